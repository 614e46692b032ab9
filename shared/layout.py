"""Names preimg and DFOS agree on, spelled once.

* The calibration directory of an instrument, ``$DFO_CAL_DIR/<INSTR>/``, holds
  the static calibrations in ``2099-99-99/`` (DFOS's "valid forever" date
  directory) and the general files (catalogues, gain tables) in ``gen/``.
* A FITS file is recognised by its name: ``.fits``, ``.fit`` or the tile-
  compressed ``.fits.fz`` (any case).
* An instrument name as ESO writes it in INSTRUME and in routing keys:
  upper case, a letter first, at most 16 characters.
"""

from __future__ import annotations

import os

#: Static calibrations of an instrument (DFOS: dated "forever").
DATED_CAL_DIR = "2099-99-99"
#: General calibration files (catalogues, gain tables).
GEN_CAL_DIR = "gen"
#: Both, in the order the association reads them.
CAL_SUBDIRS = (DATED_CAL_DIR, GEN_CAL_DIR)

#: File name endings of FITS files (compared in lower case).
FITS_SUFFIXES = (".fits", ".fit", ".fits.fz")
#: The same as glob patterns, for listings.
FITS_GLOBS = tuple(f"*{suffix}" for suffix in FITS_SUFFIXES)

#: An instrument name (INSTRUME, profile names, routing-key words).
INSTRUMENT_PATTERN = r"^[A-Z][A-Z0-9_]{1,15}$"


def is_fits_name(name: str) -> bool:
    """True for a file name with a FITS ending (:data:`FITS_SUFFIXES`)."""
    return name.lower().endswith(FITS_SUFFIXES)


def path_inside(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> str | None:
    """``path`` relative to ``directory`` (POSIX, "." for the directory itself), None when outside it.

    Both are taken as written: made absolute and normalised, no symlink looked up
    (``Path.is_relative_to`` / ``relative_to`` on the normalised paths, without the Path objects).
    """
    where = os.path.normpath(os.path.abspath(path))
    base = os.path.normpath(os.path.abspath(directory))
    if where == base:
        return "."
    top = base if base.endswith("/") else base + "/"
    return where[len(top):] if where.startswith(top) else None

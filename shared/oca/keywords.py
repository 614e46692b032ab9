"""Map OCA's dotted keyword names to FITS header keywords and back.

OCA writes ESO hierarchical keywords dotted: ``DPR.CATG`` is the FITS card
``HIERARCH ESO DPR CATG`` (astropy key ``ESO DPR CATG``). A name without a dot
is a standard keyword and stays as it is (``MJD-OBS``, ``INSTRUME``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: Keywords the engine itself reads besides those in the rules: time matching,
#: templates, AB fields and names.
ENGINE_KEYWORDS = (
    "MJD-OBS", "DATE-OBS", "EXPTIME", "INSTRUME", "ARCFILE", "ORIGFILE",
    "TPL.START", "TPL.EXPNO", "TPL.NEXP", "OBS.START", "OBS.ID", "OBS.PROG.ID", "OBS.NAME",
    "DPR.CATG", "DPR.TYPE", "DPR.TECH", "PRO.CATG",
)

#: Names the organisation step gives meaning to; they are never header keywords.
SIGNAL_KEYWORDS = frozenset(["SIG.FRAME", "SIG.TEMPLATE"])


def header_key(dotted: str) -> str:
    """The astropy header key of a dotted OCA name (``DPR.CATG`` → ``ESO DPR CATG``)."""
    if "." in dotted:
        return "ESO " + dotted.replace(".", " ")
    return dotted


def fits_card_name(dotted: str) -> str:
    """The keyword as written on the FITS card (``DPR.CATG`` → ``HIERARCH ESO DPR CATG``)."""
    if "." in dotted:
        return "HIERARCH ESO " + dotted.replace(".", " ")
    return dotted


def dotted_name(key: str) -> str:
    """The OCA name of a FITS/astropy key (``HIERARCH ESO DPR CATG`` → ``DPR.CATG``)."""
    key = key.strip()
    if key.upper().startswith("HIERARCH "):
        key = key[9:].strip()
    if key.startswith("ESO "):
        return ".".join(key[4:].split())
    return key


def to_dotted(header: Mapping[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """A header mapping (astropy ``Header``, dict keyed by FITS keys or dotted names)
    as a dict keyed by dotted OCA names. Blank and COMMENT/HISTORY cards are skipped.

    ``names`` is an optional memo of key → dotted name, shared across many headers.
    """
    names = {} if names is None else names
    out: dict[str, Any] = {}
    for key, value in header.items():
        name = names.get(key)
        if name is None:
            if not key or key in ("COMMENT", "HISTORY"):
                continue
            name = key if ("." in key and " " not in key) else dotted_name(key)
            names[key] = name
        if name not in out:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """astropy's Undefined (a keyword with no value) becomes None."""
    if value is None or type(value) in (str, float, int, bool):
        return value
    return None if type(value).__name__ == "Undefined" else value


def header_keys(dotted_names: Iterable[str]) -> list[str]:
    """astropy keys for the given dotted names, without the SIG.* pseudo-keywords."""
    return [header_key(n) for n in sorted(set(dotted_names)) if n not in SIGNAL_KEYWORDS]

"""Which raw frames ``preimg synth`` makes for an instrument, and at which sizes the recipes take them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from synth import fors2, hawki, vimos
from synth.common import DEFAULT_START
from synth.hawki import (
    HAWKI_CHIP,
    HAWKI_DEFAULT_SIZE,
    HAWKI_MIN_BACKGROUND_CELLS,
    HAWKI_MIN_DEFAULT_SIZE,
    HAWKI_MIN_SIZE,
)
from synth.vimos import VIMOS_NX, VIMOS_NY


def check_size(instrument: str, size: int | None) -> int | None:
    """The window size to synthesise, or a ValueError saying why the recipes cannot take ``size``.

    Parameters
    ----------
    instrument : str
    size : int or None
        HAWK-I pixels per chip (None: :data:`HAWKI_DEFAULT_SIZE`). VIMOS and
        FORS2 frames always have their real size: only None is accepted.

    Returns
    -------
    int or None
        The HAWK-I window size; None for the other instruments.

    Raises
    ------
    ValueError
        The reason, naming the limit and where it comes from.
    """
    instrument = instrument.upper()
    if instrument == "HAWKI":
        if size is None:
            return HAWKI_DEFAULT_SIZE
        if size > HAWKI_CHIP:
            raise ValueError(f"--size {size}: a HAWK-I chip has {HAWKI_CHIP}x{HAWKI_CHIP} pixels and the "
                             f"synthetic frames are windows of it (--size {HAWKI_MIN_SIZE} to {HAWKI_CHIP})")
        if size < HAWKI_MIN_SIZE:
            raise ValueError(f"--size {size}: below {HAWKI_MIN_SIZE}x{HAWKI_MIN_SIZE} pixels per chip "
                             "hawki_science_process cannot fit the WCS (40 px: 2.2 arcsec rms, 32 px: too few "
                             f"standards) (--size {HAWKI_MIN_SIZE} to {HAWKI_CHIP})")
        return size
    if size is not None:
        if instrument == "VIMOS":
            raise ValueError(f"--size is for HAWKI: VIMOS frames are always the full {VIMOS_NX}x{VIMOS_NY} "
                             "quadrants, whose pre/overscan geometry the vimos_ima_* recipes hard-code "
                             "(smaller frames crash vimos_ima_bias)")
        raise ValueError(f"--size is for HAWKI: {instrument} frames always have the detector's real size")
    return None


def synthetic_recipe_options(instrument: str, size: int | None = None) -> dict[str, tuple[str, ...]]:
    """Recipe options the synthetic data of this size need beyond the pipeline's defaults.

    Empty from 512² per chip up (and for VIMOS). Below, ``hawki_science_process``
    gets background cells small enough for :data:`~synth.hawki.HAWKI_MIN_BACKGROUND_CELLS`
    per window side: with fewer it filters its background grid beyond the grid's
    ends, reads heap garbage and gives results that depend on where it runs
    (128² with the default 128-px cells). These go into the profile overlay
    beside the calibration set, never into the shipped profile.
    """
    size = check_size(instrument, size)
    if instrument.upper() == "HAWKI" and size is not None and size < HAWKI_MIN_DEFAULT_SIZE:
        n = size // HAWKI_MIN_BACKGROUND_CELLS
        return {"hawki_science_process": (f"--psm_nbsize={n}", f"--stk_cat_nbsize={n}")}
    return {}



def make_raw_frames(instrument: str, out_dir: Path, *, n_frames: int | None = None,
                    size: int | None = None, start: datetime = DEFAULT_START) -> list[Path]:
    """Write synthetic pre-imaging raw frames of ``instrument`` into ``out_dir``.

    Parameters
    ----------
    instrument : str
        HAWKI, VIMOS or FORS2.
    out_dir : Path
        Created if needed.
    n_frames : int, optional
        Exposures (VIMOS: 4 files each; FORS2: 2 files each). Defaults:
        HAWKI 3, VIMOS 1, FORS2 2.
    size : int, optional
        HAWK-I window size per chip (pixels, default 128); must match the
        calibration set. Not for VIMOS and FORS2 (:func:`check_size`).
    start : datetime
        Time of the first exposure (archive names derive from it).

    Returns
    -------
    list of Path

    Raises
    ------
    ValueError
        Unknown instrument, or a size the recipes cannot take (the reason is given).
    """
    instrument = instrument.upper()
    if instrument not in ("HAWKI", "VIMOS", "FORS2"):
        raise ValueError(f"no synthetic data for instrument {instrument!r} (HAWKI, VIMOS, FORS2)")
    size = check_size(instrument, size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if instrument == "HAWKI":
        assert size is not None
        return hawki.make_science(out_dir, n_frames=n_frames or 3, size=size, start=start)
    if instrument == "VIMOS":
        return vimos.make_science(out_dir, n_frames=n_frames or 1, start=start)
    return fors2.make_science(out_dir, n_frames=n_frames or 2, start=start)

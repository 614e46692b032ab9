"""Header summaries of raw frames and their OCA classification, as ingest records them.

The summary carries the keywords the reports and the monitor show (the full
header stays in the file). Keys are written the OCA way: ``DPR.CATG`` for
``HIERARCH ESO DPR CATG``; standard keywords stay plain.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astropy.io import fits

SUMMARY_KEYS = (
    "INSTRUME", "OBJECT", "DATE-OBS", "MJD-OBS", "EXPTIME", "RA", "DEC", "ARCFILE", "PI-COI",
    "DPR.CATG", "DPR.TYPE", "DPR.TECH", "OBS.ID", "OBS.NAME", "OBS.PROG.ID", "OBS.START",
    "TPL.ID", "TPL.START", "TPL.EXPNO", "TPL.NEXP", "INS.FILT1.NAME", "INS.FILT2.NAME",
    "DET.DIT", "DET.NDIT", "DET.CHIP1.ID", "TEL.AIRM.START",
)


def fits_keyword(dotted: str) -> str:
    """``DPR.CATG`` -> ``HIERARCH ESO DPR CATG``; ``MJD-OBS`` stays ``MJD-OBS``."""
    return f"HIERARCH ESO {dotted.replace('.', ' ')}" if "." in dotted else dotted


def read_summary(path: Path, keys: tuple[str, ...] = SUMMARY_KEYS) -> dict[str, Any]:
    """The summary keywords present in the primary header of ``path``."""
    try:
        header = fits.getheader(path, 0)
    except Exception as e:  # astropy raises OSError, ValueError, ... for corrupt files
        raise ValueError(f"{path.name}: not a readable FITS file ({e})") from e
    out: dict[str, Any] = {}
    for key in keys:
        value = header.get(fits_keyword(key))
        if value is not None:
            out[key] = value
    return out


def classify_by_dpr(headers: Mapping[str, Any]) -> dict[str, str]:
    """Classification for an instrument without rule file: its DPR keys, as DFOS's RAW_TYPE."""
    parts = [str(headers.get(k, "")).strip() for k in ("DPR.CATG", "DPR.TYPE", "DPR.TECH")]
    return {"RAW.TYPE": "_".join(p for p in parts if p)} if any(parts) else {}


def classifier_for_instrument(instrument: str):
    """The instrument's OCA classification as a function of a header mapping."""
    return classify_by_dpr

"""Synthetic pre-imaging data: raw frames and the static calibration set.

What is made, and why it looks the way it does, follows the measurements in
``shared/design/ESOREX.md``:

* **Raw science frames** (``DPR.CATG=SCIENCE``, ``DPR.TYPE=OBJECT``,
  ``DPR.TECH=IMAGE,PRE``) named like ESO archive files
  (``HAWKI.2026-11-20T01:02:03.456.fits``), with every keyword the recipes
  read (§3.5, §4.6) and every keyword the OCA rules classify, group and
  associate on (``hawki.oca`` / ``vimos.oca``).

  - HAWK-I: PHU without data + 4 IMAGE extensions, each the lower-left
    ``size``² window of a 2048² chip with the hard-coded chip geometry of
    ``hawki_wcsfit_multi`` (§3.1). 128² by default; 64² to 2048² (the whole
    chip) are accepted (:func:`check_size`). From 116² up the science recipe
    runs with its default options; smaller windows need smaller background
    cells, which go into a profile overlay beside the calibration set
    (:func:`synthetic_recipe_options`), never into the shipped profile.
  - VIMOS: one single-HDU file per quadrant, 4 per exposure, at the real raw
    size 2148×2440 (50 px pre- and overscan, §4.1), 16-bit with BZERO.
  - FORS2: two single-HDU chip files per exposure; no pipeline runs on them.

* **The calibration set** in ``<cal_root>/<INSTR>/2099-99-99`` (masters, one
  per setup and PRO.CATG) and ``<cal_root>/<INSTR>/gen`` (static tables).
  Masters are made by the real calibration recipes on synthetic raw
  calibrations, then stamped with the keywords the OCA association compares.
  The static tables are written in the formats of §3.4. A manifest
  (``synth-manifest.json``, with :data:`SYNTH_VERSION`) makes the build
  cacheable: an up-to-date set is reused. One set per ``<cal_root>/<INSTR>``:
  a set of another size replaces it, so keep sets of different sizes under
  different calibration roots.

* **The profile overlay** ``<cal_root>/<INSTR>/profile-overlay.toml``, only
  when the data need recipe options the operational profile does not have
  (``PREIMG_PROFILE_OVERLAY`` points the services at it; ``shared.profiles``).

The star field is deterministic per instrument: the raw frames and the local
catalogue are drawn from the same list, so the recipes find their standards.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from shared.profiles import RecipeCheck

_log = logging.getLogger(__name__)

#: Bump when the generated data change in a way that needs a rebuild.
SYNTH_VERSION = 1
MANIFEST_NAME = "synth-manifest.json"
DATED_DIR = "2099-99-99"
GEN_DIR = "gen"

#: Night of the synthetic deliveries unless a start time is given.
DEFAULT_START = datetime(2026, 11, 20, 1, 2, 3, 456000, tzinfo=UTC)

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)

# --- HAWK-I -------------------------------------------------------------------
HAWKI_CHIP = 2048
#: Offsets of extensions 2..4 in the frame of extension 1 (hawki_wcsfit_multi).
HAWKI_OFFSETS = ((0.0, 0.0), (2202.75, 2.52), (7.36, 2189.67), (2207.25, 2191.08))
#: Extension order of real HAWK-I files: ext 3 is the upper-left chip.
HAWKI_EXTNAMES = ("CHIP1.INT1", "CHIP2.INT1", "CHIP4.INT1", "CHIP3.INT1")
HAWKI_CHIP_NO = (1, 2, 4, 3)
#: Optical axis in the frame of extension 1, as hawki_updatewcs() sets it.
HAWKI_CRPIX = (2125.4, 2118.8)
HAWKI_SCALE_DEG = 0.106 / 3600.0
HAWKI_FIELD = (150.1163, -25.3341)  # RA, Dec (deg) of the synthetic target
#: Master flats need ≥1791² per chip: median window [768:1791] (§1, §3.3).
HAWKI_FLAT_SIZE = 1792
HAWKI_DEFAULT_SIZE = 128
#: Below 64² per chip the science recipe's WCS fit falls apart (measured with 32-px cells:
#: 48² 0.10" rms, 40² 2.2" rms, 32² too few standards for the fit).
HAWKI_MIN_SIZE = 64
#: hawki_science_process's sky and catalogue background cells (--psm_nbsize, --stk_cat_nbsize):
#: 128 px by default. The recipe dies of SIGFPE unless the window is at least 0.9 cell wide
#: (measured with 128: 116² runs, 115² does not; ESOREX.md §1: 64² runs with 65, not with 127).
HAWKI_DEFAULT_NBSIZE = 128
HAWKI_MIN_DEFAULT_SIZE = math.ceil(0.9 * HAWKI_DEFAULT_NBSIZE)  # 116
#: Cells for windows below that (64² to 115² all ran clean with 32).
HAWKI_SMALL_NBSIZE = 32
#: A full chip gets about as many stars as a high-latitude J-band field; denser synthetic
#: fields only slow the recipe down (2048²: 381 s of recipe time at ~16,000 stars per chip).
HAWKI_MAX_STARS_PER_CHIP = 600
HAWKI_GAIN = 1.7  # e-/ADU
HAWKI_RON = 5.0  # ADU
HAWKI_DARK_LEVEL = 50.0
HAWKI_ZP = 25.0  # mag giving 1 ADU/s

# --- VIMOS --------------------------------------------------------------------
VIMOS_NX, VIMOS_NY = 2148, 2440  # raw quadrant size, pre/overscan included
VIMOS_PRESCAN = 50
VIMOS_DATA_NX = 2048
#: Quadrant 1..4 -> ESO DET CHIP1 ID, the name the recipes know them by (§4.1).
VIMOS_CHIPS = ("BRIAN", "Keith", "Tom", "DAVID")
VIMOS_SCALE_DEG = 0.205 / 3600.0
VIMOS_FIELD = (53.1221, -27.8057)
#: Quadrant centres relative to the field centre (arcmin, east and north).
VIMOS_QUAD_OFFSETS = ((-4.6, 5.3), (4.6, 5.3), (4.6, -5.3), (-4.6, -5.3))
VIMOS_GAIN = 2.0
VIMOS_RON = 3.0
VIMOS_BIAS = 200.0
VIMOS_ZP = 27.0

# --- FORS2 --------------------------------------------------------------------
FORS2_CHIPS = ("CCID20-14-5-3", "CCID20-14-5-6")
FORS2_SHAPE = (1034, 2048)  # 2x2 binned raw (ny, nx)

#: Photometric systems offered in the photometric table and catalogue.
_BANDS = {
    "HAWKI": ("J", "H", "Ks", "Y", "NB1190", "NB2090", "BrG", "CH4", "H2"),
    "VIMOS": ("U", "B", "V", "R", "I", "z"),
}
#: Catalogue column used for each band (HAWK-I narrow bands use the nearest broad band).
_BAND_COLUMN = {
    "J": "J", "NB1190": "J", "Y": "J", "H": "H", "CH4": "H",
    "Ks": "K", "NB2090": "K", "BrG": "K", "H2": "K",
    "U": "U", "B": "B", "V": "V", "R": "R", "I": "I", "z": "I",
}


@dataclass(frozen=True)
class Setup:
    """One instrument setup the masters are made for (OCA association keys).

    Attributes
    ----------
    filter1, filter2 : str
        ``INS.FILT1.NAME`` / ``INS.FILT2.NAME`` (VIMOS: the filter of every quadrant).
    dit : float
        ``DET.DIT`` (HAWK-I) or ``EXPTIME`` (VIMOS) of the science frames.
    ndit : int
    ncorrs : str
        HAWK-I ``DET.NCORRS.NAME``.
    """

    filter1: str
    filter2: str = "OPEN"
    dit: float = 10.0
    ndit: int = 6
    ncorrs: str = "Double"

    @property
    def band(self) -> str:
        """The filter the photometric table is matched on (FILT2 when FILT1 is OPEN)."""
        return self.filter2 if self.filter1 == "OPEN" else self.filter1


#: The setups the default calibration set covers; the synthetic science uses the first.
DEFAULT_SETUPS: dict[str, tuple[Setup, ...]] = {
    "HAWKI": (Setup("J", "OPEN", dit=10.0, ndit=6),),
    "VIMOS": (Setup("R", "", dit=30.0, ndit=1, ncorrs=""),),
}

#: The profile overlay written beside a calibration set whose data need recipe options.
OVERLAY_NAME = "profile-overlay.toml"


@dataclass(frozen=True)
class CalibrationSet:
    """A static calibration set on disk.

    Attributes
    ----------
    instrument : str
    root : Path
        ``<cal_root>/<INSTR>``.
    files : dict
        SOF tag -> path, for every file the science recipe needs.
    built : bool
        True when this call ran the recipes, False when a cached set was reused.
    profile_overlay : Path or None
        The profile overlay with the recipe options these data need
        (``PREIMG_PROFILE_OVERLAY``), None when the shipped profile does.
    """

    instrument: str
    root: Path
    files: dict[str, Path]
    built: bool = False
    profile_overlay: Path | None = None

    @property
    def dated_dir(self) -> Path:
        return self.root / DATED_DIR

    @property
    def gen_dir(self) -> Path:
        return self.root / GEN_DIR


@dataclass(frozen=True)
class SynthResult:
    instrument: str
    raw_files: tuple[Path, ...]
    calibrations: CalibrationSet | None
    params: dict[str, Any] = field(default_factory=dict)


class SynthError(RuntimeError):
    """A calibration recipe failed while building the synthetic set."""


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

    Empty from 116² per chip up (and for VIMOS); below, smaller background
    cells for ``hawki_science_process`` (it dies of SIGFPE with its 128-px
    cells on a window less than 0.9 cell wide). These go into the profile
    overlay beside the calibration set, never into the shipped profile.
    """
    size = check_size(instrument, size)
    if instrument.upper() == "HAWKI" and size is not None and size < HAWKI_MIN_DEFAULT_SIZE:
        n = HAWKI_SMALL_NBSIZE
        return {"hawki_science_process": (f"--psm_nbsize={n}", f"--stk_cat_nbsize={n}")}
    return {}


# ==============================================================================
# small helpers
# ==============================================================================


def _mjd(t: datetime) -> float:
    return (t - _MJD_EPOCH).total_seconds() / 86400.0


def _isot(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _lst_seconds(t: datetime) -> float:
    """Approximate local sidereal time at Paranal, in seconds (LST header)."""
    d = _mjd(t) - 51544.5
    gmst_deg = (280.46061837 + 360.98564736629 * d) % 360.0
    return ((gmst_deg - 70.4045) % 360.0) / 15.0 * 3600.0


def archive_name(instrument: str, t: datetime) -> str:
    """ESO archive file name, ``<INSTR>.<YYYY-MM-DDThh:mm:ss.sss>.fits``."""
    return f"{instrument}.{_isot(t)}.fits"


def _noise(rng: np.random.Generator, signal: np.ndarray, gain: float, ron: float) -> np.ndarray:
    """Signal plus photon and read noise, in ADU (float32)."""
    sigma = np.sqrt(np.clip(signal, 0, None) / gain + ron * ron).astype(np.float32)
    return (signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)).astype(np.float32)


def _add_stars(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray,
               sigma_px: float, x0: int = 0) -> None:
    """Add Gaussian stars in place; (xs, ys) are 0-based pixel centres, x shifted by x0."""
    ny, nx = image.shape
    half = math.ceil(4 * sigma_px)
    for x, y, f in zip(xs + x0, ys, fluxes):
        ix, iy = round(float(x)), round(float(y))
        xa, xb = max(ix - half, 0), min(ix + half + 1, nx)
        ya, yb = max(iy - half, 0), min(iy + half + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        gx = np.exp(-0.5 * ((np.arange(xa, xb) - x) / sigma_px) ** 2)
        gy = np.exp(-0.5 * ((np.arange(ya, yb) - y) / sigma_px) ** 2)
        image[ya:yb, xa:xb] += (f / (2 * math.pi * sigma_px ** 2)) * np.outer(gy, gx).astype(np.float32)


def _eso(header: Any, key: str, value: Any, comment: str = "") -> None:
    header[f"HIERARCH ESO {key}"] = (value, comment) if comment else value


def _common_header(h: Any, instrument: str, telescope: str, t: datetime, exptime: float,
                   obs: dict[str, Any], dpr: tuple[str, str, str], pointing: tuple[float, float]) -> None:
    """Keywords every ESO raw frame carries (archive, OB, template, DPR)."""
    name = archive_name(instrument, t)
    h["ORIGIN"] = "ESO-PARANAL"
    h["TELESCOP"] = telescope
    h["INSTRUME"] = instrument
    h["OBJECT"] = obs["object"]
    h["RA"] = (pointing[0], "deg")
    h["DEC"] = (pointing[1], "deg")
    h["EQUINOX"] = 2000.0
    h["RADESYS"] = "ICRS"
    h["EXPTIME"] = (float(exptime), "Total integration time")
    h["MJD-OBS"] = (_mjd(t), "Obs start")
    h["DATE-OBS"] = _isot(t)
    h["UTC"] = (t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6, "UTC (s)")
    h["LST"] = (round(_lst_seconds(t), 3), "LST (s)")
    h["PI-COI"] = obs["pi"]
    h["OBSERVER"] = "UNKNOWN"
    h["ARCFILE"] = name
    h["ORIGFILE"] = f"{instrument}_{obs['template_label']}_{obs['expno']:04d}.fits"
    _eso(h, "OBS ID", obs["obs_id"])
    _eso(h, "OBS NAME", obs["obs_name"])
    _eso(h, "OBS PROG ID", obs["prog_id"])
    _eso(h, "OBS PI-COI NAME", obs["pi"])
    _eso(h, "OBS START", obs["obs_start"])
    _eso(h, "OBS TARG NAME", obs["object"])
    _eso(h, "TPL ID", obs["tpl_id"])
    _eso(h, "TPL NAME", obs["tpl_name"])
    _eso(h, "TPL START", obs["tpl_start"])
    _eso(h, "TPL NEXP", obs["nexp"])
    _eso(h, "TPL EXPNO", obs["expno"])
    _eso(h, "DPR CATG", dpr[0])
    _eso(h, "DPR TYPE", dpr[1])
    _eso(h, "DPR TECH", dpr[2])
    _eso(h, "TEL AIRM START", 1.150 + 0.002 * obs["expno"])
    _eso(h, "TEL AIRM END", 1.152 + 0.002 * obs["expno"])
    _eso(h, "TEL AMBI FWHM START", 0.72)
    _eso(h, "TEL AMBI FWHM END", 0.74)


def _obs_info(instrument: str, start: datetime, nexp: int, expno: int, kind: str) -> dict[str, Any]:
    tpl = {
        ("HAWKI", "science"): ("HAWKI_img_obs_AutoJitter", "Jitter observation", "JITTER"),
        ("HAWKI", "dark"): ("HAWKI_img_cal_Darks", "Darks", "DARK"),
        ("HAWKI", "flat"): ("HAWKI_img_cal_SkyFlats", "Twilight flats", "FLAT"),
        ("VIMOS", "science"): ("VIMOS_img_obs_Preimaging", "Pre-imaging", "PREIMG"),
        ("VIMOS", "bias"): ("VIMOS_img_cal_Bias", "Bias", "BIAS"),
        ("VIMOS", "dark"): ("VIMOS_img_cal_Dark", "Dark", "DARK"),
        ("VIMOS", "flat"): ("VIMOS_img_cal_SkyFlat", "Sky flats", "FLAT"),
        ("FORS2", "science"): ("FORS2_img_obs_crsplit", "Pre-imaging", "PREIMG"),
    }[(instrument, kind)]
    science = kind == "science"
    return {
        "object": "SYNTH-PREIMG-FIELD" if science else kind.upper(),
        "obs_id": {"HAWKI": 3141592, "VIMOS": 2718281, "FORS2": 1618033}[instrument] + (0 if science else 7),
        "obs_name": f"synth_{instrument.lower()}_{kind}",
        "prog_id": "0112.A-0123(A)" if science else "60.A-9022(C)",
        "pi": "SYNTHETIC/P.I.",
        "obs_start": _isot(start - timedelta(minutes=4)),
        "tpl_id": tpl[0],
        "tpl_name": tpl[1],
        "tpl_start": _isot(start - timedelta(seconds=30)),
        "template_label": tpl[2],
        "nexp": nexp,
        "expno": expno,
    }


def _jitter_arcsec(i: int) -> tuple[float, float]:
    """Deterministic jitter pattern (arcsec, east and north); frame 0 at the centre."""
    if i == 0:
        return 0.0, 0.0
    angle = 2.399963 * i  # golden angle: offsets do not repeat
    # ≥5": with smaller jitters the recipe's sky keeps star residuals and the
    # WCS match of the later frames goes wrong (measured: rms 0.5-1.3" at 1-3").
    radius = 5.0 + 0.5 * (i % 3)
    return radius * math.cos(angle), radius * math.sin(angle)


# ==============================================================================
# star fields (shared by the raw frames and the local catalogue)
# ==============================================================================


def _hawki_chip_header(k: int, pointing: tuple[float, float]) -> dict[str, Any]:
    """WCS of extension k (0-based) of a HAWK-I frame pointed at ``pointing``."""
    ox, oy = HAWKI_OFFSETS[k]
    return {
        "CTYPE1": "RA---ZPN", "CTYPE2": "DEC--ZPN",
        "CRPIX1": HAWKI_CRPIX[0] - ox, "CRPIX2": HAWKI_CRPIX[1] - oy,
        "CRVAL1": pointing[0], "CRVAL2": pointing[1],
        "CD1_1": -HAWKI_SCALE_DEG, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": HAWKI_SCALE_DEG,
        "PV2_1": 1.0, "PV2_3": 400.0,
        "CUNIT1": "deg", "CUNIT2": "deg",
    }


def _vimos_quad_header(q: int, pointing: tuple[float, float]) -> dict[str, Any]:
    """WCS of quadrant q (0-based), pixel coordinates of the trimmed 2048-wide frame.

    The recipes keep CRPIX unchanged when they trim the 50-px prescan
    (ESOREX.md §4.1), so CRPIX is given in trimmed coordinates.
    """
    east, north = VIMOS_QUAD_OFFSETS[q]
    xc, yc = (VIMOS_DATA_NX + 1) / 2.0, (VIMOS_NY + 1) / 2.0
    cd11, cd22 = -VIMOS_SCALE_DEG, VIMOS_SCALE_DEG
    return {
        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
        "CRPIX1": xc - (east / 60.0) / cd11, "CRPIX2": yc - (north / 60.0) / cd22,
        "CRVAL1": pointing[0], "CRVAL2": pointing[1],
        "CD1_1": cd11, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": cd22,
        "CUNIT1": "deg", "CUNIT2": "deg",
    }


def _wcs(header: dict[str, Any]) -> Any:
    from astropy.io import fits
    from astropy.wcs import WCS

    h = fits.Header()
    h["NAXIS"] = 2
    for k, v in header.items():
        h[k] = v
    return WCS(h)


def field_stars(instrument: str, size: int = HAWKI_DEFAULT_SIZE) -> dict[str, np.ndarray]:
    """The synthetic star field: ``ra``, ``dec`` (deg), ``mag`` (Vega, all bands).

    Deterministic per instrument (and, for HAWK-I, window size; VIMOS frames
    have one size). Stars are drawn where the detectors see them at the
    nominal pointing, with a margin for the jitter.
    """
    instrument = instrument.upper()
    if instrument != "HAWKI":
        size = HAWKI_DEFAULT_SIZE  # the seed the VIMOS field has always had
    rng = np.random.default_rng({"HAWKI": 11, "VIMOS": 22}[instrument] * 1000 + size)
    ras, decs, mags = [], [], []
    if instrument == "HAWKI":
        margin = 70.0  # covers the jitter
        # Dense enough for the WCS fit of a small window, capped so that a full chip holds
        # about as many stars as a real high-latitude J-band field (object detection and
        # matching time grow with the number of stars).
        n = min(max(12, int(0.0035 * (size + 2 * margin) ** 2)), HAWKI_MAX_STARS_PER_CHIP)
        for k in range(4):
            w = _wcs(_hawki_chip_header(k, HAWKI_FIELD))
            x = rng.uniform(-margin, size + margin, n)
            y = rng.uniform(-margin, size + margin, n)
            ra, dec = w.wcs_pix2world(x + 1, y + 1, 1)
            ras.append(ra)
            decs.append(dec)
            mags.append(rng.uniform(16.5, 20.5, n))
    elif instrument == "VIMOS":
        n = 260
        for q in range(4):
            w = _wcs(_vimos_quad_header(q, VIMOS_FIELD))
            x = rng.uniform(-20, VIMOS_DATA_NX + 20, n)
            y = rng.uniform(-20, VIMOS_NY + 20, n)
            ra, dec = w.wcs_pix2world(x + 1, y + 1, 1)
            ras.append(ra)
            decs.append(dec)
            mags.append(rng.uniform(17.0, 22.0, n))
    else:
        raise ValueError(f"no star field for {instrument}")
    return {"ra": np.concatenate(ras), "dec": np.concatenate(decs), "mag": np.concatenate(mags)}


def _stars_on(header: dict[str, Any], stars: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of the stars in the frame described by ``header``."""
    x, y = _wcs(header).wcs_world2pix(stars["ra"], stars["dec"], 0)
    return x, y


def _offset_pointing(center: tuple[float, float], east_arcsec: float, north_arcsec: float) -> tuple[float, float]:
    dec = center[1] + north_arcsec / 3600.0
    ra = center[0] + east_arcsec / 3600.0 / math.cos(math.radians(center[1]))
    return ra, dec


# ==============================================================================
# raw frames
# ==============================================================================


def _hawki_flat_pattern(n: int) -> np.ndarray:
    """A smooth, mild illumination pattern (≈±3 %) on an n×n window of a chip."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / HAWKI_CHIP
    return (1.0 + 0.03 * (xx - 0.5) - 0.02 * (yy - 0.5) + 0.01 * np.sin(6 * xx)).astype(np.float32)


def _write_hawki(path: Path, t: datetime, obs: dict[str, Any], dpr: tuple[str, str, str],
                 setup: Setup, dit: float, ndit: int, images: Sequence[np.ndarray],
                 pointing: tuple[float, float], jitter: tuple[float, float] = (0.0, 0.0)) -> Path:
    from astropy.io import fits

    phu = fits.PrimaryHDU()
    h = phu.header
    _common_header(h, "HAWKI", "ESO-VLT-U4", t, dit * ndit, obs, dpr, pointing)
    _eso(h, "DET DIT", float(dit), "Integration time")
    _eso(h, "DET NDIT", int(ndit), "# of sub-integrations")
    _eso(h, "DET NDSAMPLES", 2)
    _eso(h, "DET NCORRS NAME", setup.ncorrs)
    _eso(h, "DET READ CURNAME", setup.ncorrs)
    _eso(h, "INS FILT1 NAME", setup.filter1)
    _eso(h, "INS FILT2 NAME", setup.filter2)
    _eso(h, "SEQ CUMOFFSETX", round(-jitter[0] / 0.106, 2))
    _eso(h, "SEQ CUMOFFSETY", round(jitter[1] / 0.106, 2))
    _eso(h, "SEQ CUMOFFSETA", round(jitter[0], 3))
    _eso(h, "SEQ CUMOFFSETD", round(jitter[1], 3))
    hdus: list[Any] = [phu]
    for k, data in enumerate(images):
        ext = fits.ImageHDU(data.astype(np.float32), name=HAWKI_EXTNAMES[k])
        eh = ext.header
        for key, value in _hawki_chip_header(k, pointing).items():
            eh[key] = value
        _eso(eh, "DET CHIP NO", HAWKI_CHIP_NO[k])
        _eso(eh, "DET CHIP NAME", f"HAWAII-2RG-{HAWKI_CHIP_NO[k]}")
        _eso(eh, "DET CHIP LIVE", True)
        hdus.append(ext)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def make_hawki_science(out_dir: Path, *, n_frames: int = 3, size: int = HAWKI_DEFAULT_SIZE,
                       setup: Setup | None = None, start: datetime = DEFAULT_START,
                       seed: int = 1) -> list[Path]:
    """HAWK-I pre-imaging OBJECT frames (one jitter template)."""
    setup = setup or DEFAULT_SETUPS["HAWKI"][0]
    rng = np.random.default_rng(seed)
    stars = field_stars("HAWKI", size)
    pattern = _hawki_flat_pattern(size)
    sigma_px = 0.65 / 2.3548 / 0.106
    sky = 1200.0
    files = []
    for i in range(n_frames):
        t = start + timedelta(seconds=i * (setup.dit * setup.ndit + 12.0))
        jitter = _jitter_arcsec(i)
        pointing = _offset_pointing(HAWKI_FIELD, *jitter)
        obs = _obs_info("HAWKI", start, n_frames, i + 1, "science")
        images = []
        # The recipe takes the exposure time as DIT x NDIT (the frame is the sum of the reads).
        fluxes = 10 ** (-0.4 * (stars["mag"] - HAWKI_ZP)) * setup.dit * setup.ndit
        for k in range(4):
            light = np.full((size, size), sky, dtype=np.float32)
            x, y = _stars_on(_hawki_chip_header(k, pointing), stars)
            _add_stars(light, x, y, fluxes, sigma_px)
            signal = light * pattern + HAWKI_DARK_LEVEL
            images.append(_noise(rng, signal, HAWKI_GAIN, HAWKI_RON * math.sqrt(setup.ndit)))
        path = out_dir / archive_name("HAWKI", t)
        _write_hawki(path, t, obs, ("SCIENCE", "OBJECT", "IMAGE,PRE"), setup, setup.dit, setup.ndit,
                     images, pointing, jitter)
        files.append(path)
    return files


def _make_hawki_darks(out_dir: Path, *, n: int, size: int, dit: float, ndit: int, setup: Setup,
                      start: datetime, rng: np.random.Generator) -> list[Path]:
    files = []
    for i in range(n):
        t = start + timedelta(seconds=i * (dit * ndit + 5))
        obs = _obs_info("HAWKI", start, n, i + 1, "dark")
        level = np.full((size, size), HAWKI_DARK_LEVEL + 0.05 * dit, dtype=np.float32)
        images = [_noise(rng, level, HAWKI_GAIN, HAWKI_RON) for _ in range(4)]
        files.append(_write_hawki(out_dir / f"hawki_dark_{size}_dit{dit:g}_{i + 1:02d}.fits", t, obs,
                                  ("CALIB", "DARK", "IMAGE"), setup, dit, ndit, images, HAWKI_FIELD))
    return files


def _make_hawki_flats(out_dir: Path, *, n: int, size: int, dit: float, setup: Setup,
                      start: datetime, rng: np.random.Generator) -> list[Path]:
    pattern = _hawki_flat_pattern(size)
    files = []
    for i in range(n):
        t = start + timedelta(seconds=i * 30)
        obs = _obs_info("HAWKI", start, n, i + 1, "flat")
        level = 18000.0 - 4000.0 * i  # twilight fades; all within lthr..hthr (4000..30000)
        images = [_noise(rng, level * pattern + HAWKI_DARK_LEVEL, HAWKI_GAIN, HAWKI_RON) for _ in range(4)]
        files.append(_write_hawki(out_dir / f"hawki_flat_{i + 1:02d}.fits", t, obs,
                                  ("CALIB", "FLAT,TWILIGHT", "IMAGE"), setup, dit, 1, images, HAWKI_FIELD))
    return files


def _vimos_header(h: Any, q: int, t: datetime, exptime: float, obs: dict[str, Any],
                  dpr: tuple[str, str, str], setup: Setup, pointing: tuple[float, float]) -> None:
    _common_header(h, "VIMOS", "ESO-VLT-U3", t, exptime, obs, dpr, pointing)
    _eso(h, "OCS CON QUAD", q + 1, "Quadrant")
    _eso(h, "DET NAME", "VIMOS")
    _eso(h, "DET CHIP1 ID", VIMOS_CHIPS[q], "Detector chip identification")
    _eso(h, "DET CHIP1 NAME", f"CCD-{VIMOS_CHIPS[q]}")
    _eso(h, "DET CHIP1 PSZX", 15.0)
    _eso(h, "DET CHIP1 PSZY", 15.0)
    _eso(h, "DET READ MODE", "normal")
    _eso(h, "DET READ SPEED", "225kHz")
    _eso(h, "DET READ CLOCK", "225kHz,1port,low_gain")
    _eso(h, "DET WIN1 NX", VIMOS_DATA_NX)
    _eso(h, "DET WIN1 NY", VIMOS_NY)
    _eso(h, "DET WIN1 BINX", 1)
    _eso(h, "DET WIN1 BINY", 1)
    _eso(h, "DET OUTPUTS", 1)
    _eso(h, "DET OUT1 X", 1)
    _eso(h, "DET OUT1 Y", 1)
    _eso(h, "DET OUT1 NX", VIMOS_DATA_NX)
    _eso(h, "DET OUT1 NY", VIMOS_NY)
    _eso(h, "DET OUT1 PRSCX", VIMOS_PRESCAN)
    _eso(h, "DET OUT1 PRSCY", 0)
    _eso(h, "DET OUT1 OVSCX", VIMOS_NX - VIMOS_PRESCAN - VIMOS_DATA_NX)
    _eso(h, "DET OUT1 OVSCY", 0)
    _eso(h, "DET OUT1 GAIN", 1.0 / VIMOS_GAIN)
    _eso(h, "DET OUT1 CONAD", VIMOS_GAIN)
    _eso(h, "DET OUT1 RON", VIMOS_RON * VIMOS_GAIN)
    # Each quadrant has its own filter wheel: quadrant q carries INS.FILTq.* only.
    if setup.filter1:
        _eso(h, f"INS FILT{q + 1} NAME", setup.filter1)
        _eso(h, f"INS FILT{q + 1} ID", f"{setup.filter1}_{q + 1}")


def _write_vimos(path: Path, data: np.ndarray, header_fn: Any) -> Path:
    from astropy.io import fits

    # Raw VIMOS frames are 16-bit unsigned: BITPIX 16 + BZERO 32768 (astropy's uint mode).
    hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
    header_fn(hdu.header)
    hdu.writeto(path, overwrite=True)
    return path


def _vimos_illumination() -> np.ndarray:
    """Light falls on the 2048 data columns only, never on pre/overscan (§4.1)."""
    light = np.zeros((VIMOS_NY, VIMOS_NX), dtype=np.float32)
    yy, xx = np.mgrid[0:VIMOS_NY, 0:VIMOS_DATA_NX].astype(np.float32)
    light[:, VIMOS_PRESCAN:VIMOS_PRESCAN + VIMOS_DATA_NX] = (
        1.0 + 0.04 * (xx / VIMOS_DATA_NX - 0.5) + 0.03 * (yy / VIMOS_NY - 0.5)
    )
    return light


def make_vimos_science(out_dir: Path, *, n_frames: int = 1, setup: Setup | None = None,
                       start: datetime = DEFAULT_START, seed: int = 2) -> list[Path]:
    """VIMOS pre-imaging exposures: 4 quadrant files each (so 4 × n_frames files)."""
    setup = setup or DEFAULT_SETUPS["VIMOS"][0]
    rng = np.random.default_rng(seed)
    stars = field_stars("VIMOS")
    illum = _vimos_illumination()
    sigma_px = 0.75 / 2.3548 / 0.205
    sky = 320.0
    fluxes = 10 ** (-0.4 * (stars["mag"] - VIMOS_ZP)) * setup.dit
    files = []
    for i in range(n_frames):
        jitter = _jitter_arcsec(i)
        pointing = _offset_pointing(VIMOS_FIELD, *(3 * j for j in jitter))
        obs = _obs_info("VIMOS", start, n_frames, i + 1, "science")
        t0 = start + timedelta(seconds=i * (setup.dit + 40.0))
        for q in range(4):
            t = t0 + timedelta(milliseconds=7 * q)  # quadrant files get distinct archive names
            wcs = _vimos_quad_header(q, pointing)
            light = np.zeros((VIMOS_NY, VIMOS_NX), dtype=np.float32)
            light[:, VIMOS_PRESCAN:VIMOS_PRESCAN + VIMOS_DATA_NX] = sky
            x, y = _stars_on(wcs, stars)
            _add_stars(light, x, y, fluxes, sigma_px, x0=VIMOS_PRESCAN)
            data = _noise(rng, light * np.where(illum > 0, illum, 1) + VIMOS_BIAS, VIMOS_GAIN, VIMOS_RON)

            def header(h: Any, q: int = q, t: datetime = t, wcs: dict[str, Any] = wcs,
                       obs: dict[str, Any] = obs, pointing: tuple[float, float] = pointing) -> None:
                _vimos_header(h, q, t, setup.dit, obs, ("SCIENCE", "OBJECT", "IMAGE,PRE"), setup, pointing)
                for key, value in wcs.items():
                    h[key] = value

            files.append(_write_vimos(out_dir / archive_name("VIMOS", t), data, header))
    return files


def _make_vimos_calib(out_dir: Path, kind: str, *, n: int, setup: Setup, start: datetime,
                      rng: np.random.Generator) -> list[Path]:
    illum = _vimos_illumination() if kind == "flat" else None
    dpr = {"bias": ("CALIB", "BIAS", "IMAGE"), "dark": ("CALIB", "DARK", "IMAGE"),
           "flat": ("CALIB", "FLAT,SKY", "IMAGE")}[kind]
    exptime = {"bias": 0.0, "dark": 600.0, "flat": 5.0}[kind]
    files = []
    for i in range(n):
        obs = _obs_info("VIMOS", start, n, i + 1, kind)
        for q in range(4):
            t = start + timedelta(seconds=i * 60, milliseconds=7 * q)
            signal = np.full((VIMOS_NY, VIMOS_NX), VIMOS_BIAS, dtype=np.float32)
            if kind == "dark":
                signal[:, VIMOS_PRESCAN:VIMOS_PRESCAN + VIMOS_DATA_NX] += 1.5
            elif kind == "flat":
                signal += (20000.0 - 4000.0 * i) * illum
            data = _noise(rng, signal, VIMOS_GAIN, VIMOS_RON)

            def header(h: Any, q: int = q, t: datetime = t, obs: dict[str, Any] = obs) -> None:
                _vimos_header(h, q, t, exptime, obs, dpr, setup, VIMOS_FIELD)

            files.append(_write_vimos(out_dir / f"vimos_{kind}_{i + 1:02d}_q{q + 1}.fits", data, header))
    return files


def make_fors2_science(out_dir: Path, *, n_frames: int = 2, start: datetime = DEFAULT_START,
                       seed: int = 3) -> list[Path]:
    """FORS2 pre-imaging frames: two chip files per exposure. No pipeline reads them."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    files = []
    for i in range(n_frames):
        obs = _obs_info("FORS2", start, n_frames, i + 1, "science")
        for c, chip in enumerate(FORS2_CHIPS):
            t = start + timedelta(seconds=i * 100, milliseconds=11 * c)
            signal = np.full(FORS2_SHAPE, 210.0 + 400.0, dtype=np.float32)
            data = _noise(rng, signal, 1.25, 3.2)
            hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
            h = hdu.header
            _common_header(h, "FORS2", "ESO-VLT-U1", t, 60.0, obs, ("SCIENCE", "OBJECT", "IMAGE,PRE"),
                           (10.6848, -9.3032))
            _eso(h, "DET CHIP1 ID", chip)
            _eso(h, "DET CHIPS", 2)
            _eso(h, "DET READ CLOCK", "200Kps/2ports/low_gain")
            _eso(h, "DET READ SPEED", "normal")
            _eso(h, "DET READ MODE", "normal")
            _eso(h, "DET WIN1 BINX", 2)
            _eso(h, "DET WIN1 BINY", 2)
            _eso(h, "DET WIN1 NX", FORS2_SHAPE[1])
            _eso(h, "DET WIN1 NY", FORS2_SHAPE[0])
            _eso(h, "DET OUT1 PRSCX", 16)
            _eso(h, "DET OUT1 OVSCX", 16)
            _eso(h, "INS FILT1 NAME", "R_SPECIAL")
            _eso(h, "INS FILT1 ID", "R+76")
            _eso(h, "INS COLL NAME", "COLL_SR")
            _eso(h, "INS MODE", "IMG")
            _eso(h, "OCS CON QUAD", 1)
            path = out_dir / archive_name("FORS2", t)
            hdu.writeto(path, overwrite=True)
            files.append(path)
    return files


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
        return make_hawki_science(out_dir, n_frames=n_frames or 3, size=size, start=start)
    if instrument == "VIMOS":
        return make_vimos_science(out_dir, n_frames=n_frames or 1, start=start)
    return make_fors2_science(out_dir, n_frames=n_frames or 2, start=start)


# ==============================================================================
# static tables (gen/)
# ==============================================================================


def _product_phu(instrument: str, pro_catg: str) -> Any:
    from astropy.io import fits

    phu = fits.PrimaryHDU()
    phu.header["INSTRUME"] = instrument
    phu.header["DATE"] = "2099-01-01T00:00:00"
    _eso(phu.header, "PRO CATG", pro_catg)
    _eso(phu.header, "PRO TYPE", "STATIC")
    return phu


def write_readgain(path: Path, instrument: str) -> Path:
    """MASTER_READGAIN: ext 1 with EXTNAME, READNOISE, GAIN per detector (§3.4)."""
    from astropy.io import fits

    if instrument == "HAWKI":
        names, ron, gain = list(HAWKI_EXTNAMES), HAWKI_RON, HAWKI_GAIN
    else:
        names, ron, gain = list(VIMOS_CHIPS), VIMOS_RON, VIMOS_GAIN
    cols = [
        fits.Column("EXTNAME", "16A", array=np.array(names)),
        fits.Column("READNOISE", "E", array=np.full(len(names), ron, np.float32)),
        fits.Column("GAIN", "E", array=np.full(len(names), gain, np.float32)),
    ]
    fits.HDUList([_product_phu(instrument, "MASTER_READGAIN"), fits.BinTableHDU.from_columns(cols)]).writeto(
        path, overwrite=True)
    return path


def write_local_catalogue(path: Path, instrument: str, pro_catg: str, size: int) -> Path:
    """Local standards catalogue (ASTROM or PHOTOM): ext ``LOCALCAT`` with RA, Dec, <band>mag(_err)."""
    from astropy.io import fits

    stars = field_stars(instrument, size)
    phu = _product_phu(instrument, pro_catg)
    # Any CATNAME but casu_2mass/casu_ppmxl/casu_apass (those switch to index-file mode).
    phu.header["CATNAME"] = "localcat"
    cols = [fits.Column("RA", "D", unit="deg", array=stars["ra"]),
            fits.Column("Dec", "D", unit="deg", array=stars["dec"])]
    for band in sorted({_BAND_COLUMN[b] for b in _BANDS[instrument]}):
        cols.append(fits.Column(f"{band}mag", "E", array=stars["mag"].astype(np.float32)))
        cols.append(fits.Column(f"{band}mag_err", "E", array=np.full(len(stars["mag"]), 0.02, np.float32)))
    table = fits.BinTableHDU.from_columns(cols, name="LOCALCAT")
    fits.HDUList([phu, table]).writeto(path, overwrite=True)
    return path


def write_photcal(path: Path, instrument: str) -> Path:
    """PHOTCAL_TAB: extension named like the catalogue's (LOCALCAT), PHOTOSYS, one row per filter."""
    from astropy.io import fits

    bands = _BANDS[instrument]
    zp = HAWKI_ZP if instrument == "HAWKI" else VIMOS_ZP
    n = len(bands)
    cols = [
        fits.Column("filter_name", "16A", array=np.array(bands)),
        fits.Column("atm_extcoef", "E", array=np.full(n, 0.05 if instrument == "HAWKI" else 0.11, np.float32)),
        fits.Column("mag_offset", "E", array=np.zeros(n, np.float32)),
        fits.Column("coleq_columns", "16A", array=np.array([f"{_BAND_COLUMN[b]}mag" for b in bands])),
        fits.Column("coleq_errcols", "16A", array=np.array([f"{_BAND_COLUMN[b]}mag_err" for b in bands])),
        fits.Column("coleq_coefs", "16A", array=np.array(["1.0"] * n)),
        fits.Column("gal_extcoef", "E", array=np.full(n, 0.9, np.float32)),
        fits.Column("default_zp", "E", array=np.full(n, zp, np.float32)),
        fits.Column("default_zp_err", "E", array=np.full(n, 0.05, np.float32)),
    ]
    ext = fits.BinTableHDU.from_columns(cols, name="LOCALCAT")
    ext.header["PHOTOSYS"] = "VEGA"
    fits.HDUList([_product_phu(instrument, "PHOTCAL_TAB"), ext]).writeto(path, overwrite=True)
    return path


def write_schlegel(path: Path, instrument: str, pro_catg: str) -> Path:
    """SCHLEGEL_MAP_NORTH/SOUTH: a constant E(B-V)=0.02 image in the primary HDU."""
    from astropy.io import fits

    phu = _product_phu(instrument, pro_catg)
    hdu = fits.PrimaryHDU(np.full((16, 16), 0.02, np.float32), header=phu.header)
    hdu.writeto(path, overwrite=True)
    return path


# ==============================================================================
# masters (2099-99-99/): real recipes on synthetic raw calibrations
# ==============================================================================


#: What the calibration recipes must write. Only synth runs them (the services process SCIENCE
#: ABs), so their checks live here rather than in the instrument profiles.
CALIBRATION_CHECKS: dict[str, RecipeCheck] = {
    "hawki_dark_combine": RecipeCheck(expected_products=frozenset({"MASTER_DARK"})),
    "hawki_twilight_flat_combine": RecipeCheck(
        expected_products=frozenset({"MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_BPM"})),
    "vimos_ima_bias": RecipeCheck(expected_products=frozenset({"MASTER_BIAS"})),
    "vimos_ima_dark": RecipeCheck(expected_products=frozenset({"MASTER_DARK"})),
    "vimos_ima_twilight_flat": RecipeCheck(
        expected_products=frozenset({"MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_BPM"})),
}


def _run(recipe: str, sof: list[tuple[Path, str]], workdir: Path, recipe_dir: Path | None) -> dict[str, Path]:
    from services.processor import esorex

    result = esorex.run_recipe(recipe, sof, workdir, recipe_dir=recipe_dir, timeout_s=600,
                               check=CALIBRATION_CHECKS[recipe])
    if not result.ok:
        raise SynthError(f"building synthetic calibrations: {result.reason} (log: {result.log_path})")
    return {p.pro_catg: p.path for p in result.products}


def _stamp(path: Path, keys: dict[str, Any]) -> None:
    """Set the keywords the OCA association compares (``inputFile.X == X``) on a master."""
    from astropy.io import fits

    with fits.open(path, mode="update") as hdul:
        for key, value in keys.items():
            if key in ("INSTRUME",):
                hdul[0].header[key] = value
            else:
                _eso(hdul[0].header, key, value)


def _crop_to(src: Path, dst: Path, size: int) -> Path:
    """Copy a HAWK-I master cropped to the lower-left size² of each chip (the science window)."""
    from astropy.io import fits

    with fits.open(src) as hdul:
        out = [fits.PrimaryHDU(header=hdul[0].header)]
        for ext in hdul[1:]:
            out.append(fits.ImageHDU(np.ascontiguousarray(ext.data[:size, :size]), header=ext.header))
        fits.HDUList(out).writeto(dst, overwrite=True)
    return dst


def _setup_label(setup: Setup) -> str:
    return "_".join(x for x in (setup.filter1, setup.filter2) if x and x != "OPEN") or "OPEN"


def _build_hawki(root: Path, work: Path, size: int, setups: Sequence[Setup],
                 recipe_dir: Path | None) -> dict[str, Path]:
    rng = np.random.default_rng(101)
    dated = root / DATED_DIR
    files: dict[str, Path] = {}
    start = datetime(2026, 11, 19, 10, 0, 0, tzinfo=UTC)
    flat_dit = 3.0
    for n_setup, setup in enumerate(setups):
        raw = work / f"raw{n_setup}"
        raw.mkdir()
        # Dark for the science frames: same DIT (the OCA association key) and window size.
        darks = _make_hawki_darks(raw, n=3, size=size, dit=setup.dit, ndit=setup.ndit, setup=setup,
                                  start=start, rng=rng)
        dark = _run("hawki_dark_combine", [(p, "DARK") for p in darks], work / f"dark{n_setup}", recipe_dir)
        for p in darks:
            p.unlink()  # 67 MB each at full size; not needed once combined
        key = f"MASTER_DARK:DIT{setup.dit:g}"
        if key not in files:
            dst = dated / f"HAWKI_MASTER_DARK_DIT{setup.dit:g}_NDIT{setup.ndit}.fits"
            shutil.copyfile(dark["MASTER_DARK"], dst)
            _stamp(dst, {"INSTRUME": "HAWKI", "DET DIT": setup.dit, "DET NDIT": setup.ndit,
                         "DET NCORRS NAME": setup.ncorrs})
            files[key] = dst
        # Twilight flats at least 1792² (the recipe's median window needs ≥1791²) and at least the
        # science window (a crop cannot enlarge them), with their own dark.
        flat_size = max(size, HAWKI_FLAT_SIZE)
        fdarks = _make_hawki_darks(raw, n=2, size=flat_size, dit=flat_dit, ndit=1, setup=setup,
                                   start=start, rng=rng)
        fdark = _run("hawki_dark_combine", [(p, "DARK") for p in fdarks], work / f"fdark{n_setup}", recipe_dir)
        for p in fdarks:
            p.unlink()  # large; not needed once combined
        flats = _make_hawki_flats(raw, n=3, size=flat_size, dit=flat_dit, setup=setup, start=start, rng=rng)
        flat = _run("hawki_twilight_flat_combine",
                    [(p, "FLAT_TWILIGHT") for p in flats] + [(fdark["MASTER_DARK"], "MASTER_DARK")],
                    work / f"flat{n_setup}", recipe_dir)
        label = _setup_label(setup)
        assoc = {"INSTRUME": "HAWKI", "DET NCORRS NAME": setup.ncorrs,
                 "INS FILT1 NAME": setup.filter1, "INS FILT2 NAME": setup.filter2}
        for catg in ("MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
            dst = _crop_to(flat[catg], dated / f"HAWKI_{catg}_{label}.fits", size)
            _stamp(dst, assoc)
            files[f"{catg}:{label}"] = dst
        shutil.rmtree(raw)
    return files


def _build_vimos(root: Path, work: Path, setups: Sequence[Setup], recipe_dir: Path | None) -> dict[str, Path]:
    rng = np.random.default_rng(202)
    dated = root / DATED_DIR
    raw = work / "raw"
    raw.mkdir()
    start = datetime(2026, 11, 19, 10, 0, 0, tzinfo=UTC)
    setup0 = setups[0]
    det = {"INSTRUME": "VIMOS", "DET READ MODE": "normal", "DET READ SPEED": "225kHz",
           "DET READ CLOCK": "225kHz,1port,low_gain", "DET WIN1 NY": VIMOS_NY,
           "DET WIN1 BINX": 1, "DET WIN1 BINY": 1}
    biases = _make_vimos_calib(raw, "bias", n=3, setup=setup0, start=start, rng=rng)
    bias = _run("vimos_ima_bias", [(p, "BIAS") for p in biases], work / "bias", recipe_dir)
    darks = _make_vimos_calib(raw, "dark", n=3, setup=setup0, start=start, rng=rng)
    dark = _run("vimos_ima_dark", [(p, "DARK") for p in darks] + [(bias["MASTER_BIAS"], "MASTER_BIAS")],
                work / "dark", recipe_dir)
    for p in biases + darks:
        p.unlink()
    files: dict[str, Path] = {}
    for catg, src in (("MASTER_BIAS", bias["MASTER_BIAS"]), ("MASTER_DARK", dark["MASTER_DARK"])):
        dst = dated / f"VIMOS_{catg}.fits"
        shutil.copyfile(src, dst)
        _stamp(dst, det)
        files[catg] = dst
    for n_setup, setup in enumerate(setups):
        flats = _make_vimos_calib(raw, "flat", n=3, setup=setup, start=start, rng=rng)
        flat = _run("vimos_ima_twilight_flat",
                    [(p, "FLAT_TWILIGHT") for p in flats]
                    + [(bias["MASTER_BIAS"], "MASTER_BIAS"), (dark["MASTER_DARK"], "MASTER_DARK")],
                    work / f"flat{n_setup}", recipe_dir)
        for p in flats:
            p.unlink()
        label = _setup_label(setup)
        filt = {f"INS FILT{q} NAME": setup.filter1 for q in range(1, 5)}
        filt.update({f"INS FILT{q} ID": f"{setup.filter1}_{q}" for q in range(1, 5)})
        for catg in ("MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
            dst = dated / f"VIMOS_{catg}_{label}.fits"
            shutil.copyfile(flat[catg], dst)
            _stamp(dst, {**det, **filt})
            files[f"{catg}:{label}"] = dst
    return files


def _write_gen(root: Path, instrument: str, size: int) -> dict[str, Path]:
    gen = root / GEN_DIR
    pre = instrument
    files = {
        "MASTER_READGAIN": write_readgain(gen / f"{pre}_MASTER_READGAIN.fits", instrument),
        "PHOTCAL_TAB": write_photcal(gen / f"{pre}_PHOTCAL_TAB.fits", instrument),
        "SCHLEGEL_MAP_NORTH": write_schlegel(gen / f"{pre}_SCHLEGEL_MAP_NORTH.fits", instrument, "SCHLEGEL_MAP_NORTH"),
        "SCHLEGEL_MAP_SOUTH": write_schlegel(gen / f"{pre}_SCHLEGEL_MAP_SOUTH.fits", instrument, "SCHLEGEL_MAP_SOUTH"),
    }
    for catg in ("MASTER_LOCAL_CATALOGUE_ASTROM", "MASTER_LOCAL_CATALOGUE_PHOTOM"):
        files[catg] = write_local_catalogue(gen / f"{pre}_{catg}.fits", instrument, catg, size)
    return files


# ==============================================================================
# the cached calibration set
# ==============================================================================


def _params(instrument: str, size: int | None, setups: Sequence[Setup]) -> dict[str, Any]:
    if instrument != "HAWKI":
        return {"instrument": instrument, "version": SYNTH_VERSION, "science_size": [VIMOS_NY, VIMOS_NX],
                "setups": [s.__dict__ for s in setups]}
    assert size is not None
    return {
        "instrument": instrument,
        "version": SYNTH_VERSION,
        "science_size": size,
        # Sets built before the flat followed a science window above 1792² had flats too small.
        "flat_size": max(size, HAWKI_FLAT_SIZE),
        "recipe_options": {k: list(v) for k, v in synthetic_recipe_options(instrument, size).items()},
        "setups": [s.__dict__ for s in setups],
    }


def _overlay_text(instrument: str, size: int | None, options: dict[str, tuple[str, ...]]) -> str:
    window = f"{size}x{size} pixels per chip" if size else "full-size frames"
    lines = [
        f"# Written by `preimg synth` with the synthetic {instrument} calibration set ({window}).",
        "# Recipe options that only these synthetic data need; the shipped profile keeps the",
        "# pipeline's defaults. Use it with PREIMG_PROFILE_OVERLAY=<this file> (shared/profiles).",
        f"instrument = {json.dumps(instrument)}",
        "",
        "[recipe_options]",
    ]
    lines += [f"{recipe} = {json.dumps(list(opts))}" for recipe, opts in sorted(options.items())]
    return "\n".join(lines) + "\n"


def _sync_overlay(root: Path, instrument: str, size: int | None) -> Path | None:
    """Write (or remove) the set's profile overlay so that it matches the data's needs."""
    path = root / OVERLAY_NAME
    options = synthetic_recipe_options(instrument, size)
    if not options:
        path.unlink(missing_ok=True)
        return None
    text = _overlay_text(instrument, size, options)
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _manifest_current(root: Path, params: dict[str, Any]) -> dict[str, Path] | None:
    """The files of an up-to-date set, or None when it must be (re)built."""
    manifest = read_manifest(root)
    if not manifest or manifest.get("params") != params:
        return None
    files = {}
    for key, entry in manifest.get("files", {}).items():
        path = root / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
        files[key] = path
    return files


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builders of the same set (a test session and ``make demo`` may race)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _science_tags(files: dict[str, Path]) -> dict[str, Path]:
    """SOF tag -> file for the first setup (keys like ``MASTER_CONF:J`` lose their suffix)."""
    tags: dict[str, Path] = {}
    for key, path in files.items():
        tags.setdefault(key.split(":")[0], path)
    return tags


def make_calibrations(instrument: str, cal_root: Path, *, size: int | None = None,
                      setups: Sequence[Setup] | None = None, force: bool = False,
                      recipe_dir: Path | None = None) -> CalibrationSet:
    """Build (or reuse) the static calibration set of ``instrument`` under ``cal_root``.

    Parameters
    ----------
    instrument : str
        HAWKI or VIMOS.
    cal_root : Path
        ``$DFO_CAL_DIR``; the set goes to ``<cal_root>/<INSTR>/{2099-99-99,gen}``.
    size : int, optional
        HAWK-I science window size the masters are cropped to (default 128;
        :func:`check_size`). Not for VIMOS, whose set is always full size.
    setups : sequence of Setup, optional
        Default :data:`DEFAULT_SETUPS`.
    force : bool
        Rebuild even when an up-to-date set exists.
    recipe_dir : Path, optional
        Plugin directory; default from the instrument profile.

    Returns
    -------
    CalibrationSet

    Raises
    ------
    SynthError
        A calibration recipe failed (the message names the log).
    ValueError
        No pipeline for the instrument, or a size the recipes cannot take.
    """
    instrument = instrument.upper()
    if instrument not in DEFAULT_SETUPS:
        raise ValueError(f"no calibration set for {instrument} (no pipeline): only raw frames are synthesised")
    size = check_size(instrument, size)
    setups = tuple(setups or DEFAULT_SETUPS[instrument])
    root = Path(cal_root).resolve() / instrument
    params = _params(instrument, size, setups)
    with _locked(root):
        files = None if force else _manifest_current(root, params)
        if files is not None:
            _log.info("reusing synthetic %s calibrations in %s", instrument, root)
            return CalibrationSet(instrument, root, _science_tags(files), built=False,
                                  profile_overlay=_sync_overlay(root, instrument, size))
        if recipe_dir is None:
            from shared.profiles import load_profile

            recipe_dir = load_profile(instrument).resolve_recipe_dir()
        _log.info("building synthetic %s calibrations in %s", instrument, root)
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        (root / OVERLAY_NAME).unlink(missing_ok=True)
        for sub in (DATED_DIR, GEN_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            if instrument == "HAWKI":
                assert size is not None
                files = _build_hawki(root, work, size, setups, recipe_dir)
            else:
                files = _build_vimos(root, work, setups, recipe_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        files.update(_write_gen(root, instrument, size or HAWKI_DEFAULT_SIZE))
        overlay = _sync_overlay(root, instrument, size)
        manifest = {
            "generator": "preimg.synth",
            "params": params,
            "files": {
                key: {"path": str(p.relative_to(root)), "bytes": p.stat().st_size, "pro_catg": key.split(":")[0]}
                for key, p in files.items()
            },
        }
        # Written last: a set without a manifest is incomplete and gets rebuilt.
        tmp = root / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, root / MANIFEST_NAME)
        return CalibrationSet(instrument, root, _science_tags(files), built=True, profile_overlay=overlay)


def science_sof(raw_files: Sequence[Path], calibrations: CalibrationSet) -> list[tuple[Path, str]]:
    """The SOF of the science recipe for these raw frames, without the OCA engine.

    Used by tests and the benchmark; in the services the OCA rules build it.
    """
    sof = [(Path(p), "OBJECT") for p in raw_files]
    sof += [(path, tag) for tag, path in sorted(calibrations.files.items())]
    return sof


def synthesize(instrument: str, out_dir: Path, *, cal_root: Path | None = None, n_frames: int | None = None,
               size: int | None = None, start: datetime = DEFAULT_START,
               force: bool = False) -> SynthResult:
    """Raw frames into ``out_dir`` and (pipeline instruments) the calibration set.

    ``cal_root`` defaults to ``out_dir/../cal``.
    """
    instrument = instrument.upper()
    out_dir = Path(out_dir)
    raw = make_raw_frames(instrument, out_dir, n_frames=n_frames, size=size, start=start)
    cal = None
    if instrument in DEFAULT_SETUPS:
        cal = make_calibrations(instrument, Path(cal_root) if cal_root else out_dir.resolve().parent / "cal",
                                size=size, force=force)
    return SynthResult(instrument, tuple(raw), cal, {"size": size, "n_frames": n_frames})


# ==============================================================================
# bad data for tests
# ==============================================================================


def truncate_file(path: Path, keep_bytes: int | None = None) -> Path:
    """Cut a file short in place (a transfer that died half-way).

    ``keep_bytes`` defaults to half the file, rounded down to a FITS block,
    which leaves the primary header readable but the data incomplete.
    """
    path = Path(path)
    n = path.stat().st_size
    if keep_bytes is None:
        keep_bytes = max(2880, (n // 2) // 2880 * 2880)
    with open(path, "r+b") as f:
        f.truncate(min(keep_bytes, n))
    return path


def remove_keyword(path: Path, keyword: str, hdu: int = 0) -> Path:
    """Delete one header keyword (e.g. ``"HIERARCH ESO DET CHIP1 ID"``) in place."""
    from astropy.io import fits

    with fits.open(path, mode="update") as hdul:
        key = keyword[9:] if keyword.upper().startswith("HIERARCH ") else keyword
        if key in hdul[hdu].header:
            del hdul[hdu].header[key]
    return path

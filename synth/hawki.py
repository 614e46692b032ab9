"""HAWK-I: raw pre-imaging frames and the masters made from synthetic raw calibrations.

A frame is a PHU without data + 4 IMAGE extensions, each the lower-left
``size``² window of a 2048² chip with the hard-coded chip geometry of
``hawki_wcsfit_multi`` (ESOREX.md §3.1). The masters are made by the real
calibration recipes (``hawki_dark_combine``, ``hawki_twilight_flat_combine``)
and cropped to the science window.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from synth.common import (
    DEFAULT_SETUPS,
    DEFAULT_START,
    Setup,
    add_stars,
    archive_name,
    common_header,
    eso,
    jitter_arcsec,
    make_wcs,
    noise,
    obs_info,
    offset_pointing,
    stars_on,
)
from synth.masters import run_calibration, setup_label, stamp

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
#: 128 px by default.
HAWKI_DEFAULT_NBSIZE = 128
#: The recipe median-filters its grid of background cells with a 3-cell window whose edge
#: padding reads 4 cells from each end (casu_bfilt's wraparound, and imcore's 5-cell filter):
#: a window fewer than 4 cells wide makes it read outside its buffers. The run does not crash;
#: it reads whatever the heap holds there, so its sky and zero point depend on the process's
#: memory layout (measured on 128² frames with 128-px cells: QC.MAGZPT 25.39 to 25.89 and
#: WCS_RMS 0.011 to 0.017 for the same data in four working directories, valgrind: 482 invalid
#: reads; and, with one working-directory path, "Cannot save product table extension" and a
#: failed run). With 4 cells or more valgrind is clean and the run is bit-identical wherever it
#: runs (128² with 32-px cells, 64² with 16-px cells).
HAWKI_MIN_BACKGROUND_CELLS = 4
#: From this window up the pipeline's default cells are safe.
HAWKI_MIN_DEFAULT_SIZE = HAWKI_MIN_BACKGROUND_CELLS * HAWKI_DEFAULT_NBSIZE  # 512
#: A full chip gets about as many stars as a high-latitude J-band field; denser synthetic
#: fields only slow the recipe down (2048²: 381 s of recipe time at ~16,000 stars per chip).
HAWKI_MAX_STARS_PER_CHIP = 600
HAWKI_GAIN = 1.7  # e-/ADU
HAWKI_RON = 5.0  # ADU
HAWKI_DARK_LEVEL = 50.0
HAWKI_ZP = 25.0  # mag giving 1 ADU/s


def chip_header(k: int, pointing: tuple[float, float]) -> dict[str, Any]:
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



def field_stars(size: int = HAWKI_DEFAULT_SIZE) -> dict[str, np.ndarray]:
    """The synthetic HAWK-I star field: ``ra``, ``dec`` (deg), ``mag`` (Vega, all bands).

    Deterministic per window size. Stars are drawn where the chips see them at
    the nominal pointing, with a margin for the jitter; the local catalogue
    (:mod:`synth.tables`) is drawn from the same list.
    """
    rng = np.random.default_rng(11 * 1000 + size)
    ras, decs, mags = [], [], []
    margin = 70.0  # covers the jitter
    # Dense enough for the WCS fit of a small window, capped so that a full chip holds
    # about as many stars as a real high-latitude J-band field (object detection and
    # matching time grow with the number of stars).
    n = min(max(12, int(0.0035 * (size + 2 * margin) ** 2)), HAWKI_MAX_STARS_PER_CHIP)
    for k in range(4):
        w = make_wcs(chip_header(k, HAWKI_FIELD))
        x = rng.uniform(-margin, size + margin, n)
        y = rng.uniform(-margin, size + margin, n)
        ra, dec = w.wcs_pix2world(x + 1, y + 1, 1)
        ras.append(ra)
        decs.append(dec)
        mags.append(rng.uniform(16.5, 20.5, n))
    return {"ra": np.concatenate(ras), "dec": np.concatenate(decs), "mag": np.concatenate(mags)}


def flat_pattern(n: int) -> np.ndarray:
    """A smooth, mild illumination pattern (≈±3 %) on an n×n window of a chip."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / HAWKI_CHIP
    return (1.0 + 0.03 * (xx - 0.5) - 0.02 * (yy - 0.5) + 0.01 * np.sin(6 * xx)).astype(np.float32)


def write_frame(path: Path, t: datetime, obs: dict[str, Any], dpr: tuple[str, str, str],
                 setup: Setup, dit: float, ndit: int, images: Sequence[np.ndarray],
                 pointing: tuple[float, float], jitter: tuple[float, float] = (0.0, 0.0)) -> Path:
    from astropy.io import fits

    phu = fits.PrimaryHDU()
    h = phu.header
    common_header(h, "HAWKI", "ESO-VLT-U4", t, dit * ndit, obs, dpr, pointing)
    eso(h, "DET DIT", float(dit), "Integration time")
    eso(h, "DET NDIT", int(ndit), "# of sub-integrations")
    eso(h, "DET NDSAMPLES", 2)
    eso(h, "DET NCORRS NAME", setup.ncorrs)
    eso(h, "DET READ CURNAME", setup.ncorrs)
    eso(h, "INS FILT1 NAME", setup.filter1)
    eso(h, "INS FILT2 NAME", setup.filter2)
    eso(h, "SEQ CUMOFFSETX", round(-jitter[0] / 0.106, 2))
    eso(h, "SEQ CUMOFFSETY", round(jitter[1] / 0.106, 2))
    eso(h, "SEQ CUMOFFSETA", round(jitter[0], 3))
    eso(h, "SEQ CUMOFFSETD", round(jitter[1], 3))
    hdus: list[Any] = [phu]
    for k, data in enumerate(images):
        ext = fits.ImageHDU(data.astype(np.float32), name=HAWKI_EXTNAMES[k])
        eh = ext.header
        for key, value in chip_header(k, pointing).items():
            eh[key] = value
        eso(eh, "DET CHIP NO", HAWKI_CHIP_NO[k])
        eso(eh, "DET CHIP NAME", f"HAWAII-2RG-{HAWKI_CHIP_NO[k]}")
        eso(eh, "DET CHIP LIVE", True)
        hdus.append(ext)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def make_science(out_dir: Path, *, n_frames: int = 3, size: int = HAWKI_DEFAULT_SIZE,
                       setup: Setup | None = None, start: datetime = DEFAULT_START,
                       seed: int = 1) -> list[Path]:
    """HAWK-I pre-imaging OBJECT frames (one jitter template)."""
    setup = setup or DEFAULT_SETUPS["HAWKI"][0]
    rng = np.random.default_rng(seed)
    stars = field_stars(size)
    pattern = flat_pattern(size)
    sigma_px = 0.65 / 2.3548 / 0.106
    sky = 1200.0
    files = []
    for i in range(n_frames):
        t = start + timedelta(seconds=i * (setup.dit * setup.ndit + 12.0))
        jitter = jitter_arcsec(i)
        pointing = offset_pointing(HAWKI_FIELD, *jitter)
        obs = obs_info("HAWKI", start, n_frames, i + 1, "science")
        images = []
        # The recipe takes the exposure time as DIT x NDIT (the frame is the sum of the reads).
        fluxes = 10 ** (-0.4 * (stars["mag"] - HAWKI_ZP)) * setup.dit * setup.ndit
        for k in range(4):
            light = np.full((size, size), sky, dtype=np.float32)
            x, y = stars_on(chip_header(k, pointing), stars)
            add_stars(light, x, y, fluxes, sigma_px)
            signal = light * pattern + HAWKI_DARK_LEVEL
            images.append(noise(rng, signal, HAWKI_GAIN, HAWKI_RON * math.sqrt(setup.ndit)))
        path = out_dir / archive_name("HAWKI", t)
        write_frame(path, t, obs, ("SCIENCE", "OBJECT", "IMAGE,PRE"), setup, setup.dit, setup.ndit,
                     images, pointing, jitter)
        files.append(path)
    return files


def make_darks(out_dir: Path, *, n: int, size: int, dit: float, ndit: int, setup: Setup,
                      start: datetime, rng: np.random.Generator) -> list[Path]:
    files = []
    for i in range(n):
        t = start + timedelta(seconds=i * (dit * ndit + 5))
        obs = obs_info("HAWKI", start, n, i + 1, "dark")
        level = np.full((size, size), HAWKI_DARK_LEVEL + 0.05 * dit, dtype=np.float32)
        images = [noise(rng, level, HAWKI_GAIN, HAWKI_RON) for _ in range(4)]
        files.append(write_frame(out_dir / f"hawki_dark_{size}_dit{dit:g}_{i + 1:02d}.fits", t, obs,
                                  ("CALIB", "DARK", "IMAGE"), setup, dit, ndit, images, HAWKI_FIELD))
    return files


def make_flats(out_dir: Path, *, n: int, size: int, dit: float, setup: Setup,
                      start: datetime, rng: np.random.Generator) -> list[Path]:
    pattern = flat_pattern(size)
    files = []
    for i in range(n):
        t = start + timedelta(seconds=i * 30)
        obs = obs_info("HAWKI", start, n, i + 1, "flat")
        level = 18000.0 - 4000.0 * i  # twilight fades; all within lthr..hthr (4000..30000)
        images = [noise(rng, level * pattern + HAWKI_DARK_LEVEL, HAWKI_GAIN, HAWKI_RON) for _ in range(4)]
        files.append(write_frame(out_dir / f"hawki_flat_{i + 1:02d}.fits", t, obs,
                                  ("CALIB", "FLAT,TWILIGHT", "IMAGE"), setup, dit, 1, images, HAWKI_FIELD))
    return files


def _crop_to(src: Path, dst: Path, size: int) -> Path:
    """Copy a HAWK-I master cropped to the lower-left size² of each chip (the science window)."""
    from astropy.io import fits

    with fits.open(src) as hdul:
        out = [fits.PrimaryHDU(header=hdul[0].header)]
        for ext in hdul[1:]:
            out.append(fits.ImageHDU(np.ascontiguousarray(ext.data[:size, :size]), header=ext.header))
        fits.HDUList(out).writeto(dst, overwrite=True)
    return dst



def build_masters(dated: Path, work: Path, size: int, setups: Sequence[Setup],
                 recipe_dir: Path | None) -> dict[str, Path]:
    """Masters for ``setups`` into ``dated`` (``2099-99-99``), cropped to the ``size``² window; key -> path."""
    rng = np.random.default_rng(101)
    files: dict[str, Path] = {}
    start = datetime(2026, 11, 19, 10, 0, 0, tzinfo=UTC)
    flat_dit = 3.0
    for n_setup, setup in enumerate(setups):
        raw = work / f"raw{n_setup}"
        raw.mkdir()
        # Dark for the science frames: same DIT (the OCA association key) and window size.
        darks = make_darks(raw, n=3, size=size, dit=setup.dit, ndit=setup.ndit, setup=setup,
                                  start=start, rng=rng)
        dark = run_calibration("hawki_dark_combine", [(p, "DARK") for p in darks], work / f"dark{n_setup}", recipe_dir)
        for p in darks:
            p.unlink()  # 67 MB each at full size; not needed once combined
        key = f"MASTER_DARK:DIT{setup.dit:g}"
        if key not in files:
            dst = dated / f"HAWKI_MASTER_DARK_DIT{setup.dit:g}_NDIT{setup.ndit}.fits"
            shutil.copyfile(dark["MASTER_DARK"], dst)
            stamp(dst, {"INSTRUME": "HAWKI", "DET DIT": setup.dit, "DET NDIT": setup.ndit,
                         "DET NCORRS NAME": setup.ncorrs})
            files[key] = dst
        # Twilight flats at least 1792² (the recipe's median window needs ≥1791²) and at least the
        # science window (a crop cannot enlarge them), with their own dark.
        flat_size = max(size, HAWKI_FLAT_SIZE)
        fdarks = make_darks(raw, n=2, size=flat_size, dit=flat_dit, ndit=1, setup=setup,
                                   start=start, rng=rng)
        fdark = run_calibration("hawki_dark_combine", [(p, "DARK") for p in fdarks], work / f"fdark{n_setup}", recipe_dir)
        for p in fdarks:
            p.unlink()  # large; not needed once combined
        flats = make_flats(raw, n=3, size=flat_size, dit=flat_dit, setup=setup, start=start, rng=rng)
        flat = run_calibration("hawki_twilight_flat_combine",
                    [(p, "FLAT_TWILIGHT") for p in flats] + [(fdark["MASTER_DARK"], "MASTER_DARK")],
                    work / f"flat{n_setup}", recipe_dir)
        label = setup_label(setup)
        assoc = {"INSTRUME": "HAWKI", "DET NCORRS NAME": setup.ncorrs,
                 "INS FILT1 NAME": setup.filter1, "INS FILT2 NAME": setup.filter2}
        for catg in ("MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
            dst = _crop_to(flat[catg], dated / f"HAWKI_{catg}_{label}.fits", size)
            stamp(dst, assoc)
            files[f"{catg}:{label}"] = dst
        shutil.rmtree(raw)
    return files

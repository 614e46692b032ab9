"""VIMOS: raw pre-imaging quadrants and the masters made from synthetic raw calibrations.

One single-HDU file per quadrant, 4 per exposure, at the real raw size
2148×2440 (50 px pre- and overscan, ESOREX.md §4.1), 16-bit with BZERO. The
masters are made by the real calibration recipes (``vimos_ima_bias``,
``vimos_ima_dark``, ``vimos_ima_twilight_flat``), all at full size.
"""

from __future__ import annotations

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
#: Seed of the star field (it was drawn with the default HAWK-I window's seed, and stays so).
_FIELD_SEED = 22 * 1000 + 128


def quad_header(q: int, pointing: tuple[float, float]) -> dict[str, Any]:
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



def field_stars() -> dict[str, np.ndarray]:
    """The synthetic VIMOS star field: ``ra``, ``dec`` (deg), ``mag`` (Vega, all bands).

    Deterministic (VIMOS frames have one size). Stars are drawn where the
    quadrants see them at the nominal pointing; the local catalogue
    (:mod:`synth.tables`) is drawn from the same list.
    """
    rng = np.random.default_rng(_FIELD_SEED)
    ras, decs, mags = [], [], []
    n = 260
    for q in range(4):
        w = make_wcs(quad_header(q, VIMOS_FIELD))
        x = rng.uniform(-20, VIMOS_DATA_NX + 20, n)
        y = rng.uniform(-20, VIMOS_NY + 20, n)
        ra, dec = w.wcs_pix2world(x + 1, y + 1, 1)
        ras.append(ra)
        decs.append(dec)
        mags.append(rng.uniform(17.0, 22.0, n))
    return {"ra": np.concatenate(ras), "dec": np.concatenate(decs), "mag": np.concatenate(mags)}


def quadrant_header(h: Any, q: int, t: datetime, exptime: float, obs: dict[str, Any],
                  dpr: tuple[str, str, str], setup: Setup, pointing: tuple[float, float]) -> None:
    common_header(h, "VIMOS", "ESO-VLT-U3", t, exptime, obs, dpr, pointing)
    eso(h, "OCS CON QUAD", q + 1, "Quadrant")
    eso(h, "DET NAME", "VIMOS")
    eso(h, "DET CHIP1 ID", VIMOS_CHIPS[q], "Detector chip identification")
    eso(h, "DET CHIP1 NAME", f"CCD-{VIMOS_CHIPS[q]}")
    eso(h, "DET CHIP1 PSZX", 15.0)
    eso(h, "DET CHIP1 PSZY", 15.0)
    eso(h, "DET READ MODE", "normal")
    eso(h, "DET READ SPEED", "225kHz")
    eso(h, "DET READ CLOCK", "225kHz,1port,low_gain")
    eso(h, "DET WIN1 NX", VIMOS_DATA_NX)
    eso(h, "DET WIN1 NY", VIMOS_NY)
    eso(h, "DET WIN1 BINX", 1)
    eso(h, "DET WIN1 BINY", 1)
    eso(h, "DET OUTPUTS", 1)
    eso(h, "DET OUT1 X", 1)
    eso(h, "DET OUT1 Y", 1)
    eso(h, "DET OUT1 NX", VIMOS_DATA_NX)
    eso(h, "DET OUT1 NY", VIMOS_NY)
    eso(h, "DET OUT1 PRSCX", VIMOS_PRESCAN)
    eso(h, "DET OUT1 PRSCY", 0)
    eso(h, "DET OUT1 OVSCX", VIMOS_NX - VIMOS_PRESCAN - VIMOS_DATA_NX)
    eso(h, "DET OUT1 OVSCY", 0)
    eso(h, "DET OUT1 GAIN", 1.0 / VIMOS_GAIN)
    eso(h, "DET OUT1 CONAD", VIMOS_GAIN)
    eso(h, "DET OUT1 RON", VIMOS_RON * VIMOS_GAIN)
    # Each quadrant has its own filter wheel: quadrant q carries INS.FILTq.* only.
    if setup.filter1:
        eso(h, f"INS FILT{q + 1} NAME", setup.filter1)
        eso(h, f"INS FILT{q + 1} ID", f"{setup.filter1}_{q + 1}")


def write_quadrant(path: Path, data: np.ndarray, header_fn: Any) -> Path:
    from astropy.io import fits

    # Raw VIMOS frames are 16-bit unsigned: BITPIX 16 + BZERO 32768 (astropy's uint mode).
    hdu = fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16))
    header_fn(hdu.header)
    hdu.writeto(path, overwrite=True)
    return path


def illumination() -> np.ndarray:
    """Light falls on the 2048 data columns only, never on pre/overscan (§4.1)."""
    light = np.zeros((VIMOS_NY, VIMOS_NX), dtype=np.float32)
    yy, xx = np.mgrid[0:VIMOS_NY, 0:VIMOS_DATA_NX].astype(np.float32)
    light[:, VIMOS_PRESCAN:VIMOS_PRESCAN + VIMOS_DATA_NX] = (
        1.0 + 0.04 * (xx / VIMOS_DATA_NX - 0.5) + 0.03 * (yy / VIMOS_NY - 0.5)
    )
    return light


def make_science(out_dir: Path, *, n_frames: int = 1, setup: Setup | None = None,
                       start: datetime = DEFAULT_START, seed: int = 2) -> list[Path]:
    """VIMOS pre-imaging exposures: 4 quadrant files each (so 4 × n_frames files)."""
    setup = setup or DEFAULT_SETUPS["VIMOS"][0]
    rng = np.random.default_rng(seed)
    stars = field_stars()
    illum = illumination()
    sigma_px = 0.75 / 2.3548 / 0.205
    sky = 320.0
    fluxes = 10 ** (-0.4 * (stars["mag"] - VIMOS_ZP)) * setup.dit
    files = []
    for i in range(n_frames):
        jitter = jitter_arcsec(i)
        pointing = offset_pointing(VIMOS_FIELD, *(3 * j for j in jitter))
        obs = obs_info("VIMOS", start, n_frames, i + 1, "science")
        t0 = start + timedelta(seconds=i * (setup.dit + 40.0))
        for q in range(4):
            t = t0 + timedelta(milliseconds=7 * q)  # quadrant files get distinct archive names
            wcs = quad_header(q, pointing)
            light = np.zeros((VIMOS_NY, VIMOS_NX), dtype=np.float32)
            light[:, VIMOS_PRESCAN:VIMOS_PRESCAN + VIMOS_DATA_NX] = sky
            x, y = stars_on(wcs, stars)
            add_stars(light, x, y, fluxes, sigma_px, x0=VIMOS_PRESCAN)
            data = noise(rng, light * np.where(illum > 0, illum, 1) + VIMOS_BIAS, VIMOS_GAIN, VIMOS_RON)

            def header(h: Any, q: int = q, t: datetime = t, wcs: dict[str, Any] = wcs,
                       obs: dict[str, Any] = obs, pointing: tuple[float, float] = pointing) -> None:
                quadrant_header(h, q, t, setup.dit, obs, ("SCIENCE", "OBJECT", "IMAGE,PRE"), setup, pointing)
                for key, value in wcs.items():
                    h[key] = value

            files.append(write_quadrant(out_dir / archive_name("VIMOS", t), data, header))
    return files


def make_calibration_frames(out_dir: Path, kind: str, *, n: int, setup: Setup, start: datetime,
                      rng: np.random.Generator) -> list[Path]:
    illum = illumination() if kind == "flat" else None
    dpr = {"bias": ("CALIB", "BIAS", "IMAGE"), "dark": ("CALIB", "DARK", "IMAGE"),
           "flat": ("CALIB", "FLAT,SKY", "IMAGE")}[kind]
    exptime = {"bias": 0.0, "dark": 600.0, "flat": 5.0}[kind]
    files = []
    for i in range(n):
        obs = obs_info("VIMOS", start, n, i + 1, kind)
        for q in range(4):
            t = start + timedelta(seconds=i * 60, milliseconds=7 * q)
            signal = np.full((VIMOS_NY, VIMOS_NX), VIMOS_BIAS, dtype=np.float32)
            if kind == "dark":
                signal[:, VIMOS_PRESCAN:VIMOS_PRESCAN + VIMOS_DATA_NX] += 1.5
            elif kind == "flat":
                signal += (20000.0 - 4000.0 * i) * illum
            data = noise(rng, signal, VIMOS_GAIN, VIMOS_RON)

            def header(h: Any, q: int = q, t: datetime = t, obs: dict[str, Any] = obs) -> None:
                quadrant_header(h, q, t, exptime, obs, dpr, setup, VIMOS_FIELD)

            files.append(write_quadrant(out_dir / f"vimos_{kind}_{i + 1:02d}_q{q + 1}.fits", data, header))
    return files



def build_masters(dated: Path, work: Path, setups: Sequence[Setup], recipe_dir: Path | None) -> dict[str, Path]:
    """Bias, dark and per-setup flat masters into ``dated`` (``2099-99-99``), full size; key -> path."""
    rng = np.random.default_rng(202)
    raw = work / "raw"
    raw.mkdir()
    start = datetime(2026, 11, 19, 10, 0, 0, tzinfo=UTC)
    setup0 = setups[0]
    det = {"INSTRUME": "VIMOS", "DET READ MODE": "normal", "DET READ SPEED": "225kHz",
           "DET READ CLOCK": "225kHz,1port,low_gain", "DET WIN1 NY": VIMOS_NY,
           "DET WIN1 BINX": 1, "DET WIN1 BINY": 1}
    biases = make_calibration_frames(raw, "bias", n=3, setup=setup0, start=start, rng=rng)
    bias = run_calibration("vimos_ima_bias", [(p, "BIAS") for p in biases], work / "bias", recipe_dir)
    darks = make_calibration_frames(raw, "dark", n=3, setup=setup0, start=start, rng=rng)
    dark = run_calibration("vimos_ima_dark", [(p, "DARK") for p in darks] + [(bias["MASTER_BIAS"], "MASTER_BIAS")],
                work / "dark", recipe_dir)
    for p in biases + darks:
        p.unlink()
    files: dict[str, Path] = {}
    for catg, src in (("MASTER_BIAS", bias["MASTER_BIAS"]), ("MASTER_DARK", dark["MASTER_DARK"])):
        dst = dated / f"VIMOS_{catg}.fits"
        shutil.copyfile(src, dst)
        stamp(dst, det)
        files[catg] = dst
    for n_setup, setup in enumerate(setups):
        flats = make_calibration_frames(raw, "flat", n=3, setup=setup, start=start, rng=rng)
        flat = run_calibration("vimos_ima_twilight_flat",
                    [(p, "FLAT_TWILIGHT") for p in flats]
                    + [(bias["MASTER_BIAS"], "MASTER_BIAS"), (dark["MASTER_DARK"], "MASTER_DARK")],
                    work / f"flat{n_setup}", recipe_dir)
        for p in flats:
            p.unlink()
        label = setup_label(setup)
        filt = {f"INS FILT{q} NAME": setup.filter1 for q in range(1, 5)}
        filt.update({f"INS FILT{q} ID": f"{setup.filter1}_{q}" for q in range(1, 5)})
        for catg in ("MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
            dst = dated / f"VIMOS_{catg}_{label}.fits"
            shutil.copyfile(flat[catg], dst)
            stamp(dst, {**det, **filt})
            files[f"{catg}:{label}"] = dst
    return files

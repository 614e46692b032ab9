"""A fixed ProductsReady over real small FITS files, shared by reporter and publisher tests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.io import fits

from shared.messages import ABResult, CalibrationUsed, Product, ProductsReady, RawFrame

DELIVERED = datetime(2026, 11, 20, 8, 30, 0, tzinfo=UTC)
REPORTED = datetime(2026, 11, 20, 9, 15, 42, tzinfo=UTC)
XSS = "<script>alert(1)</script>"


def write_fits(path: Path, cards: dict) -> Path:
    """A 4x4 image whose primary header carries ``cards`` (dotted ESO keywords allowed)."""
    header = fits.Header()
    for key, value in cards.items():
        name = key if "." not in key else "HIERARCH ESO " + key.replace(".", " ")
        header[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data=np.zeros((4, 4), dtype=np.float32), header=header).writeto(path, overwrite=True)
    return path


def raw_headers(i: int, ob_id: int, obj: str, filt: str) -> dict:
    return {
        "OBJECT": obj,
        "DATE-OBS": f"2026-11-19T0{i}:10:00.000",
        "MJD-OBS": 61000.0 + i / 24,
        "EXPTIME": 10.0,
        "RA": 150.123456,
        "DEC": -2.5,
        "HIERARCH ESO OBS ID": ob_id,
        "HIERARCH ESO OBS NAME": f"preimg_ob_{ob_id}",
        "HIERARCH ESO OBS PROG ID": "0116.A-0123(A)",
        "HIERARCH ESO DPR TECH": "IMAGE,PRE",
        "HIERARCH ESO INS FILT1 NAME": filt,
        "HIERARCH ESO TEL AIRM START": 1.2345,
        "HIERARCH ESO TEL AMBI FWHM START": 0.71,
    }


def products_ready(root: Path, *, run_id: str = "run-0001", test: bool = False,
                   obj2: str = XSS, with_files: bool = True) -> ProductsReady:
    """Two OBs, two ABs (one successful, one failed), one product, two calibrations."""
    raw_dir, sci_dir, log_dir = root / "raw" / run_id, root / "sci" / run_id, root / "logs" / run_id
    cal_dir = root / "cal"
    frames = []
    for i, (ob_id, obj, filt) in enumerate([(2001, "NGC 1234", "J"), (2001, "NGC 1234", "J"),
                                            (2002, obj2, "Ks")], start=1):
        name = f"HAWKI.2026-11-19T0{i}:10:00.000.fits"
        frames.append(RawFrame(name=name, path=str(raw_dir / name), size=2880 * 2,
                               checksum="sha256:" + "0" * 64,
                               headers=raw_headers(i, ob_id, obj, filt),
                               classification={"DO.CATG": "OBJECT"}))
    dark = cal_dir / "M.HAWKI.2026-11-01T10:00:00.000.fits"
    flat = cal_dir / "M.HAWKI.2026-10-28T12:00:00.000.fits"
    product = sci_dir / "r.HAWKI.2026-11-19T01:10:00.000_0000.fits"
    ab_log = log_dir / "HAWKI.2026-11-19T01:10:00.000.ab.log"
    if with_files:
        write_fits(dark, {"PRO.CATG": "MASTER_DARK", "DATE-OBS": "2026-11-01T10:00:00.000"})
        write_fits(flat, {"PRO.CATG": "MASTER_TWILIGHT_FLAT", "DATE-OBS": "2026-10-28T12:00:00.000"})
        write_fits(product, {"OBJECT": "NGC 1234", "PRO.CATG": "BASIC_CALIBRATED_SCI",
                             "INS.FILT1.NAME": "J", "DATE-OBS": "2026-11-19T01:10:00.000"})
        ab_log.parent.mkdir(parents=True, exist_ok=True)
        ab_log.write_text("esorex --recipe hawki_science_process ...\n[ INFO  ] done\n")
    abs_ = (
        ABResult(name="HAWKI.2026-11-19T01:10:00.000_tpl.ab", action="SCIENCE_FRAMES",
                 recipe="hawki_science_process", status="SUCCESSFUL",
                 raw=(frames[0].name, frames[1].name),
                 calibrations=(CalibrationUsed(tag="MASTER_DARK", path=str(dark), pro_catg="MASTER_DARK",
                                               date="2026-11-01T10:00:00.000"),
                               CalibrationUsed(tag="MASTER_TWILIGHT_FLAT", path=str(flat),
                                               pro_catg="MASTER_TWILIGHT_FLAT", date="2026-10-28")),
                 started_at=datetime(2026, 11, 20, 8, 31, 0, tzinfo=UTC),
                 finished_at=datetime(2026, 11, 20, 8, 33, 30, tzinfo=UTC),
                 duration_s=150.0, log_path=str(ab_log)),
        ABResult(name="HAWKI.2026-11-19T03:10:00.000_tpl.ab", action="SCIENCE_FRAMES",
                 recipe="hawki_science_process", status="FAILED",
                 reason="esorex exited with status 1: no master dark matches DIT 10.0",
                 raw=(frames[2].name,),
                 calibrations=(CalibrationUsed(tag="MASTER_DARK", path=str(dark), pro_catg="MASTER_DARK",
                                               date="2026-11-01T10:00:00.000"),),
                 missing=("MASTER_DARK(DIT=10.0)",),
                 started_at=datetime(2026, 11, 20, 8, 33, 31, tzinfo=UTC),
                 finished_at=datetime(2026, 11, 20, 8, 33, 40, tzinfo=UTC),
                 duration_s=9.0),
    )
    # As the processor reads them: the header values the USERREPORT tabulates travel in the message.
    products = (Product(path=str(product), pro_catg="BASIC_CALIBRATED_SCI",
                        ab=abs_[0].name, qc={"QC.BACKGD.MEAN": 1234.5},
                        header={"OBJECT": "NGC 1234", "INS.FILT1.NAME": "J", "DATE-OBS": "2026-11-19T01:10:00.000"}),)
    return ProductsReady(
        run_id=run_id, delivery_id=f"aog-{run_id}", instrument="HAWKI", test=test,
        raw_dir=str(raw_dir), sci_dir=str(sci_dir), log_dir=str(log_dir),
        frames=tuple(frames), abs=abs_, products=products, status="partial",
        delivered_at=DELIVERED,
    )

"""The fast product-header reader gives what astropy gives, on real recipe products."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.processor.products import read_product
from shared.files import file_digest
from shared.fitsheader import FitsHeaderError, iter_header_texts


def astropy_product(path: Path) -> tuple[str, dict]:
    qc = {}
    with fits.open(path) as hdul:
        pro_catg = str(hdul[0].header.get("HIERARCH ESO PRO CATG", ""))
        for i, hdu in enumerate(hdul):
            prefix = "" if i == 0 else f"{hdu.header.get('EXTNAME') or f'HDU{i}'}:"
            qc.update({f"{prefix}{k[4:]}": v for k, v in hdu.header.items() if k.startswith("ESO QC ")})
    return pro_catg, qc


@pytest.mark.filterwarnings("ignore:Unexpected extra padding")
def test_equal_to_astropy_on_a_synthetic_mef(tmp_path):
    path = tmp_path / "p.fits"
    phu = fits.PrimaryHDU()
    phu.header["HIERARCH ESO PRO CATG"] = "JITTERED_IMAGE_SCI"
    phu.header["HIERARCH ESO QC MAGZPT"] = 24.987
    image = fits.ImageHDU(np.zeros((37, 41), dtype=np.float32), name="CHIP1.INT1")
    image.header["HIERARCH ESO QC WCS_RMS"] = 1.5e-3
    image.header["HIERARCH ESO QC NBAD"] = 12
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.arange(5))])
    table.header["HIERARCH ESO QC NOTE"] = "it's fine"
    unnamed = fits.ImageHDU(np.ones((3, 1000), dtype=np.int16))
    unnamed.header["HIERARCH ESO QC FLAG"] = True
    fits.HDUList([phu, image, table, unnamed]).writeto(path)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 100)  # bytes after the last HDU belong to the file's checksum too
    product = read_product(path, keywords=("PRO.CATG", "OBJECT"))
    assert (product.pro_catg, product.qc) == astropy_product(path)
    assert product.qc["HDU2:QC NOTE"] == "it's fine" and product.qc["HDU3:QC FLAG"] is True
    assert product.header == {"PRO.CATG": "JITTERED_IMAGE_SCI"}  # OBJECT is not in the header
    assert product.checksum == f"sha256:{file_digest(path)}"  # computed in the same pass


def test_equal_to_astropy_on_real_products(hawki_cal, vimos_cal):
    """Masters the real calibration recipes wrote (built here if no earlier run cached them)."""
    masters = sorted(p for cal in (hawki_cal, vimos_cal) for p in cal.files.values()
                     if p.name.endswith(".fits") and "2099-99-99" in p.parts)
    assert len(masters) >= 5, masters
    for path in masters:
        product = read_product(path, keywords=("DATE-OBS", "INSTRUME"))
        assert (product.pro_catg, product.qc) == astropy_product(path), path.name
        assert product.checksum == f"sha256:{file_digest(path)}", path.name
        assert product.header == {k: v for k, v in fits.getheader(path).items() if k in ("DATE-OBS", "INSTRUME")}


def test_truncated_product_keeps_what_could_be_read(tmp_path):
    path = tmp_path / "p.fits"
    phu = fits.PrimaryHDU()
    phu.header["HIERARCH ESO PRO CATG"] = "MASTER_DARK"
    fits.HDUList([phu, fits.ImageHDU(np.zeros((64, 64), dtype=np.float32), name="CHIP1.INT1"),
                  fits.ImageHDU(np.zeros((64, 64), dtype=np.float32), name="CHIP2.INT1")]).writeto(path)
    with open(path, "r+b") as fh:
        fh.truncate(2880 * 3 + 100)  # inside the first extension's data
    with pytest.raises(FitsHeaderError, match="truncated: the data of HDU 1"):
        list(iter_header_texts(path))
    product = read_product(path)
    assert product.pro_catg == "MASTER_DARK" and product.checksum == f"sha256:{file_digest(path)}"

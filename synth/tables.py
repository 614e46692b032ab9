"""The static tables of a synthetic calibration set (``gen/``), in the formats of ESOREX.md §3.4.

MASTER_READGAIN, PHOTCAL_TAB, the Schlegel maps and the local astrometric and
photometric catalogues. The catalogues are drawn from the same star field as
the raw frames (:func:`field_stars`), so the recipes find their standards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from synth import hawki, vimos
from synth.common import eso
from synth.hawki import HAWKI_DEFAULT_SIZE, HAWKI_EXTNAMES, HAWKI_GAIN, HAWKI_RON, HAWKI_ZP
from synth.vimos import VIMOS_CHIPS, VIMOS_GAIN, VIMOS_RON, VIMOS_ZP

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


def field_stars(instrument: str, size: int = HAWKI_DEFAULT_SIZE) -> dict[str, np.ndarray]:
    """The synthetic star field of ``instrument`` (HAWK-I: per window ``size``), as the raw frames show it."""
    instrument = instrument.upper()
    if instrument == "HAWKI":
        return hawki.field_stars(size)
    if instrument == "VIMOS":
        return vimos.field_stars()
    raise ValueError(f"no star field for {instrument}")


def _product_phu(instrument: str, pro_catg: str) -> Any:
    from astropy.io import fits

    phu = fits.PrimaryHDU()
    phu.header["INSTRUME"] = instrument
    phu.header["DATE"] = "2099-01-01T00:00:00"
    eso(phu.header, "PRO CATG", pro_catg)
    eso(phu.header, "PRO TYPE", "STATIC")
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



def write_gen(gen: Path, instrument: str, size: int) -> dict[str, Path]:
    """The static tables of ``instrument`` into ``gen``; PRO.CATG -> path."""
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

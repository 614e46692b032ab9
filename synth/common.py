"""What every synthetic ESO frame shares: times and archive names, noise and stars, the header
keywords of every raw frame, and the instrument setups the data are made for.

The instrument modules (:mod:`synth.hawki`, :mod:`synth.vimos`, :mod:`synth.fors2`) build
their frames from these pieces; nothing here knows a detector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

#: Night of the synthetic deliveries unless a start time is given.
DEFAULT_START = datetime(2026, 11, 20, 1, 2, 3, 456000, tzinfo=UTC)

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)


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


class SynthError(RuntimeError):
    """A calibration recipe failed while building the synthetic set."""



def mjd(t: datetime) -> float:
    return (t - _MJD_EPOCH).total_seconds() / 86400.0


def isot(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def lst_seconds(t: datetime) -> float:
    """Approximate local sidereal time at Paranal, in seconds (LST header)."""
    d = mjd(t) - 51544.5
    gmst_deg = (280.46061837 + 360.98564736629 * d) % 360.0
    return ((gmst_deg - 70.4045) % 360.0) / 15.0 * 3600.0


def archive_name(instrument: str, t: datetime) -> str:
    """ESO archive file name, ``<INSTR>.<YYYY-MM-DDThh:mm:ss.sss>.fits``."""
    return f"{instrument}.{isot(t)}.fits"


def noise(rng: np.random.Generator, signal: np.ndarray, gain: float, ron: float) -> np.ndarray:
    """Signal plus photon and read noise, in ADU (float32)."""
    sigma = np.sqrt(np.clip(signal, 0, None) / gain + ron * ron).astype(np.float32)
    return (signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)).astype(np.float32)


def add_stars(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray,
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


def eso(header: Any, key: str, value: Any, comment: str = "") -> None:
    header[f"HIERARCH ESO {key}"] = (value, comment) if comment else value


def common_header(h: Any, instrument: str, telescope: str, t: datetime, exptime: float,
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
    h["MJD-OBS"] = (mjd(t), "Obs start")
    h["DATE-OBS"] = isot(t)
    h["UTC"] = (t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6, "UTC (s)")
    h["LST"] = (round(lst_seconds(t), 3), "LST (s)")
    h["PI-COI"] = obs["pi"]
    h["OBSERVER"] = "UNKNOWN"
    h["ARCFILE"] = name
    h["ORIGFILE"] = f"{instrument}_{obs['template_label']}_{obs['expno']:04d}.fits"
    eso(h, "OBS ID", obs["obs_id"])
    eso(h, "OBS NAME", obs["obs_name"])
    eso(h, "OBS PROG ID", obs["prog_id"])
    eso(h, "OBS PI-COI NAME", obs["pi"])
    eso(h, "OBS START", obs["obs_start"])
    eso(h, "OBS TARG NAME", obs["object"])
    eso(h, "TPL ID", obs["tpl_id"])
    eso(h, "TPL NAME", obs["tpl_name"])
    eso(h, "TPL START", obs["tpl_start"])
    eso(h, "TPL NEXP", obs["nexp"])
    eso(h, "TPL EXPNO", obs["expno"])
    eso(h, "DPR CATG", dpr[0])
    eso(h, "DPR TYPE", dpr[1])
    eso(h, "DPR TECH", dpr[2])
    eso(h, "TEL AIRM START", 1.150 + 0.002 * obs["expno"])
    eso(h, "TEL AIRM END", 1.152 + 0.002 * obs["expno"])
    eso(h, "TEL AMBI FWHM START", 0.72)
    eso(h, "TEL AMBI FWHM END", 0.74)


def obs_info(instrument: str, start: datetime, nexp: int, expno: int, kind: str) -> dict[str, Any]:
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
        "obs_start": isot(start - timedelta(minutes=4)),
        "tpl_id": tpl[0],
        "tpl_name": tpl[1],
        "tpl_start": isot(start - timedelta(seconds=30)),
        "template_label": tpl[2],
        "nexp": nexp,
        "expno": expno,
    }


def jitter_arcsec(i: int) -> tuple[float, float]:
    """Deterministic jitter pattern (arcsec, east and north); frame 0 at the centre."""
    if i == 0:
        return 0.0, 0.0
    angle = 2.399963 * i  # golden angle: offsets do not repeat
    # ≥5": with smaller jitters the recipe's sky keeps star residuals and the
    # WCS match of the later frames goes wrong (measured: rms 0.5-1.3" at 1-3").
    radius = 5.0 + 0.5 * (i % 3)
    return radius * math.cos(angle), radius * math.sin(angle)


def make_wcs(header: dict[str, Any]) -> Any:
    from astropy.io import fits
    from astropy.wcs import WCS

    h = fits.Header()
    h["NAXIS"] = 2
    for k, v in header.items():
        h[k] = v
    return WCS(h)


def stars_on(header: dict[str, Any], stars: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of the stars in the frame described by ``header``."""
    x, y = make_wcs(header).wcs_world2pix(stars["ra"], stars["dec"], 0)
    return x, y


def offset_pointing(center: tuple[float, float], east_arcsec: float, north_arcsec: float) -> tuple[float, float]:
    dec = center[1] + north_arcsec / 3600.0
    ra = center[0] + east_arcsec / 3600.0 / math.cos(math.radians(center[1]))
    return ra, dec

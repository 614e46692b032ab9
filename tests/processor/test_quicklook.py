"""Quick-look images: decoded and measured, not just "a file was written".

The images are drawn from FITS files made here with a known WCS, so the test
knows where the target must appear: a star is put at the target's pixel on
one chip of a two-chip mosaic, and the green target circle in the PNG must be
centred on the star's image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from services.processor import quicklook

SCALE = 0.106 / 3600  # HAWK-I's pixel scale, degrees
TARGET = (150.10, -25.35)


def _chip_wcs(crval: tuple[float, float], crpix: tuple[float, float]) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cd = [[-SCALE, 0.0], [0.0, SCALE]]
    return wcs


def _decode(path: Path) -> np.ndarray:
    from matplotlib import image

    with path.open("rb") as f:
        return image.imread(io.BytesIO(f.read()), format="png")


def _mosaic(path: Path, *, star: bool = True, n: int = 300, primary: dict | None = None) -> Path:
    """Two chips side by side on the sky (a gap between them); a star at TARGET on the second."""
    rng = np.random.default_rng(1)
    hdus = [fits.PrimaryHDU()]
    hdus[0].header.update({"OBJECT": "NGC 1234", "EXPTIME": 120.0, "DATE-OBS": "2026-11-20T01:02:03.456",
                           "HIERARCH ESO INS FILT1 NAME": "Ks", "RA": TARGET[0], "DEC": TARGET[1],
                           **(primary or {})})
    # Chip 2 has the target 70 px right and 40 px up of its centre; chip 1 lies west of chip 2.
    chip2 = _chip_wcs(TARGET, (n / 2 - 70, n / 2 + 40))
    ra_c2, dec_c2 = chip2.pixel_to_world_values(n / 2, n / 2)
    chip1 = _chip_wcs((ra_c2 + (n + 40) * SCALE / np.cos(np.radians(dec_c2)), dec_c2), (n / 2, n / 2))
    for name, wcs in (("CHIP1.INT1", chip1), ("CHIP2.INT1", chip2)):
        data = rng.normal(1000.0, 10.0, (n, n)).astype(np.float32)
        if star and name == "CHIP2.INT1":
            x, y = wcs.world_to_pixel_values(*TARGET)
            yy, xx = np.mgrid[0:n, 0:n]
            data += 5000 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
        hdus.append(fits.ImageHDU(data, header=wcs.to_header(), name=name))
    fits.HDUList(hdus).writeto(path)
    return path


def _centroid(mask: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    w = np.ones(len(xs)) if weights is None else weights[ys, xs]
    return float(np.average(xs, weights=w)), float(np.average(ys, weights=w))


def test_sky_quicklook_is_a_real_image_with_the_target_on_the_star(tmp_path: Path):
    product = _mosaic(tmp_path / "HAWKI.x_jittered_image_sci_0000.fits")
    result = quicklook.render(product, tmp_path / "sci")

    assert result.kind == quicklook.KIND_SKY, result.note
    assert result.png == tmp_path / "sci" / "quicklook" / "HAWKI.x_jittered_image_sci_0000.png"
    png = _decode(result.png)
    thumb = _decode(result.thumbnail)
    assert png.shape[:2] == (quicklook.QUICKLOOK_PX, quicklook.QUICKLOOK_PX)
    assert thumb.shape[:2] == (quicklook.THUMBNAIL_PX, quicklook.THUMBNAIL_PX)
    rgb = png[..., :3]
    assert rgb.std() > 0.05, "the quick-look is blank"
    assert thumb[..., :3].std() > 0.05, "the thumbnail is blank"
    import hashlib
    assert hashlib.sha256(result.png.read_bytes()).hexdigest() == result.png_sha256

    # The target circle: pure green pixels.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    green = (g > 0.8) & (r < 0.3) & (b < 0.3)
    assert green.sum() > 50, "no target marker drawn"
    cx, cy = _centroid(green)
    # The star: where nearly every grey pixel (over 7x7 PNG pixels) is saturated, near the circle;
    # grid lines and the circle (not grey) count neither way.
    y0, x0 = int(cy), int(cx)
    win = (slice(y0 - 60, y0 + 61), slice(x0 - 60, x0 + 61))
    grey = (np.abs(r - g) < 0.02) & (np.abs(g - b) < 0.02)
    saturated = grey & (rgb.mean(axis=2) > 0.97)
    fraction = _box(saturated[win].astype(float), 7) / np.maximum(_box(grey[win].astype(float), 7), 1e-9)
    core = fraction > 0.95
    assert core.sum() >= 5, "no star under the target circle"
    sx, sy = _centroid(core)
    sx, sy = sx + x0 - 60, sy + y0 - 60
    assert abs(sx - cx) < 2 and abs(sy - cy) < 2, \
        f"target circle at ({cx:.1f}, {cy:.1f}), star at ({sx:.1f}, {sy:.1f})"


def _box(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over size x size pixels (same shape, edges zero)."""
    c = np.cumsum(np.cumsum(np.pad(image, ((1, 0), (1, 0))), axis=0), axis=1)
    s = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    out = np.zeros_like(image)
    h = size // 2
    out[h:h + s.shape[0], h:h + s.shape[1]] = s / size**2
    return out


def test_target_comes_from_tel_targ_alpha_delta_before_ra_dec():
    header = {"ESO TEL TARG ALPHA": 100026.0, "ESO TEL TARG DELTA": -252100.5, "RA": 1.0, "DEC": 2.0}
    ra, dec = quicklook.target_of(header)
    assert ra == pytest.approx((10 + 0 / 60 + 26 / 3600) * 15)
    assert dec == pytest.approx(-(25 + 21 / 60 + 0.5 / 3600))
    assert quicklook.target_of({"RA": 10.5, "DEC": -3.0}) == (10.5, -3.0)
    assert quicklook.target_of({}) is None


def test_title_names_object_filter_exptime_and_date():
    title = quicklook.title_of({"OBJECT": "NGC 1234", "ESO INS FILT1 NAME": "Ks", "EXPTIME": 120.0,
                                "DATE-OBS": "2026-11-20T01:02:03.456"}, "x.fits")
    assert title.split("  |  ") == ["NGC 1234", "Ks", "120 s", "2026-11-20T01:02:03.456"]


def test_no_wcs_gives_a_pixel_quicklook_with_a_note(tmp_path: Path):
    path = tmp_path / "nowcs.fits"
    data = np.random.default_rng(2).normal(100, 5, (200, 300)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(data)]).writeto(path)
    result = quicklook.render(path, tmp_path)
    assert result.kind == quicklook.KIND_PIXEL
    assert "WCS" in result.note
    png = _decode(result.png)
    assert png.shape[:2] == (quicklook.QUICKLOOK_PX, quicklook.QUICKLOOK_PX)
    assert png[..., :3].std() > 0.05


@pytest.mark.parametrize("fill, why", [(np.nan, "all NaN"), (42.0, "constant")])
def test_blank_images_get_a_labelled_placeholder(tmp_path: Path, fill: float, why: str):
    path = tmp_path / "blank.fits"
    fits.HDUList([fits.PrimaryHDU(np.full((100, 100), fill, dtype=np.float32))]).writeto(path)
    result = quicklook.render(path, tmp_path)
    assert result.kind == quicklook.KIND_PLACEHOLDER
    assert why in result.note
    assert _decode(result.png)[..., :3].std() > 0.01  # the label is drawn
    assert _decode(result.thumbnail).shape[:2] == (quicklook.THUMBNAIL_PX, quicklook.THUMBNAIL_PX)


def test_unreadable_file_gets_a_placeholder_not_an_exception(tmp_path: Path):
    path = tmp_path / "broken.fits"
    path.write_bytes(b"SIMPLE  = not really a FITS file")
    result = quicklook.render(path, tmp_path)
    assert result.kind == quicklook.KIND_PLACEHOLDER
    assert result.png.is_file() and result.thumbnail.is_file()


def test_importing_the_module_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, services.processor.quicklook; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_malformed_header_card_costs_the_keyword_not_the_quicklook(tmp_path: Path):
    """A long hostile OBJECT comes back from a recipe as CONTINUE cards astropy cannot parse."""
    path = _mosaic(tmp_path / "p.fits")
    raw = bytearray(path.read_bytes())
    card = b"CONTINUE  = 12345 / not a string value".ljust(80)
    start = raw.index(b"END" + b" " * 77)  # replace the primary header's END with a bad card + END
    raw[start:start + 160] = card + (b"END" + b" " * 77)
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # noqa: B017 - astropy's own error for the card
        dict(fits.getheader(path).items())
    result = quicklook.render(path, tmp_path / "sci")
    assert result.kind == quicklook.KIND_SKY, result.note


def test_header_text_is_not_mathtext(tmp_path: Path):
    """An OBJECT with "$" (invalid mathtext) is drawn as text, not a failed quick-look."""
    product = _mosaic(tmp_path / "m.fits", primary={"OBJECT": r"$\frac{ <b>NGC$ 1234"})
    result = quicklook.render(product, tmp_path / "sci")
    assert result.kind == quicklook.KIND_SKY, result.note

"""What a quick-look shows, read from a product: its chips, their WCS and the common sky frame.

The chips of a product (every 2-D image extension) are read once, block-averaged
to the quick-look's resolution, each with its celestial WCS; the OB's target and
the title come from the primary header. :func:`common_frame` makes the one TAN
frame all chips are drawn in, :func:`chip_to_frame` the affine map that places
a chip there. No matplotlib here: :mod:`services.processor.quicklook` draws.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)


@dataclass
class Chip:
    name: str
    data: Any  # 2-D float array, block-averaged
    binning: int
    wcs: Any = None  # celestial astropy WCS of the full-resolution chip, or None
    shape: tuple[int, int] = (0, 0)  # full-resolution (ny, nx)


@dataclass
class Info:
    title: str
    target: tuple[float, float] | None = None  # ICRS degrees
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# header helpers
# ---------------------------------------------------------------------------

_SEXA = re.compile(r"^\s*([+-]?)(\d{1,3})(\d{2})(\d{2}(?:\.\d*)?)\s*$")


def _eso_sexagesimal(value: Any, hours: bool) -> float | None:
    """``TEL TARG ALPHA`` (HHMMSS.sss) / ``DELTA`` (±DDMMSS.ss) as degrees."""
    if isinstance(value, (int, float)):
        text = f"{value:.4f}"
    elif isinstance(value, str):
        text = value
    else:
        return None
    text = text.strip()
    negative = text.startswith("-")
    body = text.lstrip("+-")
    whole, _, frac = body.partition(".")
    whole = whole.zfill(6)
    match = _SEXA.match(whole + ("." + frac if frac else ""))
    if not match:
        return None
    _, a, b, c = match.groups()
    degrees = int(a) + int(b) / 60 + float(c) / 3600
    degrees *= 15 if hours else 1
    return -degrees if negative else degrees


def target_of(header: Mapping[str, Any]) -> tuple[float, float] | None:
    """The OB's target (ICRS degrees) from a primary header: TEL TARG ALPHA/DELTA, else RA/DEC."""
    ra = _eso_sexagesimal(_first(header, "ESO TEL TARG ALPHA", "HIERARCH ESO TEL TARG ALPHA"), True)
    dec = _eso_sexagesimal(_first(header, "ESO TEL TARG DELTA", "HIERARCH ESO TEL TARG DELTA"), False)
    if ra is not None and dec is not None and -90 <= dec <= 90:
        return ra % 360, dec
    try:
        ra_f, dec_f = float(header["RA"]), float(header["DEC"])
    except (KeyError, TypeError, ValueError):
        return None
    if math.isfinite(ra_f) and math.isfinite(dec_f) and -90 <= dec_f <= 90:
        return ra_f % 360, dec_f
    return None


def _first(header: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = header.get(key)
        if value not in (None, ""):
            return value
    return None


def title_of(header: Mapping[str, Any], fallback: str) -> str:
    """Object, filter, exposure time and date, from the primary header."""
    obj = _first(header, "OBJECT", "ESO OBS TARG NAME", "HIERARCH ESO OBS TARG NAME") or fallback
    filters = [str(_first(header, f"ESO INS FILT{n} NAME", f"HIERARCH ESO INS FILT{n} NAME") or "")
               for n in range(1, 5)]
    filters = [f for f in dict.fromkeys(filters) if f and f.upper() not in ("OPEN", "FREE")]
    exptime = _first(header, "EXPTIME", "TEXPTIME", "ESO DET DIT", "HIERARCH ESO DET DIT")
    date = _first(header, "DATE-OBS", "DATE")
    parts = [str(obj)]
    parts.append("/".join(filters) if filters else "filter ?")
    try:
        parts.append(f"{float(exptime):g} s")
    except (TypeError, ValueError):
        parts.append("exptime ?")
    parts.append(str(date) if date else "date ?")
    return "  |  ".join(parts)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _celestial_wcs(header: Any) -> tuple[Any, str]:
    """The header's celestial WCS, or (None, why not)."""
    import warnings

    import numpy as np
    from astropy.wcs import WCS, FITSFixedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
    except Exception as e:  # noqa: BLE001 - any WCS parsing problem means "no usable WCS"
        return None, f"WCS unreadable ({type(e).__name__}: {e})"
    if not wcs.has_celestial:
        return None, "no celestial WCS in the header"
    try:
        scale = wcs.proj_plane_pixel_scales()
        values = [float(getattr(s, "value", s)) for s in scale]
        ny, nx = int(header.get("NAXIS2", 1)), int(header.get("NAXIS1", 1))
        centre = wcs.pixel_to_world_values(nx / 2, ny / 2)
    except Exception as e:  # noqa: BLE001
        return None, f"WCS unusable ({type(e).__name__}: {e})"
    if not all(np.isfinite(values)) or min(values) <= 0 or max(values) > 1.0 \
            or not all(np.isfinite(np.asarray(centre, dtype=float))):
        return None, "WCS gives no sensible pixel scale"
    return wcs, ""


def _block_mean(data: Any, factor: int) -> Any:
    import numpy as np

    if factor <= 1:
        return np.asarray(data, dtype=np.float32)
    ny, nx = data.shape
    ny_b, nx_b = ny // factor, nx // factor
    if ny_b == 0 or nx_b == 0:
        return np.asarray(data, dtype=np.float32)
    trimmed = np.asarray(data[: ny_b * factor, : nx_b * factor], dtype=np.float32)
    blocks = trimmed.reshape(ny_b, factor, nx_b, factor)
    with np.errstate(invalid="ignore"):
        # nanmean without its all-NaN warning: sum and count of the finite pixels
        finite = np.isfinite(blocks)
        total = np.where(finite, blocks, 0).sum(axis=(1, 3))
        count = finite.sum(axis=(1, 3))
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _clean(header: Any) -> Any:
    """The header without cards astropy cannot parse (a recipe's CONTINUE of a long value, say).

    One malformed card must cost that keyword, not the quick-look.
    """
    from astropy.io import fits

    cards = []
    for card in header.cards:
        try:
            card.value  # noqa: B018 - parses the card
            cards.append(card)
        except Exception as e:  # noqa: BLE001 - astropy raises several kinds for malformed cards
            _log.debug("quick-look: header card %r left out: %s", card.keyword, e)
    return fits.Header(cards)


def read_chips(path: Path, target_px: int) -> tuple[dict[str, Any], list[Chip], list[str]]:
    """Primary header and the image chips, block-averaged so the mosaic is about ``target_px`` wide."""
    from astropy.io import fits

    notes: list[str] = []
    chips: list[Chip] = []
    # Opened here, once: given a name, astropy opens the file a second time to sniff compression.
    with path.open("rb") as stream, fits.open(stream, memmap=True, lazy_load_hdus=True) as hdul:
        primary_header = _clean(hdul[0].header)
        primary = dict(primary_header.items())
        images = []
        for index, hdu in enumerate(hdul):
            if not getattr(hdu, "is_image", False) or hdu.header.get("NAXIS", 0) < 2:
                continue
            shape = tuple(int(hdu.header.get(f"NAXIS{n}", 0)) for n in (2, 1))
            if min(shape) < 2:
                continue
            images.append((index, hdu, shape))
        if not images:
            return primary, [], ["no 2-D image in the file"]
        # A chip as big as the quick-look alone decides the binning (mosaic ~ 2x2 chips at most).
        biggest = max(max(shape) for _, _, shape in images)
        per_row = 2 if len(images) > 1 else 1
        factor = max(1, biggest * per_row // target_px)
        for index, hdu, shape in images:
            data = hdu.data
            if data.ndim > 2:  # a cube: its first plane
                data = data.reshape((-1, *data.shape[-2:]))[0]
            wcs, why = _celestial_wcs(_clean(hdu.header) if index else primary_header)
            if wcs is None and why:
                notes.append(f"{hdu.name or index}: {why}")
            chips.append(Chip(str(hdu.name or index), _block_mean(data, factor), factor, wcs, shape))
    return primary, chips, notes


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------


def common_frame(chips: Sequence[Chip]) -> tuple[Any, int, int]:
    """A TAN WCS centred on the chips' footprint at their finest scale, and its size (nx, ny), binned."""
    import numpy as np
    from astropy.wcs import WCS

    corners = []
    scales = []
    for chip in chips:
        ny, nx = chip.shape
        xs = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, nx / 2])
        ys = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, ny / 2])
        ra, dec = chip.wcs.pixel_to_world_values(xs, ys)
        corners.append(np.column_stack([ra, dec]))
        scales.append(min(float(getattr(s, "value", s)) for s in chip.wcs.proj_plane_pixel_scales()))
    pts = np.vstack(corners)
    # Centre: mean unit vector (safe across RA = 0).
    ra_r, dec_r = np.radians(pts[:, 0]), np.radians(pts[:, 1])
    vec = np.column_stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)]).mean(axis=0)
    ra0 = math.degrees(math.atan2(vec[1], vec[0])) % 360
    dec0 = math.degrees(math.atan2(vec[2], math.hypot(vec[0], vec[1])))
    binning = chips[0].binning
    scale = min(scales) * binning
    frame = WCS(naxis=2)
    frame.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    frame.wcs.crval = [ra0, dec0]
    frame.wcs.cdelt = [-scale, scale]
    frame.wcs.crpix = [1, 1]
    frame.wcs.radesys = "ICRS"
    x, y = frame.world_to_pixel_values(pts[:, 0], pts[:, 1])
    x0, y0 = math.floor(np.min(x)), math.floor(np.min(y))
    nx, ny = math.ceil(np.max(x)) - x0 + 1, math.ceil(np.max(y)) - y0 + 1
    frame.wcs.crpix = [1 - x0, 1 - y0]
    return frame, int(nx), int(ny)


def chip_to_frame(chip: Chip, frame: Any) -> tuple[Any, float]:
    """The 3x3 affine matrix from binned chip pixels to frame pixels, and its worst residual (frame px)."""
    import numpy as np

    ny, nx = chip.data.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 7), np.linspace(0, ny - 1, 7))
    bx, by = gx.ravel(), gy.ravel()
    f = chip.binning
    ra, dec = chip.wcs.pixel_to_world_values(f * bx + (f - 1) / 2, f * by + (f - 1) / 2)
    fx, fy = frame.world_to_pixel_values(ra, dec)
    design = np.column_stack([bx, by, np.ones_like(bx)])
    cx, *_ = np.linalg.lstsq(design, fx, rcond=None)
    cy, *_ = np.linalg.lstsq(design, fy, rcond=None)
    residual = float(np.max(np.hypot(design @ cx - fx, design @ cy - fy)))
    return np.array([cx, cy, [0.0, 0.0, 1.0]]), residual


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------


def usable_reason(chips: Sequence[Chip]) -> str:
    """Empty when there is something to show, else why not."""
    import numpy as np

    finite = [c.data[np.isfinite(c.data)] for c in chips]
    if not chips or all(v.size == 0 for v in finite):
        return "no finite pixel values (all NaN)"
    values = np.concatenate([v.ravel() for v in finite])
    if float(np.max(values)) == float(np.min(values)):
        return f"constant image (every pixel {float(values[0]):g})"
    return ""

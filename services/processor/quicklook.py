"""Quick-look PNGs of science products: what the PI and the QC scientist look at first.

One PNG per science product (and a small thumbnail), drawn from the product's
pixels and WCS:

* every 2-D image extension is a chip; chips are block-averaged down to the
  quick-look's resolution and drawn onto one WCSAxes in a common sky frame
  (a TAN projection centred on the mosaic, at the finest chip scale). Each
  chip is placed by the affine map from its own pixels to the common frame,
  fitted through its WCS on a grid of points (exact for TAN chips sharing a
  tangent point; the residual of a ZPN chip over a HAWK-I field is far below
  a quick-look pixel); no resampling of the data is needed;
* one ZScale interval over all chips, asinh (default) or linear stretch;
* RA/Dec axes and grid, the OB's target marked (``TEL TARG ALPHA/DELTA`` of
  the primary header, else ``RA``/``DEC``), north and east arrows, a scale bar
  and a title with object, filter, exposure time and date.

Bad input never stops a run: without a usable celestial WCS the quick-look is
drawn in pixel coordinates with a note; an image without finite pixels, or a
constant one, gets a labelled placeholder. The product is opened once (header
and pixels in the same pass). matplotlib and astropy's WCS machinery are
imported when the first quick-look is drawn, not when the service starts.

Reading the chips and their sky geometry is :mod:`services.processor.quicklook_sky`;
this module draws. The PNG bytes are hashed before they are written, so the checksums listed in
the manifest come from the bytes themselves without reading the files back.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.processor.quicklook_sky import (
    Chip,
    Info,
    chip_to_frame,
    common_frame,
    read_chips,
    target_of,
    title_of,
    usable_reason,
)
from shared.files import write_atomic
from shared.layout import FITS_SUFFIXES

_log = logging.getLogger(__name__)

#: Sub-directory of the run's science directory holding the quick-looks.
QUICKLOOK_DIR = "quicklook"
#: Size of the quick-look (pixels, square) and of its thumbnail.
QUICKLOOK_PX = 1000
THUMBNAIL_PX = 200
_DPI = 100
#: Colour of the target marker (also what the image tests look for).
TARGET_COLOUR = "#00ff00"

KIND_SKY = "sky"
KIND_PIXEL = "pixel"
KIND_PLACEHOLDER = "placeholder"


@dataclass(frozen=True)
class QuickLook:
    """What :func:`render` wrote: the PNG and thumbnail with their SHA-256 (hex)."""

    png: Path
    thumbnail: Path
    png_sha256: str
    thumbnail_sha256: str
    kind: str  # sky, pixel or placeholder
    note: str = ""
    seconds: float = 0.0


def quicklook_paths(product: Path, sci_dir: Path) -> tuple[Path, Path]:
    """Where the quick-look of ``product`` and its thumbnail go: ``<sci>/quicklook/<stem>.png``."""
    stem = product.name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):  # .fits.fz before .fits
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    directory = sci_dir / QUICKLOOK_DIR
    return directory / f"{stem}.png", directory / f"{stem}_thumb.png"


def _norm(chips: Sequence[Chip], stretch: str) -> Any:
    import numpy as np
    from astropy.visualization import AsinhStretch, ImageNormalize, LinearStretch, ZScaleInterval

    values = np.concatenate([c.data[np.isfinite(c.data)].ravel() for c in chips])
    vmin, vmax = ZScaleInterval().get_limits(values)
    if not vmax > vmin:
        vmin, vmax = float(np.min(values)), float(np.max(values))
    chosen = AsinhStretch(0.1) if stretch == "asinh" else LinearStretch()
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=chosen, clip=True)


def _figure(size_px: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size_px / _DPI, size_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _draw_chips(ax: Any, placed: Sequence[tuple[Chip, Any]], norm: Any) -> None:
    """Each chip's pixels onto ``ax``, placed by its affine matrix (chip pixels -> frame pixels)."""
    from matplotlib.transforms import Affine2D

    for chip, matrix in placed:
        ax.imshow(chip.data, cmap="gray", norm=norm, origin="lower", interpolation="nearest",
                  transform=Affine2D(matrix) + ax.transData)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _placeholder(size_px: int, title: str, why: str) -> bytes:
    fig = _figure(size_px)
    fig.patch.set_facecolor("#dddddd")
    fontsize = max(6, size_px // 50)
    fig.text(0.5, 0.55, "no quick-look", ha="center", va="center", fontsize=fontsize * 2, color="#333333")
    fig.text(0.5, 0.45, why, ha="center", va="center", fontsize=fontsize, color="#333333", wrap=True,
             parse_math=False)
    fig.text(0.5, 0.95, title, ha="center", va="top", fontsize=fontsize, color="#333333", wrap=True,
             parse_math=False)
    return _png(fig)


def _arrows_and_bar(ax: Any, frame: Any, nx: int, ny: int) -> None:
    """North/east arrows (top left) and a scale bar (bottom right), in frame pixels."""
    import numpy as np

    scale_deg = abs(float(frame.wcs.cdelt[1]))
    ra0, dec0 = frame.pixel_to_world_values(nx / 2, ny / 2)
    step = 30 * scale_deg
    x0, y0 = frame.world_to_pixel_values(ra0, dec0)
    xn, yn = frame.world_to_pixel_values(ra0, dec0 + step)
    xe, ye = frame.world_to_pixel_values(ra0 + step / max(math.cos(math.radians(dec0)), 1e-6), dec0)
    length = 0.1 * min(nx, ny)
    origin = np.array([0.15 * nx, 0.82 * ny])
    for (x, y), label in (((xn, yn), "N"), ((xe, ye), "E")):
        d = np.array([x - x0, y - y0], dtype=float)
        d = d / (np.hypot(*d) or 1.0) * length
        ax.annotate("", xy=origin + d, xytext=origin, xycoords="data",
                    arrowprops={"arrowstyle": "->", "color": "yellow", "lw": 2})
        ax.text(*(origin + 1.25 * d), label, color="yellow", fontsize=12, ha="center", va="center",
                fontweight="bold")
    # Scale bar: the largest of 10", 30", 1', 2', 5' shorter than a quarter of the width.
    width_arcsec = nx * scale_deg * 3600
    bar = max((s for s in (10, 30, 60, 120, 300) if s <= width_arcsec / 4), default=10)
    bar_px = bar / 3600 / scale_deg
    bx, by = 0.95 * nx - bar_px, 0.06 * ny
    ax.plot([bx, bx + bar_px], [by, by], color="yellow", lw=3)
    ax.text(bx + bar_px / 2, by + 0.02 * ny, f'{bar}"' if bar < 60 else f"{bar // 60}'",
            color="yellow", fontsize=12, ha="center", va="bottom")


def _draw_sky(chips: Sequence[Chip], info: Info, size_px: int, stretch: str) -> tuple[bytes, bytes]:
    import numpy as np

    frame, nx, ny = common_frame(chips)
    norm = _norm(chips, stretch)
    placed = []
    for chip in chips:
        matrix, residual = chip_to_frame(chip, frame)
        if residual > 1.0:
            info.notes.append(f"{chip.name}: chip placed to within {residual:.1f} quick-look pixels")
        placed.append((chip, matrix))

    fig = _figure(size_px)
    ax = fig.add_axes([0.14, 0.1, 0.8, 0.8], projection=frame)
    ax.set_facecolor("black")
    _draw_chips(ax, placed, norm)
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.coords.grid(True, color="cyan", ls=":", alpha=0.6)
    ax.coords[0].set_axislabel("RA (ICRS)")
    ax.coords[1].set_axislabel("Dec (ICRS)")
    ax.coords[0].set_major_formatter("hh:mm:ss")
    ax.coords[1].set_major_formatter("dd:mm:ss")
    if info.target is not None:
        tx, ty = frame.world_to_pixel_values(*info.target)
        if np.isfinite(tx) and np.isfinite(ty):
            ax.plot([tx], [ty], marker="o", ms=22, mfc="none", mec=TARGET_COLOUR, mew=2.5)
            fig.text(0.94, 0.045, "green circle: OB target", ha="right", fontsize=9)
    else:
        info.notes.append("no target position in the header")
    _arrows_and_bar(ax, frame, nx, ny)
    fig.suptitle(info.title, fontsize=12, parse_math=False)  # header text: a "$" is not mathtext
    if info.notes:
        fig.text(0.5, 0.015, "; ".join(info.notes)[:200], ha="center", fontsize=8, color="#aa0000",
                 parse_math=False)
    full = _png(fig)
    return full, _thumbnail(placed, norm, nx, ny)


def _thumbnail(placed: Sequence[tuple[Chip, Any]], norm: Any, nx: int, ny: int) -> bytes:

    fig = _figure(THUMBNAIL_PX)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    fig.patch.set_facecolor("black")
    _draw_chips(ax, placed, norm)
    side = max(nx, ny)
    ax.set_xlim((nx - side) / 2 - 0.5, (nx + side) / 2 - 0.5)
    ax.set_ylim((ny - side) / 2 - 0.5, (ny + side) / 2 - 0.5)
    return _png(fig)


def _draw_pixels(chips: Sequence[Chip], info: Info, size_px: int, stretch: str) -> tuple[bytes, bytes]:
    """No usable WCS: the chips side by side in pixel coordinates, with the reason."""
    from matplotlib.transforms import Affine2D

    norm = _norm(chips, stretch)
    placed = []
    x = 0.0
    height = max(c.data.shape[0] for c in chips)
    for chip in chips:
        placed.append((chip, Affine2D().translate(x, 0).get_matrix()))
        x += chip.data.shape[1] + 4
    nx, ny = int(x - 4), int(height)
    binning = chips[0].binning
    fig = _figure(size_px)
    ax = fig.add_axes([0.12, 0.1, 0.82, 0.8])
    ax.set_facecolor("black")
    _draw_chips(ax, placed, norm)
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_aspect("equal")
    ax.set_xlabel(f"x (pixels / {binning})" if binning > 1 else "x (pixels)")
    ax.set_ylabel(f"y (pixels / {binning})" if binning > 1 else "y (pixels)")
    fig.suptitle(info.title, fontsize=12, parse_math=False)
    fig.text(0.5, 0.02, "pixel coordinates: " + "; ".join(info.notes)[:180], ha="center", fontsize=9, parse_math=False,
             color="#aa0000")
    return _png(fig), _thumbnail(placed, norm, nx, ny)


def draw(path: Path, *, size_px: int = QUICKLOOK_PX, stretch: str = "asinh",
         target: tuple[float, float] | None = None) -> tuple[bytes, bytes, str, str]:
    """The quick-look and thumbnail PNG bytes of a FITS file, its kind and the note on it.

    ``target`` (ICRS degrees) overrides the header's target position.
    Raises OSError when the file cannot be read at all (the caller decides).
    """
    primary, chips, notes = read_chips(path, size_px)
    info = Info(title_of(primary, path.name), target or target_of(primary), list(notes))
    why = usable_reason(chips) if chips else "; ".join(notes)
    if why:
        return (_placeholder(size_px, info.title, why), _placeholder(THUMBNAIL_PX, "", why),
                KIND_PLACEHOLDER, why)
    chips = [c for c in chips if usable_reason([c]) == ""] or list(chips)
    if all(c.wcs is not None for c in chips):
        try:
            full, thumb = _draw_sky(chips, info, size_px, stretch)
            return full, thumb, KIND_SKY, "; ".join(info.notes)
        except Exception as e:  # noqa: BLE001 - a WCS that fails while drawing: fall back to pixels
            _log.warning("quick-look of %s in sky coordinates failed, drawing pixels: %s", path.name, e)
            info.notes.append(f"WCS failed while drawing ({type(e).__name__})")
    elif not info.notes:
        info.notes.append("no usable WCS")
    full, thumb = _draw_pixels(chips, info, size_px, stretch)
    return full, thumb, KIND_PIXEL, "; ".join(info.notes)


def render(product: Path, sci_dir: Path, *, size_px: int = QUICKLOOK_PX, stretch: str = "asinh",
           target: tuple[float, float] | None = None) -> QuickLook:
    """Write the quick-look and thumbnail of ``product`` under ``<sci_dir>/quicklook/``.

    Never raises for bad data: an unreadable file gets a placeholder naming the error.
    """
    started = time.perf_counter()
    png_path, thumb_path = quicklook_paths(product, sci_dir)
    try:
        full, thumb, kind, note = draw(product, size_px=size_px, stretch=stretch, target=target)
    except Exception as e:  # noqa: BLE001 - a quick-look must never stop a run
        _log.warning("quick-look of %s failed: %s", product.name, e)
        note = f"could not read the image: {type(e).__name__}: {e}"
        full, thumb, kind = _placeholder(size_px, product.name, note), _placeholder(THUMBNAIL_PX, "", note), \
            KIND_PLACEHOLDER
    png_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(png_path, full)
    write_atomic(thumb_path, thumb)
    seconds = time.perf_counter() - started
    _log.info("quick-look of %s (%s) in %.2f s", product.name, kind, seconds)
    return QuickLook(png_path, thumb_path, hashlib.sha256(full).hexdigest(), hashlib.sha256(thumb).hexdigest(),
                     kind, note, seconds)


def preload() -> threading.Thread:
    """Import the drawing libraries in a background thread (about 3 s, mostly astropy.coordinates).

    Called when the processor's ports are built, so the import overlaps the first recipe instead of
    delaying the first quick-look; the service's start-up itself imports nothing heavy.
    """

    def load() -> None:
        try:
            import astropy.visualization.wcsaxes
            import astropy.wcs  # noqa: F401
            import matplotlib.backends.backend_agg
            import matplotlib.figure  # noqa: F401
        except ImportError as e:  # reported when a quick-look is drawn
            _log.warning("quick-look libraries not importable: %s", e)

    thread = threading.Thread(target=load, name="quicklook-preload", daemon=True)
    thread.start()
    return thread


def with_quicklook(product: Any, sci_dir: Path, stretch: str = "asinh") -> Any:
    """The processor's quick-look port: ``product`` (a ``shared.messages.Product``) with its quick-look."""
    from shared.messages import QuickLookImage

    look = render(Path(product.path), sci_dir, stretch=stretch)
    image = QuickLookImage(path=str(look.png), thumbnail=str(look.thumbnail), checksum=f"sha256:{look.png_sha256}",
                           thumbnail_checksum=f"sha256:{look.thumbnail_sha256}", kind=look.kind, note=look.note)
    return product.model_copy(update={"quicklook": image})

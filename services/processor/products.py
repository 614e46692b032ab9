"""renameProducts and moveProducts: product names from header values, then files into place.

Naming scheme
-------------
A product of an AB is renamed to::

    <INSTR>.<DATE-OBS of the AB's first raw frame>_<pro.catg in lower case>_<NNNN>.fits

for example ``HAWKI.2026-11-20T01:02:03.456_jittered_image_sci_0000.fits``.

* ``<INSTR>`` is the instrument name (``INSTRUME`` of the raw frames).
* ``DATE-OBS`` is the earliest ``DATE-OBS`` among the AB's raw frames, as
  written in the header (milliseconds, no time zone). It is unique per AB
  because an AB owns its raw frames, and it ties every product to the archive
  name of its first raw frame (``ARCFILE`` carries the same timestamp), much
  like the DFOS ``r.<INSTR>.<timestamp>_<NNNN>`` names.
* ``<pro.catg>`` is ``HIERARCH ESO PRO CATG`` of the product, lower case, so
  the name says what the file is without opening it.
* ``<NNNN>`` counts products of the same PRO.CATG within the AB, from 0000,
  in the recipe's own order (``exp_1``, ``exp_2``, ... sorted naturally), so
  per-exposure products keep the exposure order.

A product without PRO.CATG (a recipe that died while writing) is named with
``unknown``. Headers are not edited: the recipe's CHECKSUM/DATASUM stay valid.

Log files of an AB go to the run's log directory as ``<AB>.ab`` (the AB),
``<AB>.rblog`` (the esorex log), ``<AB>.sof`` (the SOF) and ``<AB>.out``
(esorex's stdout and stderr).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from services.processor.esorex import Product
from shared.files import fsync_dir, fsync_file
from shared.messages import Product as MessageProduct
from shared.messages import RawFrame

_log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:+-]")


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def first_date_obs(dates: Iterable[object]) -> str:
    """The earliest DATE-OBS of an AB's raw frames (strings as in the headers ingest read).

    Raises
    ------
    ValueError
        No raw frame carries DATE-OBS.
    """
    found = [str(d).strip() for d in dates if d not in (None, "")]
    if not found:
        raise ValueError("no DATE-OBS in the raw frames: cannot name the products")
    # ISO timestamps of the same format sort chronologically as strings.
    return min(found)


def product_name(instrument: str, date_obs: str, pro_catg: str, index: int) -> str:
    """One name of the scheme (see the module docstring)."""
    catg = _UNSAFE.sub("_", (pro_catg or "unknown").lower())
    return f"{instrument.upper()}.{date_obs}_{catg}_{index:04d}.fits"


def plan_names(products: Sequence[Product], instrument: str, date_obs: str) -> list[tuple[Product, str]]:
    """New names for the products of one AB, without touching any file."""
    counters: dict[str, int] = {}
    planned = []
    for product in sorted(products, key=lambda p: (p.pro_catg, _natural_key(p.path.name))):
        n = counters.get(product.pro_catg, 0)
        counters[product.pro_catg] = n + 1
        planned.append((product, product_name(instrument, date_obs, product.pro_catg, n)))
    return planned


def move_products(products: Sequence[Product], sci_dir: Path, instrument: str | None = None,
                  date_obs: str | None = None) -> list[Product]:
    """renameProducts + moveProducts: each product file renamed into the science directory, once.

    With ``instrument`` and ``date_obs`` the files get the names of the scheme
    (see the module docstring); without, they keep their names. The working
    directory lies on the same file system as the science directory, so this
    is a rename, not a copy.

    Raises
    ------
    FileExistsError
        A file of that name is already there; nothing is overwritten.
    """
    sci_dir.mkdir(parents=True, exist_ok=True)
    if instrument is not None and date_obs is not None:
        planned = plan_names(products, instrument, date_obs)
    else:
        planned = [(product, product.path.name) for product in products]
    moved = []
    for product, name in planned:
        target = sci_dir / name
        if target.exists():
            raise FileExistsError(f"{target} exists already; refusing to overwrite a product")
        shutil.move(str(product.path), target)  # os.rename on one file system
        fsync_file(target)  # esorex does not: the products must be durable before the run is acked
        moved.append(replace(product, path=target))
    fsync_dir(sci_dir)
    _log.info("moved %d products to %s", len(moved), sci_dir)
    return moved


def move_logs(workdir: Path, log_dir: Path, ab_name: str) -> dict[str, Path]:
    """moveProducts (logs): the esorex log, SOF and captured output into the log directory.

    Moved, not copied: the working directory is discarded afterwards. Missing
    pieces (a recipe that never started has no log) are skipped. The AB file
    is written straight into the log directory by the processor.

    Returns
    -------
    dict
        ``{"rblog": ..., "sof": ..., "out": ...}`` for the files moved.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "rblog": workdir / "esorex.log",
        "sof": workdir / "input.sof",
        "out": workdir / "esorex.out",
    }
    written = {}
    for kind, src in sources.items():
        if not src.is_file():
            continue
        target = log_dir / f"{ab_name}.{kind}"
        shutil.move(str(src), target)
        written[kind] = target
    return written


def package_raw_frames(frames: Sequence[RawFrame], sci_dir: Path) -> list[MessageProduct]:
    """PIPE_SUPPORT=NO: the raw frames themselves are the package (hard links, or copies).

    Their checksums are the ones ingest verified; nothing is read.
    """
    products = []
    for frame in frames:
        target = sci_dir / frame.name
        if not target.exists():
            try:
                os.link(frame.path, target)
            except OSError:
                shutil.copyfile(frame.path, target)
        products.append(MessageProduct(path=str(target), pro_catg="RAW", ab="", checksum=frame.checksum))
    return products

"""The products of one recipe run: read once, renamed from header values, moved into place.

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

Reading the products
--------------------
What a recipe wrote is read here too (:func:`read_products`, one
:class:`RecipeProduct` per file): PRO.CATG, the QC cards and the header
keywords the reports want, and the checksum, all in the one pass over the
header blocks. It sits beside the naming and moving because those are its
only users and change with it (a new card to read is a new field to carry
into the message); running the recipe (``esorex``) and judging the run
(``judging``) only look at ``pro_catg``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.files import file_digest, sync_later
from shared.fitsheader import FitsHeaderError, card_value, iter_header_texts, parse_value
from shared.messages import Product, RawFrame
from shared.oca.keywords import header_key

_log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:+-]")


@dataclass(frozen=True)
class RecipeProduct:
    """One product file written by a recipe (the message model is :class:`shared.messages.Product`).

    Attributes
    ----------
    path : Path
        Where the file is now.
    pro_catg : str
        ``HIERARCH ESO PRO CATG`` of the primary header ("" when absent).
    qc : dict
        ``HIERARCH ESO QC *`` keywords of all HDUs, flattened: primary-header
        keys as ``"QC MAGZPT"``, extension keys prefixed with the extension
        name, ``"CHIP1.INT1:QC DARK MED"`` (``"HDU2:QC ..."`` when unnamed).
    """

    path: Path
    pro_catg: str
    qc: dict[str, Any] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""


def read_product(path: Path, keywords: Sequence[str] = ()) -> RecipeProduct:
    """PRO.CATG, QC keywords and the primary-header ``keywords`` (dotted) of one product file.

    Only the header blocks are read (``shared.fitsheader``), not the data: on a
    delivery this runs for every product, and astropy would parse every card.
    This is the one read of a product: the reports take what they need from
    the message, and the file's SHA-256 (``checksum``, ``sha256:<hex>``) is
    computed in the same pass, for the manifest and the upload. A product the
    recipe left half-written (it died while saving) still yields a RecipeProduct;
    the keywords that could be read are returned.
    """
    pro_catg = ""
    qc: dict[str, Any] = {}
    header: dict[str, Any] = {}
    digest = hashlib.sha256()
    try:
        for index, text in enumerate(iter_header_texts(path, digest)):
            if index == 0:
                pro_catg = str(card_value(text, "ESO PRO CATG", path) or "")
                for keyword in keywords:
                    value = card_value(text, header_key(keyword), path)
                    if value is not None:
                        header[keyword] = value
                prefix = ""
            else:
                prefix = f"{card_value(text, 'EXTNAME', path) or f'HDU{index}'}:"
            for key, value_text in _qc_cards(text):
                qc[f"{prefix}{key}"] = parse_value(value_text, path, key)
    except (OSError, FitsHeaderError) as e:  # truncated or corrupt product
        _log.warning("cannot read product %s: %s", path, e)
        return RecipeProduct(path=path, pro_catg=pro_catg, qc=qc, header=header,
                       checksum=f"sha256:{file_digest(path)}" if path.is_file() else "")
    return RecipeProduct(path=path, pro_catg=pro_catg, qc=qc, header=header, checksum=f"sha256:{digest.hexdigest()}")


def _qc_cards(text: str) -> Iterator[tuple[str, str]]:
    """(``QC ...`` key, value text) of every ``HIERARCH ESO QC`` card of a header."""
    for pos in range(0, len(text), 80):
        card = text[pos:pos + 80]
        if card.startswith("HIERARCH ESO QC "):
            key, sep, value = card[len("HIERARCH ESO "):].partition("=")
            if sep:
                yield " ".join(key.split()), value


def read_products(workdir: Path, keywords: Sequence[str] = ()) -> list[RecipeProduct]:
    """The products listed in ``<workdir>/products.json``, or found in ``products/``.

    esorex writes ``products.json`` only when the recipe returns; after a
    signal death the partial files in the output directory are reported.
    """
    listing = workdir / "products.json"
    paths: list[Path] = []
    if listing.is_file():
        try:
            for entry in json.loads(listing.read_text() or "[]"):
                p = Path(entry["name"])
                paths.append(p if p.is_absolute() else workdir / p)
        except (ValueError, KeyError, TypeError) as e:
            _log.warning("unreadable %s: %s", listing, e)
    if not paths:
        out = workdir / "products"
        paths = sorted(out.glob("*.fits")) if out.is_dir() else []
    return [read_product(p, keywords) for p in paths if p.is_file()]



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


def plan_names(products: Sequence[RecipeProduct], instrument: str, date_obs: str) -> list[tuple[RecipeProduct, str]]:
    """New names for the products of one AB, without touching any file."""
    counters: dict[str, int] = {}
    planned = []
    for product in sorted(products, key=lambda p: (p.pro_catg, _natural_key(p.path.name))):
        n = counters.get(product.pro_catg, 0)
        counters[product.pro_catg] = n + 1
        planned.append((product, product_name(instrument, date_obs, product.pro_catg, n)))
    return planned


def move_products(products: Sequence[RecipeProduct], sci_dir: Path, instrument: str | None = None,
                  date_obs: str | None = None) -> list[RecipeProduct]:
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
        moved.append(replace(product, path=target))
    # esorex does not sync: the products (bytes and names) must be durable before the run is
    # acked. One round for the AB's products (write-back of all started first, then synced in
    # lanes: shared.files.sync_all), not one fsync after another.
    sync_later([*(m.path for m in moved), sci_dir])
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


def package_raw_frames(frames: Sequence[RawFrame], sci_dir: Path) -> list[Product]:
    """PIPE_SUPPORT=NO: the raw frames themselves are the package (hard links, or copies).

    Their checksums are the ones ingest verified; nothing is read. The links (and the bytes of
    a copy) are made durable with the run's other outputs (``sync_later``): the frames' bytes
    are ingest's, durable already, but a name in sci/ is not until its directory is synced.
    """
    products = []
    copied = []
    for frame in frames:
        target = sci_dir / frame.name
        if not target.exists():
            try:
                os.link(frame.path, target)
            except OSError:
                shutil.copyfile(frame.path, target)
                copied.append(target)
        products.append(Product(path=str(target), pro_catg="RAW", ab="", checksum=frame.checksum))
    sync_later([*copied, sci_dir])
    return products

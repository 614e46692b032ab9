"""Ingest: verify a delivery, stage its raw frames, read and classify their headers.

This is step 1 of processPreImg (``mv PREIMAGING 2099-99-99``) done safely:
every run gets a staging directory of its own, filled under a temporary name
and renamed into place in one step, so two deliveries of one instrument can be
processed at once and a crash never leaves a half-staged run behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import PermanentError
from shared.files import CHUNK, file_digest, fsync_dir
from shared.messages import (
    DeliveredFile,
    DeliveryAnnounced,
    Envelope,
    RawDataReady,
    RawFrame,
)
from shared.settings import RunDirs

_log = logging.getLogger(__name__)

#: (instrument, path) -> header values by dotted name; raises for an unreadable header.
HeaderReader = Callable[[str, Path], Mapping[str, Any]]
#: (instrument, header values) -> classification, e.g. {"DO.CATG": "OBJECT"}.
Classifier = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class IngestPorts:
    """What ingest needs from the outside world."""

    delivery_dir: Path
    run_dirs: Callable[[str, str], RunDirs]
    known_instruments: Callable[[], list[str]]
    read_header: HeaderReader
    classify: Classifier
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


def handle_delivery(msg: DeliveryAnnounced, ports: IngestPorts) -> list[Envelope]:
    """Verify, stage and describe the delivered raw frames; emit RawDataReady."""
    received = ports.clock()
    known = ports.known_instruments()
    if msg.instrument not in known:
        raise PermanentError(
            f"unknown instrument {msg.instrument!r}: preimg has profiles for {', '.join(known)}; "
            "check the instrument name in the delivery message"
        )
    if not msg.files:
        raise PermanentError("the delivery lists no files; announce the delivery with its raw frames")
    names = [f.name for f in msg.files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PermanentError(f"the delivery lists these file names more than once: {', '.join(duplicates)}")

    sources = [(f, _resolve_inside(f, ports.delivery_dir)) for f in msg.files]
    dirs = ports.run_dirs(msg.instrument, msg.run_id)
    staged = _stage(sources, dirs.raw)

    frames = [_describe(msg.instrument, f, path, ports) for f, path in zip(msg.files, staged)]
    _log.info("staged %d raw frames into %s", len(frames), dirs.raw)
    return [
        RawDataReady(
            **msg.follow_up("raw_ready"),
                        raw_dir=str(dirs.raw),
            frames=tuple(frames),
            delivered_at=received,
        )
    ]


def _resolve_inside(f: DeliveredFile, area: Path) -> Path:
    """The real path of a delivered file, refused unless it lies inside the delivery area."""
    if os.path.basename(f.name) != f.name or f.name in (".", ".."):
        raise PermanentError(f"file name {f.name!r} must be a plain name without directories")
    area = area.resolve()
    candidate = Path(f.path) if Path(f.path).is_absolute() else area / f.path
    real = candidate.resolve()  # follows symlinks: a link pointing out of the area is refused
    if not real.is_relative_to(area):
        raise PermanentError(
            f"{f.name}: path {f.path!r} resolves to {real}, outside the delivery area {area}; "
            "AOG must deliver files into the delivery area"
        )
    if not real.is_file():
        raise PermanentError(f"{f.name}: file {real} does not exist (or is not a regular file); "
                             "check that the transfer finished before the delivery was announced")
    return real


def _stage(sources: list[tuple[DeliveredFile, Path]], dest: Path) -> list[Path]:
    """Copy (or hard-link) and verify every file into a temporary directory, then rename it to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    problems: list[str] = []
    try:
        for f, src in sources:
            target = tmp / f.name
            algorithm = f.checksum.split(":", 1)[0]
            problem = _verify(f, target, copied_digest=_link_or_copy(src, target, algorithm))
            if problem:
                problems.append(problem)
        if problems:
            raise PermanentError(
                "the delivery failed verification: " + "; ".join(problems) +
                ". Deliver the files again with their correct sizes and checksums",
                problems=problems,
            )
        fsync_dir(tmp)
        if dest.exists():  # left by an attempt that crashed before recording its result
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [dest / f.name for f, _ in sources]


def _link_or_copy(src: Path, target: Path, algorithm: str) -> str | None:
    """Hard-link ``src`` (no byte read), or copy it hashing the bytes on the way: the digest then."""
    try:
        os.link(src, target)
        return None
    except OSError:
        pass
    digest = hashlib.new(algorithm)
    with open(src, "rb") as source, open(target, "wb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _verify(f: DeliveredFile, path: Path, copied_digest: str | None = None) -> str:
    size = path.stat().st_size
    if size != f.size:
        kind = "truncated" if size < f.size else "larger than announced"
        return f"{f.name} is {kind}: {size} bytes on disk, {f.size} announced"
    algorithm, expected = f.checksum.split(":", 1)
    actual = copied_digest or file_digest(path, algorithm)
    if actual != expected:
        return f"{f.name}: {algorithm} checksum mismatch (announced {expected}, file has {actual})"
    return ""


def _describe(instrument: str, f: DeliveredFile, path: Path, ports: IngestPorts) -> RawFrame:
    """Header summary and classification of one staged frame; a bad header is noted, not fatal."""
    try:
        headers = dict(ports.read_header(instrument, path))
    except Exception as e:  # noqa: BLE001 - any unreadable header is reported on the frame
        _log.warning("%s: header unreadable: %s", f.name, e)
        return RawFrame(name=f.name, path=str(path), size=f.size, checksum=f.checksum,
                        problem=f"header unreadable: {e}")
    try:
        classification = dict(ports.classify(instrument, headers))
        problem = "" if classification else "no classification rule matched"
    except Exception as e:  # noqa: BLE001
        classification, problem = {}, f"classification failed: {e}"
    return RawFrame(
        name=f.name, path=str(path), size=f.size, checksum=f.checksum,
        headers=headers, classification=classification, problem=problem,
    )

"""Ingest: verify a delivery, stage its raw frames, read and classify their headers.

This is step 1 of processPreImg (``mv PREIMAGING 2099-99-99``) done safely:
every run gets a staging directory of its own (``services.ingest.staging``
does the file work behind the ``stage`` port), so two deliveries of one
instrument can be processed at once and a crash never leaves a half-staged
run behind. The handler decides; its ports touch the disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import PermanentError
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
ReadHeader = Callable[[str, Path], Mapping[str, Any]]
#: (instrument, header values) -> classification, e.g. {"DO.CATG": "OBJECT"}.
Classifier = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


#: (delivered files, the run's staging directory) -> the staged paths, in order; raises
#: PermanentError naming every file that is outside the delivery area, missing or corrupt.
Stager = Callable[[Sequence[DeliveredFile], Path], list[Path]]


@dataclass(frozen=True)
class IngestPorts:
    """What ingest needs from the outside world."""

    stage: Stager
    run_dirs: Callable[[str, str], RunDirs]
    known_instruments: Callable[[], list[str]]
    read_header: ReadHeader
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

    dirs = ports.run_dirs(msg.instrument, msg.run_id)
    staged = ports.stage(msg.files, dirs.raw)

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

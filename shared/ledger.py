"""Idempotency records: what each stage emitted for a run, kept beside the run's data.

At-least-once delivery means a stage sometimes sees a message twice (a crash
after the work, before the ack). A stage records the events it emitted once
its outputs are durable; a redelivered message then re-emits the recorded
events instead of redoing the work. The record also notes when the events were
confirmed by the broker, so a replay after that point is absorbed instead of
being sent down the chain again.

Records live in ``<data_root>/state/<INSTR>/<run_id>/<stage>.json`` and are
written atomically (temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.files import write_atomic
from shared.messages import Envelope, decode


@dataclass(frozen=True)
class StageRecord:
    """What a stage did for one run."""

    stage: str
    input_message_id: str
    delivery_id: str
    events: tuple[Envelope, ...]
    recorded_at: str
    published_at: str | None = None


class FileLedger:
    """Stage records as JSON files under ``<state_root>/<INSTR>/<run_id>/``."""

    def __init__(self, state_root: Path):
        self._root = state_root

    def _path(self, stage: str, instrument: str, run_id: str) -> Path:
        return self._root / instrument / run_id / f"{stage}.json"

    def lookup(self, stage: str, instrument: str, run_id: str) -> StageRecord | None:
        path = self._path(stage, instrument, run_id)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        return StageRecord(
            stage=raw["stage"],
            input_message_id=raw["input_message_id"],
            delivery_id=raw["delivery_id"],
            events=tuple(decode(json.dumps(e).encode()) for e in raw["events"]),
            recorded_at=raw["recorded_at"],
            published_at=raw.get("published_at"),
        )

    def record(self, stage: str, source: Envelope, events: list[Envelope]) -> StageRecord:
        rec = StageRecord(
            stage=stage,
            input_message_id=source.message_id,
            delivery_id=source.delivery_id,
            events=tuple(events),
            recorded_at=_now(),
        )
        self._write(source.instrument, source.run_id, rec)
        return rec

    def mark_published(self, stage: str, instrument: str, run_id: str) -> None:
        rec = self.lookup(stage, instrument, run_id)
        if rec is None or rec.published_at:
            return
        self._write(instrument, run_id, StageRecord(**{**rec.__dict__, "published_at": _now()}))

    def _write(self, instrument: str, run_id: str, rec: StageRecord) -> None:
        doc: dict[str, Any] = {
            "stage": rec.stage,
            "input_message_id": rec.input_message_id,
            "delivery_id": rec.delivery_id,
            "events": [json.loads(e.model_dump_json()) for e in rec.events],
            "recorded_at": rec.recorded_at,
            "published_at": rec.published_at,
        }
        write_atomic(self._path(rec.stage, instrument, run_id), json.dumps(doc, indent=1).encode())


def _now() -> str:
    return datetime.now(UTC).isoformat()

"""Idempotency records and leases: what each stage emitted for a run, kept beside the run's data.

At-least-once delivery means a stage sometimes sees a message twice (a crash
after the work, before the ack). A stage records the events it emitted once
its outputs are durable; a redelivered message then re-emits the recorded
events instead of redoing the work. The record also notes when the events were
confirmed by the broker, so a replay after that point is absorbed instead of
being sent down the chain again.

Two copies of one message can also be *in hand at once*: a broker that lost a
consumer's connection redelivers the message to another replica while the
first still runs its recipe. A per-(stage, run) **lease** makes sure only one
of them works: an exclusive ``flock`` on ``<stage>.lease``, taken before any
work and released after the result is recorded. The kernel drops the lock when
its holder dies (kill -9 included), so a lease never outlives its process. Each
acquisition gets a fencing token (one more than the last), written into the
lease file with the holder's host and pid; ``record`` refuses to write for a
token that is no longer the current one. Every lease is appended to the run's
``leases.jsonl`` when released (one file for all stages, each entry naming its
stage): the history of who worked on the run when.

The run's last answer to AOG (a PreImagingCompleted or RunFailed) is kept in
``terminal.json``, so a delivery sent again after its run finished can be
answered with it.

Records live in ``<data_root>/state/<INSTR>/<run_id>/<stage>.json`` (the directory made by
the run's first lease, its name synced with that stage's record) and are
written atomically (temporary file, fsync, rename, fsync of the directory),
each event serialised once. That the events were published is a marker naming
the input message, written into the stage's lease file after the holder (no
file of its own), so the record is never rewritten; earlier versions kept it in
``<stage>.published``, which is still read.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.files import (
    fsync_dir,
    make_dirs,
    remove_temp_files_of,
    sync_soon,
    write_all_atomic,
    write_atomic,
)
from shared.messages import Envelope, MessageDecodeError, decode

_log = logging.getLogger(__name__)

#: The run's lease history, every stage's released leases (``lease_history``).
LEASE_HISTORY = "leases.jsonl"
#: A lease file holds the holder's JSON in its first HOLDER_BYTES (padded with blanks), then the
#: stage's published marker in the next MARKER_BYTES (blank: not published).
HOLDER_BYTES = 4096
MARKER_BYTES = 4096


class LedgerError(Exception):
    """A record could not be read or written; the runner classifies it."""


class CorruptRecord(LedgerError):
    """A record file exists but cannot be understood; retrying will not mend it."""

    def __init__(self, path: Path, cause: object):
        super().__init__(f"the state record {path} is corrupt ({cause}); move it aside and replay the message")
        self.path = path


class LeaseBusy(LedgerError):
    """Another copy of the message holds the run's lease for this stage."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "acquired_at") if k in holder) or "unknown holder"
        super().__init__(f"{path.name} is held ({who})")
        self.holder = holder


class LeaseLost(LedgerError):
    """The lease was taken over while we worked: our result must not be recorded."""


@dataclass(frozen=True)
class StageRecord:
    """What a stage did for one run."""

    stage: str
    input_message_id: str
    delivery_id: str
    events: tuple[Envelope, ...]
    recorded_at: str
    published_at: str | None = None
    lease_token: int | None = None


@dataclass(frozen=True)
class Lease:
    """A held lease: the fencing token and the open, locked file."""

    path: Path
    token: int
    fd: int

    def current_token(self) -> int | None:
        try:
            return int(json.loads(os.pread(self.fd, 4096, 0) or b"{}").get("token"))
        except (ValueError, TypeError):
            return None


class FileLedger:
    """Stage records as JSON files under ``<state_root>/<INSTR>/<run_id>/``."""

    def __init__(self, state_root: Path):
        self._root = state_root

    def run_dir(self, instrument: str, run_id: str) -> Path:
        return self._root / instrument / run_id

    def _path(self, stage: str, instrument: str, run_id: str) -> Path:
        return self.run_dir(instrument, run_id) / f"{stage}.json"

    # --- records -------------------------------------------------------------------

    def lookup(self, stage: str, instrument: str, run_id: str) -> StageRecord | None:
        """The record of ``stage`` for the run, None when there is none.

        Raises ``CorruptRecord`` for a file that is not a record and
        ``OSError`` when the file cannot be read.
        """
        path = self._path(stage, instrument, run_id)
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            raw = json.loads(body)
            published = self._published_at(stage, instrument, run_id, raw["input_message_id"])
            return StageRecord(
                stage=raw["stage"],
                input_message_id=raw["input_message_id"],
                delivery_id=raw["delivery_id"],
                events=tuple(decode(json.dumps(e).encode()) for e in raw["events"]),
                recorded_at=raw["recorded_at"],
                published_at=published or raw.get("published_at"),
                lease_token=raw.get("lease_token"),
            )
        except (ValueError, KeyError, TypeError, MessageDecodeError) as e:
            raise CorruptRecord(path, e) from e

    def record(self, stage: str, source: Envelope, events: list[Envelope], lease: Lease | None = None,
               terminal: Envelope | None = None, sync_first: Sequence[Path] = (),
               entry_synced_later: bool = False) -> Callable[[], None]:
        """Write what ``stage`` emitted for ``source``; with ``lease``, only while it is still ours.

        ``terminal``: the run's answer to AOG among ``events``, kept as ``terminal.json``
        in the same round of syncs as the record. ``sync_first``: the stage's outputs (files,
        directories) whose syncs were put off (``shared.files.deferred_syncs``): synced
        with the record's bytes, so they are durable before the record appears.

        Returns a function that blocks until the record is durable and raises the
        ``OSError`` that kept it from being so. The record's bytes are synced before it is
        renamed into place; its directory entry, after. ``entry_synced_later``: that last
        sync runs in the background and the returned function waits for it (the runner's
        bus adapter, before the ack: the entry's sync overlaps the events' publishing);
        otherwise it is done before returning.
        """
        if lease is not None and lease.current_token() != lease.token:
            raise LeaseLost(f"{lease.path}: token {lease.token} is no longer current; not recording")
        # A new record (another failure of the run) is not published yet, whatever its predecessor was.
        self._clear_marker(stage, source.instrument, source.run_id, lease)
        meta = {
            "stage": stage,
            "input_message_id": source.message_id,
            "delivery_id": source.delivery_id,
            "recorded_at": _now(),
            "lease_token": lease.token if lease else None,
        }
        # Each event is serialised once, straight into the record (and the answer's copy from it).
        texts = {id(e): e.to_json() for e in events}
        body = json.dumps(meta)[:-1] + ', "events": [' + ", ".join(t.decode() for t in texts.values()) + "]}"
        record_path = self._path(stage, source.instrument, source.run_id)
        # The record's own directory is synced by the ledger below, never put off into the
        # handler's round (shared.files.sync_later): the entry appears after the outputs.
        if terminal is None:
            write_atomic(record_path, body.encode(), sync_first=sync_first, sync_dir=False)
        else:
            answer = texts.get(id(terminal)) or terminal.to_json()
            write_all_atomic({record_path: body.encode(), self._terminal_path(terminal): answer},
                             sync_first=sync_first, sync_dir=False)
        if entry_synced_later:
            return self._sync_entry(source.instrument, source.run_id)
        fsync_dir(record_path.parent)
        return _already_durable

    def remove_interrupted_record(self, stage: str, instrument: str, run_id: str) -> list[Path]:
        """Remove the temporary files of ``stage``'s record that an earlier holder of its lease left
        (killed while writing it); only the lease holder writes them. Returns what was removed."""
        return remove_temp_files_of(self._path(stage, instrument, run_id))

    def sync_record_entry(self, stage: str, instrument: str, run_id: str) -> Callable[[], None]:
        """Sync the directory entry of an existing record again, in the background; the returned
        function waits for it (a record found unpublished: its first sync may have failed)."""
        return self._sync_entry(instrument, run_id)

    def _sync_entry(self, instrument: str, run_id: str) -> Callable[[], None]:
        """Start syncing the run's state directory (the records' entries); the wait for it."""
        return sync_soon([self.run_dir(instrument, run_id)])

    def mark_published(self, stage: str, instrument: str, run_id: str, input_message_id: str) -> None:
        """Note that the events recorded for ``input_message_id`` were confirmed; the record is not rewritten.

        The marker is written into the stage's lease file, after the holder (no new file);
        not fsynced: a marker lost in a crash costs one re-emission of events consumers
        already dedupe, and one cut short is read as absent.
        """
        marker = json.dumps({"input_message_id": input_message_id, "published_at": _now()}).encode()
        self._write_marker(stage, instrument, run_id, marker)

    def _clear_marker(self, stage: str, instrument: str, run_id: str, lease: Lease | None) -> None:
        self._write_marker(stage, instrument, run_id, b"", lease)
        self._marker(stage, instrument, run_id).unlink(missing_ok=True)

    def _write_marker(self, stage: str, instrument: str, run_id: str, marker: bytes,
                      lease: Lease | None = None) -> None:
        """Put ``marker`` (blank-padded; empty: not published) after the holder in the stage's lease
        file, through the held lease's descriptor or, without one, by opening the file (gone: nothing to mark)."""
        padded = marker.ljust(MARKER_BYTES)
        if lease is not None:
            os.pwrite(lease.fd, padded, HOLDER_BYTES)
            return
        try:
            fd = os.open(self._lease_path(stage, instrument, run_id), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # the run's state was removed meanwhile: there is no record to mark
        try:
            os.pwrite(fd, padded, HOLDER_BYTES)
        finally:
            os.close(fd)

    def _lease_path(self, stage: str, instrument: str, run_id: str) -> Path:
        return self.run_dir(instrument, run_id) / f"{stage}.lease"

    def _marker(self, stage: str, instrument: str, run_id: str) -> Path:
        """Where an earlier version kept the published marker (still read; removed by a new record)."""
        return self.run_dir(instrument, run_id) / f"{stage}.published"

    def _published_at(self, stage: str, instrument: str, run_id: str, input_message_id: str) -> str | None:
        try:
            fd = os.open(self._lease_path(stage, instrument, run_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            text = b""
        else:
            try:
                text = os.pread(fd, MARKER_BYTES, HOLDER_BYTES)
            finally:
                os.close(fd)
        if not text.strip():
            try:
                text = self._marker(stage, instrument, run_id).read_bytes()
            except FileNotFoundError:
                return None
        try:
            marker = json.loads(text)
        except ValueError:
            return None  # a marker cut short: not published as far as we know; re-emitting is harmless
        if not isinstance(marker, dict) or marker.get("input_message_id") != input_message_id:
            return None
        return str(marker.get("published_at") or "") or None

    # --- the run's answer to AOG -------------------------------------------------------

    def record_terminal(self, event: Envelope) -> None:
        """Keep the run's latest terminal event (completion or failure)."""
        path = self._terminal_path(event)
        write_atomic(path, event.to_json(), sync_dir=False)
        fsync_dir(path.parent)

    def _terminal_path(self, event: Envelope) -> Path:
        return self.run_dir(event.instrument, event.run_id) / "terminal.json"

    def terminal(self, instrument: str, run_id: str) -> Envelope | None:
        path = self.run_dir(instrument, run_id) / "terminal.json"
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode(body)
        except MessageDecodeError as e:
            raise CorruptRecord(path, e.reason) from e

    # --- leases ------------------------------------------------------------------------

    @contextmanager
    def lease(self, stage: str, instrument: str, run_id: str) -> Iterator[Lease]:
        """Hold the (stage, run) lease for the duration of the block; ``LeaseBusy`` if another holds it."""
        directory = self.run_dir(instrument, run_id)
        path = self._lease_path(stage, instrument, run_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            # The run's first stage: its state directory is made here, and made durable with the
            # stage's record (``make_dirs`` under the runner's deferred syncs: the same round).
            make_dirs(directory)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LeaseBusy(path, _read_json(fd)) from None
            previous = _read_json(fd).get("token")
            token = (previous if isinstance(previous, int) else 0) + 1
            holder = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": _now()}
            body = json.dumps(holder).encode()
            # Padded over the previous holder, the published marker after it kept. Not fsynced:
            # the lock, not the file, excludes; the token is for the record.
            os.pwrite(fd, body.ljust(HOLDER_BYTES), 0)
            lease = Lease(path, token, fd)
            try:
                yield lease
            finally:
                _append_history(directory / LEASE_HISTORY, {"stage": stage, **holder, "released_at": _now()})
        finally:
            os.close(fd)  # releases the flock

    def lease_history(self, stage: str, instrument: str, run_id: str) -> list[dict[str, Any]]:
        """Every released lease of (stage, run), oldest first (an earlier version's per-stage file first)."""
        directory = self.run_dir(instrument, run_id)
        entries = []
        for path, of_stage in ((directory / f"{stage}.leases.jsonl", True), (directory / LEASE_HISTORY, False)):
            try:
                lines = path.read_text().splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                if line.strip():
                    entry = json.loads(line)
                    if of_stage or entry.get("stage") == stage:
                        entries.append(entry)
        return entries


def _append_history(path: Path, entry: dict[str, Any]) -> None:
    """Best effort: the history is for people; a full disk must not turn a finished stage into a retry."""
    try:
        with open(path, "a") as out:
            out.write(json.dumps(entry) + "\n")
    except OSError as e:
        _log.warning("could not append to %s: %s", path, e)


def _read_json(fd: int) -> dict[str, Any]:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _already_durable() -> None:
    """What :meth:`FileLedger.record` returns when the record was made durable before it returned."""


def _now() -> str:
    return datetime.now(UTC).isoformat()

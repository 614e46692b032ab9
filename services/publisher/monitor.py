"""preimgMonitor.html: the table of recent executions, one row per run.

processPreImg fetched the page with wget, edited it and copied it back with
scp: two runs at once could lose a row, and a rerun added a second one. Here
every run owns one row object, ``<base>/monitor/rows/<run_id>.json``, and the
page is a view rebuilt from all row objects:

- one row per run however often a message is replayed: the row's key is the
  run id, a replay overwrites it;
- two publishers at the same moment lose no row: after writing its row, a
  publisher lists the rows, renders the page, puts it, and lists again; if the
  listing changed meanwhile (a row added, rewritten or removed: keys and ETags
  are compared), it renders again. Whoever puts the page last has listed after
  its own put, so its page holds every row written before that; a row written
  later is followed by its writer's own rebuild. S3 (and MinIO) list with
  read-after-write consistency, and a PUT replaces an object atomically, so
  this needs no lock and no conditional write.
- the page is created from scratch whenever it is missing: it is never edited,
  always rendered from the rows. Deleting ``monitor/rows/`` resets the monitor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.publisher.qcserver import QcServer
from shared.errors import RetryableError

_log = logging.getLogger(__name__)

MONITOR_PAGE = "preimgMonitor.html"
#: Rebuild rounds before giving up (a storm of concurrent runs); the message is retried later.
MAX_ROUNDS = 25


class MonitorRow(BaseModel):
    """One execution on the monitor page. Header-derived text is escaped when rendered."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    run_id: str
    instrument: str
    test: bool = False
    delivered_at: datetime
    completed_at: datetime
    n_files: int = 0
    abs_ok: int = 0
    abs_failed: int = 0
    duration_s: float = 0.0
    status: str
    report_url: str = ""
    objects: tuple[str, ...] = ()
    prog_ids: tuple[str, ...] = ()
    reason: str = ""


def page_key(base: str) -> str:
    return f"{base}/{MONITOR_PAGE}"


def rows_prefix(base: str) -> str:
    return f"{base}/monitor/rows/"


def row_key(base: str, run_id: str) -> str:
    return f"{rows_prefix(base)}{run_id}.json"


def read_row(qc: QcServer, base: str, run_id: str) -> MonitorRow | None:
    data = qc.get(row_key(base, run_id))
    return MonitorRow.model_validate_json(data) if data is not None else None


def _read_rows(qc: QcServer, keys: list[str]) -> list[MonitorRow]:
    rows = []
    for key in keys:
        data = qc.get(key)
        if data is None:
            continue  # removed since the listing; the second listing will notice
        try:
            rows.append(MonitorRow.model_validate_json(data))
        except ValueError as e:
            # One damaged row must not take the page down; say which object to fix.
            _log.error("monitor row %s is not valid, left off the page: %s", key, e)
    return rows


def rebuild_page(qc: QcServer, base: str, render: Callable[[list[MonitorRow]], str]) -> int:
    """Render the page from every row object until the rows stay still across a put.

    Returns
    -------
    int
        Number of rows the final page was rendered from.

    Raises
    ------
    RetryableError
        The rows kept changing for ``MAX_ROUNDS`` rounds.
    """
    prefix = rows_prefix(base)
    listing = qc.list(prefix)
    for _ in range(MAX_ROUNDS):
        rows = _read_rows(qc, sorted(listing))
        page = render(rows).encode()
        # The page is a view of the rows, rebuilt whenever it is missing: not worth a sync.
        qc.put(page_key(base), page, content_type="text/html; charset=utf-8", durable=False)
        after = qc.list(prefix)
        if after == listing:
            return len(rows)
        _log.info("monitor rows changed while the page was written (%d -> %d); rendering again",
                  len(listing), len(after))
        listing = after
    raise RetryableError(f"the monitor rows under {prefix} kept changing; will retry later")


def record_row(
    qc: QcServer, base: str, row: MonitorRow, render: Callable[[list[MonitorRow]], str]
) -> None:
    """Write (or overwrite) the run's row and bring the page up to date."""
    data = row.model_dump_json(indent=1).encode()
    qc.put(row_key(base, row.run_id), data, content_type="application/json")
    count = rebuild_page(qc, base, render)
    _log.info("monitor %s updated with run %s (%d rows)", page_key(base), row.run_id, count)


def prune_test_runs(
    qc: QcServer, base: str, render: Callable[[list[MonitorRow]], str], *, remove_files: bool = True
) -> list[str]:
    """Remove the test runs from the monitor (and their packages) and rebuild the page.

    The seed's manual clean-up after a test run, as a command.

    Returns
    -------
    list of str
        The run ids removed.
    """
    removed = []
    for key in sorted(qc.list(rows_prefix(base))):
        data = qc.get(key)
        if data is None:
            continue
        try:
            row: dict[str, Any] = json.loads(data)
        except ValueError:
            continue
        if not row.get("test"):
            continue
        run_id = str(row.get("run_id", ""))
        if remove_files and run_id:
            for file_key in qc.list(f"{base}/runs/{run_id}/"):
                qc.delete(file_key)
        qc.delete(key)
        removed.append(run_id)
    rebuild_page(qc, base, render)
    return removed

"""preimgMonitor.html: the table of recent executions, one row per run.

processPreImg fetched the page with wget, edited it and copied it back with
scp: two runs at once could lose a row, and a rerun added a second one. Here
every run owns one row object, ``<base>/monitor/rows/<run_id>.json``, and the
page is a view rebuilt from the newest rows:

- one row per run however often a message is replayed: the row's key is the
  run id, a replay overwrites it;
- a copy of each row sits in an index, ``<base>/monitor/recent/<K>_<run_id>.json``,
  whose key ``K`` orders the newest delivery first; the page is rendered from
  the first ``max_rows`` keys of a listing in key order (S3 lists in key order
  and can stop after N keys); the index keeps only the newest ``max_rows``
  entries (the page never shows older ones; their rows stay), so a publish
  costs the same with 10,000 past runs as with 10, on S3 and on a local QC
  directory alike; rows already parsed are kept per process by ETag;
- two publishers at the same moment lose no row: after writing its row, a
  publisher lists the newest rows, renders the page, puts it, and lists again;
  if the listing changed meanwhile (keys or ETags), it renders again. Whoever
  puts the page last has listed after its own put, so its page holds every
  newest row written before that; a row written later is followed by its
  writer's own rebuild. S3 (and MinIO) list with read-after-write consistency,
  and a PUT replaces an object atomically, so this needs no lock and no
  conditional write;
- the run's row is durable before its completion is returned; the page is
  rebuilt afterwards, on a thread of the publisher's own
  (:mod:`services.publisher.pages`), rebuilds asked for meanwhile merged;
- the page is created from scratch whenever it is missing: it is never edited,
  always rendered from the rows. Rows written before the index existed are
  indexed by each publisher process once, when it first finds the index
  shorter than ``max_rows``. Deleting ``monitor/`` resets the monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from services.publisher.qcserver import QcServer
from shared.errors import RetryableError

_log = logging.getLogger(__name__)

MONITOR_PAGE = "preimgMonitor.html"
#: Index keys count down from here, so the newest delivery sorts first.
NEWEST_FIRST = 10**15
#: Index entries listed beyond ``max_rows``: older entries found there are deleted (one per run once full).
INDEX_SLACK = 16
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
    #: A completed run's first failure (partial runs); ``reason`` is for runs that did not complete.
    first_failure: str = ""
    #: The run's page and thumbnail, relative to the monitor page ("" when the run has none).
    run_url: str = ""
    thumbnail_url: str = ""
    #: Key QC values of the run (the profile's qc_ranges keywords), for the trend plots.
    key_qc: dict[str, float] = {}


def page_key(base: str) -> str:
    return f"{base}/{MONITOR_PAGE}"


def rows_prefix(base: str) -> str:
    return f"{base}/monitor/rows/"


def row_key(base: str, run_id: str) -> str:
    return f"{rows_prefix(base)}{run_id}.json"


def recent_prefix(base: str) -> str:
    return f"{base}/monitor/recent/"


def recent_key(base: str, row: MonitorRow) -> str:
    """The row's index key: newest delivery first in key order (milliseconds before year 33658)."""
    millis = int(row.delivered_at.timestamp() * 1000)
    return f"{recent_prefix(base)}{NEWEST_FIRST - millis:016d}_{row.run_id}.json"


def read_row(qc: QcServer, base: str, run_id: str) -> MonitorRow | None:
    data = qc.get(row_key(base, run_id))
    return MonitorRow.model_validate_json(data) if data is not None else None


@dataclass
class RowCache:
    """What one publisher process already knows of the monitor: no need to read it again."""

    #: Parsed rows by index key: (ETag, row). Only keys still listed are kept.
    rows: dict[str, tuple[str, MonitorRow]] = field(default_factory=dict)
    #: Bases whose rows without an index entry were indexed by this process.
    indexed: set[str] = field(default_factory=set)


def _read_rows(qc: QcServer, listing: dict[str, str], cache: dict[str, tuple[str, MonitorRow]]) -> list[MonitorRow]:
    rows = []
    for key in sorted(listing, key=str.encode):
        etag = listing[key]
        hit = cache.get(key)
        if hit is not None and hit[0] == etag:
            rows.append(hit[1])
            continue
        data = qc.get(key)
        if data is None:
            continue  # removed since the listing; the second listing will notice
        try:
            row = MonitorRow.model_validate_json(data)
        except ValueError as e:
            # One damaged row must not take the page down; say which object to fix.
            _log.error("monitor row %s is not valid, left off the page: %s", key, e)
            continue
        cache[key] = (etag, row)
        rows.append(row)
    for key in [k for k in cache if k not in listing]:
        del cache[key]
    return rows


def _fill_index(qc: QcServer, base: str, listing: dict[str, str]) -> bool:
    """Index the rows that have no index entry (written before the index existed); True if any.

    ``listing`` is the whole index: the caller fills only an index shorter than its listing limit.
    """
    indexed = {key.rsplit("/", 1)[-1].split("_", 1)[-1] for key in listing}
    added = False
    for key in qc.list(rows_prefix(base)):
        if key.rsplit("/", 1)[-1] in indexed:
            continue
        data = qc.get(key)
        try:
            row = MonitorRow.model_validate_json(data) if data is not None else None
        except ValueError:
            row = None  # reported by the page rebuild if it ever reaches the page
        if row is not None:
            qc.put(recent_key(base, row), data, content_type="application/json")
            added = True
    return added


def _newest(qc: QcServer, prefix: str, max_rows: int) -> dict[str, str]:
    """The newest ``max_rows`` index entries (key -> ETag); older ones listed are deleted.

    The page never shows them, and their rows stay (``_fill_index`` indexes them again
    if ``max_rows`` grows), so the index stays ``max_rows`` long whatever the number of
    runs. Two publishers deleting the same entry is harmless.
    """
    listing = qc.list(prefix, limit=max_rows + INDEX_SLACK)
    keys = sorted(listing, key=str.encode)
    for key in keys[max_rows:]:
        qc.delete(key)
    return {key: listing[key] for key in keys[:max_rows]}


def rebuild_page(qc: QcServer, base: str, render: Callable[[list[MonitorRow]], str], max_rows: int,
                 cache: RowCache | None = None) -> int:
    """Render the page from the newest ``max_rows`` rows until they stay still across a put.

    Returns
    -------
    int
        Number of rows the final page was rendered from.

    Raises
    ------
    RetryableError
        The rows kept changing for ``MAX_ROUNDS`` rounds.
    """
    cache = RowCache() if cache is None else cache
    prefix = recent_prefix(base)
    listing = _newest(qc, prefix, max_rows)
    if base not in cache.indexed and len(listing) < max_rows:
        # Once per process: rows from before the index (or from a publisher of that time).
        if _fill_index(qc, base, listing):
            listing = _newest(qc, prefix, max_rows)
        cache.indexed.add(base)
    for _ in range(MAX_ROUNDS):
        rows = _read_rows(qc, listing, cache.rows)
        page = render(rows).encode()
        # The page is a view of the rows, rebuilt whenever it is missing: not worth a sync.
        qc.put(page_key(base), page, content_type="text/html; charset=utf-8", durable=False)
        after = _newest(qc, prefix, max_rows)
        if after == listing:
            return len(rows)
        _log.info("monitor rows changed while the page was written (%d -> %d); rendering again",
                  len(listing), len(after))
        listing = after
    raise RetryableError(f"the monitor rows under {prefix} kept changing; will retry later")


def write_row(qc: QcServer, base: str, row: MonitorRow) -> None:
    """Put the run's row and its index entry; they appear together (inside the caller's batch, if any)."""
    data = row.model_dump_json(indent=1).encode()
    with qc.batch():
        qc.put(row_key(base, row.run_id), data, content_type="application/json")
        qc.put(recent_key(base, row), data, content_type="application/json")


def drop_moved_entry(qc: QcServer, base: str, row: MonitorRow, previous: MonitorRow | None) -> None:
    """Delete the index entry of the run's ``previous`` row when ``row`` (written by :func:`write_row`)
    sorts elsewhere (a failure shown before the delivery time was known): one entry per run."""
    if previous is not None and recent_key(base, previous) != recent_key(base, row):
        qc.delete(recent_key(base, previous))


def prune_test_runs(
    qc: QcServer, base: str, render: Callable[[list[MonitorRow]], str], max_rows: int, *,
    remove_files: bool = True,
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
            row = MonitorRow.model_validate_json(data)
        except ValueError:
            continue
        if not row.test:
            continue
        if remove_files:
            for file_key in qc.list(f"{base}/runs/{row.run_id}/"):
                qc.delete(file_key)
        qc.delete(recent_key(base, row))
        qc.delete(key)
        removed.append(row.run_id)
    rebuild_page(qc, base, render, max_rows)
    return removed

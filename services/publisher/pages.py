"""Rebuilding preimgMonitor.html: at once, or on a thread of its own after the completion is sent.

The page is a view of the monitor rows (:mod:`services.publisher.monitor`); a
run's row is durable before its completion is returned, the page is not part
of that promise. AOG waits for the completion, the operators look at the page:

- :class:`MonitorPageBuilder` rebuilds a page when asked, on the caller's
  thread (the embedded run, which prints the page's path when it returns, and
  the handler tests);
- :class:`BackgroundMonitorPages` hands the rebuild to one thread of the
  publisher process, so the completion is not held up by it. A page is rebuilt
  at most once per ``min_interval_s`` (``PREIMG_MONITOR_PAGE_INTERVAL_S``, 1 s):
  requests that arrive meanwhile are merged into the next rebuild, so a burst
  of completions costs one rebuild per instrument and second instead of one
  each, and a page is never more than that interval (plus one rebuild) behind
  its rows. A rebuild that fails (the
  QC server is down) is logged, counted, and tried again with back-off until
  it succeeds. A publisher that exits (SIGTERM included) runs what is pending
  first, for up to ``EXIT_FLUSH_S``; one killed before leaves the page behind
  its rows until the next rebuild, which every publisher process asks for for
  its instruments when it starts.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

import jinja2

from services.publisher.handlers import RowFragments, render_monitor
from services.publisher.monitor import RowCache, page_key, rebuild_page, recent_prefix
from services.publisher.qcserver import QcServer

_log = logging.getLogger(__name__)

#: Seconds between attempts at a page whose rebuild failed: doubling from the first to the last.
RETRY_DELAYS_S = (1.0, 60.0)
#: How long a process that exits waits for the rebuilds still pending (a QC server that is down).
EXIT_FLUSH_S = 5.0


class MonitorPageBuilder:
    """Rebuilds a monitor page from its newest rows on the caller's thread.

    Keeps what it parsed and rendered (rows by ETag, row HTML), so a rebuild
    reads and renders only the rows that are new. Not thread-safe: one caller
    at a time (``qc`` must not be used by another thread during a rebuild).
    """

    def __init__(self, qc: QcServer, templates: jinja2.Environment, max_rows: int):
        self._qc = qc
        self._templates = templates
        self._max_rows = max_rows
        self._rows = RowCache()
        self._fragments = RowFragments()

    def refresh(self, instrument: str, base: str, now: datetime) -> None:
        """Rebuild the page under ``base``; ``now`` is the page's "generated at"."""
        render = render_monitor(self._templates, instrument, now, self._max_rows, self._fragments)
        count = rebuild_page(self._qc, base, render, self._max_rows, self._rows)
        _log.info("monitor %s rebuilt (%d rows)", page_key(base), count)

    def has_rows(self, base: str) -> bool:
        """Whether any run has a row under ``base`` (the page of an instrument that never ran is not made)."""
        return bool(self._qc.list(recent_prefix(base), limit=1))


class BackgroundMonitorPages:
    """Rebuilds monitor pages on one thread of its own; requests for the same page are merged.

    Parameters
    ----------
    builder
        Does the rebuilds; only this object's thread calls it.
    on_failure
        Called with the instrument each time a rebuild fails (the metric).
    retry_delays_s
        (first, last) wait before trying a failed page again, doubling in between.
    min_interval_s
        Least time between the starts of two rebuilds of one page; requests made
        meanwhile wait and are merged (``flush`` and ``stop`` do not wait for it).
    clock
        Monotonic seconds (tests).
    """

    def __init__(self, builder: MonitorPageBuilder, on_failure: Callable[[str], None] = lambda _i: None,
                 retry_delays_s: tuple[float, float] = RETRY_DELAYS_S, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._builder = builder
        self._on_failure = on_failure
        self._retry_delays_s = retry_delays_s
        self._min_interval_s = min_interval_s
        self._clock = clock
        #: When each page's last rebuild started (``clock``).
        self._last_started: dict[str, float] = {}
        #: Callers of ``flush`` waiting: while any does, what is pending runs without waiting for the interval.
        self._hurry = 0
        self._cond = threading.Condition()
        #: Pages to rebuild: base -> (instrument, the newest "generated at" asked for).
        self._pending: dict[str, tuple[str, datetime]] = {}
        self._busy = False
        #: Bases asked for by ``refresh_existing``: rebuilt only if they have rows by then.
        self._only_with_rows: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def refresh(self, instrument: str, base: str, now: datetime) -> None:
        """Ask for the page under ``base`` to be rebuilt soon; returns at once."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the monitor page thread was stopped")
            self._pending[base] = (instrument, now)
            if self._thread is None:  # started on first use: nothing runs at construction
                self._thread = threading.Thread(target=self._run, name="monitor-pages", daemon=True)
                self._thread.start()
                atexit.register(self._stop_at_exit)
            self._cond.notify_all()

    def refresh_existing(self, bases: dict[str, str], now: datetime) -> None:
        """Ask for the pages of ``bases`` (base -> instrument) that have rows, checked on the page thread:
        a publisher that stopped with a rebuild pending left its page behind its rows."""
        with self._cond:
            self._only_with_rows.update(b for b in bases if b not in self._pending)
        for base, instrument in bases.items():
            self.refresh(instrument, base, now)

    def flush(self, timeout_s: float) -> bool:
        """Run what is pending now (not waiting for the interval) and wait until no rebuild is pending
        or running; False if that took longer than ``timeout_s``."""
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout_s)
            finally:
                self._hurry -= 1

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Run what is pending (within ``timeout_s``), then end the thread; True if nothing was left."""
        done = self.flush(timeout_s)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return done

    def _stop_at_exit(self) -> None:
        if self._stopped:  # stopped by its owner already
            return
        if not self.stop(EXIT_FLUSH_S):
            _log.warning("exiting with a monitor page rebuild still pending or failing; the page shows "
                         "older rows until the publisher's next start rebuilds it")

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                batch = self._wait_for_due_pages()
                if batch is None:
                    return
                self._busy = True
                only_with_rows = self._only_with_rows & batch.keys()
                self._only_with_rows -= only_with_rows
            failed: dict[str, tuple[str, datetime]] = {}
            for base, (instrument, now) in batch.items():
                try:
                    if base in only_with_rows and not self._builder.has_rows(base):
                        continue
                    self._builder.refresh(instrument, base, now)
                except Exception as e:  # noqa: BLE001 - the page waits; the thread must not die
                    _log.error("monitor page %s could not be rebuilt (%s: %s); it shows older rows "
                               "until a rebuild succeeds", page_key(base), type(e).__name__, e)
                    self._on_failure(instrument)
                    failed[base] = (instrument, now)
            with self._cond:
                for base, request in failed.items():
                    self._pending.setdefault(base, request)  # a newer request keeps its own time
                    if base in only_with_rows:  # still only if it has rows, when tried again
                        self._only_with_rows.add(base)
                self._busy = False
                self._cond.notify_all()
            if not failed:
                failures = 0
                continue
            failures += 1
            first, last = self._retry_delays_s
            delay = min(last, first * 2 ** (failures - 1))
            with self._cond:
                self._cond.wait_for(lambda: self._stopped, delay)

    def _wait_for_due_pages(self) -> dict[str, tuple[str, datetime]] | None:
        """Under the lock: wait until a pending page is due (its interval over, or a flush asks),
        take those pages off the pending set and return them; None once stopped."""
        while True:
            self._cond.wait_for(lambda: self._pending or self._stopped)
            if self._stopped:
                return None
            now = self._clock()
            due_at = {base: self._last_started.get(base, -float("inf")) + self._min_interval_s
                      for base in self._pending}
            due = [base for base, at in due_at.items() if at <= now or self._hurry]
            if due:
                for base in due:
                    self._last_started[base] = now
                return {base: self._pending.pop(base) for base in due}
            self._cond.wait(min(due_at.values()) - now)

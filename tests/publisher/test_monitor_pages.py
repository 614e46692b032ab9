"""The monitor page thread: the completion does not wait for the page, the page catches up."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.publisher.handlers import handle_reports_ready
from services.publisher.pages import BackgroundMonitorPages
from services.publisher.service import build_ports
from shared.metrics import build_metrics
from shared.settings import Settings
from tests.publisher.conftest import reports_ready

BASE = "PREIMG/HAWKI"
REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


class RecordingBuilder:
    """Stands in for MonitorPageBuilder: records the rebuilds, can be held, can fail."""

    def __init__(self, failures: int = 0, rows: bool = True, listing_failures: int = 0):
        self.calls: list[tuple[str, str, datetime]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.failures = failures
        self.rows = rows
        self.listing_failures = listing_failures
        self.checked: list[str] = []

    def refresh(self, instrument: str, base: str, now: datetime) -> None:
        self.entered.set()
        self.release.wait(10)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("QC server unreachable")
        self.calls.append((instrument, base, now))

    def has_rows(self, base: str) -> bool:
        self.checked.append(base)
        if self.listing_failures:
            self.listing_failures -= 1
            raise ConnectionError("QC server unreachable")
        return self.rows


def test_requests_made_during_a_rebuild_are_merged_into_one():
    builder = RecordingBuilder()
    builder.release.clear()
    pages = BackgroundMonitorPages(builder)
    pages.refresh("HAWKI", BASE, T0)
    assert builder.entered.wait(5)
    for i in range(1, 6):  # five completions while the first rebuild runs
        pages.refresh("HAWKI", BASE, T0 + timedelta(minutes=i))
    pages.refresh("VIMOS", "PREIMG/VIMOS", T0)
    builder.release.set()
    assert pages.flush(5)
    assert builder.calls[0] == ("HAWKI", BASE, T0)
    # The five became one rebuild, stamped with the newest time asked for.
    assert sorted(builder.calls[1:]) == [("HAWKI", BASE, T0 + timedelta(minutes=5)),
                                         ("VIMOS", "PREIMG/VIMOS", T0)]
    assert pages.stop()


def _wait_for_calls(builder: RecordingBuilder, n: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while len(builder.calls) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(builder.calls) >= n


def test_a_page_is_rebuilt_at_most_once_per_interval_and_flush_does_not_wait_for_it():
    builder = RecordingBuilder()
    pages = BackgroundMonitorPages(builder, min_interval_s=60)
    pages.refresh("HAWKI", BASE, T0)
    assert _wait_for_calls(builder, 1)
    for i in range(1, 4):  # three completions right after the rebuild
        pages.refresh("HAWKI", BASE, T0 + timedelta(minutes=i))
    time.sleep(0.3)
    assert builder.calls == [("HAWKI", BASE, T0)], "rebuilt again within the interval"
    assert pages.flush(5)
    assert builder.calls[1:] == [("HAWKI", BASE, T0 + timedelta(minutes=3))]
    assert pages.stop()


def test_the_interval_is_per_page_and_a_waiting_page_is_rebuilt_once_it_is_over():
    builder = RecordingBuilder()
    pages = BackgroundMonitorPages(builder, min_interval_s=0.5)
    pages.refresh("HAWKI", BASE, T0)
    assert _wait_for_calls(builder, 1)
    pages.refresh("HAWKI", BASE, T0 + timedelta(minutes=1))
    pages.refresh("VIMOS", "PREIMG/VIMOS", T0)  # another page: not held up by HAWKI's interval
    assert _wait_for_calls(builder, 2)
    assert builder.calls[1] == ("VIMOS", "PREIMG/VIMOS", T0)
    assert _wait_for_calls(builder, 3), "the waiting page was not rebuilt after its interval"
    assert builder.calls[2] == ("HAWKI", BASE, T0 + timedelta(minutes=1))
    assert pages.stop()


def test_a_page_checked_at_start_keeps_its_condition_while_it_waits_for_its_interval():
    builder = RecordingBuilder(rows=False)
    pages = BackgroundMonitorPages(builder, min_interval_s=60)
    pages.refresh("HAWKI", BASE, T0)
    assert _wait_for_calls(builder, 1)
    # HAWKI waits for its interval, VIMOS is checked (and skipped: no rows) at once.
    pages.refresh_existing({BASE: "HAWKI", "PREIMG/VIMOS": "VIMOS"}, T0 + timedelta(minutes=1))
    deadline = time.monotonic() + 5
    while "PREIMG/VIMOS" not in builder.checked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert builder.checked == ["PREIMG/VIMOS"]
    assert pages.flush(5)  # HAWKI's turn, without waiting for the interval
    assert builder.calls == [("HAWKI", BASE, T0)], "a page asked for only if it has rows was made without the check"
    assert pages.stop()


def test_a_process_that_exits_runs_the_rebuild_still_waiting_for_its_interval(tmp_path):
    """A publisher stopped by SIGTERM returns from serve() and exits: the page it owes is made first."""
    calls = tmp_path / "calls.txt"
    script = f"""
from datetime import UTC, datetime, timedelta
from services.publisher.pages import BackgroundMonitorPages

class Builder:
    def refresh(self, instrument, base, now):
        with open({str(calls)!r}, "a") as out:
            out.write(now.isoformat() + "\\n")

pages = BackgroundMonitorPages(Builder(), min_interval_s=600)
t0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
pages.refresh("HAWKI", "PREIMG/HAWKI", t0)
pages.flush(5)
pages.refresh("HAWKI", "PREIMG/HAWKI", t0 + timedelta(minutes=1))  # waits for the interval
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["2026-11-20T09:00:00+00:00", "2026-11-20T09:01:00+00:00"]


def test_a_failed_rebuild_is_counted_and_tried_again_until_it_succeeds():
    builder = RecordingBuilder(failures=2)
    failed: list[str] = []
    pages = BackgroundMonitorPages(builder, on_failure=failed.append, retry_delays_s=(0.01, 0.02))
    pages.refresh("HAWKI", BASE, T0)
    assert pages.flush(5)
    assert failed == ["HAWKI", "HAWKI"]
    assert builder.calls == [("HAWKI", BASE, T0)]
    assert pages.stop()


def test_flush_says_when_the_page_is_still_failing():
    builder = RecordingBuilder(failures=1000)
    pages = BackgroundMonitorPages(builder, retry_delays_s=(0.01, 0.01))
    pages.refresh("HAWKI", BASE, T0)
    assert not pages.flush(0.3)
    assert builder.calls == []
    pages.stop(0.5)


def test_pages_checked_at_start_are_rebuilt_only_where_runs_have_rows():
    empty, used = RecordingBuilder(rows=False), RecordingBuilder(rows=True)
    for builder in (empty, used):
        pages = BackgroundMonitorPages(builder)
        pages.refresh_existing({BASE: "HAWKI"}, T0)
        assert pages.flush(5)
        pages.stop()
    assert empty.calls == [] and used.calls == [("HAWKI", BASE, T0)]


def test_a_page_checked_at_start_stays_unmade_when_the_check_fails_first():
    builder = RecordingBuilder(rows=False, listing_failures=2)
    failed: list[str] = []
    pages = BackgroundMonitorPages(builder, on_failure=failed.append, retry_delays_s=(0.01, 0.02))
    pages.refresh_existing({BASE: "HAWKI"}, T0)
    assert pages.flush(5)
    pages.stop()
    assert failed == ["HAWKI", "HAWKI"]
    assert builder.calls == [], "an instrument without runs gets no page, even after the QC server came back"


def test_the_service_returns_the_completion_and_the_page_follows(tmp_path):
    """The publisher service's wiring: row durable with the completion, the page rebuilt by its thread."""
    settings = Settings(data_root=tmp_path)
    registry = CollectorRegistry()
    ports = build_ports(settings, build_metrics(registry), monitor_in_background=True)
    assert isinstance(ports.monitor, BackgroundMonitorPages)
    gate = threading.Event()
    real_refresh = ports.monitor._builder.refresh  # held to show the order

    def held_refresh(*args):
        gate.wait(10)
        real_refresh(*args)

    ports.monitor._builder.refresh = held_refresh
    qc = settings.qc_local_dir()
    msg = reports_ready(tmp_path, run_id="bg-1")
    [event] = handle_reports_ready(msg, ports)
    assert event.run_id == "bg-1" and event.status == msg.status
    assert (qc / BASE / "monitor" / "rows" / "bg-1.json").is_file(), "the row is there with the completion"
    assert not (qc / BASE / "preimgMonitor.html").exists(), "the page came after"
    gate.set()
    assert ports.monitor.flush(10)
    page = (qc / BASE / "preimgMonitor.html").read_text()
    assert re.findall(r'data-run-id="([^"]+)"', page) == ["bg-1"]
    ports.monitor.stop()

"""Composition root of the publisher: real adapters for :class:`PublisherPorts`."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from services.publisher.handlers import (
    MonitorPages,
    PublisherPorts,
    handle_reports_ready,
    handle_run_failed,
    qc_base,
)
from services.publisher.mailer import SmtpMailer
from services.publisher.pages import BackgroundMonitorPages, MonitorPageBuilder
from services.publisher.qc_local import LocalQcServer
from services.publisher.qc_s3 import S3QcServer
from services.publisher.qcserver import MIB, QcServer
from shared.bus.runner import Handlers
from shared.files import remove_stale_temp_files, sync_later, write_atomic
from shared.logs import current_context
from shared.messages import ReportsReady, RunFailed
from shared.metrics import Metrics
from shared.profiles import ProfileError, available_instruments, load_profile
from shared.settings import Settings

_log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``: the monitor's duration column."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@functools.lru_cache(maxsize=4)
def build_templates(directory: Path = TEMPLATE_DIR) -> jinja2.Environment:
    """jinja2 environment of the monitor page; every value is HTML-escaped.

    One per process and directory, so an embedded run does not compile the
    templates again; an edited template is still picked up (mtime check).
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = format_duration
    return env


def build_qc_server(settings: Settings, on_retry: Callable[[str], None] | None = None) -> QcServer:
    """The QC server adapter ``settings.qc_mode`` names (``s3`` or ``local``)."""
    if settings.qc_mode == "s3":
        secret = settings.s3_secret_access_key
        return S3QcServer(
            endpoint_url=settings.s3_endpoint_url,
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            region=settings.s3_region,
            attempts=settings.s3_max_attempts,
            timeout_s=settings.s3_timeout_s,
            multipart_threshold=settings.s3_multipart_threshold_mb * MIB,
            multipart_chunksize=settings.s3_multipart_chunk_mb * MIB,
            max_concurrency=settings.s3_max_concurrency,
            public_url=settings.qc_public_url,
            on_retry=on_retry,
        )
    return LocalQcServer(settings.qc_local_dir(), public_url=settings.qc_public_url)


def build(settings: Settings, metrics: Metrics, instrument: str | None = None,
          monitor_in_background: bool = True) -> Handlers:
    """The publisher's handlers bound to real ports (the composition root's entry point). No I/O
    here; with ``monitor_in_background`` the page thread starts and checks the pages (below).

    ``monitor_in_background``: monitor pages are rebuilt on a thread of their own after the
    completion is sent (the service); False: before it, on the handler's thread (the embedded
    run, which shows the page once it returns).
    """
    if instrument:
        raise ValueError("the publisher serves every instrument: no --instrument")
    ports = build_ports(settings, metrics, monitor_in_background=monitor_in_background)
    if isinstance(ports.monitor, BackgroundMonitorPages):
        # A publisher stopped with a rebuild pending left that page behind its rows: the page
        # thread rebuilds, in the background, the page of each instrument that has rows.
        ports.monitor.refresh_existing(_monitor_bases(), utc_now())
    return {ReportsReady: functools.partial(handle_reports_ready, ports=ports),
            RunFailed: functools.partial(handle_run_failed, ports=ports)}


def _monitor_bases() -> dict[str, str]:
    """Every instrument's monitor base on the QC server (base -> instrument)."""
    bases = {}
    for instrument in available_instruments():
        try:
            bases[qc_base(load_profile(instrument))] = instrument
        except ProfileError as e:  # the instrument's own runs are answered with this error
            _log.warning("no monitor page for %s: %s", instrument, e)
    return bases


def build_ports(settings: Settings, metrics: Any = None, instrument: str = "",
                monitor_in_background: bool = False) -> PublisherPorts:
    """Wire the publisher's real adapters. No I/O happens here.

    Parameters
    ----------
    settings
        The service's settings.
    metrics
        Optional ``shared.metrics.Metrics``; its ``notification_failures``,
        ``upload_retries`` and ``monitor_page_failures`` counters are fed when given.
    instrument
        Label for the upload-retry counter (the QC server adapter does not see messages).
    monitor_in_background
        Rebuild monitor pages on a thread of their own (:class:`BackgroundMonitorPages`,
        with its own QC server client); False: at once, on the caller's thread.
    """

    def count_notification_failure(instr: str) -> None:
        if metrics is not None:
            metrics.notification_failures.labels(instrument=instr).inc()

    def count_upload_retry(_what: str) -> None:
        # The QC server adapter serves every instrument; the message in hand names one.
        if metrics is not None:
            label = instrument or current_context().get("instrument") or "unknown"
            metrics.upload_retries.labels(instrument=label).inc()

    def count_page_failure(instr: str) -> None:
        if metrics is not None:
            metrics.monitor_page_failures.labels(instrument=instr).inc()

    qc = build_qc_server(settings, on_retry=count_upload_retry)
    templates = build_templates()
    monitor: MonitorPages
    if monitor_in_background:
        # Its own client: a QC server adapter's batch belongs to the thread that opened it.
        builder = MonitorPageBuilder(build_qc_server(settings), templates, settings.monitor_max_rows)
        monitor = BackgroundMonitorPages(builder, on_failure=count_page_failure,
                                         min_interval_s=settings.monitor_page_interval_s)
    else:
        monitor = MonitorPageBuilder(qc, templates, settings.monitor_max_rows)
    return PublisherPorts(
        settings=settings,
        qc=qc,
        mailer=SmtpMailer(settings.smtp_host, settings.smtp_port, settings.smtp_timeout_s),
        templates=templates,
        clock=utc_now,
        load_profile=load_profile,
        count_notification_failure=count_notification_failure,
        files=LocalRunFiles(),
        monitor=monitor,
    )


class LocalRunFiles:
    """The publisher's ``RunFiles`` on the shared data volume."""

    def read_text(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def write(self, path: Path, data: bytes, durable: bool = True) -> None:
        write_atomic(path, data, durable=durable)

    def exists(self, path: Path) -> bool:
        return path.is_file()

    def touch(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sync_later([path.parent])


def remove_package_temp_files(settings: Settings, instrument: str, run_id: str) -> list[Path]:
    """Temporary files an interrupted write left in the run's package and monitor row (local QC server).

    Called while the publisher holds the run; the shared monitor page itself
    is left to the periodic sweep (another run's publish may be writing it).
    """
    if settings.qc_mode != "local":
        return []
    from services.publisher.handlers import package_prefix
    from services.publisher.monitor import rows_prefix

    try:
        base = qc_base(load_profile(instrument))
    except ProfileError:  # no package or monitor row exists for an instrument preimg does not know
        return []
    root = settings.qc_local_dir()
    removed = remove_stale_temp_files(root / package_prefix(base, run_id))
    rows = root / rows_prefix(base)
    for path in rows.glob(f".{run_id}.json.*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed

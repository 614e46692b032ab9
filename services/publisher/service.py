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

from services.publisher.handlers import PublisherPorts, handle_reports_ready, handle_run_failed
from services.publisher.mailer import SmtpMailer
from services.publisher.qc_local import LocalQcServer
from services.publisher.qc_s3 import S3QcServer
from services.publisher.qcserver import MIB, QcServer
from shared.bus.runner import Handlers
from shared.files import remove_stale_temp_files, sync_later, write_atomic
from shared.logs import current_context
from shared.messages import ReportsReady, RunFailed
from shared.metrics import Metrics
from shared.profiles import ProfileError, load_profile
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


def build(settings: Settings, metrics: Metrics, instrument: str | None = None) -> Handlers:
    """The publisher's handlers bound to real ports (the composition root's entry point). No I/O here."""
    if instrument:
        raise ValueError("the publisher serves every instrument: no --instrument")
    ports = build_ports(settings, metrics)
    return {ReportsReady: functools.partial(handle_reports_ready, ports=ports),
            RunFailed: functools.partial(handle_run_failed, ports=ports)}


def build_ports(settings: Settings, metrics: Any = None, instrument: str = "") -> PublisherPorts:
    """Wire the publisher's real adapters. No I/O happens here.

    Parameters
    ----------
    settings
        The service's settings.
    metrics
        Optional ``shared.metrics.Metrics``; its ``notification_failures`` and
        ``upload_retries`` counters are fed when given.
    instrument
        Label for the upload-retry counter (the QC server adapter does not see messages).
    """

    def count_notification_failure(instr: str) -> None:
        if metrics is not None:
            metrics.notification_failures.labels(instrument=instr).inc()

    def count_upload_retry(_what: str) -> None:
        # The QC server adapter serves every instrument; the message in hand names one.
        if metrics is not None:
            label = instrument or current_context().get("instrument") or "unknown"
            metrics.upload_retries.labels(instrument=label).inc()

    return PublisherPorts(
        settings=settings,
        qc=build_qc_server(settings, on_retry=count_upload_retry),
        mailer=SmtpMailer(settings.smtp_host, settings.smtp_port, settings.smtp_timeout_s),
        templates=build_templates(),
        clock=utc_now,
        load_profile=load_profile,
        count_notification_failure=count_notification_failure,
        files=LocalRunFiles(),
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
    from services.publisher.handlers import package_prefix, qc_base
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

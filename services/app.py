"""Composition root: wires real adapters into each service's handlers.

``build_runner(service, settings, metrics, instrument)`` gives the
MessageRunner of one service. ``serve`` runs one service as a process against
RabbitMQ; ``run_embedded`` runs all four stages in one process over the
in-process bus. Nothing here runs at import time.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from services import housekeeping
from services.progress import STAGE_OF_EVENT, Progress
from shared.bus.memory import InProcessBus
from shared.bus.runner import MessageRunner
from shared.bus.topology import QueueSpec, answer_keys, dead_letter_queue, queue_name
from shared.files import file_digest
from shared.layout import FITS_GLOBS, is_fits_name
from shared.ledger import FileLedger
from shared.messages import (
    DeliveredFile,
    DeliveryAnnounced,
    PreImagingCompleted,
    RunFailed,
    decode,
)
from shared.metrics import Metrics, build_metrics
from shared.profiles import ProfileError, available_instruments, load_profile
from shared.settings import Settings

_log = logging.getLogger(__name__)

SINK_QUEUE = "preimg.embedded.completions"


#: Where each service's ``build(settings, metrics, instrument)`` lives: its handlers bound to real ports.
SERVICE_MODULES: dict[str, str] = {
    "ingest": "services.ingest.service",
    "processor": "services.processor.service",
    "reporter": "services.reporter.service",
    "publisher": "services.publisher.service",
}


def build_runner(service: str, settings: Settings, metrics: Metrics, instrument: str | None = None,
                 ab_finished: Callable[[int, int, Any], None] | None = None,
                 embedded: bool = False) -> MessageRunner:
    """The MessageRunner of ``service`` with its handlers bound to real ports.

    ``ab_finished`` (processor only) is told of each finished AB, for progress reports.
    ``embedded``: for :func:`run_embedded`, whose caller looks at the outputs once it
    returns (the publisher rebuilds the monitor page before the completion, not after).
    """
    if service not in SERVICE_MODULES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICE_MODULES)}")
    extra: dict[str, Any] = {"ab_finished": ab_finished} if ab_finished is not None else {}
    if embedded and service == "publisher":
        extra["monitor_in_background"] = False
    handlers = importlib.import_module(SERVICE_MODULES[service]).build(settings, metrics, instrument, **extra)
    return MessageRunner(
        service=service,
        queue=queue_name(service, instrument),
        handlers=handlers,
        ledger=FileLedger(settings.data_root.resolve() / "state"),
        metrics=metrics,
        max_attempts=settings.max_attempts,
        prepare=functools.partial(housekeeping.remove_run_temp_files, settings, service),
        lease_wait_limit_s=settings.lease_wait_limit_s,
        delivery_limit=settings.delivery_limit if settings.queue_type == "quorum" else None,
    )


# ----------------------------------------------------------------------------
# one service as a process (distributed set-up)
# ----------------------------------------------------------------------------


def serve(service: str, settings: Settings, instrument: str | None = None, stop: threading.Event | None = None,
          once: bool = False) -> int:
    """Run one service against RabbitMQ until SIGTERM/SIGINT; return the exit code.

    The consumer connects at once and declares the whole topology, so
    messages for this service wait in its queue whatever else happens. The
    start-up checks (seed step 0) gate consumption only: while they fail the
    service stays up, answers /readyz with what is missing, and checks again
    every ``settings.recheck_s`` seconds, so a processor starts consuming on
    its own once its calibrations are installed. Returns 1 when the consumer
    thread ends for any reason other than a stop request.

    ``once`` (``preimg serve processor --once``, a Kubernetes Job's run): take
    one message, finish and settle it, return 0. No waiting for calibrations
    then: failing start-up checks return 1 at once, the message staying queued.
    """
    from shared.bus.rabbitmq import RabbitConsumer
    from shared.httpserver import ServiceHttpServer

    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    stop = stop or threading.Event()
    state: dict[str, Any] = {"detail": "start-up checks not run yet", "checks_ok": False}
    consumer = RabbitConsumer(
        amqp_url=settings.amqp_url,
        exchange=settings.exchange,
        spec=QueueSpec.for_service(service, instrument),
        process=None,
        retry_delays_ms=settings.retry_delays_ms,
        instruments=available_instruments(),
        heartbeat_s=settings.heartbeat_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        name=f"preimg-{service}",
        max_messages=1 if once else None,
        queue_args=settings.queue_arguments(),
        tls=settings.tls(),
    )
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            consumer.run(stop)
        except BaseException as e:  # noqa: BLE001 - reported, and the process exits non-zero
            failure.append(e)
            _log.exception("the consumer thread died")

    worker = threading.Thread(target=consume, name="consumer", daemon=True)

    def live() -> tuple[bool, str]:
        alive = worker.is_alive() or stop.is_set()
        return alive, "consumer running" if alive else "consumer stopped"

    def ready() -> tuple[bool, str]:
        if consumer.consuming.is_set():
            return True, "consuming"
        broker = ("connected to the broker, its queues declared" if consumer.connected.is_set()
                  else f"not connected to the broker ({consumer.last_error or 'connecting'})")
        return False, broker if state["checks_ok"] else f"{state['detail']}; {broker}"

    def started() -> tuple[bool, str]:
        return state["checks_ok"], "start-up checks passed" if state["checks_ok"] else state["detail"]

    http = ServiceHttpServer(settings.http_host, settings.http_port, registry, live, ready, started)
    http.start()
    _log.info("%s serving: metrics and probes on port %d", service, http.port)

    def on_signal(signum: int, _frame: object) -> None:
        _log.info("received %s: finishing the message in hand, then stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    worker.start()
    while not stop.is_set() and worker.is_alive():
        ok, state["detail"] = startup_checks(service, settings, instrument)
        if ok:
            state["checks_ok"] = True
            runner = build_runner(service, settings, metrics, instrument)
            # What start-up made (modules, astropy's tables, templates) lives as long as the
            # process: out of the collector's sight, a full collection walks only what handling
            # messages makes (measured: 50-86 ms per full collection before, under 1 ms after).
            gc.freeze()
            consumer.start_consuming(runner.process)
            break
        if once:
            _log.error("start-up checks failed; --once: exiting non-zero, the queue keeps its messages: %s",
                       state["detail"])
            stop.set()
            worker.join(timeout=settings.shutdown_grace_s + 5)
            http.stop()
            return 1
        _log.error("start-up checks failed; not consuming, checking again in %.0f s: %s",
                   settings.recheck_s, state["detail"])
        stop.wait(settings.recheck_s)
    next_sweep = time.monotonic()
    while worker.is_alive():
        if time.monotonic() >= next_sweep and not stop.is_set():
            try:
                for path in housekeeping.sweep(settings, settings.temp_max_age_s):
                    _log.info("removed a stale temporary file: %s", path)
            except OSError as e:
                _log.warning("sweeping stale temporary files failed: %s", e)
            next_sweep = time.monotonic() + settings.temp_sweep_interval_s
        worker.join(timeout=0.5)
    http.stop()
    if failure or not (stop.is_set() or consumer.finished.is_set()):
        _log.error("the consumer ended without a stop request: exiting non-zero so the service is restarted")
        return 1
    if consumer.finished.is_set():
        _log.info("--once: one message handled and settled; exiting")
    return 0


def startup_checks(service: str, settings: Settings, instrument: str | None) -> tuple[bool, str]:
    """Seed step 0: the configuration and required tools; a failure names what is missing."""
    try:
        if service == "processor":
            profile = load_profile(instrument or "")
            from services.processor.service import check_instrument

            problems = check_instrument(profile, settings)
            if problems:
                return False, "; ".join(problems)
        else:
            for name in available_instruments():
                load_profile(name)
    except ProfileError as e:
        return False, str(e)
    return True, "ok"


# ----------------------------------------------------------------------------
# embedded: four stages in one process
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: str
    paths: dict[str, str]
    reason: str = ""
    event: dict[str, Any] | None = None


def new_run_id(instrument: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> str:
    return f"{instrument}_{clock().strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"


def describe_files(paths: list[Path], area: Path) -> list[DeliveredFile]:
    """DeliveredFile entries (size, sha256) for files, relative to the delivery area when inside it."""
    out = []
    for p in paths:
        p = p.resolve()
        rel = p.relative_to(area) if p.is_relative_to(area) else p
        out.append(DeliveredFile(name=p.name, path=str(rel), size=p.stat().st_size, checksum=f"sha256:{file_digest(p)}"))
    return out


def run_embedded(instrument: str, raw_dir: Path, settings: Settings, test: bool = True,
                 run_id: str | None = None, registry: CollectorRegistry | None = None,
                 progress: Progress | None = None) -> RunSummary:
    """Process the FITS files of ``raw_dir`` through the four stages in this process.

    ``registry`` receives the run's metrics (stage and recipe durations), for
    callers that want them (the full-size bench); a fresh one otherwise.
    ``progress`` is told when a stage or an AB has finished.
    """
    raw_dir = raw_dir.resolve()
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw directory {raw_dir} does not exist")
    settings = settings.model_copy(update={"delivery_area": raw_dir})
    files = sorted(p for p in raw_dir.iterdir() if p.is_file() and is_fits_name(p.name))
    if not files:
        raise FileNotFoundError(f"no FITS files ({', '.join(FITS_GLOBS)}) in {raw_dir}")
    load_profile(instrument)  # an unknown instrument stops here, before anything is staged
    run_id = run_id or new_run_id(instrument)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = build_metrics(registry)
    bus = InProcessBus(settings.retry_delays_ms, delivery_limit=settings.delivery_limit)
    bus.declare_topology(available_instruments())
    specs = []
    for service in ("ingest", "processor", "reporter", "publisher"):
        service_instrument = instrument if service == "processor" else None
        spec = QueueSpec.for_service(service, service_instrument)
        runner = build_runner(service, settings, metrics, service_instrument, embedded=True,
                              ab_finished=_ab_progress(progress) if progress and service == "processor" else None)
        bus.subscribe(spec.name, _reporting(runner.process, progress) if progress else runner.process)
        specs.append(spec)
    bus.declare_sink(SINK_QUEUE, answer_keys())

    delivery = DeliveryAnnounced(
        run_id=run_id,
        delivery_id=f"embedded-{run_id}",
        instrument=instrument,
        test=test,
        files=tuple(describe_files(files, raw_dir)),
    )
    started = time.perf_counter()
    bus.publish(delivery)
    bus.drain()
    _log.info("embedded run %s took %.1f s", run_id, time.perf_counter() - started)

    dirs = settings.run_dirs(instrument, run_id).as_dict()
    events = [decode(m.body) for m in bus.take(SINK_QUEUE)]
    completed = [e for e in events if isinstance(e, PreImagingCompleted) and e.run_id == run_id]
    failed = [e for e in events if isinstance(e, RunFailed) and e.run_id == run_id]
    dead = [m for spec in specs for m in bus.messages(dead_letter_queue(spec.name))]
    paths = {k: dirs[d] for k, d in (("raw", "raw"), ("products", "sci"), ("logs", "logs"), ("state", "state"))
             if Path(dirs[d]).exists()}
    if completed:
        event = completed[0]
        paths.update(_report_paths(event, Path(dirs["logs"])))
        return RunSummary(run_id, event.status, paths, reason=event.reason, event=event.model_dump(mode="json"))
    if failed:
        event = failed[0]
        return RunSummary(run_id, "failed", paths, reason=f"{event.failed_stage}: {event.reason}",
                          event=event.model_dump(mode="json"))
    reason = "no completion event was emitted"
    if dead:
        reason += f"; dead-lettered: {dead[0].headers.get('x-preimg-reason')}"
    return RunSummary(run_id, "failed", paths, reason=reason)


def _ab_progress(progress: Progress) -> Callable[[int, int, Any], None]:
    def tell(done: int, total: int, result: Any) -> None:
        progress.ab_finished(done, total, result.name, result.status, result.duration_s)

    return tell


def _reporting(process: Callable[[Any], Any], progress: Progress) -> Callable[[Any], Any]:
    """``process``, telling ``progress`` when the outcome carries a stage's result or a RunFailed."""

    def run(incoming: Any) -> Any:
        outcome = process(incoming)
        for event in outcome.events:
            if isinstance(event, RunFailed):
                progress.stage_failed(event.failed_stage)
            elif event.stage in STAGE_OF_EVENT:
                progress.stage_finished(STAGE_OF_EVENT[event.stage])
        return outcome

    return run


def _report_paths(event: PreImagingCompleted, log_dir: Path) -> dict[str, str]:
    paths: dict[str, str] = {"package": event.package_dir, "qc_server": event.package_url}
    if event.monitor_url:
        paths["monitor"] = event.monitor_url
    if event.run_page_url:
        paths["run_page"] = event.run_page_url
    for pattern, key in (("REPORT_*.log", "report"), ("USERREPORT_*.log", "userreport"), ("list_mcalib_*", "list_mcalib")):
        found = sorted(log_dir.glob(pattern))
        if found:
            paths[key] = str(found[-1])
    return paths

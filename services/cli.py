"""The ``preimg`` command.

    preimg run -i INSTR RAW_DIR [--data-root DIR] [--json]     all four stages in this process
    preimg deliver -i INSTR FILE... [--wait SECONDS]           announce a delivery, as AOG does
    preimg serve ingest|processor|reporter|publisher [--once]  one service against RabbitMQ

Further commands (synth, check, oca, explain, monitor) are registered by the
modules listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from services.progress import STAGE_OF_EVENT, Progress
from shared.logs import configure_logging
from shared.settings import Settings

_log = logging.getLogger(__name__)

#: Modules that add subcommands through ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "services.processor.cli", "shared.oca.cli", "services.publisher.cli", "services.gc_cli", "services.broker_cli",
)


def _version() -> str:
    try:
        return version("preimg")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preimg",
        description="ESO pre-imaging processing (processPreImg) as event-driven services.",
    )
    parser.add_argument("--version", action="version", version=f"preimg {_version()}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="process a directory of raw frames in this process (no broker)")
    run.add_argument("-i", "--instrument", required=True, type=str.upper)
    run.add_argument("raw_dir", type=Path, help="directory holding the raw FITS frames")
    run.add_argument("--data-root", type=Path, help="root of the run directories (default: $PREIMG_DATA_ROOT or ./preimg-data)")
    run.add_argument("--cal-root", type=Path, help="static calibrations, $DFO_CAL_DIR (default: <data-root>/cal)")
    run.add_argument("--run-id", help="run id to use (default: generated)")
    run.add_argument("--operational", action="store_true", help="not a test run (test runs are marked and prunable)")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    run.set_defaults(func=cmd_run)

    deliver = sub.add_parser("deliver", help="publish a DeliveryAnnounced to RabbitMQ, as AOG does")
    deliver.add_argument("-i", "--instrument", required=True, type=str.upper)
    deliver.add_argument("files", nargs="+", type=Path)
    deliver.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the completion and print it")
    deliver.add_argument("--run-id", help="run id (default: generated)")
    deliver.add_argument("--delivery-id", help="AOG's delivery id (default: the run id)")
    deliver.add_argument("--test", action="store_true", help="mark the run as a test run")
    deliver.set_defaults(func=cmd_deliver)

    serve = sub.add_parser("serve", help="run one service against RabbitMQ")
    serve.add_argument("service", choices=("ingest", "processor", "reporter", "publisher"))
    serve.add_argument("-i", "--instrument", type=str.upper, help="the processor's instrument")
    serve.add_argument("--once", action="store_true",
                       help="handle one message, settle it and exit 0 (a Kubernetes Job's run)")
    serve.set_defaults(func=cmd_serve)

    dlq = sub.add_parser("dlq", help="inspect or replay a service's dead-letter queue")
    dlq.add_argument("action", choices=("list", "replay"))
    dlq.add_argument("queue", help="the service queue, e.g. preimg.publisher or preimg.processor.HAWKI")
    dlq.add_argument("--limit", type=int, help="replay at most this many messages")
    dlq.set_defaults(func=cmd_dlq)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(service=getattr(args, "service", "") or args.command, level=args.log_level.upper(),
                      json_lines=args.command == "serve")
    return int(args.func(args) or 0)


def cmd_run(args: argparse.Namespace) -> int:
    from services.app import run_embedded
    from shared.profiles import ProfileError

    overrides = {k: v for k, v in (("data_root", args.data_root), ("cal_root", args.cal_root)) if v is not None}
    settings = Settings(**overrides)
    progress = Progress(sys.stderr)
    try:
        summary = run_embedded(args.instrument, args.raw_dir, settings, test=not args.operational, run_id=args.run_id,
                               progress=progress)
    except (FileNotFoundError, ProfileError) as e:
        progress.close()
        print(f"preimg run: {e}", file=sys.stderr)
        return 2
    progress.close()
    if args.json:
        print(json.dumps({"run_id": summary.run_id, "status": summary.status, "paths": summary.paths,
                          "reason": summary.reason}))
    else:
        print(f"run {summary.run_id}: {summary.status}")
        if summary.reason:
            print(f"  reason: {summary.reason}")
        width = max(len(k) for k in summary.paths)
        for key, path in summary.paths.items():
            print(f"  {key:<{width}}  {path}")
    return 0 if summary.status in ("ok", "partial") else 1


def cmd_deliver(args: argparse.Namespace) -> int:
    """Publish a DeliveryAnnounced as AOG does; with --wait, print the run's answer.

    Exit codes: 0 delivered (with --wait: completed ok), 1 the run failed or
    did not answer in time, 2 bad arguments, 3 the broker could not be reached
    or did not take the delivery.
    """
    from services.app import describe_files, new_run_id
    from shared.bus.rabbitmq import BrokerUnavailable, RabbitClient
    from shared.bus.topology import answer_keys
    from shared.errors import PublishFailed
    from shared.messages import DeliveryAnnounced, decode
    from shared.profiles import available_instruments

    settings = Settings()
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"preimg deliver: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    run_id = args.run_id or new_run_id(args.instrument)
    delivery = DeliveryAnnounced(
        run_id=run_id,
        delivery_id=args.delivery_id or run_id,
        instrument=args.instrument,
        test=args.test,
        files=tuple(describe_files(list(args.files), settings.delivery_dir())),
    )
    try:
        # The whole layout is declared first: a delivery sent before any service ever ran waits in its queue.
        with RabbitClient(settings.amqp_url, settings.exchange, settings.heartbeat_s,
                          instruments=available_instruments(), retry_delays_ms=settings.retry_delays_ms,
                          queue_args=settings.queue_arguments(), tls=settings.tls()) as client:
            if args.wait is not None:
                # The run's intermediate events too, for progress on stderr (stdout keeps the one answer).
                channel, queue = client.bind_private_queue(
                    answer_keys(args.instrument), optional_keys=tuple(
                        f"{stage}.{args.instrument}" for stage in STAGE_OF_EVENT
                        if f"{stage}.{args.instrument}" not in answer_keys(args.instrument)))
            client.sender.publish(delivery)
            if args.wait is None:
                print(json.dumps({"run_id": run_id, "delivery_id": delivery.delivery_id,
                                  "message_id": delivery.message_id}))
                return 0
            progress = Progress(sys.stderr)
            body = client.wait_for(channel, queue, functools.partial(
                _answer_for, delivery_id=delivery.delivery_id, progress=progress), args.wait)
            progress.close()
    except BrokerUnavailable as e:
        print(f"preimg deliver: {e}; nothing was delivered", file=sys.stderr)
        return 3
    except PublishFailed as e:
        print(f"preimg deliver: the broker did not take the delivery ({e}); nothing was delivered. "
              f"Check that the exchange {settings.exchange!r} and the queue of ingest exist "
              "(every preimg service and command declares them)", file=sys.stderr)
        return 3
    if body is None:
        print(json.dumps({"run_id": run_id, "status": "timeout",
                          "reason": f"no completion within {args.wait:g} s"}))
        return 1
    event = decode(body)
    doc = event.model_dump(mode="json")
    doc.setdefault("status", "failed")
    print(json.dumps(doc))
    return 0 if doc["status"] == "ok" else 1


def _answer_for(body: bytes, delivery_id: str, progress: Progress) -> bool:
    """True for the run's answer (completed or failed); a stage's event of the run is shown as progress."""
    if not _is_for(body, delivery_id):
        return False
    stage = str(json.loads(body).get("type", "")).removeprefix("preimg.").rsplit(".v", 1)[0]
    if stage in ("completed", "run_failed"):
        return True
    if stage in STAGE_OF_EVENT:
        progress.stage_finished(STAGE_OF_EVENT[stage])
    return False


def _is_for(body: bytes, delivery_id: str) -> bool:
    try:
        return json.loads(body).get("delivery_id") == delivery_id
    except ValueError:
        return False


def cmd_dlq(args: argparse.Namespace) -> int:
    """Operators' view of dead letters: one JSON object per message, or replay them.

    Exit codes: 0 done, 2 no such service queue, 3 the broker could not be reached.
    """
    from shared.bus.rabbitmq import BrokerUnavailable, RabbitClient
    from shared.bus.topology import HEADER_ATTEMPT, HEADER_FAILED_AT, HEADER_REASON, topology_specs
    from shared.profiles import available_instruments

    settings = Settings()
    instruments = available_instruments()
    queues = [spec.name for spec in topology_specs(instruments)]
    if args.queue not in queues:
        print(f"preimg dlq: {args.queue!r} is not a service queue; one of: {', '.join(queues)}", file=sys.stderr)
        return 2
    try:
        with RabbitClient(settings.amqp_url, settings.exchange, settings.heartbeat_s, instruments=instruments,
                          retry_delays_ms=settings.retry_delays_ms, queue_args=settings.queue_arguments(), tls=settings.tls()) as client:
            if args.action == "replay":
                moved = client.replay_dead_letters(args.queue, args.limit)
                print(json.dumps({"queue": args.queue, "replayed": moved}))
                return 0
            for body, headers in client.browse_dead_letters(args.queue):
                try:
                    fields = json.loads(body)
                    summary = {k: v for k, v in fields.items() if k in ("type", "run_id", "delivery_id", "instrument")}
                except (ValueError, AttributeError):
                    summary = {"body": body[:200].decode(errors="replace")}
                print(json.dumps({**summary, "reason": headers.get(HEADER_REASON),
                                  "attempts": headers.get(HEADER_ATTEMPT),
                                  "failed_at": headers.get(HEADER_FAILED_AT)}, default=str))
    except BrokerUnavailable as e:
        print(f"preimg dlq: {e}", file=sys.stderr)
        return 3
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from services.app import serve

    if args.service == "processor" and not args.instrument:
        print("preimg serve processor: give the instrument with -i/--instrument", file=sys.stderr)
        return 2
    if args.service != "processor" and args.instrument:
        print(f"preimg serve {args.service}: serves every instrument; -i/--instrument is for the processor",
              file=sys.stderr)
        return 2
    return serve(args.service, Settings(), args.instrument, once=args.once)


if __name__ == "__main__":
    sys.exit(main())

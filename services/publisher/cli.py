"""``preimg monitor prune -i INSTR --test``: the seed's manual clean-up of test runs."""

from __future__ import annotations

import argparse
import logging
import sys

from shared.errors import PreimgError
from shared.profiles import ProfileError, load_profile
from shared.settings import Settings

_log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``monitor`` command group to the ``preimg`` command line."""
    monitor = subparsers.add_parser("monitor", help="maintain preimgMonitor.html on the QC server")
    actions = monitor.add_subparsers(dest="monitor_command", required=True)
    prune = actions.add_parser(
        "prune",
        help="remove test runs from the monitor page (and their packages on the QC server)",
    )
    prune.add_argument("-i", "--instrument", required=True, help="instrument, e.g. HAWKI")
    prune.add_argument("--test", action="store_true",
                       help="remove the runs marked as test runs (required: the only kind "
                            "that may be pruned)")
    prune.add_argument("--keep-files", action="store_true",
                       help="keep the test runs' packages; only take their rows off the page")
    prune.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Remove test runs of one instrument; prints what was removed. Returns the exit code."""
    # Imported here so that ``preimg --help`` does not load boto3 and jinja2.
    from services.publisher.handlers import qc_base, render_monitor
    from services.publisher.monitor import page_key, prune_test_runs
    from services.publisher.service import build_qc_server, build_templates, utc_now

    if not args.test:
        print("preimg monitor prune: only test runs can be pruned; say so with --test", file=sys.stderr)
        return 2
    settings = settings or Settings()
    instrument = args.instrument.upper()
    try:
        profile = load_profile(instrument)
    except ProfileError as e:
        print(f"preimg monitor prune: {e}", file=sys.stderr)
        return 2
    qc = build_qc_server(settings)
    base = qc_base(profile)
    render = render_monitor(build_templates(), instrument, utc_now(), settings.monitor_max_rows)
    try:
        removed = prune_test_runs(qc, base, render, settings.monitor_max_rows, remove_files=not args.keep_files)
    except PreimgError as e:  # the QC server is unreachable or refuses: nothing half-claimed
        print(f"preimg monitor prune: {e}", file=sys.stderr)
        return 1
    for run_id in removed:
        print(f"removed test run {run_id}")
    print(f"{len(removed)} test run(s) removed from {qc.url(page_key(base))}")
    return 0

"""``preimg gc``: remove what interrupted writes left behind under the data root.

Removes stale temporary files and staging directories older than a limit (24 h
by default, far longer than any write), so it is safe while the services run;
what is swept and what never is: ``services.housekeeping``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.housekeeping import sweep
from shared.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``gc`` command to the ``preimg`` command line."""
    gc = subparsers.add_parser(
        "gc", help="remove temporary files and staging directories left by interrupted writes",
    )
    gc.add_argument("--older-than-hours", type=_hours, default=24.0, metavar="HOURS",
                    help="only what was last modified more than this long ago (default 24; "
                         "0 removes them whatever their age: only while no service runs)")
    gc.add_argument("--data-root", type=Path,
                    help="root of the run directories (default: $PREIMG_DATA_ROOT or ./preimg-data)")
    gc.add_argument("--json", action="store_true", help="print the count and the paths as one JSON object")
    gc.set_defaults(func=run_gc)


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more hours, not {text}")
    return value


def run_gc(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Sweep the data root; prints what was removed. Returns the exit code."""
    if settings is None:
        settings = Settings(data_root=args.data_root) if args.data_root is not None else Settings()
    root = settings.data_root.resolve()
    if not root.is_dir():
        print(f"preimg gc: the data root {root} does not exist or is not a directory "
              "(set PREIMG_DATA_ROOT or --data-root)", file=sys.stderr)
        return 2
    older_than_s = args.older_than_hours * 3600.0
    try:
        removed = sweep(settings, older_than_s)
    except OSError as e:
        print(f"preimg gc: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"data_root": str(root), "older_than_hours": args.older_than_hours,
                          "count": len(removed), "removed": [str(p) for p in removed]}))
    else:
        for path in removed:
            print(f"removed {path}")
        print(f"{len(removed)} left-over temporary file(s) and staging dir(s) removed under {root}")
    return 0

"""``preimg gc``: remove what interrupted writes left behind under the data root.

A stage killed with SIGKILL in the middle of :func:`shared.files.write_atomic`
leaves its temporary file (``.<name>.<random>.tmp``) beside the target, and an
ingest killed while staging leaves ``raw/<INSTR>/.<run_id>.staging``. Nothing
reads either; they only take space. ``preimg gc`` removes those older than a
limit (24 h by default, far longer than any write), so it is safe while the
services run.

Swept: ``raw/ sci/ logs/ work/ state/`` under the data root, and the local QC
directory. Not swept: ``incoming/`` (AOG's delivery area) and ``cal/``.
Symlinks are never followed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from shared.files import remove_stale_temp_files
from shared.settings import Settings

#: The directories under the data root that preimg's stages write into.
SWEPT_DIRS = ("raw", "sci", "logs", "work", "state")

#: Ingest stages a run in ``raw/<INSTR>/.<run_id>.staging`` and renames it into place
#: (``services.ingest.handlers._stage``); a directory by that name outlived its ingest.
STAGING_PREFIX, STAGING_SUFFIX = ".", ".staging"


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


def sweep(settings: Settings, older_than_s: float | None) -> list[Path]:
    """Remove stale temporary files and staging directories; returns what was removed.

    Raises OSError when something stale cannot be removed (permissions).
    """
    root = settings.data_root.resolve()
    removed: list[Path] = []
    for directory in (*(root / name for name in SWEPT_DIRS), settings.qc_local_dir()):
        removed += remove_stale_temp_files(directory, older_than_s)
    removed += remove_stale_staging_dirs(root / "raw", older_than_s)
    return removed


def remove_stale_staging_dirs(raw_root: Path, older_than_s: float | None) -> list[Path]:
    """Remove ``<raw_root>/<INSTR>/.<run_id>.staging`` directories not modified for ``older_than_s``.

    Only that depth is looked at; symlinks are neither followed nor removed.
    A live ingest adds files to its staging directory, which updates its
    modification time; give a limit while services run.
    """
    removed: list[Path] = []
    now = time.time()
    for instrument in _dirs(raw_root):
        for entry in _dirs(Path(instrument.path)):
            name = entry.name
            if not (name.startswith(STAGING_PREFIX) and name.endswith(STAGING_SUFFIX)
                    and len(name) > len(STAGING_PREFIX) + len(STAGING_SUFFIX)):
                continue
            try:
                if older_than_s is not None and now - entry.stat(follow_symlinks=False).st_mtime <= older_than_s:
                    continue
                shutil.rmtree(entry.path)
            except FileNotFoundError:  # removed meanwhile (ingest's own clean-up)
                continue
            removed.append(Path(entry.path))
    return removed


def _dirs(path: Path) -> list[os.DirEntry[str]]:
    """The real subdirectories of ``path`` (no symlinks); none when it is missing."""
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []

"""Housekeeping: what interrupted writes leave behind, removed before it gets in the way.

A stage killed with SIGKILL in the middle of :func:`shared.files.write_atomic`
leaves its temporary file (``.<name>.<random>.tmp``) beside the target, and an
ingest killed while staging leaves ``raw/<INSTR>/.<run_id>.staging``. Nothing
reads either; they only take space.

* ``remove_run_temp_files``: the message runner calls it for a run before a
  stage works on it (the stage holds the run's lease, so nobody else writes
  there);
* ``sweep``: everything older than a limit under the data root and the local
  QC directory, for ``preimg gc`` and the services' periodic sweep.

Swept: ``raw/ sci/ logs/ work/ state/`` under the data root, and the local QC
directory. Never: ``incoming/`` (AOG's delivery area, where a transfer tool may
use such names) and ``cal/``. Symlinks are never followed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from shared.files import remove_stale_temp_files
from shared.messages import Envelope
from shared.settings import Settings

_log = logging.getLogger(__name__)

#: The directories under the data root that preimg's stages write into.
SWEPT_DIRS = ("raw", "sci", "logs", "work", "state")

#: Ingest stages a run in ``raw/<INSTR>/.<run_id>.staging`` and renames it into place
#: (``services.ingest.handlers._stage``); a directory by that name outlived its ingest.
STAGING_PREFIX, STAGING_SUFFIX = ".", ".staging"


def remove_run_temp_files(settings: Settings, service: str, message: Envelope) -> None:
    """Temporary files an interrupted write of this run left behind (the stage holds the run's lease).

    Any age in the run's data directories, which no other stage writes while
    this one holds the run; in its state directory only those older than a
    minute, since other stages write their records and the run's terminal answer
    there (the runner removes this stage's own interrupted record at any age:
    ``FileLedger.remove_interrupted_record``).
    """
    dirs = settings.run_dirs(message.instrument, message.run_id)
    for directory in (dirs.raw, dirs.sci, dirs.logs, dirs.work, dirs.state):
        for path in remove_stale_temp_files(directory, older_than_s=60.0 if directory == dirs.state else None):
            _log.info("removed a temporary file left by an interrupted write: %s", path)
    if service == "publisher":
        from services.publisher.service import remove_package_temp_files

        for path in remove_package_temp_files(settings, message.instrument, message.run_id):
            _log.info("removed a temporary file left by an interrupted upload: %s", path)


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

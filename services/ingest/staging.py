"""Staging a delivery on disk: the adapter behind ingest's ``stage`` port.

Every file must lie inside the delivery area (symlinks are resolved, so one
pointing out is refused). The run's directory is filled under a temporary
name, each file hard-linked (no byte read) or copied and hashed in one pass,
checked against the announced size and checksum, then renamed into place in
one step: no reader ever sees a half-staged run. The frames' bytes and the
directory are made durable afterwards, under a runner in the round of
ingest's state record (``shared.files.sync_later``): until that record exists
the delivery is not acked, and a crash before it means the run is staged again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from shared.errors import PermanentError
from shared.files import CHUNK, file_digest, make_dirs, sync_later
from shared.messages import DeliveredFile


class DeliveryArea:
    """AOG's delivery area; ``stage`` is ingest's port."""

    def __init__(self, root: Path):
        self.root = root

    def stage(self, files: Sequence[DeliveredFile], dest: Path) -> list[Path]:
        """Verify and stage ``files`` into ``dest``; the staged paths, in order."""
        area = self.root.resolve()
        real_dirs: dict[Path, Path] = {}  # a delivery's files share one or two directories
        return _stage([(f, _resolve_inside(f, area, real_dirs)) for f in files], dest)


def _resolve_inside(f: DeliveredFile, area: Path, real_dirs: dict[Path, Path]) -> Path:
    """The real path of a delivered file, refused unless it lies inside the (resolved) delivery area.

    ``real_dirs`` caches the real path of each directory seen: a file that is not a symlink
    is its directory's real path plus its name, so only the directory is resolved (one
    ``lstat`` per path component), once per delivery, not once per file.
    """
    if os.path.basename(f.name) != f.name or f.name in (".", ".."):
        raise PermanentError(f"file name {f.name!r} must be a plain name without directories")
    candidate = Path(f.path) if Path(f.path).is_absolute() else area / f.path
    real = _real_path(candidate, real_dirs)  # follows symlinks: a link pointing out of the area is refused
    if not real.is_relative_to(area):
        raise PermanentError(
            f"{f.name}: path {f.path!r} resolves to {real}, outside the delivery area {area}; "
            "AOG must deliver files into the delivery area"
        )
    if not real.is_file():
        raise PermanentError(f"{f.name}: file {real} does not exist (or is not a regular file); "
                             "check that the transfer finished before the delivery was announced")
    return real


def _real_path(path: Path, real_dirs: dict[Path, Path]) -> Path:
    """``path.resolve()``, with the real path of its directory taken from (and kept in) ``real_dirs``."""
    if path.name in ("", ".", ".."):
        return path.resolve()
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return path.resolve()
    except OSError:
        return path.resolve()  # missing: resolved as far as it goes, refused by the caller
    parent = path.parent
    if parent not in real_dirs:
        real_dirs[parent] = parent.resolve()
    return real_dirs[parent] / path.name


def _stage(sources: list[tuple[DeliveredFile, Path]], dest: Path) -> list[Path]:
    """Copy (or hard-link) and verify every file into a temporary directory, then rename it to ``dest``."""
    make_dirs(dest.parent)  # raw/<INSTR> of a new instrument: its name synced with the frames
    tmp = dest.parent / f".{dest.name}.staging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    problems: list[str] = []
    try:
        staged = []
        for f, src in sources:
            target = tmp / f.name
            algorithm = f.checksum.split(":", 1)[0]
            problem = _verify(f, target, copied_digest=_link_or_copy(src, target, algorithm))
            if problem:
                problems.append(problem)
            staged.append(target)
        if problems:
            raise PermanentError(
                "the delivery failed verification: " + "; ".join(problems) +
                ". Deliver the files again with their correct sizes and checksums",
                problems=problems,
            )
        if dest.exists():  # left by an attempt that crashed before recording its result
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        # AOG's bytes are ours to keep once the delivery is acked: every frame, the directory
        # naming them and its entry made durable in one round of syncs (sync_all); under a
        # runner, the round of ingest's state record (before it, the run is staged again).
        sync_later([*(dest / f.name for f, _ in sources), dest, dest.parent])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [dest / f.name for f, _ in sources]


def _link_or_copy(src: Path, target: Path, algorithm: str) -> str | None:
    """Hard-link ``src`` (no byte read), or copy it hashing the bytes on the way: the digest then.

    Not synced here: the caller syncs every staged file at once.
    """
    try:
        os.link(src, target)
    except OSError:
        pass
    else:
        return None  # synced with the others by the caller
    digest = hashlib.new(algorithm)
    with open(src, "rb") as source, open(target, "wb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()  # synced with the others by the caller


def _verify(f: DeliveredFile, path: Path, copied_digest: str | None = None) -> str:
    size = path.stat().st_size
    if size != f.size:
        kind = "truncated" if size < f.size else "larger than announced"
        return f"{f.name} is {kind}: {size} bytes on disk, {f.size} announced"
    algorithm, expected = f.checksum.split(":", 1)
    actual = copied_digest or file_digest(path, algorithm)
    if actual != expected:
        return f"{f.name}: {algorithm} checksum mismatch (announced {expected}, file has {actual})"
    return ""



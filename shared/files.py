"""File primitives every stage relies on: atomic writes and checksums.

A stage's output must be durable before its message is acked, and a reader
(another stage, the QC web server, AOG) must never see half a file. A write
interrupted by ``kill -9`` leaves its temporary file behind;
:func:`remove_stale_temp_files` removes those.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

CHUNK = 1 << 20
T = TypeVar("T")

#: Name of :func:`write_atomic`'s temporary files, ``.<target name>.<random>.tmp``:
#: (prefix, suffix). :func:`is_temp_name` and :func:`remove_stale_temp_files` match it.
TEMP_NAME = (".", ".tmp")


def is_temp_name(name: str) -> bool:
    """True for a name :func:`write_atomic` gives its temporary files."""
    prefix, suffix = TEMP_NAME
    return len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix)


def write_atomic(path: Path, data: bytes | str | Path, mode: int = 0o644, *, durable: bool = True,
                 sync_dir: bool = True, sync_first: Iterable[Path] = ()) -> None:
    """Write ``data`` (bytes, text, or the content of another file) to ``path`` atomically.

    Temporary file in the same directory, fsync, rename over ``path``, fsync
    of the directory: readers see the old file or the new one, and after a
    crash the new one is either complete or absent.

    Parameters
    ----------
    durable
        False for a file whose loss in a crash is harmless (a marker that only
        saves a duplicate): still atomic for readers, but not fsynced.
    sync_dir
        False when the caller writes several files into one directory and
        calls :func:`fsync_dir` once afterwards (or must sync it at once, even
        inside a :func:`deferred_syncs` block: the state records).
    sync_first
        Files or directories that must be durable before ``path`` appears:
        synced in the same round as the temporary file's bytes, before the rename
        (the directory syncs a :func:`deferred_syncs` block collected).
    """
    sync_first = list(sync_first)
    tmp = _write_temp(path, data, mode, durable=durable and not sync_first)
    try:
        if durable and sync_first:
            sync_all([tmp, *sync_first])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable and sync_dir:
        sync_later([path.parent])


def write_all_atomic(contents: Mapping[Path, bytes | str], mode: int = 0o644, *,
                     sync_first: Iterable[Path] = (), sync_dir: bool = True, rewritten: bool = False) -> None:
    """Write several files atomically and durably with one round of syncs for all of them.

    Like :func:`write_atomic` for each file, but the temporary files are
    synced together, then renamed, then their directories synced together
    (:func:`sync_all`): a stage's five reports cost two journal commits
    instead of ten. Each file appears complete or not at all; a crash
    before the end may leave some of them renamed and others not, as
    separate :func:`write_atomic` calls would. ``sync_first`` and ``sync_dir``:
    as for :func:`write_atomic`.

    ``rewritten``: the files are written again whenever their writer runs again
    until it has committed (a stage's outputs under its state record): their bytes
    are synced after the renames, with their directories (:func:`sync_later`: in the
    record's round when a runner defers the syncs). Readers still never see half a
    file; after a crash before that round a file may be in place with its bytes
    lost, and is written again, the stage not having committed.
    """
    temps: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            temps[path] = _write_temp(path, data, mode, durable=False)
        if not rewritten:
            sync_all([*temps.values(), *sync_first])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    if rewritten:
        sync_later([*contents, *sync_first, *({path.parent for path in contents} if sync_dir else ())])
    elif sync_dir:
        sync_later({path.parent for path in contents})


def _write_temp(path: Path, data: bytes | str | Path, mode: int, *, durable: bool) -> Path:
    """``data`` in a new temporary file beside ``path`` (fsynced when ``durable``); its path."""
    fd, name = temp_file_beside(path)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, Path):
                with data.open("rb") as source:
                    for chunk in iter(lambda: source.read(CHUNK), b""):
                        out.write(chunk)
            else:
                out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; other stages and the QC web server read these
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _temp_prefix(path: Path) -> str:
    """How the names of ``path``'s temporary files begin (``.<name>.``)."""
    return f"{TEMP_NAME[0]}{path.name}."


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s directory, named for :func:`is_temp_name`: (fd, name).

    The directory is made when it is missing (only then: nearly every write goes into one that
    exists, and asking first would cost a ``mkdir`` and a ``stat`` per file).
    """
    # A concurrent clean-up may remove the directory just made empty; make it again.
    for attempt in range(5):
        try:
            return tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_NAME[1], dir=path.parent)
        except FileNotFoundError:
            if attempt == 4:
                raise
            make_dirs(path.parent)
    raise AssertionError("unreachable")


def make_dirs(directory: Path) -> None:
    """``directory.mkdir(parents=True, exist_ok=True)``, the new directories' names made durable
    with the caller's outputs (:func:`sync_later`: under a runner, in the round of its state record).

    A file synced into a new directory survives a crash only if the directory's own entry
    does: on a file system with a journal the file's sync commits the ``mkdir`` too, on one
    without (ext4 without a journal) only a sync of the parent makes it durable.
    """
    missing = []
    d = directory
    while not d.is_dir() and d != d.parent:
        missing.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    if missing:
        sync_later([m.parent for m in reversed(missing)])


def remove_stale_temp_files(root: Path, older_than_s: float | None = None) -> list[Path]:
    """Remove the temporary files interrupted :func:`write_atomic` calls left under ``root``.

    Parameters
    ----------
    root : Path
        Walked if it exists (it may itself be a symlink); symlinks below it
        are never followed, nor removed.
    older_than_s : float, optional
        Only files last modified more than this many seconds ago. None: any
        age, for a directory nobody else writes into at the moment (a run's
        directories while its stage holds the run); a live write's temporary
        file would be removed under it, and that write would fail.

    Returns
    -------
    list of Path
        The files removed. Files and directories vanishing meanwhile (another
        sweep, a run's clean-up) are skipped.

    Raises
    ------
    OSError
        A file that cannot be removed (permissions); directories that cannot
        be listed are skipped.
    """
    removed: list[Path] = []
    now = time.time()
    for dirpath, _dirs, files in os.walk(root):  # followlinks=False; listing errors are ignored
        for name in files:
            if not is_temp_name(name):
                continue
            path = Path(dirpath) / name
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                if older_than_s is not None and now - info.st_mtime <= older_than_s:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def remove_temp_files_of(path: Path) -> list[Path]:
    """Remove the temporary files interrupted writes of ``path`` left beside it, whatever their age:
    for a writer that knows nobody else writes ``path`` (the holder of a lease on it)."""
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return removed
    prefix = _temp_prefix(path)
    for name in names:
        if name.startswith(prefix) and is_temp_name(name):
            (path.parent / name).unlink(missing_ok=True)
            removed.append(path.parent / name)
    return removed


def fsync_path(path: Path) -> None:
    """Make a file or a directory durable: a file's bytes, or the entries created or renamed in a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: A directory after entries were created or renamed in it.
fsync_dir = fsync_path

#: Syncs put off by :func:`deferred_syncs` (None: outside such a block, sync at once).
#: An ordered set: a dict of paths, each asked for once however often it was asked.
_deferred: ContextVar[dict[Path, None] | None] = ContextVar("preimg_deferred_syncs", default=None)


@contextlib.contextmanager
def deferred_syncs() -> Iterator[dict[Path, None]]:
    """Collect, instead of doing, the syncs :func:`sync_later` is asked for inside the block.

    For the message runner around a message's lease and handler: the stage's state
    record is its commit point. What they asked to sync later (a new run's state
    directory; the directories the handler renamed outputs into; the bytes of outputs
    that are written again whenever the stage runs again)
    is synced in the same round of syncs as the bytes of the record
    (``FileLedger.record(..., sync_first=pending)``), before the record is renamed
    into place and before anything is acked or emitted. Whoever opens the block must
    sync the yielded paths before relying on the outputs; if it does not (the handler
    failed), nothing was promised and the stage runs again. Per thread (a context
    variable): other threads sync at once.
    """
    pending: dict[Path, None] = {}
    token = _deferred.set(pending)
    try:
        yield pending
    finally:
        _deferred.reset(token)


def sync_later(paths: Iterable[Path]) -> None:
    """Make files (their bytes) or directories (the entries created or renamed in them) durable:
    now, or inside a :func:`deferred_syncs` block in its owner's next round of syncs."""
    pending = _deferred.get()
    if pending is None:
        sync_all(paths)
        return
    pending.update(dict.fromkeys(paths))


#: Threads syncing beside the caller: :func:`sync_all`'s other lanes and :func:`sync_soon`.
_SYNC_THREADS = 4
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()
#: Descriptors one round of :func:`sync_all` holds open at most (more paths: several rounds).
_SYNC_BATCH = 64
#: :func:`sync_all` syncs in at most this many lanes at once, each given at least
#: ``_SYNCS_PER_LANE`` paths (fewer paths: fewer lanes; up to that many: the caller alone).
_SYNC_LANES = 4
_SYNCS_PER_LANE = 4


def sync_all(paths: Iterable[Path]) -> None:
    """Make several files and directories durable in one round.

    Two passes, as PostgreSQL syncs its data directory (``fsync_pgdata``): the
    write-back of every file's dirty pages is started first
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), then each
    file gets ``fdatasync`` (its bytes and size; a new name is the directory's
    business) and each directory ``fsync`` (its entries). The writes are then in
    flight together and the first sync commits a local file system's journal for
    the lot, so on a local disk the syncs cost about the same one after another
    as all at once. On a network file system (the shared data volume of a cluster
    is often NFS) each sync of a written file is a round trip of its own, so the
    syncs run in up to ``_SYNC_LANES`` lanes, the caller's thread being one;
    a small round runs on the caller's thread alone. Against one thread per
    sync, this costs a third to half the CPU (fewer thread hand-offs; bench_e2e's
    ``e2e_cpu_ms_per_delivery``). Without ``sync_file_range`` (not Linux) each
    lane's syncs also write the bytes. Raises the first error once every path was tried.
    """
    paths = list(paths)
    if len(paths) <= 1:
        for path in paths:
            fsync_path(path)
        return
    errors: list[OSError] = []
    for start in range(0, len(paths), _SYNC_BATCH):
        errors += _sync_batch(paths[start:start + _SYNC_BATCH])
    if errors:
        raise errors[0]


def _sync_batch(paths: Sequence[Path]) -> list[OSError]:
    """Sync ``paths`` (write-back of every file started first); the errors met, in the paths' order."""
    errors: dict[int, OSError] = {}
    opened: list[tuple[int, int, bool]] = []  # (index in paths, descriptor, is a directory)
    try:
        for i, path in enumerate(paths):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                errors[i] = e
                continue
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            opened.append((i, fd, is_dir))
            if not is_dir:
                _start_writeback(fd)

        def sync_lane(lane: Sequence[tuple[int, int, bool]]) -> None:
            for i, fd, is_dir in lane:
                try:
                    if is_dir:
                        os.fsync(fd)
                    else:
                        os.fdatasync(fd)
                except OSError as e:
                    errors[i] = e

        n_lanes = max(1, min(_SYNC_LANES, len(opened) // _SYNCS_PER_LANE))
        lanes = [opened[k::n_lanes] for k in range(n_lanes)]
        others = []
        for lane in lanes[1:]:
            try:
                others.append(_pool().submit(sync_lane, lane))
            except RuntimeError:  # the interpreter is exiting (an atexit hook writing): no new work for threads
                sync_lane(lane)
        sync_lane(lanes[0])
        for lane in others:
            lane.result()
    finally:
        for _, fd, _ in opened:
            os.close(fd)
    return [errors[i] for i in sorted(errors)]


#: ``sync_file_range``'s flag: start writing the dirty pages of the range back, do not wait.
_SYNC_FILE_RANGE_WRITE = 2
#: libc's ``sync_file_range`` once looked up (None: there is none); unset until the first use.
_writeback: list[Callable[[int, int, int, int], int] | None] = []


def _start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages back without waiting for them. A hint: where
    ``sync_file_range`` is missing or fails, the ``fdatasync`` that follows does all the work."""
    if not _writeback:  # looked up on first use: nothing is loaded at import time
        import ctypes

        call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
        if call is not None:
            call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            call.restype = ctypes.c_int
        _writeback.append(call)
    call = _writeback[0]
    if call is not None:
        call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # offset 0, length 0: the whole file


def sync_soon(paths: Iterable[Path]) -> Callable[[], None]:
    """Start making ``paths`` durable in the background; the returned function
    waits until they are and raises the first error.

    For what must be durable before a message is acked but not before its events are
    published: the directory entry of a stage's state record (``FileLedger.record``), synced
    while the broker takes the events and the next stage starts.
    """
    # One path per task: a round of one runs on its own thread, never handing lanes to the pool.
    try:
        futures = [_pool().submit(_sync_batch, [path]) for path in paths]
    except RuntimeError:  # the interpreter is exiting: sync at once
        done = [_sync_batch([path]) for path in paths]
        futures = []
    else:
        done = []

    def wait() -> None:
        errors = [e for found in [*done, *(f.result() for f in futures)] for e in found]
        if errors:
            raise errors[0]

    return wait


def _pool() -> ThreadPoolExecutor:
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None:  # made on first use: nothing starts at import time
            _sync_pool = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="fsync")
        return _sync_pool


#: A file's identity and version as :func:`file_stamp` gives it: (inode, size, mtime_ns).
Stamp = tuple[int, int, int]
#: How long a file must have been left alone before a cache may trust its stamp.
SETTLED_NS = 2_000_000_000


def file_stamp(path: Path) -> Stamp | None:
    """(inode, size, mtime_ns) of a regular file, None when it is missing or not a regular file.

    For caches of parsed configuration: a file edited in place or replaced gets another stamp.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def settled(stamp: Stamp | None) -> bool:
    """Whether a stamp can be trusted to change with the file: last modified over :data:`SETTLED_NS` ago.

    A file written twice within its file system's mtime resolution (a clock tick) keeping
    its size keeps its stamp: what was parsed from a file changed that recently is not kept.
    """
    return stamp is not None and stamp[2] < time.time_ns() - SETTLED_NS


def reuse_while_unchanged(cache: dict[Hashable, tuple[tuple[Stamp | None, ...], T]], key: Hashable,
                          paths: Sequence[Path], load: Callable[[], T]) -> T:
    """What ``load()`` makes of ``paths`` (parsed configuration), taken from ``cache[key]`` while none
    of the files changed (:func:`file_stamp`). Kept only when every file has :func:`settled`; a
    missing file has no stamp, so ``load`` runs (and says what is missing) each time."""
    stamps = tuple(file_stamp(p) for p in paths)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamps:
        return hit[1]
    value = load()
    if all(settled(s) for s in stamps):
        cache[key] = (stamps, value)
    return value


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(body: bytes | Path) -> str:
    """Hex SHA-256 of bytes or of a file."""
    return file_digest(body) if isinstance(body, Path) else hashlib.sha256(body).hexdigest()

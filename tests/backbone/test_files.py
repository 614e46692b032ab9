"""shared.files.sync_all: one round of syncs on the caller's thread, write-back started first."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from shared import files

#: A file whose fdatasync the ``syncs`` fixture fails with EIO.
FAILING = "fails.fits"


@pytest.fixture
def syncs(monkeypatch):
    """Record, in order, each write-back started and each sync done (the real calls still run)."""
    calls: list[tuple[str, str, str]] = []

    def named(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    real_writeback, real_fdatasync, real_fsync = files._start_writeback, os.fdatasync, os.fsync

    def writeback(fd: int) -> None:
        calls.append(("writeback", named(fd), threading.current_thread().name))
        real_writeback(fd)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync", named(fd), threading.current_thread().name))
        if named(fd).endswith(FAILING):
            raise OSError(errno.EIO, "input/output error (injected)", named(fd))
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        calls.append(("fsync", named(fd), threading.current_thread().name))
        real_fsync(fd)

    monkeypatch.setattr(files, "_start_writeback", writeback)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _outputs(tmp_path: Path, n: int) -> list[Path]:
    out = tmp_path / "out"
    out.mkdir()
    made = []
    for i in range(n):
        path = out / f"f{i}.fits"
        path.write_bytes(bytes([i]) * 9000)  # dirty pages, never synced
        made.append(path)
    return made


def test_every_file_is_written_back_before_the_first_sync_then_each_is_synced(tmp_path, syncs):
    made = _outputs(tmp_path, 4)
    directory = made[0].parent

    files.sync_all([*made, directory])

    kinds = [kind for kind, _, _ in syncs]
    assert kinds == ["writeback"] * 4 + ["fdatasync"] * 4 + ["fsync"]
    assert [name for kind, name, _ in syncs if kind == "writeback"] == [str(p) for p in made]
    assert [name for kind, name, _ in syncs if kind == "fdatasync"] == [str(p) for p in made]
    assert [name for kind, name, _ in syncs if kind == "fsync"] == [str(directory)]


def test_a_path_that_cannot_be_opened_fails_the_round_after_the_others_are_synced(tmp_path, syncs):
    made = _outputs(tmp_path, 2)
    missing = tmp_path / "out" / "gone.fits"

    with pytest.raises(FileNotFoundError) as raised:
        files.sync_all([made[0], missing, made[1]])

    assert raised.value.filename == str(missing)
    assert [name for kind, name, _ in syncs if kind == "fdatasync"] == [str(p) for p in made]


def test_without_sync_file_range_the_files_are_still_synced(tmp_path, syncs, monkeypatch):
    monkeypatch.setattr(files, "_writeback", [None])  # as on a system without the call
    made = _outputs(tmp_path, 3)

    files.sync_all(made)

    assert [name for kind, name, _ in syncs if kind == "fdatasync"] == [str(p) for p in made]


def test_many_paths_are_synced_in_rounds_of_bounded_open_descriptors(tmp_path, syncs, monkeypatch):
    monkeypatch.setattr(files, "_SYNC_BATCH", 3)
    made = _outputs(tmp_path, 7)
    fd_dir = Path("/proc/self/fd")
    open_before = len(list(fd_dir.iterdir()))
    most_open = 0
    real_fdatasync = os.fdatasync

    def counting(fd: int) -> None:
        nonlocal most_open
        most_open = max(most_open, len(list(fd_dir.iterdir())) - open_before)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting)

    files.sync_all(made)

    assert [name for kind, name, _ in syncs if kind == "writeback"] == [str(p) for p in made]
    assert 0 < most_open <= 3 + 1  # a round's descriptors, and the listing's own
    assert len(list(fd_dir.iterdir())) == open_before  # every descriptor closed


def test_sync_file_range_is_found_on_linux(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        files._start_writeback(fd)
    finally:
        os.close(fd)
    assert files._writeback and files._writeback[0] is not None


def test_a_large_round_is_synced_in_lanes_each_path_once_and_a_failure_in_any_lane_is_raised(tmp_path, syncs):
    made = _outputs(tmp_path, 15)
    failing = made[0].parent / FAILING
    failing.write_bytes(b"x")
    paths = [*made, failing, made[0].parent]

    with pytest.raises(OSError) as raised:
        files.sync_all(paths)

    assert raised.value.errno == errno.EIO and raised.value.filename == str(failing)
    synced = [name for kind, name, _ in syncs if kind in ("fdatasync", "fsync")]
    assert sorted(synced) == sorted(str(p) for p in paths), "each path synced exactly once"
    threads = {thread for kind, _, thread in syncs if kind in ("fdatasync", "fsync")}
    assert threading.current_thread().name in threads and len(threads) >= 2
    # Every write-back was started, on the caller's thread, before the first sync.
    first_sync = next(i for i, (kind, _, _) in enumerate(syncs) if kind != "writeback")
    assert sorted(name for kind, name, _ in syncs[:first_sync]) == sorted(str(p) for p in [*made, failing])


class _ExitingPool:
    """A thread pool after interpreter shutdown began: takes no new work."""

    def submit(self, *_args, **_kwargs):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


def test_syncs_asked_for_while_the_interpreter_exits_run_on_the_caller(tmp_path, syncs, monkeypatch):
    """An atexit hook (the publisher's last monitor page) may write: the thread pool no longer takes work."""
    monkeypatch.setattr(files, "_pool", _ExitingPool)
    made = _outputs(tmp_path, 15)

    files.sync_all(made)
    files.sync_soon([made[0].parent])()

    synced = [(name, thread) for kind, name, thread in syncs if kind in ("fdatasync", "fsync")]
    assert sorted(name for name, _ in synced) == sorted([*map(str, made), str(made[0].parent)])
    assert {thread for _, thread in synced} == {threading.current_thread().name}


def test_a_directory_made_for_a_file_has_its_name_synced_with_the_file(tmp_path):
    # Without a journal, a file synced into a new directory is lost with the directory
    # unless the directory's parent is synced too: asked for with the file's own syncs.
    target = tmp_path / "runs" / "run-1" / "products" / "a.fits"
    with files.deferred_syncs() as pending:
        files.write_atomic(target, b"data")
    assert target.read_bytes() == b"data"
    assert {tmp_path, tmp_path / "runs", tmp_path / "runs" / "run-1"} <= set(pending)
    with files.deferred_syncs() as again:  # the directories exist now: nothing more to sync for them
        files.write_atomic(target.with_name("b.fits"), b"data")
    assert tmp_path / "runs" not in again and tmp_path / "runs" / "run-1" not in again

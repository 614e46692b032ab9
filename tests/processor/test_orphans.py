"""A recipe never outlives its processor: the death signal, and the leftover kill before a retry.

No ESO software is needed: a shell script stands in for esorex, ``sleep`` for a
recipe that survived.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.processor import esorex, recipe_processes
from services.processor.recipe_processes import PID_FILE, death_guard, kill_leftover_recipes
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """The pid runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


@pytest.fixture
def sleeper():
    """A process group led by ``sleep 60`` with a child of its own; killed at the end in any case."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & exec sleep 60"], start_new_session=True)
    assert wait_until(lambda: len(group(proc.pid)) == 2)
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def group(pgid: int) -> list[int]:
    return recipe_processes._group_members(pgid)


def record(workdir: Path, pid: int, **changes) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    doc = {"pid": pid, "pgid": os.getpgid(pid), "start_time": start_time(pid), "recipe": "hawki_fake"}
    doc.update(changes)
    path = workdir / PID_FILE
    path.write_text(json.dumps(doc))
    return path


def test_kill_leftover_recipes_kills_the_recorded_group(tmp_path, sleeper):
    pid_file = record(tmp_path / "work" / "AB1", sleeper.pid)
    assert kill_leftover_recipes(tmp_path / "work") == [sleeper.pid]
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert group(sleeper.pid) == []  # the leader's child too
    assert not pid_file.exists()


def test_a_record_with_another_start_time_kills_nothing(tmp_path, sleeper):
    """The pid was reused by another process: never kill it."""
    pid_file = record(tmp_path / "AB1", sleeper.pid, start_time=start_time(sleeper.pid) - 1)
    assert kill_leftover_recipes(tmp_path) == []
    assert alive(sleeper.pid) and len(group(sleeper.pid)) == 2
    assert not pid_file.exists()  # the record is stale: removed


def test_a_record_from_another_host_kills_nothing(tmp_path, sleeper):
    record(tmp_path / "AB1", sleeper.pid, boot_id="00000000-0000-0000-0000-000000000000")
    assert kill_leftover_recipes(tmp_path) == []
    assert alive(sleeper.pid)


def test_members_of_a_group_whose_leader_died_are_killed(tmp_path, sleeper):
    members = group(sleeper.pid)
    pid_file = record(tmp_path / "AB1", sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)  # the leader dies (the death signal reached esorex) ...
    sleeper.wait()
    child = next(p for p in members if p != sleeper.pid)
    assert alive(child)  # ... but what it started lives on, in its group
    assert kill_leftover_recipes(tmp_path) == [sleeper.pid]
    assert wait_until(lambda: not alive(child))
    assert not pid_file.exists()


def test_no_records_and_unreadable_records_are_harmless(tmp_path):
    assert kill_leftover_recipes(tmp_path / "missing") == []
    (tmp_path / "AB1").mkdir()
    for text in ("{not json", "[1, 2]", '{"pid": 1}'):
        (tmp_path / "AB1" / PID_FILE).write_text(text)
        assert kill_leftover_recipes(tmp_path) == []


def test_death_guard_does_not_start_the_command_when_the_parent_is_not_the_expected_one(tmp_path):
    guard = death_guard(parent_pid=1)  # as if the processor had died before the signal was armed
    if not guard:
        pytest.skip("setpriv is not installed")
    marker = tmp_path / "ran"
    out = subprocess.run([*guard, "touch", str(marker)], check=False)
    assert out.returncode != 0 and not marker.exists()
    out = subprocess.run([*death_guard(), "touch", str(marker)], check=False)
    assert out.returncode == 0 and marker.exists()


FAKE_ESOREX = """#!/bin/sh
# stands in for esorex: runs until killed
exec sleep 60
"""

PROCESSOR = textwrap.dedent("""
    import sys, threading
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from services.processor.esorex import run_recipe
    workdir, fake = Path(sys.argv[1]), sys.argv[2]
    # as the processor does: the recipe runs in a worker thread of a pool
    with ThreadPoolExecutor(1) as pool:
        pool.submit(run_recipe, "hawki_fake", [], workdir, esorex=fake, timeout_s=120).result()
""")


def test_the_recipe_dies_with_a_processor_killed_by_sigkill(tmp_path):
    if not death_guard():
        pytest.skip("setpriv is not installed")
    fake = tmp_path / "esorex"
    fake.write_text(FAKE_ESOREX)
    fake.chmod(0o755)
    workdir = tmp_path / "work" / "AB1"
    processor = subprocess.Popen([sys.executable, "-c", PROCESSOR, str(workdir), str(fake)],
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pid_file = workdir / PID_FILE
        assert wait_until(pid_file.is_file, timeout=30)
        pid = json.loads(pid_file.read_text())["pid"]
        assert wait_until(lambda: "sleep" in Path(f"/proc/{pid}/cmdline").read_text())  # guard exec'd the recipe
        processor.send_signal(signal.SIGKILL)
        processor.wait()
        assert wait_until(lambda: not alive(pid), timeout=2), "the recipe outlived its processor"
        assert kill_leftover_recipes(tmp_path / "work") == []  # nothing left to kill; the record goes
        assert not pid_file.exists()
    finally:
        if processor.poll() is None:
            processor.kill()
            processor.wait()


def test_run_recipe_removes_its_record_when_the_recipe_ends(tmp_path):
    fake = tmp_path / "esorex"
    # the record is written right after the start: give it a moment
    fake.write_text("#!/bin/sh\nfor i in $(seq 100); do test -f esorex.pid && echo recorded && exit; sleep 0.05; done\n")
    fake.chmod(0o755)
    result = esorex.run_recipe("hawki_fake", [], tmp_path / "AB1", esorex=fake)
    assert result.ok, result.reason
    assert (tmp_path / "AB1" / "esorex.out").read_text() == "recorded\n"
    assert not (tmp_path / "AB1" / PID_FILE).exists()
    assert result.argv[0] == str(fake)  # the esorex command line, without the guard


def test_the_workspace_stops_leftovers_before_wiping_the_run(tmp_path, monkeypatch):
    """The leftover recipes are killed while the directories are as the dead attempt left them."""
    from services.processor import service

    dirs = Settings(data_root=tmp_path).run_dirs("HAWKI", "r1")
    dirs.work.mkdir(parents=True)
    (dirs.work / "left.txt").write_text("by the attempt that died")
    seen = []
    monkeypatch.setattr(service, "kill_leftover_recipes", lambda work: seen.append((work / "left.txt").exists()))
    service.prepare_workspace(dirs)
    assert seen == [True]
    assert not (dirs.work / "left.txt").exists() and dirs.sci.is_dir() and dirs.logs.is_dir()

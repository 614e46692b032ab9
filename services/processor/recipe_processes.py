"""The processes of a running recipe: started guarded, waited for, killed, and never left behind.

:func:`services.processor.esorex.run_recipe` decides *what* to run; this module
owns *how the process lives and dies*, which changes for reasons of its own
(kernels, containers, pid reuse), not when the recipe's command line does:

* :func:`death_guard` prefixes the command so that the recipe runs with
  ``PR_SET_PDEATHSIG=SIGKILL`` (through util-linux ``setpriv``): the kernel
  kills it when the processor dies, even by ``kill -9``.
* :func:`record_group` writes ``<workdir>/esorex.pid`` (pid, process group,
  start time, boot id, pid namespace) while the recipe runs, and
  :func:`kill_leftover_recipes` kills whatever survived an earlier attempt
  before a retry reuses the directory.
* :func:`wait_exit` wakes the moment the recipe exits (a pidfd), and
  :func:`kill_group` stops the recipe and everything it started on a timeout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.errors import RetryableError
from shared.files import write_atomic

_log = logging.getLogger(__name__)

#: The only PATH the recipe sees; esorex, setpriv and sh are looked up on it (system dirs only).
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

#: Seconds between SIGTERM and SIGKILL when a recipe times out.
_KILL_GRACE_S = 5.0

#: The record of a running recipe's process group, in its working directory.
PID_FILE = "esorex.pid"

#: Seconds :func:`kill_leftover_recipes` waits for a killed recipe to be gone.
LEFTOVER_WAIT_S = 10.0

#: Run by ``sh`` between ``setpriv`` (which has armed the death signal) and esorex. If the
#: processor died before the signal was armed, the shell has already been re-parented: it
#: must not start the recipe. ``$1`` is the processor's pid.
_PARENT_CHECK = '[ "$PPID" = "$1" ] || exit 137; shift; exec "$@"'


def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for the process, waking the moment it exits.

    ``Popen.wait(timeout=...)`` polls with sleeps of up to 50 ms; a pidfd
    (Linux >= 5.3) becomes readable exactly when the process ends.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return proc.wait(timeout=timeout_s)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(max(timeout_s, 0.0) * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
    finally:
        os.close(fd)
    return proc.wait()


def kill_group(proc: subprocess.Popen[bytes], grace_s: float = _KILL_GRACE_S) -> None:
    """Stop the recipe and anything it started: TERM, then KILL after a grace period."""
    steps = ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)) if grace_s > 0 else ((signal.SIGKILL, None),)
    for sig, wait in steps:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


@functools.cache
def _death_guard_tools() -> tuple[str, str] | None:
    """``setpriv`` and ``sh`` on :data:`DEFAULT_PATH`, or None (warned once) when either is missing."""
    setpriv = shutil.which("setpriv", path=DEFAULT_PATH)
    sh = shutil.which("sh", path=DEFAULT_PATH)
    if setpriv is None or sh is None:
        _log.warning(
            "setpriv (util-linux) not found on %s: recipes run without PR_SET_PDEATHSIG, so a processor "
            "killed with SIGKILL leaves its esorex running until the retry kills it", DEFAULT_PATH,
        )
        return None
    return setpriv, sh


def death_guard(parent_pid: int | None = None) -> list[str]:
    """Command prefix that makes the command after it die with this process.

    ``setpriv --pdeathsig KILL`` sets ``PR_SET_PDEATHSIG=SIGKILL`` and execs
    ``sh``, which execs the command only if its parent is still
    ``parent_pid`` (default: this process). That closes the race between fork
    and prctl: a processor that dies in between leaves a re-parented child,
    which exits instead of running the recipe. No ``preexec_fn`` (not safe
    with threads). ``[]`` when setpriv is missing: the recipe then runs
    unguarded, and only :func:`kill_leftover_recipes` stops a leftover.

    CAUTION: the kernel sends the death signal when the *thread* that forked
    the child exits, not only the process. :func:`~services.processor.esorex.run_recipe` waits for the
    child in the thread that started it (a ThreadPoolExecutor worker of the
    processor, or the main thread), so the thread outlives the recipe; never
    start a recipe from a thread that may end before it.
    """
    tools = _death_guard_tools()
    if tools is None:
        return []
    setpriv, sh = tools
    pid = os.getpid() if parent_pid is None else parent_pid
    return [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", _PARENT_CHECK, "esorex-guard", str(pid)]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks after boot) of a live pid, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')'.
    fields = text.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[2]), int(fields[19])  # fields 3, 5 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def record_group(proc: subprocess.Popen[bytes], recipe: str, workdir: Path) -> None:
    """Write ``<workdir>/esorex.pid``: pid, process group and start time of the recipe.

    The start time tells a recycled pid from the recipe; boot id and pid
    namespace tell a record written on another host or in another container
    (the data volume is shared), where the pid means nothing.
    """
    stat = _proc_stat(proc.pid)
    if stat is None:  # already gone: nothing to record
        return
    record = {
        "pid": proc.pid,
        "pgid": stat[1],
        "start_time": stat[2],
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "recipe": recipe,
    }
    try:
        write_atomic(workdir / PID_FILE, json.dumps(record) + "\n")
    except OSError as e:  # the death signal still protects; a retry may not find a leftover
        _log.warning("cannot record the process group of %s in %s: %s", recipe, workdir, e)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def _leftover_group(record: Mapping[str, Any], where: Path) -> int | None:
    """The process group to kill for a record, or None when nothing of it is alive.

    Never a group that is not the recipe's: the recorded pid must be the same
    process (same start time), or, when it is gone, processes must still be in
    its group (which keeps the group id, hence the pid, from being reused).
    """
    boot_id, pid_ns = _read_text("/proc/sys/kernel/random/boot_id"), _pid_namespace()
    if (record.get("boot_id") and boot_id and record["boot_id"] != boot_id) or (
        record.get("pid_ns") and pid_ns and record["pid_ns"] != pid_ns
    ):
        _log.warning("the recipe recorded in %s ran on another host or in another container: "
                     "its processes are not visible from here, not checked", where)
        return None
    pid, pgid, start = int(record["pid"]), int(record["pgid"]), int(record["start_time"])
    stat = _proc_stat(pid)
    if stat is not None and stat[2] != start:
        return None  # the pid was reused by another process
    # The recipe itself, or (when it is gone or a zombie) what it started, still in its group.
    return pgid if _group_members(pgid) else None


def _pid_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):  # does not follow symlinks
        if PID_FILE in files:
            yield Path(dirpath) / PID_FILE


def kill_leftover_recipes(work_root: Path, *, wait_s: float = LEFTOVER_WAIT_S) -> list[int]:
    """Kill the recipes still running from an earlier attempt under ``work_root``.

    Every ``esorex.pid`` under ``work_root`` (symlinks not followed) whose
    process is still the recorded one has its process group killed with
    SIGKILL; this waits until the group is gone, then removes the record.
    Records of finished recipes, or of pids since reused, are removed and
    nothing is killed.

    Call it before removing or reusing a working directory: a recipe that
    survived its processor (started without the death signal, or in the race
    before it was armed) would go on writing into it.

    Returns
    -------
    list of int
        The process groups killed.

    Raises
    ------
    RetryableError
        A killed group is still alive after ``wait_s`` (a process stuck in
        uninterruptible I/O): the directory is not safe to reuse yet.
    """
    killed = []
    for path in _pid_files(Path(work_root)):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")
            pgid = _leftover_group(record, path.parent)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError, KeyError) as e:
            _log.warning("ignoring unreadable %s: %s", path, e)
            continue
        if pgid is not None:
            _log.warning("killing leftover recipe %s (process group %d) in %s",
                         record.get("recipe", "?"), pgid, path.parent)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait_s
            while _group_members(pgid):
                if time.monotonic() >= deadline:
                    raise RetryableError(
                        f"leftover recipe (process group {pgid}) in {path.parent} still alive "
                        f"{wait_s:g} s after SIGKILL"
                    )
                time.sleep(0.02)
            killed.append(pgid)
        path.unlink(missing_ok=True)
    return killed


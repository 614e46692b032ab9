"""Run one ESO pipeline recipe through ``esorex`` and judge the outcome.

This is the ``processAB`` core without the AB bookkeeping: one recipe, one SOF,
one fresh working directory. The facts behind the design are in
``shared/design/ESOREX.md`` (measured on the real recipes):

* rc 0 does not mean success (§6.1): a run is SUCCESSFUL only when the exit
  code is 0, no ``[ ERROR ]`` line was printed, and every PRO.CATG the recipe
  is expected to write is present in ``products.json``.
* Recipes die by signal on bad input (SIGSEGV, SIGFPE, SIGABRT) and leave
  partial products behind (§6.2): those runs are FAILED, the log is kept.
* ``--recipe-dir`` must point at the instrument's own plugin directory, or the
  HAWK-I recipes load VIMOS' ``libcasu`` (§6.4).
* The catalogue cache lands in the current directory (§3.6), so every run gets
  its own working directory as cwd.

Layout of a working directory after :func:`run_recipe`::

    <workdir>/input.sof        the SOF, absolute paths
    <workdir>/products.json    esorex --products-sof output
    <workdir>/esorex.log       esorex --log-dir log (log level info)
    <workdir>/esorex.out       stdout+stderr of the esorex process
    <workdir>/products/        --output-dir: the products
    <workdir>/esorex.pid       while the recipe runs: its process group (see below)

A recipe never outlives the processor that started it. esorex runs with
``PR_SET_PDEATHSIG=SIGKILL`` (through util-linux ``setpriv``), so the kernel
kills it when the processor dies, even by ``kill -9``; and the process group of
a running recipe is recorded in ``esorex.pid``, so that
:func:`kill_leftover_recipes` can kill whatever survived before a retry reuses
the directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import RetryableError
from shared.files import file_digest, write_atomic
from shared.fitsheader import FitsHeaderError, card_value, iter_header_texts, parse_value
from shared.oca.abfiles import format_sof
from shared.oca.keywords import header_key

_log = logging.getLogger(__name__)

SUCCESSFUL = "SUCCESSFUL"
FAILED = "FAILED"

#: PRO.CATG values a recipe must write for the run to count as complete.
#: Only the products the reports and the PI need are listed; optional ones
#: (e.g. MEAN_SKY, written only when a sky is made) are not.
EXPECTED_PRODUCTS: dict[str, frozenset[str]] = {
    "hawki_dark_combine": frozenset({"MASTER_DARK"}),
    "hawki_twilight_flat_combine": frozenset({"MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_BPM"}),
    "hawki_science_process": frozenset(
        {
            "BASIC_CALIBRATED_SCI",
            "BASIC_VAR_MAP",
            "JITTERED_IMAGE_SCI",
            "JITTERED_VAR_IMAGE",
            "CONFIDENCE_MAP_JITTERED",
            "OBJECT_CATALOGUE_JITTERED",
        }
    ),
    "vimos_ima_bias": frozenset({"MASTER_BIAS"}),
    "vimos_ima_dark": frozenset({"MASTER_DARK"}),
    "vimos_ima_twilight_flat": frozenset({"MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_BPM"}),
    "vimos_ima_science": frozenset(
        {
            "BASIC_CALIBRATED_SCI",
            "BASIC_VAR_MAP_SCI",
            "JITTERED_IMAGE_SCI",
            "JITTERED_VAR_IMAGE",
            "CONFIDENCE_MAP_SCI",
            "OBJECT_CATALOGUE_SCI_JITTERED",
        }
    ),
}

#: One BASIC_CALIBRATED_SCI per exposure: (raw tag, raw files per exposure).
#: VIMOS writes one file per quadrant, so 4 OBJECT files are one exposure.
#: Without LST the VIMOS recipe silently processes only the first exposure
#: (ESOREX.md §4.6); this check turns that into a failure.
PER_EXPOSURE_PRODUCT: dict[str, tuple[str, int, str]] = {
    "hawki_science_process": ("OBJECT", 1, "BASIC_CALIBRATED_SCI"),
    "vimos_ima_science": ("OBJECT", 4, "BASIC_CALIBRATED_SCI"),
}

#: esorex prints "[ ERROR ]" with padding; match any spacing (ESOREX.md §6.1).
_ERROR_RE = re.compile(r"\[\s*ERROR\s*\]")

#: Lines that are printed on every run and are not a problem (ESOREX.md §6.7).
_HARMLESS = ("Unable to open directory /usr/lib/cpl/plugins",)

#: The only PATH the recipe sees; esorex and its helpers live in the system dirs.
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


@dataclass(frozen=True)
class Product:
    """One product file written by a recipe.

    Attributes
    ----------
    path : Path
        Where the file is now.
    pro_catg : str
        ``HIERARCH ESO PRO CATG`` of the primary header ("" when absent).
    qc : dict
        ``HIERARCH ESO QC *`` keywords of all HDUs, flattened: primary-header
        keys as ``"QC MAGZPT"``, extension keys prefixed with the extension
        name, ``"CHIP1.INT1:QC DARK MED"`` (``"HDU2:QC ..."`` when unnamed).
    """

    path: Path
    pro_catg: str
    qc: dict[str, Any] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""


@dataclass(frozen=True)
class RecipeResult:
    """What one esorex run did.

    Attributes
    ----------
    recipe : str
    status : str
        ``SUCCESSFUL`` or ``FAILED``.
    reason : str
        One sentence a person can act on; "" when successful.
    rc : int or None
        Exit code as :mod:`subprocess` reports it (negative: killed by that
        signal); None when the process could not be started.
    signal : str or None
        Name of the signal that ended the process (``SIGSEGV``, ...), if any.
    errors : tuple of str
        The ``[ ERROR ]`` lines, in order, without duplicates.
    products : tuple of Product
    log_path : Path or None
        The esorex log (``esorex.log``), or the captured output if esorex
        wrote no log.
    duration_s : float
        Wall time of the esorex process.
    workdir : Path
    argv : tuple of str
        The esorex command line (without the :func:`death_guard` prefix).
    timed_out : bool
    """

    recipe: str
    status: str
    reason: str
    rc: int | None
    signal: str | None
    errors: tuple[str, ...]
    products: tuple[Product, ...]
    log_path: Path | None
    duration_s: float
    workdir: Path
    argv: tuple[str, ...] = ()
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESSFUL

    def product_catgs(self) -> set[str]:
        return {p.pro_catg for p in self.products if p.pro_catg}


def recipe_environment(extra: Mapping[str, str] | None = None, home: Path | None = None) -> dict[str, str]:
    """A fresh environment for esorex, independent of the caller's.

    The caller's PATH may start with a pyenv or a venv (ESOREX.md: the first
    ``python3`` on PATH is not the system one), and ``~/.esorex/esorex.rc``
    would silently change recipe defaults; neither should reach a recipe.

    Parameters
    ----------
    extra : mapping, optional
        Variables to add or override (e.g. ``OMP_NUM_THREADS``).
    home : Path, optional
        Value for HOME; the working directory, so no user configuration is read.
    """
    env = {
        "PATH": DEFAULT_PATH,
        "LANG": "C",
        "LC_ALL": "C",
        "TZ": "UTC",
        "HOME": str(home) if home else "/nonexistent",
    }
    if home:
        env["TMPDIR"] = str(home)
    if extra:
        env.update(extra)
    return env


def find_esorex(esorex: str | os.PathLike[str] | None = None) -> Path | None:
    """Absolute path of the esorex executable, looked up on :data:`DEFAULT_PATH`."""
    if esorex is not None and os.sep in str(esorex):
        path = Path(esorex)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which(str(esorex or "esorex"), path=DEFAULT_PATH)
    return Path(found) if found else None


def write_sof(entries: Iterable[tuple[str | os.PathLike[str], str]], path: Path) -> Path:
    """Write a set-of-frames file with the OCA engine's writer (``shared.oca.abfiles.format_sof``)."""
    path.write_text(format_sof(entries))
    return path


def read_sof(path: Path) -> list[tuple[Path, str]]:
    """Read a SOF back as (path, tag) pairs; blank lines and ``#`` comments skipped."""
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        entries.append((Path(parts[0]), parts[1] if len(parts) > 1 else ""))
    return entries


def build_argv(
    recipe: str,
    sof: Path,
    *,
    esorex: Path,
    output_dir: Path,
    log_dir: Path,
    recipe_dir: Path | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """The esorex command line; a list, never a shell string."""
    argv = [str(esorex)]
    if recipe_dir is not None:
        argv.append(f"--recipe-dir={recipe_dir}")
    argv += [
        f"--output-dir={output_dir}",
        f"--log-dir={log_dir}",
        "--products-sof=products.json",
        recipe,
        *options,
        str(sof),
    ]
    return argv


_TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d\s+")
_TID = re.compile(r"\[tid=\d+\]\s*")


def _normalise_error(line: str) -> tuple[str, str]:
    """(component, message) of an error line from stdout or from esorex.log.

    stdout says ``[ ERROR ] recipe: message``; the log file adds a timestamp
    and ``[tid=000]`` and leaves esorex's own component empty.
    """
    text = _TIMESTAMP.sub("", line.strip())
    text = _TID.sub("", text[_ERROR_RE.search(text).end():]).strip()
    component, sep, message = text.partition(": ")
    if not sep:
        return "", text
    return component.strip() or "esorex", " ".join(message.split())


def error_lines(*texts: str) -> list[str]:
    """The ``[ ERROR ]`` lines of esorex output and log, normalised, each message once.

    Returns lines like ``"hawki_science_process: No master confidence map file found"``.
    """
    seen: dict[str, str] = {}
    for text in texts:
        for line in text.splitlines():
            if not _ERROR_RE.search(line) or any(h in line for h in _HARMLESS):
                continue
            component, message = _normalise_error(line)
            seen.setdefault(message, f"{component}: {message}" if component else message)
    return list(seen.values())


def _generic(error: str) -> bool:
    """esorex's own summary line, which says nothing about the cause."""
    return error.startswith("esorex:") and "Execution of recipe" in error


def main_error(errors: Sequence[str]) -> str:
    """The error a person should read first: the first one that is not esorex's summary."""
    specific = [e for e in errors if not _generic(e)]
    return (specific or list(errors) or [""])[0]


def read_product(path: Path, keywords: Sequence[str] = ()) -> Product:
    """PRO.CATG, QC keywords and the primary-header ``keywords`` (dotted) of one product file.

    Only the header blocks are read (``shared.fitsheader``), not the data: on a
    delivery this runs for every product, and astropy would parse every card.
    This is the one read of a product: the reports take what they need from
    the message, and the file's SHA-256 (``checksum``, ``sha256:<hex>``) is
    computed in the same pass, for the manifest and the upload. A product the
    recipe left half-written (it died while saving) still yields a Product;
    the keywords that could be read are returned.
    """
    pro_catg = ""
    qc: dict[str, Any] = {}
    header: dict[str, Any] = {}
    digest = hashlib.sha256()
    try:
        for index, text in enumerate(iter_header_texts(path, digest)):
            if index == 0:
                pro_catg = str(card_value(text, "ESO PRO CATG", path) or "")
                for keyword in keywords:
                    value = card_value(text, header_key(keyword), path)
                    if value is not None:
                        header[keyword] = value
                prefix = ""
            else:
                prefix = f"{card_value(text, 'EXTNAME', path) or f'HDU{index}'}:"
            for key, value_text in _qc_cards(text):
                qc[f"{prefix}{key}"] = parse_value(value_text, path, key)
    except (OSError, FitsHeaderError) as e:  # truncated or corrupt product
        _log.warning("cannot read product %s: %s", path, e)
        return Product(path=path, pro_catg=pro_catg, qc=qc, header=header,
                       checksum=f"sha256:{file_digest(path)}" if path.is_file() else "")
    return Product(path=path, pro_catg=pro_catg, qc=qc, header=header, checksum=f"sha256:{digest.hexdigest()}")


def _qc_cards(text: str) -> Iterator[tuple[str, str]]:
    """(``QC ...`` key, value text) of every ``HIERARCH ESO QC`` card of a header."""
    for pos in range(0, len(text), 80):
        card = text[pos:pos + 80]
        if card.startswith("HIERARCH ESO QC "):
            key, sep, value = card[len("HIERARCH ESO "):].partition("=")
            if sep:
                yield " ".join(key.split()), value


def read_products(workdir: Path, keywords: Sequence[str] = ()) -> list[Product]:
    """The products listed in ``<workdir>/products.json``, or found in ``products/``.

    esorex writes ``products.json`` only when the recipe returns; after a
    signal death the partial files in the output directory are reported.
    """
    listing = workdir / "products.json"
    paths: list[Path] = []
    if listing.is_file():
        try:
            for entry in json.loads(listing.read_text() or "[]"):
                p = Path(entry["name"])
                paths.append(p if p.is_absolute() else workdir / p)
        except (ValueError, KeyError, TypeError) as e:
            _log.warning("unreadable %s: %s", listing, e)
    if not paths:
        out = workdir / "products"
        paths = sorted(out.glob("*.fits")) if out.is_dir() else []
    return [read_product(p, keywords) for p in paths if p.is_file()]


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
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


def _signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = _KILL_GRACE_S) -> None:
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
    the child exits, not only the process. :func:`run_recipe` waits for the
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


def _record_group(proc: subprocess.Popen[bytes], recipe: str, workdir: Path) -> None:
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


def judge(
    recipe: str,
    rc: int | None,
    errors: Sequence[str],
    products: Sequence[Product],
    *,
    timed_out: bool = False,
    timeout_s: float | None = None,
    expected: Iterable[str] | None = None,
    n_exposures: int | None = None,
) -> tuple[str, str]:
    """Status and reason for one run, from the evidence alone.

    Parameters
    ----------
    recipe : str
    rc : int or None
        subprocess return code (negative for a signal).
    errors : sequence of str
        ``[ ERROR ]`` lines.
    products : sequence of Product
    timed_out : bool
    timeout_s : float, optional
        The limit, for the message.
    expected : iterable of str, optional
        PRO.CATG values that must be present; default :data:`EXPECTED_PRODUCTS`.
    n_exposures : int, optional
        Number of exposures in the SOF; checks one BASIC_CALIBRATED_SCI each.

    Returns
    -------
    (status, reason)
    """
    last_error = ""
    if errors:
        more = len(errors) - 1
        last_error = f"; error: {main_error(errors)}" + (f" (+{more} more in the log)" if more else "")
    if timed_out:
        limit = f"{timeout_s:g} s" if timeout_s is not None else "the time limit"
        return FAILED, f"recipe {recipe} timed out after {limit} and was killed{last_error}"
    if rc is None:
        return FAILED, f"recipe {recipe} could not be started{last_error}"
    if rc < 0:
        return FAILED, f"recipe {recipe} killed by {_signal_name(rc)} (rc {rc}){last_error}"
    if rc != 0:
        return FAILED, f"recipe {recipe} exited with rc {rc}{last_error}"
    if errors:
        return FAILED, f"recipe {recipe} exited with rc 0 but printed errors{last_error}"
    want = set(EXPECTED_PRODUCTS.get(recipe, ()) if expected is None else expected)
    have = {p.pro_catg for p in products if p.pro_catg}
    missing = sorted(want - have)
    if missing:
        return FAILED, f"recipe {recipe} exited with rc 0 but products are missing: {', '.join(missing)}"
    if n_exposures and recipe in PER_EXPOSURE_PRODUCT:
        catg = PER_EXPOSURE_PRODUCT[recipe][2]
        got = sum(1 for p in products if p.pro_catg == catg)
        if got < n_exposures:
            return FAILED, (
                f"recipe {recipe} wrote {got} {catg} for {n_exposures} exposures "
                "(missing LST, MJD-OBS or DATE-OBS in some raw frames?)"
            )
    return SUCCESSFUL, ""


def count_exposures(recipe: str, sof_entries: Sequence[tuple[Path, str]]) -> int | None:
    """Exposures in a SOF for the per-exposure product check, or None if not applicable."""
    if recipe not in PER_EXPOSURE_PRODUCT:
        return None
    tag, per_exposure, _ = PER_EXPOSURE_PRODUCT[recipe]
    n = sum(1 for _, t in sof_entries if t == tag)
    return n // per_exposure if n else None


def run_recipe(
    recipe: str,
    sof: Sequence[tuple[str | os.PathLike[str], str]] | Path,
    workdir: Path,
    *,
    recipe_dir: Path | None = None,
    options: Sequence[str] = (),
    timeout_s: float = 900.0,
    expected: Iterable[str] | None = None,
    esorex: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    header_keywords: Sequence[str] = (),
) -> RecipeResult:
    """Run one recipe on one SOF in a fresh working directory.

    Parameters
    ----------
    recipe : str
        Recipe name, e.g. ``hawki_science_process``.
    sof : sequence of (path, tag) or Path
        The frames, or an existing SOF file (copied into the working directory).
    workdir : Path
        Created by this function; must not exist or be empty. Kept afterwards
        (the caller moves products and logs out of it). While the recipe runs
        it holds ``esorex.pid``, for :func:`kill_leftover_recipes`.
    recipe_dir : Path, optional
        The instrument's own plugin directory (``Profile.resolve_recipe_dir()``).
    options : sequence of str
        Recipe options, e.g. ``("--psm_nbsize=32",)``.
    timeout_s : float
        Wall-time limit; the whole process group is killed when it is exceeded.
    expected : iterable of str, optional
        PRO.CATG values required for success; default :data:`EXPECTED_PRODUCTS`.
    esorex : str or path, optional
        The esorex executable (default: ``esorex`` on :data:`DEFAULT_PATH`).
    env : mapping, optional
        Extra environment variables for the recipe.
    header_keywords : sequence of str
        Dotted primary-header keywords read from every product (``Product.header``).

    Returns
    -------
    RecipeResult
        Never raises for a recipe failure; only for a non-empty ``workdir``.
    """
    workdir = Path(workdir).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise FileExistsError(f"working directory {workdir} is not empty; each run needs a fresh one")
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / "products"
    out_dir.mkdir()
    sof_path = workdir / "input.sof"
    if isinstance(sof, (str, os.PathLike)):
        shutil.copyfile(sof, sof_path)
        sof_entries = read_sof(sof_path)
    else:
        sof_entries = [(Path(p), tag) for p, tag in sof]
        write_sof(sof_entries, sof_path)

    exe = find_esorex(esorex)
    if exe is None:
        reason = f"esorex not found (looked for {esorex or 'esorex'} on {DEFAULT_PATH})"
        return RecipeResult(recipe, FAILED, reason, None, None, (), (), None, 0.0, workdir)

    argv = build_argv(
        recipe, sof_path, esorex=exe, output_dir=out_dir, log_dir=workdir,
        recipe_dir=recipe_dir, options=options,
    )
    capture = workdir / "esorex.out"
    _log.info("running %s in %s", recipe, workdir)
    _log.debug("argv: %s", argv)
    timed_out = False
    started = time.monotonic()
    with open(capture, "wb") as out:
        try:
            # This thread waits for the child below: the death signal, which follows the
            # forking *thread*, fires only when the processor dies (see death_guard).
            proc = subprocess.Popen(
                death_guard() + argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=recipe_environment(env, home=workdir),
                start_new_session=True,  # own process group: a timeout kills everything it started
            )
        except OSError as e:
            reason = f"recipe {recipe} could not be started: {e}"
            return RecipeResult(recipe, FAILED, reason, None, None, (), (), None, 0.0, workdir, tuple(argv))
        try:
            _record_group(proc, recipe, workdir)
            rc: int | None = _wait_exit(proc, timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        except BaseException:  # the recipe must not outlive the caller's failure either
            _kill_group(proc, grace_s=0)
            raise
        finally:
            (workdir / PID_FILE).unlink(missing_ok=True)
    duration = time.monotonic() - started

    log_file = workdir / "esorex.log"
    # stdout first (cleaner component names); the log adds what a crash kept
    # in stdout's buffer.
    texts = [capture.read_text(errors="replace")]
    if log_file.is_file():
        texts.append(log_file.read_text(errors="replace"))
    errors = error_lines(*texts)
    products = read_products(workdir, header_keywords)
    status, reason = judge(
        recipe, rc, errors, products, timed_out=timed_out, timeout_s=timeout_s,
        expected=expected, n_exposures=count_exposures(recipe, sof_entries),
    )
    result = RecipeResult(
        recipe=recipe, status=status, reason=reason, rc=rc, signal=_signal_name(rc),
        errors=tuple(errors), products=tuple(products),
        log_path=log_file if log_file.is_file() else capture,
        duration_s=duration, workdir=workdir, argv=tuple(argv), timed_out=timed_out,
    )
    if result.ok:
        _log.info("%s SUCCESSFUL in %.1f s, %d products", recipe, duration, len(products))
    else:
        _log.warning("%s FAILED in %.1f s: %s", recipe, duration, reason)
    return result

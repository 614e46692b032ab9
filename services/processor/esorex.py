"""Run one ESO pipeline recipe through ``esorex``: environment, command line, SOF, the run.

This is the ``processAB`` core without the AB bookkeeping: one recipe, one SOF,
one fresh working directory. The facts behind the design are in
``shared/design/ESOREX.md`` (measured on the real recipes):

* ``--recipe-dir`` must point at the instrument's own plugin directory, or the
  HAWK-I recipes load VIMOS' ``libcasu`` (§6.4).
* The catalogue cache lands in the current directory (§3.6), so every run gets
  its own working directory as cwd.
* The recipe sees a fixed environment (PATH, locale, HOME), not the caller's.

Three neighbours do the rest, each for its own reason to change:
:mod:`services.processor.recipe_processes` keeps the process from outliving the
processor (death signal, ``esorex.pid``, leftover kill, timeout kill),
:mod:`services.processor.judging` decides SUCCESSFUL or FAILED from the
evidence, and :mod:`services.processor.products` reads the products' headers.

Layout of a working directory after :func:`run_recipe`::

    <workdir>/input.sof        the SOF, absolute paths
    <workdir>/products.json    esorex --products-sof output
    <workdir>/esorex.log       esorex --log-dir log (log level info)
    <workdir>/esorex.out       stdout+stderr of the esorex process
    <workdir>/products/        --output-dir: the products
    <workdir>/esorex.pid       while the recipe runs: its process group
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.processor.judging import (
    FAILED,
    SUCCESSFUL,
    count_exposures,
    error_lines,
    judge,
    signal_name,
)
from services.processor.products import RecipeProduct, read_products
from services.processor.recipe_processes import (
    DEFAULT_PATH,
    PID_FILE,
    death_guard,
    kill_group,
    record_group,
    wait_exit,
)
from shared.oca.abfiles import format_sof
from shared.profiles import RecipeCheck

_log = logging.getLogger(__name__)


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
    products : tuple of RecipeProduct
    log_path : Path or None
        The esorex log (``esorex.log``), or the captured output if esorex
        wrote no log.
    duration_s : float
        Wall time of the esorex process.
    workdir : Path
    argv : tuple of str
        The esorex command line (without the death-guard prefix).
    timed_out : bool
    """

    recipe: str
    status: str
    reason: str
    rc: int | None
    signal: str | None
    errors: tuple[str, ...]
    products: tuple[RecipeProduct, ...]
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


def run_recipe(
    recipe: str,
    sof: Sequence[tuple[str | os.PathLike[str], str]] | Path,
    workdir: Path,
    *,
    recipe_dir: Path | None = None,
    options: Sequence[str] = (),
    timeout_s: float = 900.0,
    check: RecipeCheck | None = None,
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
        it holds ``esorex.pid``, for
        :func:`~services.processor.recipe_processes.kill_leftover_recipes`.
    recipe_dir : Path, optional
        The instrument's own plugin directory (``Profile.resolve_recipe_dir()``).
    options : sequence of str
        Recipe options, e.g. ``("--psm_nbsize=32",)``.
    timeout_s : float
        Wall-time limit; the whole process group is killed when it is exceeded.
    check : RecipeCheck, optional
        What the recipe must have written to count as SUCCESSFUL: the
        instrument profile's ``recipe_checks[recipe]``. None: no expected
        products (rc 0 and no ``[ ERROR ]`` line suffice).
    esorex : str or path, optional
        The esorex executable (default: ``esorex`` on :data:`DEFAULT_PATH`).
    env : mapping, optional
        Extra environment variables for the recipe.
    header_keywords : sequence of str
        Dotted primary-header keywords read from every product (``RecipeProduct.header``).

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
            record_group(proc, recipe, workdir)
            rc: int | None = wait_exit(proc, timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.returncode
        except BaseException:  # the recipe must not outlive the caller's failure either
            kill_group(proc, grace_s=0)
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
        check=check, n_exposures=count_exposures(check, sof_entries),
    )
    result = RecipeResult(
        recipe=recipe, status=status, reason=reason, rc=rc, signal=signal_name(rc),
        errors=tuple(errors), products=tuple(products),
        log_path=log_file if log_file.is_file() else capture,
        duration_s=duration, workdir=workdir, argv=tuple(argv), timed_out=timed_out,
    )
    if result.ok:
        _log.info("%s SUCCESSFUL in %.1f s, %d products", recipe, duration, len(products))
    else:
        _log.warning("%s FAILED in %.1f s: %s", recipe, duration, reason)
    return result


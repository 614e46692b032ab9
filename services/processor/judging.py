"""Judging one recipe run: SUCCESSFUL or FAILED, and a reason a person can act on.

Judging reads only evidence (exit code, the ``[ ERROR ]`` lines, the products
written, the SOF) and never runs anything, so it changes with what we learn
about the recipes' output (ESOREX.md), not with how they are run:

* rc 0 does not mean success (ESOREX.md §6.1): a run is SUCCESSFUL only when
  the exit code is 0, no ``[ ERROR ]`` line was printed, and every PRO.CATG
  the recipe is expected to write is present.
* Recipes die by signal on bad input (SIGSEGV, SIGFPE, SIGABRT) and leave
  partial products behind (§6.2): those runs are FAILED, with the signal named.
* What a recipe is expected to write is configuration: the instrument
  profile's ``[recipe_checks.<recipe>]`` (:class:`shared.profiles.RecipeCheck`),
  passed in by the caller. No check: no expected products.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from pathlib import Path

from services.processor.products import RecipeProduct
from shared.profiles import RecipeCheck

SUCCESSFUL = "SUCCESSFUL"
FAILED = "FAILED"

#: esorex prints "[ ERROR ]" with padding; match any spacing (ESOREX.md §6.1).
_ERROR_RE = re.compile(r"\[\s*ERROR\s*\]")
#: Lines that are printed on every run and are not a problem (ESOREX.md §6.7).
_HARMLESS = ("Unable to open directory /usr/lib/cpl/plugins",)

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


def signal_name(rc: int | None) -> str | None:
    """``SIGSEGV`` for rc -11; None for an exit code or a process never started."""
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def judge(
    recipe: str,
    rc: int | None,
    errors: Sequence[str],
    products: Sequence[RecipeProduct],
    *,
    timed_out: bool = False,
    timeout_s: float | None = None,
    check: RecipeCheck | None = None,
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
    products : sequence of RecipeProduct
    timed_out : bool
    timeout_s : float, optional
        The limit, for the message.
    check : RecipeCheck, optional
        What the recipe must have written (the profile's ``recipe_checks``);
        None: no expected products.
    n_exposures : int, optional
        Number of exposures in the SOF (:func:`count_exposures`); with the
        check's ``per_exposure``, one such product is required for each.

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
        return FAILED, f"recipe {recipe} killed by {signal_name(rc)} (rc {rc}){last_error}"
    if rc != 0:
        return FAILED, f"recipe {recipe} exited with rc {rc}{last_error}"
    if errors:
        return FAILED, f"recipe {recipe} exited with rc 0 but printed errors{last_error}"
    if check is None:
        return SUCCESSFUL, ""
    want = set(check.expected_products)
    have = {p.pro_catg for p in products if p.pro_catg}
    missing = sorted(want - have)
    if missing:
        return FAILED, f"recipe {recipe} exited with rc 0 but products are missing: {', '.join(missing)}"
    if n_exposures and check.per_exposure is not None:
        catg = check.per_exposure.product
        got = sum(1 for p in products if p.pro_catg == catg)
        if got < n_exposures:
            return FAILED, (
                f"recipe {recipe} wrote {got} {catg} for {n_exposures} exposures "
                "(missing LST, MJD-OBS or DATE-OBS in some raw frames?)"
            )
    return SUCCESSFUL, ""


def count_exposures(check: RecipeCheck | None, sof_entries: Sequence[tuple[Path, str]]) -> int | None:
    """Exposures in a SOF for the per-exposure product check, or None if the check has none."""
    if check is None or check.per_exposure is None:
        return None
    per_exposure = check.per_exposure
    n = sum(1 for _, t in sof_entries if t == per_exposure.raw_tag)
    return n // per_exposure.files if n else None


"""Processor benchmark: bare esorex against our recipe runner, on synthetic data.

Prints JSON lines (``name``, values, ``unit``):

  esorex_bare_s              wall time of the bare ``esorex`` command on one SOF (median, min, max)
  run_recipe_s               the same SOF through ``services.processor.esorex.run_recipe``
                             (fresh workdir, SOF writing, log parsing, product/QC reading)
  run_recipe_overhead_pct    (run_recipe median - bare median) / bare median * 100

``processor_overhead_pct`` (the whole processor on a delivery against the sum
of bare esorex runs on the same SOFs, target <= 5 %) needs the integrated
processor; :func:`processor_overhead_pct` takes it as a callable and is not
called from ``main`` yet.

Usage: ``python bench/bench_processor.py [--repeat N] [--vimos]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.processor import esorex, synth
from shared.profiles import load_profile

Sof = Sequence[tuple[Path, str]]


def bare_esorex_seconds(recipe: str, sof: Sof, recipe_dir: Path | None, options: Sequence[str] = (),
                        scratch: Path | None = None) -> float:
    """Wall time of one bare esorex run (same argv and environment as the processor uses).

    Parameters
    ----------
    recipe, sof, recipe_dir, options
        What to run.
    scratch : Path, optional
        Parent of the throw-away working directory (default: a temporary directory).

    Returns
    -------
    float
        Seconds from process start to exit.
    """
    exe = esorex.find_esorex()
    if exe is None:
        raise RuntimeError("esorex not found")
    work = Path(tempfile.mkdtemp(prefix="bare-", dir=scratch))
    try:
        out = work / "products"
        out.mkdir()
        sof_path = esorex.write_sof(sof, work / "input.sof")
        argv = esorex.build_argv(recipe, sof_path, esorex=exe, output_dir=out, log_dir=work,
                                 recipe_dir=recipe_dir, options=options)
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=work, env=esorex.recipe_environment(home=work),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"bare {recipe} exited with rc {proc.returncode}")
        return elapsed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bare_esorex_total(runs: Sequence[tuple[str, Sof, Path | None, Sequence[str]]]) -> float:
    """Sum of bare esorex times over several SOFs (the denominator of processor_overhead_pct)."""
    return sum(bare_esorex_seconds(recipe, sof, rdir, opts) for recipe, sof, rdir, opts in runs)


def run_recipe_seconds(recipe: str, sof: Sof, recipe_dir: Path | None, options: Sequence[str] = (),
                       scratch: Path | None = None) -> float:
    """Wall time of :func:`services.processor.esorex.run_recipe` on one SOF, end to end."""
    parent = Path(tempfile.mkdtemp(prefix="runner-", dir=scratch))
    try:
        started = time.perf_counter()
        result = esorex.run_recipe(recipe, sof, parent / "ab", recipe_dir=recipe_dir, options=options)
        elapsed = time.perf_counter() - started
        if not result.ok:
            raise RuntimeError(result.reason)
        return elapsed
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def processor_overhead_pct(process_delivery: Callable[[], float],
                           runs: Sequence[tuple[str, Sof, Path | None, Sequence[str]]]) -> float:
    """The processor's wall time for a delivery against the sum of bare esorex runs.

    Parameters
    ----------
    process_delivery
        Runs the integrated processor on the delivery whose ABs are ``runs``
        and returns its wall time in seconds (to be supplied once the
        processor is integrated).
    runs
        (recipe, SOF, recipe_dir, options) of every AB of that delivery.

    Returns
    -------
    float
        ``(processor - sum(bare)) / sum(bare) * 100``.
    """
    bare = bare_esorex_total(runs)
    return (process_delivery() - bare) / bare * 100.0


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def bench_recipe(instrument: str, recipe: str, sof: Sof, repeat: int, scratch: Path) -> None:
    recipe_dir = load_profile(instrument).resolve_recipe_dir()
    options = tuple(load_profile(instrument).recipe_options.get(recipe, ()))
    bare, runner = [], []
    bare_esorex_seconds(recipe, sof, recipe_dir, options, scratch)  # warm the page cache
    for _ in range(repeat):  # interleaved, so drift hits both equally
        bare.append(bare_esorex_seconds(recipe, sof, recipe_dir, options, scratch))
        runner.append(run_recipe_seconds(recipe, sof, recipe_dir, options, scratch))
    common = {"instrument": instrument, "recipe": recipe, "sof_lines": len(sof)}
    print(json.dumps({"name": "esorex_bare_s", **common, **_stats(bare), "unit": "s"}), flush=True)
    print(json.dumps({"name": "run_recipe_s", **common, **_stats(runner), "unit": "s"}), flush=True)
    pct = (statistics.median(runner) - statistics.median(bare)) / statistics.median(bare) * 100.0
    print(json.dumps({"name": "run_recipe_overhead_pct", **common, "value": round(pct, 2), "unit": "%"}),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--vimos", action="store_true", help="also VIMOS (about 10 s per run)")
    args = parser.parse_args(argv)
    if esorex.find_esorex() is None:
        print(json.dumps({"name": "esorex_bare_s", "skipped": "esorex not installed", "unit": "s"}))
        return 0
    cal_root = REPO / ".cache" / "synth" / "cal"
    with tempfile.TemporaryDirectory(prefix="bench-processor-") as tmp:
        scratch = Path(tmp)
        hawki_cal = synth.make_calibrations("HAWKI", cal_root)
        raw = synth.make_raw_frames("HAWKI", scratch / "hawki_raw", n_frames=3)
        bench_recipe("HAWKI", "hawki_science_process", synth.science_sof(raw, hawki_cal), args.repeat, scratch)
        if args.vimos:
            vimos_cal = synth.make_calibrations("VIMOS", cal_root)
            raw = synth.make_raw_frames("VIMOS", scratch / "vimos_raw", n_frames=1)
            bench_recipe("VIMOS", "vimos_ima_science", synth.science_sof(raw, vimos_cal), args.repeat, scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

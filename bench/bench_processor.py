"""Processor benchmark: bare esorex against our recipe runner, on synthetic data.

Prints JSON lines (``name``, values, ``unit``):

  esorex_bare_s              wall time of the bare ``esorex`` command on one SOF (median, min, max)
  run_recipe_s               the same SOF through ``services.processor.esorex.run_recipe``
                             (fresh workdir, SOF writing, log parsing, product/QC reading)
  run_recipe_overhead_pct    (run_recipe median - bare median) / bare median * 100

  processor_overhead_pct     the processor (createAB, processAB, rename, move) on a two-AB HAWK-I
                             delivery against the sum of bare esorex runs on the same SOFs
                             (target <= 5 %); ``value`` with one AB at a time, ``parallel`` with
                             the profile's max_parallel_abs

Usage: ``python bench/bench_processor.py [--repeat N] [--vimos]``
"""

from __future__ import annotations

import argparse
import json
import os
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

from datetime import UTC

import synth
from services.processor import esorex
from shared.profiles import OVERLAY_ENV, RecipeCheck, load_profile

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
                       scratch: Path | None = None, check: RecipeCheck | None = None) -> float:
    """Wall time of :func:`services.processor.esorex.run_recipe` on one SOF, end to end."""
    parent = Path(tempfile.mkdtemp(prefix="runner-", dir=scratch))
    try:
        started = time.perf_counter()
        result = esorex.run_recipe(recipe, sof, parent / "ab", recipe_dir=recipe_dir, options=options,
                                   check=check)
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


def processor_delivery_seconds(raw_frames: list[Path], cal_root: Path, scratch: Path, max_parallel: int,
                               run_id: str) -> tuple[float, list[tuple[str, Sof, Path | None, Sequence[str]]]]:
    """Wall time of the processor handler on one delivery, and the (recipe, SOF, ...) of its ABs."""
    from prometheus_client import CollectorRegistry

    from services.app import describe_files
    from services.ingest.handlers import handle_delivery
    from services.ingest.service import build_ports as ingest_ports
    from services.processor.handlers import handle_raw_ready
    from services.processor.service import build_ports
    from shared.messages import DeliveryAnnounced
    from shared.metrics import build_metrics
    from shared.settings import Settings

    area = raw_frames[0].parent
    settings = Settings(data_root=scratch / "data", delivery_area=area, cal_root=cal_root)
    delivery = DeliveryAnnounced(run_id=run_id, delivery_id=run_id, instrument="HAWKI",
                                 files=tuple(describe_files(raw_frames, area)))
    [raw_ready] = handle_delivery(delivery, ingest_ports(settings))
    profile = load_profile("HAWKI").model_copy(update={"max_parallel_abs": max_parallel})
    ports = build_ports(settings, "HAWKI", build_metrics(CollectorRegistry()), profile=profile)
    ports.plan(raw_ready, settings.run_dirs("HAWKI", run_id))  # load the rules once, as a running service has
    started = time.perf_counter()
    [event] = handle_raw_ready(raw_ready, ports)
    elapsed = time.perf_counter() - started
    bad = [ab for ab in event.abs if ab.status != "SUCCESSFUL"]
    if bad:
        raise RuntimeError(f"processor failed: {bad[0].reason}")
    runs = []
    for ab in event.abs:
        sof = esorex.read_sof(Path(event.log_dir) / f"{ab.name}.sof")
        runs.append((ab.recipe, sof, profile.resolve_recipe_dir(), tuple(profile.recipe_options.get(ab.recipe, ()))))
    return elapsed, runs


def bench_processor_overhead(cal_root: Path, scratch: Path, repeat: int) -> None:
    """processor_overhead_pct on a delivery of two templates (two ABs)."""
    from datetime import datetime

    raw = scratch / "delivery"
    frames = synth.make_raw_frames("HAWKI", raw, n_frames=2)
    frames += synth.make_raw_frames("HAWKI", raw, n_frames=2, start=datetime(2026, 11, 20, 3, tzinfo=UTC))
    sequential, parallel, bare = [], [], []
    for i in range(repeat):  # interleaved, so drift hits all three alike
        t, runs = processor_delivery_seconds(frames, cal_root, scratch / f"s{i}", 1, f"seq-{i}")
        sequential.append(t)
        parallel.append(processor_delivery_seconds(frames, cal_root, scratch / f"p{i}", 2, f"par-{i}")[0])
        bare.append(bare_esorex_total(runs))
    b = statistics.median(bare)
    print(json.dumps({
        "name": "processor_overhead_pct",
        "value": round((statistics.median(sequential) - b) / b * 100.0, 2),
        "parallel": round((statistics.median(parallel) - b) / b * 100.0, 2),
        "processor_s": round(statistics.median(sequential), 3),
        "processor_parallel_s": round(statistics.median(parallel), 3),
        "bare_esorex_sum_s": round(b, 3), "abs": len(runs), "n": repeat, "unit": "%", "target": 5,
    }), flush=True)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def bench_recipe(instrument: str, recipe: str, sof: Sof, repeat: int, scratch: Path) -> None:
    recipe_dir = load_profile(instrument).resolve_recipe_dir()
    options = tuple(load_profile(instrument).recipe_options.get(recipe, ()))
    check = load_profile(instrument).recipe_checks.get(recipe)  # judged as the processor judges it
    bare, runner = [], []
    bare_esorex_seconds(recipe, sof, recipe_dir, options, scratch)  # warm the page cache
    for _ in range(repeat):  # interleaved, so drift hits both equally
        bare.append(bare_esorex_seconds(recipe, sof, recipe_dir, options, scratch))
        runner.append(run_recipe_seconds(recipe, sof, recipe_dir, options, scratch, check))
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
        if hawki_cal.profile_overlay is not None:  # the cells the small synthetic windows need
            os.environ[OVERLAY_ENV] = str(hawki_cal.profile_overlay)
        raw = synth.make_raw_frames("HAWKI", scratch / "hawki_raw", n_frames=3)
        bench_recipe("HAWKI", "hawki_science_process", synth.science_sof(raw, hawki_cal), args.repeat, scratch)
        bench_processor_overhead(cal_root, scratch, args.repeat)
        if args.vimos:
            vimos_cal = synth.make_calibrations("VIMOS", cal_root)
            raw = synth.make_raw_frames("VIMOS", scratch / "vimos_raw", n_frames=1)
            bench_recipe("VIMOS", "vimos_ima_science", synth.science_sof(raw, vimos_cal), args.repeat, scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

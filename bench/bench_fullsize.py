"""Full-size benchmark: one HAWK-I delivery of 3 frames of 4 x 2048² (67 MB each), real recipes.

Prints JSON lines (``name``, values, ``unit``), each with its baseline measured in the same run:

  ingest_mb_per_s       the ingest stage alone (services.ingest.handlers.handle_delivery with the
                        ports the services use: verify, stage, read and classify the headers) over
                        the delivery's bytes, against ``sha256sum`` of the same files
                        (``ratio`` = ingest / sha256sum, target >= 0.9); medians of --repeat runs,
                        interleaved, page cache warm for both
  fullsize_turnaround   ``preimg run`` (services.app.run_embedded) of the delivery against bare
                        ``esorex`` on the SOF the processor wrote, with the options the processor
                        gave it (read back from the recipe's log), in the same run
                        (``value`` = preimg run / bare esorex, target <= 1.03); each stage's time
                        and share of the run (from the run's preimg_stage_duration_seconds), and
                        what lies outside the stages (the embedded mode's own checksums of the
                        delivered files, as AOG announces them, and the in-process bus)

The full-size calibration set is built once (about 25 s) and cached under
``.cache/synth/cal-hawki-2048``, shared with tests/integration/test_fullsize.py.
Needs about 3 GB of scratch space (``--scratch``, default the system's temporary directory).

Usage: ``python bench/bench_fullsize.py [--repeat N] [--runs N] [--size N] [--scratch DIR] [--area-dir DIR]``
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_processor import bare_esorex_seconds
from prometheus_client import CollectorRegistry

import synth
from services.processor import esorex
from shared.profiles import OVERLAY_ENV, load_profile

INSTRUMENT = "HAWKI"
#: Service -> the stage label of its handler's time (the runner labels it with the stage of the
#: message handled: ingest handles the delivery, the processor raw_ready, ...).
STAGES = {"ingest": "delivery", "processor": "raw_ready", "reporter": "products_ready",
          "publisher": "reports_ready"}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def sha256sum_seconds(paths: list[Path]) -> float:
    """Wall time of ``sha256sum`` over ``paths`` (one process, as an operator would run it)."""
    started = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def hashlib_seconds(paths: list[Path]) -> float:
    """Wall time of reading ``paths`` through hashlib's SHA-256 in 1 MiB chunks: the in-process floor."""
    import hashlib

    started = time.perf_counter()
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return time.perf_counter() - started


def ingest_seconds(frames: list[Path], area: Path, data_root: Path, run_id: str) -> tuple[float, str]:
    """Wall time of the ingest handler on the delivery of ``frames``, and how it staged them."""
    from services.app import describe_files
    from services.ingest.handlers import handle_delivery
    from services.ingest.service import build_ports as ingest_ports
    from shared.messages import DeliveryAnnounced
    from shared.settings import Settings
    from shared.userreport_config import report_keywords

    settings = Settings(data_root=data_root, delivery_area=area)
    ports = ingest_ports(settings, report_keys=report_keywords("raw"))  # as services.app builds them
    delivery = DeliveryAnnounced(run_id=run_id, delivery_id=run_id, instrument=INSTRUMENT,
                                 files=tuple(describe_files(frames, area)))
    started = time.perf_counter()
    [event] = handle_delivery(delivery, ports)
    elapsed = time.perf_counter() - started
    staged = [Path(f.path) for f in event.frames]
    if any(f.problem for f in event.frames) or len(staged) != len(frames):
        raise RuntimeError(f"ingest did not describe every frame: {[f.problem for f in event.frames]}")
    mode = "hard-linked" if staged[0].stat().st_ino == frames[0].stat().st_ino else "copied"
    shutil.rmtree(data_root, ignore_errors=True)
    return elapsed, mode


def bench_ingest(frames: list[Path], area: Path, scratch: Path, repeat: int) -> None:
    sha256sum_seconds(frames)  # warm the page cache for both
    ingest, sha, floor, modes = [], [], [], set()
    for i in range(repeat):  # interleaved, so drift hits all alike
        t, mode = ingest_seconds(frames, area, scratch / f"ingest-{i}", f"bench-ingest-{i}")
        ingest.append(t)
        modes.add(mode)
        sha.append(sha256sum_seconds(frames))
        floor.append(hashlib_seconds(frames))
    mb = _mb(frames)
    ingest_rate, sha_rate, floor_rate = mb / _median(ingest), mb / _median(sha), mb / _median(floor)
    print(json.dumps({
        "name": "ingest_mb_per_s", "value": round(ingest_rate, 1), "sha256sum_mb_per_s": round(sha_rate, 1),
        "ratio": round(ingest_rate / sha_rate, 3), "ingest_s": round(_median(ingest), 3),
        "sha256sum_s": round(_median(sha), 3),
        # coreutils' sha256sum does not use the CPU's SHA extensions; Python's hashlib (OpenSSL) does
        "hashlib_sha256_mb_per_s": round(floor_rate, 1), "ratio_to_hashlib": round(ingest_rate / floor_rate, 3),
        "mb": round(mb, 1), "files": len(frames),
        "staging": "/".join(sorted(modes)), "n": repeat, "unit": "MB/s", "target_ratio": 0.9,
    }), flush=True)


def _sums(registry: CollectorRegistry, metric: str) -> dict[str, float]:
    """``<metric>_sum`` of a histogram by its ``stage`` label ("" when it has none)."""
    out: dict[str, float] = {}
    for family in registry.collect():
        if family.name == metric:
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    stage = sample.labels.get("stage", "")
                    out[stage] = out.get(stage, 0.0) + sample.value
    return out


def _stage_seconds(registry: CollectorRegistry) -> dict[str, float]:
    """Seconds spent in each service's handler, from the run's preimg_stage_duration_seconds."""
    by_label = _sums(registry, "preimg_stage_duration_seconds")
    missing = [label for label in STAGES.values() if label not in by_label]
    if missing:
        raise RuntimeError(f"no preimg_stage_duration_seconds for {missing} (labels: {sorted(by_label)})")
    return {service: by_label[label] for service, label in STAGES.items()}


def _recipe_command(log_dir: Path) -> tuple[str, list[tuple[Path, str]], list[str]]:
    """The recipe, SOF and options the processor ran, read back from the AB's logs."""
    [rblog] = sorted(log_dir.glob("*.rblog"))
    line = next(x for x in rblog.read_text().splitlines() if "Invocation command line was:" in x)
    argv = line.split("Invocation command line was:", 1)[1].split()
    i = next(k for k, a in enumerate(argv) if k > 0 and not a.startswith("--"))
    recipe, options = argv[i], argv[i + 1:-1]
    sof = esorex.read_sof(rblog.with_suffix(".sof"))
    return recipe, sof, options


def bench_turnaround(frames_dir: Path, cal_root: Path, scratch: Path, runs: int) -> None:
    from services.app import run_embedded
    from shared.settings import Settings

    registries: list[CollectorRegistry] = []
    recipe_dir = load_profile(INSTRUMENT).resolve_recipe_dir()
    command: tuple[str, list[tuple[Path, str]], list[str]] | None = None
    totals: list[float] = []
    bares: list[float] = []
    recipe_s: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for i in range(runs):
        data_root = scratch / f"run-{i}"
        settings = Settings(data_root=data_root, cal_root=cal_root)
        started = time.perf_counter()
        registries.append(CollectorRegistry())
        summary = run_embedded(INSTRUMENT, frames_dir, settings, test=True, run_id=f"bench-fullsize-{i}",
                               registry=registries[i])
        total = time.perf_counter() - started
        if summary.status != "ok":
            raise RuntimeError(f"preimg run ended {summary.status}: {summary.reason}")
        for stage, seconds in _stage_seconds(registries[i]).items():
            stages[stage].append(seconds)
        recipe_s.append(sum(_sums(registries[i], "preimg_recipe_duration_seconds").values()))
        if command is None:  # the first run's SOF and options; its staged frames stay for the bare runs
            command = _recipe_command(Path(summary.paths["logs"]))
            keep = data_root
        else:
            shutil.rmtree(data_root, ignore_errors=True)
        totals.append(total)
        # Interleaved (run, bare, run, bare, ...), so drift hits both alike.
        bares.append(bare_esorex_seconds(command[0], command[1], recipe_dir, command[2], scratch))
    shutil.rmtree(keep, ignore_errors=True)
    assert command is not None
    recipe, _, options = command
    total, bare, recipe_own = _median(totals), _median(bares), _median(recipe_s)
    in_stages = sum(_median(v) for v in stages.values())
    print(json.dumps({
        "name": "fullsize_turnaround", "value": round(total / bare, 4),
        "preimg_run_s": round(total, 2), "bare_esorex_s": round(bare, 2), "overhead_s": round(total - bare, 2),
        "preimg_runs_s": [round(t, 2) for t in totals], "bare_esorex_runs_s": [round(b, 2) for b in bares],
        # The same comparison without the run-to-run noise of the recipe: the run against the
        # recipe's own time inside it (what esorex took while preimg waited for it).
        "recipe_in_processor_s": round(recipe_own, 2), "ratio_to_own_recipe": round(total / recipe_own, 4),
        "stages": {s: {"s": round(_median(v), 3), "share": round(_median(v) / total, 4)} for s, v in stages.items()},
        "outside_stages": {"s": round(total - in_stages, 3), "share": round((total - in_stages) / total, 4)},
        "recipe": recipe, "options": options, "frames": len(list(frames_dir.glob("*.fits"))),
        "n": runs, "unit": "ratio", "target": 1.03,
    }), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="ingest and sha256sum runs (default 5)")
    parser.add_argument("--runs", type=int, default=1, help="preimg run / bare esorex pairs (about 4 min each)")
    parser.add_argument("--size", type=int, default=synth.HAWKI_CHIP, help="HAWK-I window (default 2048)")
    parser.add_argument("--scratch", type=Path, help="parent of the scratch directory")
    parser.add_argument("--area-dir", type=Path,
                        help="parent of the delivery area (default: the scratch directory); on another file "
                        "system (e.g. /dev/shm) ingest copies the frames instead of hard-linking them")
    args = parser.parse_args(argv)
    if esorex.find_esorex() is None:
        print(json.dumps({"name": "fullsize_turnaround", "skipped": "esorex not installed", "unit": "ratio"}))
        return 0
    os.environ.pop(OVERLAY_ENV, None)  # the shipped profile, as operations run it
    cal_root = REPO / ".cache" / "synth" / f"cal-hawki-{args.size}"  # one set per root and size
    cal = synth.make_calibrations(INSTRUMENT, cal_root, size=args.size)
    if cal.profile_overlay is not None:
        os.environ[OVERLAY_ENV] = str(cal.profile_overlay)
    with (tempfile.TemporaryDirectory(prefix="bench-fullsize-", dir=args.scratch) as tmp,
          tempfile.TemporaryDirectory(prefix="bench-fullsize-area-", dir=args.area_dir or tmp) as area_tmp):
        scratch = Path(tmp)
        area = Path(area_tmp) / "incoming"
        frames = synth.make_raw_frames(INSTRUMENT, area, n_frames=3, size=args.size)
        bench_ingest(frames, area, scratch, args.repeat)
        bench_turnaround(area, cal_root, scratch, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

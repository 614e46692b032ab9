"""Quick-look benchmark: drawing the quick-look of a full-size HAWK-I product against its recipe.

One ``preimg run`` (services.app.run_embedded) of a full-size HAWK-I delivery (3 frames of
4 x 2048², real recipes) makes the JITTERED_IMAGE_SCI product and, in the processor, its quick-look.
Then the quick-look of that product is drawn again here, timed:

  quicklook_s   services.processor.quicklook.render on the product (page cache warm, as in the
                processor right after the recipe wrote it; drawing libraries already imported, as
                the processor preloads them while the recipe runs), median of --repeat;
                ``ratio`` = quicklook_s / the recipe's own time in that run
                (preimg_recipe_duration_seconds), target < 0.05.
                ``cold_s``: the same in a fresh interpreter, imports included (what a processor's
                first quick-look would cost without the preload).

The full-size calibration set is cached under ``.cache/synth/cal-hawki-2048`` (shared with
bench_fullsize.py and tests/integration/test_fullsize.py). Prints one JSON object per line.

Usage: ``python bench/bench_quicklook.py [--repeat N] [--size N] [--scratch DIR] [--keep-png DIR]``
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

from prometheus_client import CollectorRegistry

import synth
from services.processor import esorex, quicklook
from shared.profiles import OVERLAY_ENV

INSTRUMENT = "HAWKI"

COLD = """
import sys, time
from pathlib import Path
started = time.perf_counter()
from services.processor import quicklook
quicklook.render(Path(sys.argv[1]), Path(sys.argv[2]))
print(time.perf_counter() - started)
"""


def _recipe_seconds(registry: CollectorRegistry) -> float:
    total = 0.0
    for family in registry.collect():
        if family.name == "preimg_recipe_duration_seconds":
            total += sum(s.value for s in family.samples if s.name.endswith("_sum"))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed quick-looks per product (default 3)")
    parser.add_argument("--size", type=int, default=synth.HAWKI_CHIP, help="HAWK-I window (default 2048)")
    parser.add_argument("--scratch", type=Path, help="parent of the scratch directory")
    parser.add_argument("--keep-png", type=Path, help="copy the run's quick-looks into this directory")
    args = parser.parse_args(argv)
    if esorex.find_esorex() is None:
        print(json.dumps({"name": "quicklook_s", "skipped": "esorex not installed", "unit": "s"}))
        return 0
    from services.app import run_embedded
    from shared.settings import Settings

    os.environ.pop(OVERLAY_ENV, None)
    cal_root = REPO / ".cache" / "synth" / f"cal-hawki-{args.size}"
    cal = synth.make_calibrations(INSTRUMENT, cal_root, size=args.size)
    if cal.profile_overlay is not None:
        os.environ[OVERLAY_ENV] = str(cal.profile_overlay)
    with tempfile.TemporaryDirectory(prefix="bench-quicklook-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        frames_dir = scratch / "incoming"
        synth.make_raw_frames(INSTRUMENT, frames_dir, n_frames=3, size=args.size)
        registry = CollectorRegistry()
        started = time.perf_counter()
        summary = run_embedded(INSTRUMENT, frames_dir, Settings(data_root=scratch / "data", cal_root=cal_root),
                               run_id="bench-quicklook", registry=registry)
        run_s = time.perf_counter() - started
        if summary.status != "ok":
            raise RuntimeError(f"preimg run ended {summary.status}: {summary.reason}")
        recipe_s = _recipe_seconds(registry)
        sci = Path(summary.paths["products"])
        products = sorted(sci.glob("*_jittered_image_sci_*.fits"))
        if not products:
            raise RuntimeError(f"no JITTERED_IMAGE_SCI product in {sci}")
        for product in products:
            in_run = quicklook.quicklook_paths(product, sci)[0]
            if args.keep_png is not None and in_run.is_file():  # to look at, e.g. test-artifacts/
                args.keep_png.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(in_run, args.keep_png / f"quicklook-{args.size}-{in_run.name}")
            out = scratch / "again"
            times, kinds = [], set()
            for _ in range(args.repeat):
                look = quicklook.render(product, out)
                times.append(look.seconds)
                kinds.add(look.kind)
            cold = subprocess.run([sys.executable, "-c", COLD, str(product), str(scratch / "cold")], cwd=REPO,
                                  capture_output=True, text=True, check=True)
            value = statistics.median(times)
            print(json.dumps({
                "name": "quicklook_s", "value": round(value, 3), "runs_s": [round(t, 3) for t in times],
                "cold_s": round(float(cold.stdout.strip()), 3),
                "recipe_s": round(recipe_s, 2), "ratio": round(value / recipe_s, 4), "target_ratio": 0.05,
                "preimg_run_s": round(run_s, 2), "product": product.name,
                "product_mb": round(product.stat().st_size / 1e6, 1), "kind": "/".join(sorted(kinds)),
                "written_in_run": in_run.is_file(), "size": args.size, "n": args.repeat, "unit": "s",
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One full-size HAWK-I delivery through `preimg run`: 3 frames of 4 x 2048², real recipes, to `ok`.

The calibration set is the full-size one (masters of 4 x 2048², cached under
``.cache/synth/cal-hawki-2048``; about 25 s to build the first time). The
science recipe takes about a minute on a quiet 2-vCPU machine (ESOREX.md §1)
and two when the machine is shared. Each raw frame is 67 MB; the run's
directories (staged raw frames, products, the QC copy: about 2 GB) are
removed at the end, so that pytest's kept temporary directories stay small.
QC values: presence and plausible ranges (that a run gives the same values
wherever it runs is tested in tests/processor/test_recipes.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from astropy.io import fits

import synth
from shared.profiles import OVERLAY_ENV, load_profile

pytestmark = [pytest.mark.esorex, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHIP = synth.HAWKI_CHIP


def _shape(path: Path, ext: int) -> tuple[int, int]:
    header = fits.getheader(path, ext)
    return header["NAXIS2"], header["NAXIS1"]


def _qc(path: Path, key: str) -> list[float]:
    with fits.open(path) as hdul:
        return [float(h.header[f"HIERARCH ESO QC {key}"]) for h in hdul if f"HIERARCH ESO QC {key}" in h.header]


def test_fullsize_calibration_set_matches_the_frames(hawki_fullsize_cal):
    for tag in ("MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
        path = hawki_fullsize_cal.files[tag]
        assert [_shape(path, ext) for ext in range(1, 5)] == [(CHIP, CHIP)] * 4, tag
    # Whole chips run with the pipeline's default parameters: no overlay.
    assert hawki_fullsize_cal.profile_overlay is None


@pytest.mark.timeout(1800)
def test_fullsize_hawki_delivery_runs_to_ok(tmp_path, hawki_fullsize_cal):
    raw = tmp_path / "incoming"
    data = tmp_path / "data"
    frames = synth.make_raw_frames("HAWKI", raw, n_frames=3, size=CHIP)
    assert all(p.stat().st_size > 67_000_000 for p in frames)
    env = {k: v for k, v in os.environ.items() if k != OVERLAY_ENV}  # the shipped profile, as operations run it
    try:
        out = subprocess.run(
            [str(REPO / ".venv/bin/preimg"), "run", "-i", "HAWKI", str(raw), "--data-root", str(data),
             "--cal-root", str(hawki_fullsize_cal.root.parent), "--json"],
            capture_output=True, text=True, timeout=1500, check=False, env=env)
        assert out.stdout.strip(), out.stderr[-3000:]
        doc = json.loads(out.stdout)
        assert doc["status"] == "ok" and out.returncode == 0, (doc, out.stderr[-3000:])

        by_catg: dict[str, list[Path]] = {}
        for path in Path(doc["paths"]["products"]).glob("*.fits"):
            by_catg.setdefault(fits.getval(path, "HIERARCH ESO PRO CATG"), []).append(path)
        # The same 12 products as the small runs: per exposure, per sky, per stack.
        assert {c: len(p) for c, p in by_catg.items()} == {
            "BASIC_CALIBRATED_SCI": 3, "BASIC_VAR_MAP": 3, "MEAN_SKY": 1, "MEAN_SKY_VAR": 1,
            "JITTERED_IMAGE_SCI": 1, "JITTERED_VAR_IMAGE": 1, "CONFIDENCE_MAP_JITTERED": 1,
            "OBJECT_CATALOGUE_JITTERED": 1,
        }
        check = load_profile("HAWKI", overlays=[]).recipe_checks["hawki_science_process"]
        assert check.expected_products <= set(by_catg)
        for path in by_catg["BASIC_CALIBRATED_SCI"]:
            assert [_shape(path, ext) for ext in range(1, 5)] == [(CHIP, CHIP)] * 4
        [stack] = by_catg["JITTERED_IMAGE_SCI"]
        assert all(min(_shape(stack, ext)) >= CHIP for ext in range(1, 5))  # the jittered stack is larger
        assert all(0.100 < v < 0.112 for v in _qc(stack, "WCS_SCALE"))  # HAWK-I 0.106"/px
        assert all(23.5 < v < 26.5 for v in _qc(stack, "MAGZPT"))  # synthetic zero point 25
        assert all(0 <= v < 0.5 for p in by_catg["BASIC_CALIBRATED_SCI"] for v in _qc(p, "WCS_RMS"))

        logs = Path(doc["paths"]["logs"])
        [rblog] = logs.glob("*.rblog")
        command = next(line for line in rblog.read_text().splitlines() if "Invocation command line" in line)
        assert "hawki_science_process" in command and "nbsize" not in command  # the pipeline's defaults
        report = Path(doc["paths"]["report"]).read_text()
        assert "hawki_science_process" in report and "SUCCESSFUL" in report
        assert Path(doc["paths"]["userreport"]).is_file()
        assert len(list(Path(doc["paths"]["package"]).glob("*.fits"))) == 12
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(raw, ignore_errors=True)

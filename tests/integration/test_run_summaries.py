"""What `preimg run` and `preimg synth` tell a new user: progress, one JSON object, reasons that help.

Real commands in subprocesses, real recipes where a run needs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import synth

pytestmark = [pytest.mark.esorex, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PREIMG = [sys.executable, "-m", "services.cli"]


def _preimg(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PREIMG, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def _recipe_logs(data_root: Path) -> str:
    """Why a recipe failed when it should not have: each recipe log's first error with what led to it,
    and the state of the machine (a failure seen twice in whole-suite runs only, never alone)."""
    parts = []
    for log in sorted(data_root.rglob("*.rblog")):
        lines = log.read_text(errors="replace").splitlines()
        first = next((i for i, line in enumerate(lines) if "[ ERROR ]" in line), len(lines))
        parts.append(f"\n--- {log} (lines {max(first - 40, 0)}-{first + 10} of {len(lines)}):\n"
                     + "\n".join(lines[max(first - 40, 0):first + 10]))
    disk = os.statvfs(data_root)
    parts.append(f"\n--- free: {disk.f_bavail * disk.f_frsize >> 20} MiB, {disk.f_favail} inodes; "
                 + " ".join(Path("/proc/meminfo").read_text().split("\n")[:3]))
    return "".join(parts)


def test_run_reports_progress_on_stderr_and_one_json_object_on_stdout(tmp_path, hawki_cal):
    incoming = tmp_path / "incoming"
    synth.make_raw_frames("HAWKI", incoming, n_frames=3)
    (incoming / "HAWKI.2026-11-20T03:00:00.000.fits").write_bytes(b"SIMPLE  = not FITS" * 100)
    out = _preimg("--log-level", "WARNING", "run", "-i", "HAWKI", str(incoming), "--data-root", str(tmp_path / "d"),
                  "--cal-root", str(hawki_cal), "--json")
    summary = json.loads(out.stdout)  # the whole of stdout is one JSON object
    assert summary["status"] == "partial", out.stderr[-3000:] + _recipe_logs(tmp_path / "d")
    assert out.returncode == 0
    # The first failure's reason, not "".
    assert summary["reason"].startswith("HAWKI.2026-11-20T03:00:00.000.fits: frame HAWKI.2026-11-20T03:00:00.000.fits "
                                        "not processed: header unreadable")
    assert summary["paths"]["run_page"].endswith("/runs/" + summary["run_id"] + "/index.html")
    lines = [line.split("] ", 1)[1] for line in out.stderr.splitlines() if line.startswith("[")]
    assert lines[0] == "ingest finished"
    assert [line.split(":")[0] for line in lines if line.startswith("AB ")] == ["AB 1 of 2 finished",
                                                                              "AB 2 of 2 finished"]
    assert lines[-3:] == ["processor finished", "reporter finished", "publisher finished"]


def test_empty_calibration_directories_are_named_with_a_hint(tmp_path, esorex_installed):
    incoming = tmp_path / "incoming"
    synth.make_raw_frames("HAWKI", incoming, n_frames=2)
    cal = tmp_path / "cal"
    (cal / "HAWKI" / "gen").mkdir(parents=True)  # one directory there but empty, the other missing
    out = _preimg("--log-level", "ERROR", "run", "-i", "HAWKI", str(incoming), "--data-root", str(tmp_path / "d"),
                  "--cal-root", str(cal), "--json")
    summary = json.loads(out.stdout)
    assert out.returncode == 1 and summary["status"] == "failed"
    reason = summary["reason"]
    assert f"{cal}/HAWKI/2099-99-99 (missing)" in reason and f"{cal}/HAWKI/gen (empty)" in reason, reason
    assert "preimg check -i HAWKI" in reason
    assert "no file with PRO.CATG" not in reason
    assert [line.split("] ", 1)[1] for line in out.stderr.splitlines() if line.startswith("[")] == [
        "ingest finished", "processor failed"]


def test_synth_uses_preimg_cal_root(tmp_path, hawki_cal):
    """The cached set under PREIMG_CAL_ROOT is found (and reused), nothing lands beside --out."""
    out = _preimg("synth", "-i", "HAWKI", "--out", str(tmp_path / "incoming"), env={"PREIMG_CAL_ROOT": str(hawki_cal)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"calibrations up to date in {hawki_cal}/HAWKI" in out.stdout
    assert not (tmp_path / "cal").exists()

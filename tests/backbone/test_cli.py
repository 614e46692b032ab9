"""The preimg command as a user meets it: help, version, the embedded run and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.backbone.test_e2e_rabbitmq import make_frames

REPO = Path(__file__).resolve().parents[2]


def preimg(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_version_and_help():
    out = preimg("--version")
    assert out.returncode == 0 and out.stdout.startswith("preimg ")
    out = preimg("--help")
    for command in ("run", "deliver", "serve", "synth", "check", "oca", "explain", "monitor"):
        assert f"    {command} " in out.stdout


def test_run_json_gives_run_id_status_and_paths(tmp_path):
    make_frames(tmp_path / "in", 2)
    out = preimg("run", "-i", "FORS2", str(tmp_path / "in"), "--data-root", str(tmp_path / "data"), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ok" and doc["run_id"].startswith("FORS2_")
    for key in ("raw", "products", "logs", "report", "userreport", "list_mcalib", "monitor"):
        assert key in doc["paths"], doc["paths"]
    assert Path(doc["paths"]["report"]).is_file()
    assert len(list(Path(doc["paths"]["raw"]).iterdir())) == 2


def test_run_reports_bad_input_with_a_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (("run", "-i", "FORS2", str(tmp_path / "missing")), "raw directory"),
        (("run", "-i", "FORS2", str(tmp_path / "empty")), "no FITS files"),
        (("run", "-i", "ESPRESSO", str(tmp_path / "empty")), "no FITS files"),
    ]
    make_frames(tmp_path / "in", 1)
    cases.append((("run", "-i", "ESPRESSO", str(tmp_path / "in"), "--data-root", str(tmp_path / "d")),
                  "unknown instrument 'ESPRESSO'"))
    for args, text in cases:
        out = preimg(*args)
        assert out.returncode == 2 and text in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_deliver_refuses_missing_files_before_touching_the_broker(tmp_path):
    out = preimg("deliver", "-i", "FORS2", str(tmp_path / "nothing.fits"))
    assert out.returncode == 2 and "no such file" in out.stderr

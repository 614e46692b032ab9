"""The preimg command as a user meets it: help, version, the embedded run and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shared.files import is_temp_name, remove_stale_temp_files, write_atomic
from tests.backbone.test_e2e_rabbitmq import make_frames

REPO = Path(__file__).resolve().parents[2]


def preimg(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_version_and_help():
    out = preimg("--version")
    assert out.returncode == 0 and out.stdout.startswith("preimg ")
    out = preimg("--help")
    for command in ("run", "deliver", "serve", "synth", "check", "oca", "explain", "monitor", "gc"):
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


def test_dlq_names_the_queues_it_knows_when_given_another(tmp_path):
    out = preimg("dlq", "list", "preimg.processor.NOSUCH")
    assert out.returncode == 2 and out.stdout == ""
    assert "not a service queue" in out.stderr and "preimg.processor.HAWKI" in out.stderr


def test_prune_without_test_flag_is_refused_on_stderr(tmp_path):
    out = preimg("monitor", "prune", "-i", "HAWKI")
    assert out.returncode == 2 and out.stdout == "" and "only test runs" in out.stderr


def touch(path: Path, age_h: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    then = time.time() - age_h * 3600
    os.utime(path, (then, then))
    return path


def test_gc_removes_stale_temporary_files_and_keeps_the_rest(tmp_path):
    data = tmp_path / "data"
    stale = [
        touch(data / "sci" / "HAWKI" / "r1" / ".HAWKI.fits.k2j3h4.tmp", age_h=30),
        touch(data / "state" / "HAWKI" / "r1" / ".raw_ready.json.x8y9z0.tmp", age_h=25),
        touch(data / "qc" / "HAWKI" / ".preimgMonitor.html.q1w2e3.tmp", age_h=48),
    ]
    staging = data / "raw" / "HAWKI" / ".r2.staging"
    touch(staging / "frame.fits", age_h=30)
    os.utime(staging, (time.time() - 30 * 3600,) * 2)
    kept = [
        touch(data / "sci" / "HAWKI" / "r1" / ".HAWKI.fits.fresh1.tmp", age_h=1),  # a write in progress
        touch(data / "logs" / "HAWKI" / "r1" / ".hidden", age_h=30),  # a dotfile, not a temporary file
        touch(data / "logs" / "HAWKI" / "r1" / "notes.tmp", age_h=30),  # not write_atomic's pattern
        touch(data / "sci" / "HAWKI" / "r1" / "HAWKI.2026-11-20.fits", age_h=30),
        touch(data / "incoming" / ".upload.abc.tmp", age_h=30),  # AOG's delivery area is not ours
    ]
    outside = touch(tmp_path / "elsewhere" / ".other.abc.tmp", age_h=30)
    (data / "work" / "HAWKI").mkdir(parents=True)
    (data / "work" / "HAWKI" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (data / "state" / ".linked.abc.tmp").symlink_to(outside)  # a symlink is never removed

    out = preimg("gc", "--data-root", str(data), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["count"] == len(stale) + 1
    assert sorted(doc["removed"]) == sorted(str(p.resolve()) for p in [*stale, staging])
    assert not any(p.exists() for p in stale) and not staging.exists()
    assert all(p.exists() for p in kept)
    assert outside.exists() and (data / "state" / ".linked.abc.tmp").is_symlink()

    out = preimg("gc", "--data-root", str(data))
    assert out.returncode == 0 and out.stdout.startswith("0 ")


def test_gc_limit_is_configurable_and_errors_have_a_reason(tmp_path):
    data = tmp_path / "data"
    fresh = touch(data / "work" / "HAWKI" / "r1" / ".x.json.abc.tmp", age_h=2)
    out = preimg("gc", "--data-root", str(data), "--older-than-hours", "1")
    assert out.returncode == 0 and f"removed {fresh.resolve()}" in out.stdout
    assert not fresh.exists()

    out = preimg("gc", "--data-root", str(tmp_path / "missing"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = preimg("gc", "--data-root", str(data), "--older-than-hours", "-1")
    assert out.returncode == 2 and "0 or more hours" in out.stderr


def test_write_atomic_temporary_files_match_the_sweep_pattern(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "report.html", "x")
    assert len(seen) == 1 and is_temp_name(seen[0]) and seen[0].startswith(".report.html.")
    assert not is_temp_name(".tmp") and not is_temp_name("..tmp")  # too short to be one


def test_remove_stale_temp_files_any_age_and_missing_root(tmp_path):
    fresh = touch(tmp_path / "run" / ".a.json.abc.tmp")
    assert remove_stale_temp_files(tmp_path / "run", older_than_s=60) == []
    assert remove_stale_temp_files(tmp_path / "run") == [fresh]  # None: whatever the age
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_remove_stale_temp_files_tolerates_files_vanishing_meanwhile(tmp_path, monkeypatch):
    touch(tmp_path / ".a.json.abc.tmp", age_h=30)
    touch(tmp_path / ".b.json.abc.tmp", age_h=30)
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name.startswith(".a."):  # another sweep was quicker
            real_unlink(self)
            raise FileNotFoundError(self)
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert remove_stale_temp_files(tmp_path, older_than_s=3600) == [tmp_path / ".b.json.abc.tmp"]
    assert list(tmp_path.iterdir()) == []

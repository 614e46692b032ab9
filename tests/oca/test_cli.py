"""``preimg oca check`` and ``preimg explain`` on real files."""

from __future__ import annotations

import argparse
import json

import pytest

from shared.oca.cli import register

from .conftest import write_fits

SCIENCE = {
    "INSTRUME": "HAWKI", "DPR.CATG": "SCIENCE", "DPR.TECH": "IMAGE,PRE", "DPR.TYPE": "OBJECT",
    "DET.DIT": 10.0, "DET.NDIT": 6, "DET.NCORRS.NAME": "Double", "INS.FILT1.NAME": "J",
    "INS.FILT2.NAME": "OPEN", "OBS.START": "2024-01-02T02:59:00",
    "TPL.START": "2024-01-02T03:00:00",
}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preimg")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_oca_check_counts(oca_rules_dir, capsys):
    assert _run(["oca", "check", str(oca_rules_dir / "hawki.oca")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classification_rules"] == 77
    assert out["organisation_rules"] == 11
    assert out["actions"] == 8


def test_oca_check_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.oca"
    bad.write_text('if DPR.CATG == "X" then\n{\n  DO.CATG = "Y"\n}\n')
    assert _run(["oca", "check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"{bad}:4:1: expected ';' after the assigned value, found '}}'"


@pytest.fixture
def delivery(tmp_path):
    raw = tmp_path / "raw"
    cal = tmp_path / "cal"
    raw.mkdir()
    cal.mkdir()
    files = []
    for i in range(2):
        files.append(write_fits(raw / f"pre{i + 1}.fits", dict(
            SCIENCE, **{"MJD-OBS": 60310.1 + i * 0.001, "TPL.EXPNO": i + 1})))
    broken = raw / "broken.fits"
    broken.write_bytes(files[0].read_bytes()[:2000])  # truncated inside the header
    files.append(broken)
    write_fits(cal / "dark.fits", {"INSTRUME": "HAWKI", "PRO.CATG": "MASTER_DARK",
                                   "DET.DIT": 10.0, "MJD-OBS": 60310.0})
    return files, cal


def test_explain_json_with_overlay(delivery, capsys):
    files, cal = delivery
    code = _run(["explain", "-i", "HAWKI", "--calib", str(cal), *map(str, files), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1  # one file could not be read; the others are still explained
    first, _second, broken = out["files"]
    assert first["classification"] == {"DO.CATG": "IMG_PREIMAGING"}
    assert first["rules"] == {"DO.CATG": "hawki_overlay.oca:10"}
    assert "truncated header" in broken["errors"][0]
    (ab,) = out["abs"]
    assert (ab["action"], ab["recipe"]) == ("SCIENCE_FRAMES", "hawki_science_process")
    assert [r["tag"] for r in ab["raw"]] == ["OBJECT", "OBJECT"]
    assert ab["calibs"] == {"MASTER_DARK": [str(cal / "dark.fits")]}
    assert ab["complete"] is False
    assert "MASTER_TWILIGHT_FLAT" in ab["missing"] and "MASTER_DARK" not in ab["missing"]


def test_explain_rules_alone_and_text(delivery, oca_rules_dir, capsys):
    files, _cal = delivery
    code = _run(["explain", "-i", "HAWKI", "--rules", str(oca_rules_dir / "hawki.oca"),
                 *map(str, files[:2])])
    text = capsys.readouterr().out
    assert code == 0
    assert "DO.CATG = 'JITTER_OBS'   set by hawki.oca:33" in text
    assert "no AB: no organisation rule selected these files" in text

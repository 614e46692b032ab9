"""Preprocessed rule sets (DFOS <instr>.h → <instr>.RLS): the same rules as the expanded
form, errors at the original header and line, and `preimg oca check` on a directory."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from shared.oca import (
    FramePool,
    OcaSyntaxError,
    build_abs,
    load_rules,
    make_records,
    parse_file,
    preprocess,
)
from shared.oca.cli import register
from shared.oca.preprocess import available_engines

RULES = Path(__file__).parent / "rules"
ENTRY = RULES / "inst" / "INST.h"
ENGINES = available_engines()


def _copy_set(tmp_path: Path) -> Path:
    dest = tmp_path / "inst"
    shutil.copytree(RULES / "inst", dest)
    return dest


def _headers():
    raw = {}
    for i in range(2):
        raw[f"/raw/pre{i}.fits"] = {
            "ESO DPR CATG": "SCIENCE", "ESO DPR TECH": "IMAGE,PRE", "ESO DPR TYPE": "OBJECT",
            "ESO DET DIT": 10.0, "ESO INS FILT1 NAME": "R", "ESO TPL START": "T1",
            "MJD-OBS": 60100.0 + i * 0.001, "ARCFILE": f"INST.PRE.{i}.fits"}
        raw[f"/raw/dark{i}.fits"] = {
            "ESO DPR CATG": "CALIB", "ESO DPR TYPE": "DARK", "ESO DET DIT": 10.0,
            "ESO TPL START": "T0", "MJD-OBS": 60099.8 + i * 0.001, "ARCFILE": f"INST.D.{i}.fits"}
    cal = {
        "/cal/dark.fits": {"ESO PRO CATG": "MASTER_DARK", "ESO DET DIT": 10.0, "MJD-OBS": 60099.0},
        "/cal/flat_old.fits": {"ESO PRO CATG": "MASTER_FLAT", "ESO DET DIT": 10.0,
                               "ESO INS FILT1 NAME": "R", "MJD-OBS": 60096.5},
        "/cal/flat_ok.fits": {"ESO PRO CATG": "MASTER_FLAT", "ESO DET DIT": 10.0,
                              "ESO INS FILT1 NAME": "R", "MJD-OBS": 60097.5},
        "/cal/flat_I.fits": {"ESO PRO CATG": "MASTER_FLAT", "ESO DET DIT": 10.0,
                             "ESO INS FILT1 NAME": "I", "MJD-OBS": 60100.0},
    }
    return raw, cal


def _summary(rules):
    raw, cal = _headers()
    records = make_records(rules, raw)
    pool = FramePool.from_headers(rules, cal)
    return ([(str(r.path), r.category) for r in records],
            [(ab.action, ab.name, [str(p) for p, _ in ab.raw],
              {t: [str(p) for p in ps] for t, ps in ab.calibs.items()}, ab.complete, ab.missing)
             for ab in build_abs(rules, records, pool)])


@pytest.mark.parametrize("engine", ENGINES)
def test_preprocessed_set_equals_its_expanded_form(engine):
    pre = load_rules(ENTRY, preprocessor=engine)
    expanded = parse_file(RULES / "INST_expanded.oca")
    assert pre == expanded
    assert _summary(pre) == _summary(expanded)
    categories, abs_ = _summary(pre)
    assert dict(categories)["/raw/pre0.fits"] == "IMG_PREIMAGING"
    (dark_ab,) = [a for a in abs_ if a[0] == "DARKS"]
    (pre_ab,) = [a for a in abs_ if a[0] == "PRE"]
    # RECENT(FLAT_DAYS): within 3 days; the I flat is nearer but of another filter
    assert pre_ab[3] == {"MASTER_DARK": ["/cal/dark.fits"], "MASTER_FLAT": ["/cal/flat_ok.fits"]}
    assert dark_ab[2] == ["/raw/dark0.fits", "/raw/dark1.fits"]
    # rules are attributed to the header that holds them
    assert Path(pre.classification[0].source).name == "INST_classification.h"
    assert (Path(pre.actions[0].source).name, pre.actions[0].line) == ("INST_association.h", 1)
    assert pre.sources == (ENTRY,)


@pytest.mark.parametrize("engine", ENGINES)
def test_defines_and_include_dirs(tmp_path, engine):
    # a define from the profile/command line changes the rules: FLAT_DAYS 4 takes flat_old too
    rules = load_rules(ENTRY, preprocessor=engine, defines={"FLAT_DAYS": 4})
    assert "inputFile.MJD-OBS - 4" in preprocess(ENTRY, defines=["FLAT_DAYS=4"], engine=engine)
    assert rules != load_rules(ENTRY, preprocessor=engine)
    # headers found through the include path
    inst = _copy_set(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (inst / "INST_macros.h").rename(shared / "INST_macros.h")
    with pytest.raises(OcaSyntaxError) as err:
        load_rules(inst / "INST.h", preprocessor=engine)
    assert (Path(err.value.path).name, err.value.line) == ("INST.h", 3)
    assert "INST_macros.h" in str(err.value)
    assert load_rules(inst / "INST.h", preprocessor=engine, include_dirs=[shared]) == load_rules(
        ENTRY, preprocessor=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_errors_point_to_the_original_header(tmp_path, engine):
    inst = _copy_set(tmp_path)
    assoc = inst / "INST_association.h"
    # a misspelt operator glued to a keyword on line 8 of the association header
    assoc.write_text(assoc.read_text().replace("and SAME_SETUP", "andSAME_SETUP"))
    with pytest.raises(OcaSyntaxError) as err:
        load_rules(inst / "INST.h", preprocessor=engine)
    assert (Path(err.value.path).name, err.value.line) == ("INST_association.h", 8)
    assert "is 'and' glued to the keyword? write 'and SAME_SETUP'" in str(err.value)

    # an unclosed brace: the parser reaches the end of the entry file
    inst = _copy_set(tmp_path / "b")
    cls = inst / "INST_classification.h"
    cls.write_text(cls.read_text().replace('  DO.CATG = "DARK";\n}', '  DO.CATG = "DARK";\n'))
    with pytest.raises(OcaSyntaxError) as err:
        load_rules(inst / "INST.h", preprocessor=engine)
    assert Path(err.value.path).name == "INST_organisation.h" and err.value.line == 1
    assert f"expected '}}' closing the '{{' at {cls}:6:1, found 'select'" in str(err.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_macro_that_expands_to_nothing(tmp_path, engine):
    inst = _copy_set(tmp_path)
    macros = inst / "INST_macros.h"
    macros.write_text(macros.read_text().replace("#define SETUP DET.DIT,INS.FILT1.NAME",
                                                 "#define SETUP"))
    with pytest.raises(OcaSyntaxError) as err:
        load_rules(inst / "INST.h", preprocessor=engine)
    assert (Path(err.value.path).name, err.value.line) == ("INST_organisation.h", 2)
    assert "expected a keyword to group by" in str(err.value)
    assert str(err.value).endswith("(macro SETUP on this line expands to nothing)")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preimg")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_oca_check_a_directory_with_one_broken_file(tmp_path, capsys):
    inst = _copy_set(tmp_path)
    shutil.copy(RULES / "INST_expanded.oca", tmp_path / "expanded.oca")
    (tmp_path / "broken.oca").write_text('if A == "x" then\n{\n  DO.CATG = "Y"\n}\n')
    assert _run(["oca", "check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    parsed = [json.loads(line) for line in out.splitlines()]
    # the entry header is checked (preprocessed), not the headers it includes
    assert sorted(Path(p["file"]).name for p in parsed) == ["INST.h", "expanded.oca"]
    assert all(p["actions"] == 2 and p["organisation_rules"] == 2 for p in parsed)
    assert f"{tmp_path / 'broken.oca'}:4:1: expected ';'" in err
    assert "3 files, 2 parsed, 1 with errors" in err
    assert _run(["oca", "check", str(inst / "INST.h"), "-D", "FLAT_DAYS=4"]) == 0
    assert json.loads(capsys.readouterr().out)["version"].startswith("INST.h sha1:")
    assert _run(["oca", "check", str(tmp_path / "nothing")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["oca", "check", str(empty)]) == 2

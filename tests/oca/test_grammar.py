"""The OCA language as QC scientists write it: arithmetic, between/tryBetween, undefined,
``like`` in assignments, settings without ``;``, preprocessor line markers, and real
Reflex rule files from ESO's pipeline source packages."""

from __future__ import annotations

import pytest

from shared.oca import OcaSyntaxError, OcaTypeError, classify, format_rules, parse_file, parse_rules
from shared.oca.evaluate import compile_expr, normalise_record
from shared.oca.model import Arith, Between, Compare, Keyword, Literal

from .conftest import REFLEX_RULES


def _cond(text: str):
    return parse_rules(f"if {text} then {{ X = T; }}").classification[0].condition


def _eval(condition: str, cand: dict, inp: dict | None = None):
    fn = compile_expr(_cond(condition))
    return fn(normalise_record(cand), normalise_record(inp or {}), None)


def _value(expr: str, cand: dict | None = None):
    rules = parse_rules(f"if (T) then {{ V = {expr}; }}")
    (result,) = classify(rules, {"f.fits": cand or {}}).values()
    return result.values.get("V")


# -- lexing of '-' ----------------------------------------------------------

@pytest.mark.parametrize("text", ["MJD-OBS - 3", "MJD-OBS-3", "MJD-OBS -3", "MJD-OBS- 3"])
def test_minus_after_a_dashed_keyword_is_subtraction(text):
    # muse_wkf.oca writes "inputFile.MJD-OBS - 3"; '-' before a digit ends the name
    assert _cond(f"{text} > 0") == Compare(">", Arith("-", Keyword("MJD-OBS"), Literal(3)),
                                           Literal(0))


def test_dash_before_a_letter_stays_in_the_keyword():
    assert _cond("DATE-OBS == 1") == Compare("==", Keyword("DATE-OBS"), Literal(1))
    assert _cond("MJD-OBS - EXPTIME > 1").left == Arith(
        "-", Keyword("MJD-OBS"), Keyword("EXPTIME"))
    # glued, it is one keyword (documented: write blanks around a keyword operand)
    assert _cond("MJD-OBS-EXPTIME > 1").left == Keyword("MJD-OBS-EXPTIME")


def test_arithmetic_precedence_and_round_trip():
    cond = _cond("A == 4 + 1 - 2 * 3 and B < -C / (2 - 1) and W >= -1")
    a, b, w = cond.items
    # left-associative, * before +
    assert a.right == Arith("-", Arith("+", Literal(4), Literal(1)),
                            Arith("*", Literal(2), Literal(3)))
    assert b.right == Arith("/", Arith("-", Literal(0), Keyword("C")),
                            Arith("-", Literal(2), Literal(1)))
    assert w.right == Literal(-1)
    rules = parse_rules("if A - (B - C) == (A - B) - C then { X = T; }")
    again = parse_rules(format_rules(rules))
    assert again == rules
    assert "A - (B - C) == A - B - C" in format_rules(rules)


def test_arithmetic_values():
    assert _value("4 + 1 - 2") == 3.0
    assert _value("MJD-OBS + EXPTIME / 2 / 86400", {"MJD-OBS": 60000.0, "EXPTIME": 86400}) == 60000.5
    assert _value('"IMG_" + DPR.TYPE', {"ESO DPR TYPE": "SKY"}) == "IMG_SKY"
    assert _value('DET.DIT * 2', {"ESO DET DIT": "10"}) == 20.0  # a string that reads as a number
    assert _value("MISSING + 1") is None  # missing stays missing: no value assigned
    assert _value("1 / 0") is None
    with pytest.raises(OcaTypeError, match="keyword DATE-OBS = '2024-01-01T00:00:00'"):
        _eval("DATE-OBS - 1 > 0", {"DATE-OBS": "2024-01-01T00:00:00"})


def test_arithmetic_time_window():
    # muse_wkf.oca: MJD-OBS > inputFile.MJD-OBS - 3 and MJD-OBS < inputFile.MJD-OBS + 3
    window = "MJD-OBS > inputFile.MJD-OBS - 3 and MJD-OBS < inputFile.MJD-OBS + 3"
    raw = {"MJD-OBS": 60010.0}
    assert _eval(window, {"MJD-OBS": 60007.5}, raw)
    assert not _eval(window, {"MJD-OBS": 60007.0}, raw)  # strict: exactly 3 days is out
    assert _eval(window, {"MJD-OBS": 60012.999}, raw)
    assert not _eval(window, {}, raw)  # missing MJD-OBS never qualifies


# -- between / tryBetween ---------------------------------------------------

def test_between_is_inclusive_and_parses_with_and():
    cond = _cond("MJD-OBS between inputFile.MJD-OBS - 1 and inputFile.MJD-OBS + 1 and K == 2")
    between, k = cond.items
    assert isinstance(between, Between) and not between.soft
    assert k == Compare("==", Keyword("K"), Literal(2))
    text = "MJD-OBS between inputFile.MJD-OBS - 1 and inputFile.MJD-OBS + 1"
    raw = {"MJD-OBS": 100.0}
    assert _eval(text, {"MJD-OBS": 99.0}, raw) and _eval(text, {"MJD-OBS": 101.0}, raw)
    assert not _eval(text, {"MJD-OBS": 101.0001}, raw)
    assert not _eval(text, {}, raw)
    soft = _cond("MJD-OBS tryBetween 1 and 2")
    assert isinstance(soft, Between) and soft.soft
    # outside association tryBetween is between
    assert not _eval("MJD-OBS tryBetween 1 and 2", {"MJD-OBS": 3})
    rules = parse_rules("if X between 1 and 2 and Y tryBetween A and B + 1 then { Z = 1; }")
    assert parse_rules(format_rules(rules)) == rules
    assert "tryBetween" in format_rules(rules)


# -- undefined, like in an assignment, settings without ';' ------------------

def test_is_undefined_and_defined():
    # muse_wkf.oca:155: USERTBL is undefined
    assert _eval("USERTBL is undefined", {}) and not _eval("USERTBL is undefined", {"USERTBL": "x"})
    assert _eval("USERTBL is defined", {"USERTBL": 0}) and not _eval("USERTBL is defined", {})
    assert _eval("not (USERTBL is undefined)", {"USERTBL": "x"})


def test_like_in_an_assignment_stores_a_boolean():
    # muse_wkf.oca:55: INS.OPTI1.FILTER = INS.OPTI1.NAME like "Blue%";
    assert _value('INS.OPTI1.NAME like "Blue%"', {"ESO INS OPTI1 NAME": "Blue2"}) is True
    assert _value('INS.OPTI1.NAME like "Blue%"', {"ESO INS OPTI1 NAME": "Red"}) is False


def test_settings_without_semicolon():
    rules = parse_rules('''
    minRet = 3
    select execute(A) from inputFiles where DO.CATG == "X";
    action A
    {
      minRet = 2
      maxRet = 2
      select file as T from inputFiles where DO.CATG == "X";
      minRet = 0 maxRet = 1
      select file as U from calibFiles where PRO.CATG == "U";
      recipe r;
      priority = 3
    }
    ''')
    assert rules.organisation[0].min_files == 3
    t, u = rules.actions[0].selects
    assert (t.min_ret, t.max_ret, u.min_ret, u.max_ret) == (2, 2, 0, 1)
    assert parse_rules(format_rules(rules)) == rules


# -- '#' lines ----------------------------------------------------------------

def test_line_markers_attribute_rules_and_errors_to_the_original_file():
    text = ('# 1 "inst.h"\n'
            '# 1 "inst_classification.h" 1\n'
            '\n'
            'if DPR.TYPE == "DARK" then { DO.CATG = "DARK"; }\n'
            '# 7 "inst.h" 2\n'
            '#pragma once\n'
            'select execute(D) from inputFiles where DO.CATG == "DARK";\n'
            '#line 40 "inst_association.h"\n'
            'action D { recipe r; }\n')
    rules = parse_rules(text, "inst.RLS")
    assert (rules.classification[0].source, rules.classification[0].line) == (
        "inst_classification.h", 2)
    assert (rules.organisation[0].source, rules.organisation[0].line) == ("inst.h", 8)
    assert (rules.actions[0].source, rules.actions[0].line) == ("inst_association.h", 40)
    (result,) = classify(rules, {"f.fits": {"ESO DPR TYPE": "DARK"}}).values()
    assert result.rule_lines == {"DO.CATG": "inst_classification.h:2"}
    bad = text.replace("recipe r;", "recipe ;")
    with pytest.raises(OcaSyntaxError) as err:
        parse_rules(bad, "inst.RLS")
    assert str(err.value).startswith("inst_association.h:40:19: expected a recipe name")


def test_unpreprocessed_directive_is_a_clear_error():
    with pytest.raises(OcaSyntaxError) as err:
        parse_rules('// rules\n#include "x.h"\nif (T) then { A = 1; }\n', "x.oca")
    assert (err.value.line, err.value.column) == (2, 1)
    assert "preprocessor directive '#include'" in str(err.value)


def test_operator_glued_to_a_keyword_is_named():
    # uves_wkf_onlydflats.oca:1020 has "DET.WIN1.BINYand inputFile.INS.MODE==INS.MODE"
    text = ('action A {\n  select file as T from calibFiles where PRO.CATG == "T"\n'
            '    and inputFile.X == Xand inputFile.Y == Y;\n}\n')
    with pytest.raises(OcaSyntaxError) as err:
        parse_rules(text, "glued.oca")
    assert (err.value.line, err.value.column) == (3, 24)
    assert "after 'Xand': is 'and' glued to the keyword? write 'X and'" in str(err.value)


# -- real Reflex rule files --------------------------------------------------

@pytest.mark.parametrize("name", [n for n in REFLEX_RULES if "onlydflats" not in n])
def test_reflex_rule_files_parse_and_round_trip(reflex_rules_dir, name):
    rules = parse_file(reflex_rules_dir / name)
    assert rules.classification and rules.organisation and rules.actions
    assert parse_rules(format_rules(rules)) == rules


def test_reflex_muse_uses_arithmetic_undefined_and_like_assignment(reflex_rules_dir):
    text = format_rules(parse_file(reflex_rules_dir / "muse_muse_wkf.oca"))
    assert "MJD-OBS > inputFile.MJD-OBS - 3" in text
    assert "USERTBL is undefined" in text
    assert 'INS.OPTI1.FILTER = INS.OPTI1.NAME like "Blue%";' in text


def test_reflex_file_with_a_real_typo_gives_one_clear_error(reflex_rules_dir):
    with pytest.raises(OcaSyntaxError) as err:
        parse_file(reflex_rules_dir / "uves_uves_wkf_onlydflats.oca")
    assert err.value.line == 1020
    assert "'DET.WIN1.BINYand': is 'and' glued to the keyword?" in str(err.value)

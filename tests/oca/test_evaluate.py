"""Expression semantics: like, numbers versus strings, ?=, missing keywords, type errors."""

from __future__ import annotations

import pytest

from shared.oca import OcaTypeError, classify, parse_rules
from shared.oca.evaluate import compile_expr, normalise_record
from shared.oca.keywords import dotted_name, fits_card_name, header_key


def _eval(condition: str, cand: dict, inp: dict | None = None):
    rules = parse_rules(f"if {condition} then {{ X = T; }}")
    fn = compile_expr(rules.classification[0].condition)
    return fn(normalise_record(cand), normalise_record(inp or {}), None)


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("%SCIENCE%", "SCIENCE", True), ("%IMAGE%", "IMAGE,PRE", True),
        ("%PRE%", "IMAGE", False), ("IMAGE", "IMAGE,PRE", False), ("IMAGE", "IMAGE", True),
        ("Blue%", "Blue2", True), ("%PRE", "IMAGE,PRE", True), ("A%B%C", "AxxBxxC", True),
        ("A%B%C", "AxxC", False), ("MASTER_BIAS", "MASTERXBIAS", False),
    ],
)
def test_like(pattern, value, expected):
    assert _eval(f'K like "{pattern}"', {"K": value}) is expected


def test_numbers_compare_numerically_strings_as_strings():
    assert _eval("TPL.NEXP > 2", {"TPL.NEXP": 10})
    assert not _eval('K > "2"', {"K": "10"})  # both strings: "10" < "2"
    assert _eval("MJD-OBS < 55459.0", {"MJD-OBS": 55000})
    assert _eval("DET.DIT == 10", {"DET.DIT": 10.0})
    assert _eval('DET.DIT == "10"', {"DET.DIT": 10.0})  # a string that reads as a number
    assert not _eval('K == "abc"', {"K": 1.0})
    assert _eval('K == T', {"K": True}) and not _eval('K == F', {"K": True})
    assert _eval("inputFile.DET.DIT == DET.DIT", {"DET.DIT": 10}, {"DET.DIT": 10.0})


def test_missing_keywords_and_maybe_equal():
    assert not _eval('K == "a"', {})
    assert _eval('K != "a"', {})  # != is not ==
    assert not _eval("K < 3", {})
    # ?= : true when missing on either side, else equality
    assert _eval("inputFile.FLT ?= FLT", {}, {"FLT": "R"})
    assert _eval("inputFile.FLT ?= FLT", {"FLT": "R"}, {})
    assert _eval("inputFile.FLT ?= FLT", {"FLT": "R"}, {"FLT": "R"})
    assert not _eval("inputFile.FLT ?= FLT", {"FLT": "I"}, {"FLT": "R"})


def test_boolean_operators_and_types():
    assert _eval('not (A == 1 or B == 2) and (T)', {"A": 0, "B": 0})
    assert _eval('K is string', {"K": "x"}) and not _eval('K is string', {"K": 1})
    assert _eval('K is number', {"K": 1.5}) and _eval('K is boolean', {"K": False})
    assert _eval('K regexp "MUSE_[wn]fm_cal_.*"', {"K": "MUSE_wfm_cal_specflat"})


def test_type_errors_name_keyword_value_and_operator():
    with pytest.raises(OcaTypeError, match=r"keyword DPR.CATG = 5.0 \(number\): 'like' needs a string"):
        _eval('DPR.CATG like "%SCIENCE%"', {"DPR.CATG": 5})
    with pytest.raises(OcaTypeError, match="keyword TPL.NEXP = 'many'"):
        _eval("TPL.NEXP > 2", {"TPL.NEXP": "many"})


def test_last_match_wins_and_rule_lines_recorded():
    rules = parse_rules(
        'if A like "%X%" then\n{ DO.CATG = "FIRST"; }\n'
        'if A == "XY" then\n{ DO.CATG = "SECOND"; MORE = A; }\n'
        'if A == "nothing" then\n{ DO.CATG = "THIRD"; }\n',
        "t.oca",
    )
    (result,) = classify(rules, {"f.fits": {"ESO A": "XY"}}).values()
    assert result.values == {"DO.CATG": "SECOND", "MORE": "XY"}
    assert result.rule_lines == {"DO.CATG": "t.oca:3", "MORE": "t.oca:3"}
    assert result.category == "SECOND"


def test_keyword_name_mapping():
    assert fits_card_name("DPR.CATG") == "HIERARCH ESO DPR CATG"
    assert header_key("DPR.CATG") == "ESO DPR CATG"
    assert fits_card_name("MJD-OBS") == "MJD-OBS" and header_key("INSTRUME") == "INSTRUME"
    assert dotted_name("HIERARCH ESO INS FILT1 NAME") == "INS.FILT1.NAME"
    assert dotted_name("ESO DET DIT") == "DET.DIT" and dotted_name("MJD-OBS") == "MJD-OBS"

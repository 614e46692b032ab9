"""Evaluation as DFOS does it, worked by hand: time windows written with arithmetic,
between/tryBetween edges, undefined keywords, MJD-OBS_MOD, TPL.NEXP completeness,
PRO.CATG fallback and virtual calibrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.oca import FramePool, build_abs, classify, parse_rules

RULES = '''
if DPR.CATG == "SCIENCE" then { DO.CATG = "SCI"; }
if DPR.CATG == "CALIB" and DPR.TYPE == "DARK" then { DO.CATG = "DARK"; }
select execute(SCI) from inputFiles where SIG.TEMPLATE == 1 and DO.CATG == "SCI";
select execute(DARKS) from inputFiles where SIG.TEMPLATE == 1 and DO.CATG == "DARK";
action SCI
{
  minRet = 1; maxRet = 1;
  select file as WINDOW from calibFiles where PRO.CATG == "WINDOW"
    and MJD-OBS > inputFile.MJD-OBS - 3 and MJD-OBS < inputFile.MJD-OBS + 3;
  minRet = 1; maxRet = 1;
  select file as INRANGE from calibFiles where PRO.CATG == "INRANGE"
    and MJD-OBS between inputFile.MJD-OBS - 1 and inputFile.MJD-OBS;
  minRet = 1; maxRet = 1;
  select file as PREFER from calibFiles where PRO.CATG == "PREFER"
    and MJD-OBS tryBetween inputFile.MJD-OBS - 7 and inputFile.MJD-OBS;
  minRet = 1; maxRet = 1;
  select file as NEAREST from calibFiles where PRO.CATG == "NEAREST";
  minRet = 0; maxRet = 1;
  select file as NOUSER from calibFiles where PRO.CATG == "NOUSER" and USERTBL is undefined;
  recipe sci;
}
action DARKS
{
  recipe dark;
  product MASTER_DARK { PRO.CATG = "MASTER_DARK"; PRO.EXT = "0000.fits"; }
}
'''
T0 = 60100.0  # MJD-OBS of the science frame


def _sci(n=1, nexp=None, exptime=None, mjd=T0, tpl="2024-01-01T01:00:00"):
    out = {}
    for i in range(n):
        h = {"INSTRUME": "X", "ESO DPR CATG": "SCIENCE", "ESO DPR TYPE": "OBJECT",
             "MJD-OBS": mjd + i * 0.001, "ESO TPL START": tpl, "ESO TPL EXPNO": i + 1,
             "DATE-OBS": "2024-01-01T01:00:00.000", "ARCFILE": f"X.{tpl}.{i}.fits"}
        if nexp is not None:
            h["ESO TPL NEXP"] = nexp
        if exptime is not None:
            h["EXPTIME"] = exptime
        out[f"/raw/sci{i + 1}.fits"] = h
    return out


def _cal(name, catg, mjd, **extra):
    return {f"/cal/{name}.fits": {"ESO PRO CATG": catg, "MJD-OBS": mjd, **extra}}


def _pool(rules, *cals, time_match="MJD-OBS_MOD"):
    headers = {}
    for c in cals:
        headers.update(c)
    return FramePool.from_headers(rules, headers, time_match=time_match)


@pytest.fixture(scope="module")
def rules():
    return parse_rules(RULES, "fid.oca")


def _base_cals():
    return [_cal("window", "WINDOW", T0 - 1), _cal("inrange", "INRANGE", T0 - 0.5),
            _cal("prefer", "PREFER", T0 - 2), _cal("nearest", "NEAREST", T0)]


def test_arithmetic_time_window(rules):
    # window: T0-3 < MJD-OBS < T0+3 (strict). w_out, exactly 3 d before, is rejected although
    # it is as near as w_in, 2.9 d after; alone, it leaves the tag unfilled.
    pool = _pool(rules, _cal("w_out", "WINDOW", T0 - 3.0), _cal("w_in", "WINDOW", T0 + 2.9),
                 *_base_cals()[1:])
    (ab,) = build_abs(rules, _sci(), pool, actions=["SCI"])
    assert ab.calibs["WINDOW"] == [Path("/cal/w_in.fits")]
    pool = _pool(rules, _cal("w_out", "WINDOW", T0 - 3.0), *_base_cals()[1:])
    (ab,) = build_abs(rules, _sci(), pool, actions=["SCI"])
    assert "WINDOW" in ab.missing and not ab.complete
    assert "rejected by 'MJD-OBS > inputFile.MJD-OBS - 3'" in ab.missing["WINDOW"]


def test_between_edges_are_included(rules):
    # INRANGE: T0-1 <= MJD-OBS <= T0; exactly T0-1 qualifies, T0+0.0001 does not
    for mjd, ok in ((T0 - 1, True), (T0, True), (T0 - 1.0001, False), (T0 + 0.0001, False)):
        pool = _pool(rules, _cal("window", "WINDOW", T0), _cal("r", "INRANGE", mjd),
                     _cal("prefer", "PREFER", T0 - 2), _cal("nearest", "NEAREST", T0))
        (ab,) = build_abs(rules, _sci(), pool, actions=["SCI"], time_match="MJD-OBS")
        assert ("INRANGE" in ab.calibs) is ok, mjd


def test_try_between_prefers_the_range_and_falls_back_to_the_nearest(rules):
    base = [_cal("window", "WINDOW", T0), _cal("inrange", "INRANGE", T0),
            _cal("nearest", "NEAREST", T0)]
    # one 6 d before (in range) and one 0.1 d after (nearer, out of range): the range wins
    pool = _pool(rules, *base, _cal("p_before", "PREFER", T0 - 6), _cal("p_after", "PREFER", T0 + 0.1))
    (ab,) = build_abs(rules, _sci(), pool, actions=["SCI"])
    assert ab.calibs["PREFER"] == [Path("/cal/p_before.fits")] and not ab.notes
    # nothing in range: the nearest outside is taken, the AB stays complete and says so
    pool = _pool(rules, *base, _cal("p_old", "PREFER", T0 - 8), _cal("p_after", "PREFER", T0 + 0.1))
    (ab,) = build_abs(rules, _sci(), pool, actions=["SCI"])
    assert ab.calibs["PREFER"] == [Path("/cal/p_after.fits")] and ab.complete
    assert ab.notes == [("PREFER: no candidate within MJD-OBS tryBetween inputFile.MJD-OBS - 7 "
                         "and inputFile.MJD-OBS; the nearest outside taken")]


def test_undefined_keyword_in_association(rules):
    pool = _pool(rules, *_base_cals(), _cal("user", "NOUSER", T0, USERTBL="mine"),
                 _cal("plain", "NOUSER", T0 - 5))
    (ab,) = build_abs(rules, _sci(), pool, actions=["SCI"])
    # the nearer one has USERTBL: "USERTBL is undefined" rejects it
    assert ab.calibs["NOUSER"] == [Path("/cal/plain.fits")]


def test_mjd_obs_mod_chooses_another_calibration_than_mjd_obs(rules):
    # science starts at T0 and lasts 3600 s: middle T0 + 0.02083 d.
    # NEAREST candidates: 0.010 d before the start, 0.012 d after it.
    cals = [*_base_cals()[:3], _cal("n_before", "NEAREST", T0 - 0.010),
            _cal("n_after", "NEAREST", T0 + 0.012)]
    sci = _sci(exptime=3600.0)
    # MJD-OBS: |−0.010| < |0.012| → before; MJD-OBS_MOD: |−0.0308| > |−0.0088| → after
    (by_start,) = build_abs(rules, sci, _pool(rules, *cals, time_match="MJD-OBS"), actions=["SCI"])
    (by_middle,) = build_abs(rules, sci, _pool(rules, *cals), actions=["SCI"])
    assert by_start.calibs["NEAREST"] == [Path("/cal/n_before.fits")]
    assert by_middle.calibs["NEAREST"] == [Path("/cal/n_after.fits")]
    assert by_middle.time_match == "MJD-OBS_MOD"
    # build_abs can override the pool's choice
    (again,) = build_abs(rules, sci, _pool(rules, *cals), actions=["SCI"], time_match="MJD-OBS")
    assert again.calibs["NEAREST"] == [Path("/cal/n_before.fits")]


def test_template_missing_exposures_is_incomplete(rules):
    pool = _pool(rules, *_base_cals())
    files = _sci(n=5, nexp=5)
    del files["/raw/sci4.fits"], files["/raw/sci5.fits"]
    (ab,) = build_abs(rules, files, pool, actions=["SCI"])
    assert not ab.complete and ab.completeness == "INCOMPLETE"
    assert ab.missing == {"(template)": "template TPL.START=2024-01-01T01:00:00: 3 of TPL.NEXP=5 "
                                        "exposures (missing TPL.EXPNO 4, 5)"}
    (ab,) = build_abs(rules, _sci(n=5, nexp=5), pool, actions=["SCI"])
    assert ab.complete
    # one file per quadrant and exposure (VIMOS): exposures are counted by TPL.EXPNO
    quads = {}
    for q in range(4):
        for path, h in _sci(n=2, nexp=2).items():
            quads[path.replace(".fits", f"_q{q}.fits")] = dict(h)
    (ab,) = build_abs(rules, quads, pool, actions=["SCI"])
    assert ab.complete and len(ab.raw) == 8


def test_pro_catg_fallback_for_unclassified_products(rules):
    got = classify(rules, {"p.fits": {"ESO PRO CATG": "MASTER_FLAT"}, "u.fits": {"X": 1},
                           "d.fits": {"ESO DPR CATG": "CALIB", "ESO DPR TYPE": "DARK",
                                      "ESO PRO CATG": "IGNORED"}})
    assert got[Path("p.fits")].category == "MASTER_FLAT" and got[Path("p.fits")].values == {}
    assert got[Path("u.fits")].category == "UNCLASSIFIED"
    assert got[Path("d.fits")].category == "DARK"  # a rule's value wins


def test_virtual_calibration_from_a_product_of_the_run():
    rules = parse_rules(RULES.replace('select file as NEAREST from calibFiles where PRO.CATG == "NEAREST";',
                                      'select file as MASTER_DARK from calibFiles where PRO.CATG == "MASTER_DARK";'),
                        "virt.oca")
    darks = {f"/raw/dark{i}.fits": {"ESO DPR CATG": "CALIB", "ESO DPR TYPE": "DARK",
                                    "MJD-OBS": T0 - 0.5 + i * 0.001, "ESO TPL START": "D",
                                    "ARCFILE": f"X.DARK.{i}.fits"} for i in range(2)}
    pool = _pool(rules, *_base_cals()[:3])
    raw = {**darks, **_sci()}
    (plain,) = build_abs(rules, raw, pool, actions=["SCI"])
    assert "MASTER_DARK" in plain.missing and not plain.virtual
    dark_ab, sci_ab = build_abs(rules, raw, pool, actions=["SCI"], virtual=True, vcal_dir="/vcal")
    assert dark_ab.action == "DARKS" and sci_ab.action == "SCI"  # producer first
    assert sci_ab.complete and "MASTER_DARK" not in sci_ab.calibs
    assert sci_ab.virtual == {"MASTER_DARK": [(Path("/vcal/r.X.DARK.0_0000.fits"), "X.DARK.0")]}

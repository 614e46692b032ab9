"""AB files in the DFOS layout (AB_structure.html): a golden file, and read back."""

from __future__ import annotations

from pathlib import Path

from shared.oca import FramePool, build_abs, format_ab, parse_rules, read_ab, write_ab

GOLDEN = Path(__file__).parent / "golden"

RULES = '''
if DPR.CATG == "SCIENCE" and DPR.TECH like "%PRE%" then { DO.CATG = "IMG_PREIMAGING"; }
if DPR.CATG == "CALIB" and DPR.TYPE == "DARK" then { DO.CATG = "DARK"; }
select execute(SCI) from inputFiles where SIG.TEMPLATE == 1 and DO.CATG == "IMG_PREIMAGING"
  group by INS.GRAT.NAME,DET.DIT as (TPL_A,tpl);
select execute(DARKS) from inputFiles where SIG.TEMPLATE == 1 and DO.CATG == "DARK";
action SCI
{
  minRet = 1; maxRet = 1;
  select file as MASTER_BIAS from calibFiles where PRO.CATG == "MASTER_BIAS";
  minRet = 1; maxRet = 1;
  select file as MASTER_DARK from calibFiles where PRO.CATG == "MASTER_DARK";
  minRet = 1; maxRet = 1;
  select file as MASTER_FLAT from calibFiles where PRO.CATG == "MASTER_FLAT"
    and inputFile.INS.FILT1.NAME == INS.FILT1.NAME;
  recipe pre_science { "--stack=median"; }
}
action DARKS
{
  recipe make_dark;
  product MASTER_DARK { PRO.CATG = "MASTER_DARK"; PRO.EXT = "0000.fits"; }
}
tagmap { IMG_PREIMAGING = "OBJECT"; }
'''


def _raw():
    sci = {f"/data/raw/INST.2024-03-05T01:0{i}:00.000.fits": {
        "INSTRUME": "INST", "ESO DPR CATG": "SCIENCE", "ESO DPR TECH": "IMAGE,PRE",
        "ESO DPR TYPE": "OBJECT", "ESO INS GRAT NAME": "HR", "ESO DET DIT": 10.0,
        "ESO INS FILT1 NAME": "R", "ESO OBS PROG ID": "112.A-0001(A)", "ESO OBS ID": 200123,
        "ESO TPL START": "2024-03-05T01:00:00", "ESO TPL NEXP": 2, "ESO TPL EXPNO": i + 1,
        "MJD-OBS": 60374.04166667 + i * 0.0007, "EXPTIME": 60.0,
        "DATE-OBS": f"2024-03-05T01:0{i}:00.000",
        "ARCFILE": f"INST.2024-03-05T01:0{i}:00.000.fits"} for i in range(2)}
    darks = {f"/data/raw/INST.2024-03-04T20:0{i}:00.000.fits": {
        "INSTRUME": "INST", "ESO DPR CATG": "CALIB", "ESO DPR TYPE": "DARK",
        "ESO TPL START": "2024-03-04T20:00:00", "MJD-OBS": 60373.83333333 + i * 0.0007,
        "DATE-OBS": f"2024-03-04T20:0{i}:00.000",
        "ARCFILE": f"INST.2024-03-04T20:0{i}:00.000.fits"} for i in range(2)}
    return {**darks, **sci}


def _pool(rules):
    return FramePool.from_headers(rules, {
        "/data/cal/bias.fits": {"ESO PRO CATG": "MASTER_BIAS", "MJD-OBS": 60373.5},
        "/data/cal/flat_I.fits": {"ESO PRO CATG": "MASTER_FLAT", "ESO INS FILT1 NAME": "I",
                                  "MJD-OBS": 60374.0},
    })


def _abs():
    rules = parse_rules(RULES, "/cfg/inst.oca")
    return build_abs(rules, _raw(), _pool(rules), actions=["SCI"], virtual=True,
                     vcal_dir="/data/cal/VCAL", batch_id="SCIENCE_2024-03-04")


def test_ab_golden_dfos_layout():
    dark_ab, sci_ab = _abs()
    assert (dark_ab.action, sci_ab.action) == ("DARKS", "SCI")
    text = format_ab(sci_ab, prod_path="/data/sci/run1")
    golden = (GOLDEN / "INST.2024-03-05T01:00:00.000_tpl.ab").read_text()
    # the CONFIG_VERSION digest depends on the rule text above; the rest is DFOS layout
    assert text.replace(sci_ab.config_version, "<config>") == golden
    assert format_ab(dark_ab).splitlines()[1:3] == [
        "TOOL_VERSION     preimg-oca 2", f"CONFIG_VERSION   {dark_ab.config_version}"]


def test_ab_round_trip(tmp_path):
    _, ab = _abs()
    path = write_ab(ab, tmp_path, prod_path="/data/sci/run1")
    back = read_ab(path)
    assert back["AB_NAME"] == f"{ab.name}.ab" and back["PROD_ROOT_NAME"] == ab.name
    assert back["CONFIG_VERSION"] == ab.config_version.strip()
    assert back["CONFIG_VERSION"].startswith("inst.oca sha1:")
    assert back["BATCH_ID"] == "SCIENCE_2024-03-04" and back["OBS_MODE"] == "SM"
    assert back["COMPLETENESS"] == ab.completeness == "INCOMPLETE"
    assert back["MJD-OBS"] == "60374.04166667"
    assert back["MJD-OBS_MOD"] == "60374.04201389"  # + 60 s / 2
    assert back["PROD_PATH"] == "/data/sci/run1"
    assert back["match_keys"] == {"INS_GRAT_NAME": "HR", "DET_DIT": "10.0"}
    assert back["RAWFILE"] == [(str(p), t) for p, t in ab.raw]
    assert back["MCALIB"] == [(str(p), t) for t, ps in ab.calibs.items() for p in ps]
    assert back["MCALIB_VIRTUAL"] == [(str(p), t) for t, vs in ab.virtual.items() for p, _ in vs]
    assert back["RECIPE_PARAM"] == list(ab.recipe_options)
    assert back["MISSING"] == [f"{t} {r}" for t, r in ab.missing.items()]
    assert back["ACTION"] == "SCI" and back["TIME_MATCH"] == "MJD-OBS_MOD"
    # what was written, written again, is the same text
    assert path.read_text() == format_ab(ab, prod_path="/data/sci/run1")


def test_reads_the_earlier_preimg_layout(tmp_path):
    old = tmp_path / "old.ab"
    old.write_text(
        "# Association Block X, created by preimg from the OCA rules\n"
        "TOOL_VERSION     preimg-oca 1\nCONFIG_VERSION\nINSTRUMENT       HAWKI\n"
        "ACTION           SCIENCE_FRAMES\nCOMPLETENESS     COMPLETE\n"
        "OCA_RULE         hawki_overlay.oca:37\nRAW_MATCH_KEY    INS.FILT1.NAME=J\n"
        "RAWFILE          /raw/a.fits OBJECT\nMCALIB           /cal/d.fits MASTER_DARK\n")
    back = read_ab(old)
    assert back["CONFIG_VERSION"] == "" and back["ACTION"] == "SCIENCE_FRAMES"
    assert back["match_keys"] == {"INS.FILT1.NAME": "J"}
    assert back["RAWFILE"] == [("/raw/a.fits", "OBJECT")]
    assert back["MCALIB"] == [("/cal/d.fits", "MASTER_DARK")] and back["MCALIB_VIRTUAL"] == []

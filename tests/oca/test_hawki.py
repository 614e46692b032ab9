"""HAWK-I: classification, grouping and association by hawki.oca (+ the preimg overlay).

Expected values are worked out by hand from Debian's hawki.oca (cpl-plugin-hawki
2.4.11); each assertion names the rule line that gives it.
"""

from __future__ import annotations

from pathlib import Path

from shared.oca import FramePool, build_abs, classify, read_ab, write_ab, write_sof

SCIENCE = {
    "INSTRUME": "HAWKI", "DPR.CATG": "SCIENCE", "DPR.TECH": "IMAGE", "DPR.TYPE": "OBJECT",
    "DET.DIT": 10.0, "DET.NDIT": 6, "DET.NCORRS.NAME": "Double",
    "INS.FILT1.NAME": "J", "INS.FILT2.NAME": "OPEN",
}


def _frames(prefix, base, n, mjd0, tpl_start, **extra):
    out = {}
    for i in range(n):
        h = dict(base, **extra)
        h.update({"MJD-OBS": mjd0 + i * 0.001, "TPL.START": tpl_start, "TPL.EXPNO": i + 1,
                  "TPL.NEXP": n, "DATE-OBS": f"{tpl_start[:17]}{10 + i:02d}.000",
                  "ARCFILE": f"HAWKI.{tpl_start[:17]}{10 + i:02d}.000.fits"})
        out[f"/raw/{prefix}{i + 1}.fits"] = {
            (("HIERARCH ESO " + k.replace(".", " ")) if "." in k else k): v for k, v in h.items()}
    return out


def _calib(**cards):
    return {(("ESO " + k.replace(".", " ")) if "." in k else k): v for k, v in cards.items()}


def _pool(rules):
    cal = {
        # two MASTER_DARKs with DIT 10 (0.6 d and 0.1 d before the science), one with DIT 20
        # closest of all in time
        "/cal/dark10_old.fits": _calib(INSTRUME="HAWKI", **{"PRO.CATG": "MASTER_DARK",
                                        "DET.DIT": 10.0, "MJD-OBS": 60309.5}),
        "/cal/dark10_new.fits": _calib(INSTRUME="HAWKI", **{"PRO.CATG": "MASTER_DARK",
                                        "DET.DIT": 10.0, "MJD-OBS": 60310.0}),
        "/cal/dark20.fits": _calib(INSTRUME="HAWKI", **{"PRO.CATG": "MASTER_DARK",
                                   "DET.DIT": 20.0, "MJD-OBS": 60310.1}),
        "/cal/flat_J.fits": _calib(**{"PRO.CATG": "MASTER_TWILIGHT_FLAT", "MJD-OBS": 60309.0,
                                      "DET.NCORRS.NAME": "Double", "INS.FILT1.NAME": "J",
                                      "INS.FILT2.NAME": "OPEN"}),
        "/cal/conf_J.fits": _calib(**{"PRO.CATG": "MASTER_CONF", "MJD-OBS": 60309.0,
                                      "DET.NCORRS.NAME": "Double", "INS.FILT1.NAME": "J",
                                      "INS.FILT2.NAME": "OPEN"}),
    }
    for catg in ("MASTER_READGAIN", "PHOTCAL_TAB", "MASTER_LOCAL_CATALOGUE_ASTROM",
                 "MASTER_LOCAL_CATALOGUE_PHOTOM", "SCHLEGEL_MAP_NORTH", "SCHLEGEL_MAP_SOUTH"):
        cal[f"/cal/{catg.lower()}.fits"] = _calib(**{"PRO.CATG": catg})
    return FramePool.from_headers(rules, cal)


def _one(result):
    (value,) = result.values()
    return value


def test_classification_shipped(hawki_shipped):
    plain = _frames("obj", SCIENCE, 1, 60310.1, "2024-01-02T03:00:00")
    pre = _frames("pre", SCIENCE, 1, 60310.2, "2024-01-02T04:00:00", **{"DPR.TECH": "IMAGE,PRE"})
    got = classify(hawki_shipped, {**plain, **pre})
    # hawki.oca:33 (DPR.TECH like %IMAGE%) gives JITTER_OBS, hawki.oca:53 (DPR.TECH == "IMAGE")
    # then gives OBJECT: the last match wins
    c = got[Path("/raw/obj1.fits")]
    assert c.values == {"DO.CATG": "OBJECT"}
    assert c.rule_lines == {"DO.CATG": "hawki.oca:53"}
    # IMAGE,PRE is not == "IMAGE": only hawki.oca:33 matches, so JITTER_OBS, which no
    # organisation rule selects
    c = got[Path("/raw/pre1.fits")]
    assert (c.category, c.rule_lines["DO.CATG"]) == ("JITTER_OBS", "hawki.oca:33")


def test_classification_of_calibrations_and_unknowns(hawki_rules):
    got = classify(hawki_rules, {
        "dark.fits": {"INSTRUME": "HAWKI", "ESO DPR CATG": "CALIB", "ESO DPR TECH": "IMAGE",
                      "ESO DPR TYPE": "DARK"},
        "flat.fits": {"INSTRUME": "HAWKI", "ESO DPR CATG": "CALIB", "ESO DPR TECH": "IMAGE",
                      "ESO DPR TYPE": "FLAT,TWILIGHT"},
        "mdark.fits": {"INSTRUME": "HAWKI", "ESO PRO CATG": "MASTER_DARK"},
        "cat.fits": {"ESO PRO CATG": "MASTER_LOCAL_CATALOGUE_ASTROM"},
        "other.fits": {"INSTRUME": "HAWKI", "ESO DPR CATG": "OTHER"},
    })
    lines = {p.name: (c.category, c.rule_lines.get("DO.CATG")) for p, c in got.items()}
    assert lines == {
        "dark.fits": ("DARK", "hawki.oca:41"),
        "flat.fits": ("FLAT_TWILIGHT", "hawki.oca:45"),
        "mdark.fits": ("MASTER_DARK", "hawki.oca:169"),
        "cat.fits": ("MASTER_LOCAL_CATALOGUE_ASTROM", "hawki_overlay.oca:23"),
        "other.fits": ("UNCLASSIFIED", None),
    }


def test_preimaging_classified_by_overlay(hawki_rules):
    pre = _frames("pre", SCIENCE, 1, 60310.2, "2024-01-02T04:00:00", **{"DPR.TECH": "IMAGE,PRE"})
    c = _one(classify(hawki_rules, pre))
    # hawki.oca:33 gives JITTER_OBS, then hawki_overlay.oca:10 (DPR.TECH like %PRE%) wins
    assert (c.category, c.rule_lines["DO.CATG"]) == ("IMG_PREIMAGING", "hawki_overlay.oca:10")
    sky = _frames("sky", SCIENCE, 1, 60310.2, "2024-01-02T04:00:00",
                  **{"DPR.TECH": "IMAGE,PRE", "DPR.TYPE": "SKY"})
    c = _one(classify(hawki_rules, sky))
    # hawki.oca:37 gives JITTER_SKY, hawki_overlay.oca:16 makes it SKY like hawki.oca:57
    assert (c.category, c.rule_lines["DO.CATG"]) == ("SKY", "hawki_overlay.oca:16")


def test_wrong_type_is_reported_and_other_files_classified(hawki_rules):
    bad = _frames("bad", SCIENCE, 1, 60310.0, "2024-01-02T01:00:00", **{"DPR.CATG": 5})
    good = _frames("good", SCIENCE, 1, 60310.1, "2024-01-02T02:00:00")
    got = classify(hawki_rules, {**bad, **good})
    errors = got[Path("/raw/bad1.fits")].errors
    # hawki.oca:1 is the first rule reading DPR.CATG (like "%ACQUISITION%")
    assert errors[0].startswith("/raw/bad1.fits: rule hawki.oca:1: keyword DPR.CATG = 5.0")
    assert "'like' needs a string" in errors[0]
    assert got[Path("/raw/good1.fits")].category == "OBJECT"
    assert not got[Path("/raw/good1.fits")].errors


def test_grouping_templates_and_keys(hawki_rules, hawki_shipped):
    darks = _frames("dark", {"INSTRUME": "HAWKI", "DPR.CATG": "CALIB", "DPR.TECH": "IMAGE",
                             "DPR.TYPE": "DARK", "DET.NCORRS.NAME": "Double", "DET.NDIT": 1},
                    4, 60309.9, "2024-01-01T20:00:00")
    for i, path in enumerate(sorted(darks)):  # DIT 10, 10, 20, 20 in one template
        darks[path]["HIERARCH ESO DET DIT"] = 10.0 if i < 2 else 20.0
    sci = _frames("obj", SCIENCE, 3, 60310.1, "2024-01-02T03:00:00", **{"OBS.START": "O1"})
    pre = _frames("pre", SCIENCE, 2, 60310.2, "2024-01-02T04:00:00",
                  **{"DPR.TECH": "IMAGE,PRE", "OBS.START": "O2", "INS.FILT1.NAME": "H"})
    raw = {**darks, **sci, **pre}

    abs_ = build_abs(hawki_rules, raw)
    summary = [(ab.action, ab.rule, [p.name for p, _ in ab.raw]) for ab in abs_]
    assert summary == [
        # hawki.oca:371: SIG.TEMPLATE, group by DET.NCORRS.NAME,DET.DIT,DET.NDIT: one AB per DIT
        ("DARKS", "hawki.oca:371", ["dark1.fits", "dark2.fits"]),
        ("DARKS", "hawki.oca:371", ["dark3.fits", "dark4.fits"]),
        # hawki_overlay.oca:35 = hawki.oca:379 (LF.DO.CATG == "OBJECT"): the template
        ("SCIENCE_FRAMES", "hawki_overlay.oca:35", ["obj1.fits", "obj2.fits", "obj3.fits"]),
        # hawki_overlay.oca:37: pre-imaging template, raw tag OBJECT through the tagmap
        ("SCIENCE_FRAMES", "hawki_overlay.oca:37", ["pre1.fits", "pre2.fits"]),
    ]
    assert abs_[3].raw[0][1] == "OBJECT" and abs_[3].event == "TPL_A"
    assert abs_[3].name == "HAWKI.2024-01-02T04:00:10.000_tpl"
    assert abs_[0].recipe == "hawki_dark_combine" and abs_[2].recipe == "hawki_science_process"
    # the shipped rules alone make no AB of the pre-imaging frames (JITTER_OBS)
    shipped = build_abs(hawki_shipped, raw)
    assert [ab.action for ab in shipped] == ["DARKS", "DARKS", "SCIENCE_FRAMES"]
    # processPreImg: SCIENCE only
    assert [ab.action for ab in build_abs(hawki_rules, raw, actions=["SCIENCE_FRAMES"])] == [
        "SCIENCE_FRAMES", "SCIENCE_FRAMES"]


def test_association_closest_in_time_and_incomplete(hawki_rules, tmp_path):
    sci = _frames("obj", SCIENCE, 2, 60310.2, "2024-01-02T03:00:00", **{"OBS.START": "O1"})
    pre = _frames("pre", SCIENCE, 2, 60310.3, "2024-01-02T04:00:00",
                  **{"DPR.TECH": "IMAGE,PRE", "OBS.START": "O2", "INS.FILT1.NAME": "H"})
    pool = _pool(hawki_rules)
    complete, incomplete = build_abs(hawki_rules, {**sci, **pre}, pool)

    # MASTER_DARK: inputFile.DET.DIT == DET.DIT keeps dark10_old/new; maxRet=1 takes the one
    # closest in time (0.2 d before rather than 0.7 d); dark20 is nearer but has DIT 20
    assert complete.calibs["MASTER_DARK"] == [Path("/cal/dark10_new.fits")]
    assert complete.calibs["MASTER_TWILIGHT_FLAT"] == [Path("/cal/flat_J.fits")]
    assert complete.complete and not complete.missing
    assert list(complete.calibs) == [
        "MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_READGAIN", "PHOTCAL_TAB",
        "MASTER_LOCAL_CATALOGUE_ASTROM", "MASTER_LOCAL_CATALOGUE_PHOTOM",
        "SCHLEGEL_MAP_NORTH", "SCHLEGEL_MAP_SOUTH"]

    # H-band pre-imaging: the only flat/conf are J, rejected by the filter condition
    assert not incomplete.complete
    assert set(incomplete.missing) == {"MASTER_TWILIGHT_FLAT", "MASTER_CONF"}
    reason = incomplete.missing["MASTER_TWILIGHT_FLAT"]
    assert "flat_J.fits rejected by 'inputFile.INS.FILT1.NAME == INS.FILT1.NAME'" in reason
    assert "inputFile.INS.FILT1.NAME='H'" in reason and "INS.FILT1.NAME='J'" in reason

    sof = write_sof(complete, tmp_path / "c.sof").read_text().splitlines()
    assert sof[:3] == ["/raw/obj1.fits OBJECT", "/raw/obj2.fits OBJECT",
                       "/cal/dark10_new.fits MASTER_DARK"]
    assert len(sof) == 2 + 9
    ab_path = write_ab(incomplete, tmp_path, config_version="hawki.oca+hawki_overlay.oca")
    assert ab_path.name == "HAWKI.2024-01-02T04:00:10.000_tpl.ab"
    ab = read_ab(ab_path)
    assert ab["COMPLETENESS"] == "INCOMPLETE" and ab["RECIPE"] == "hawki_science_process"
    assert ab["INSTRUMENT"] == "HAWKI" and ab["DATE"] == "2024-01-01"  # night starts at noon
    assert ab["RAWFILE"] == [("/raw/pre1.fits", "OBJECT"), ("/raw/pre2.fits", "OBJECT")]
    assert ("/cal/dark10_new.fits", "MASTER_DARK") in ab["MCALIB"]
    assert any(m.startswith("MASTER_CONF ") for m in ab["MISSING"])
    # DFOS writes RAW_MATCH_KEY names with underscores (INS_GRAT_NAME=HR), not dots
    assert "INS_FILT1_NAME=H" in ab["RAW_MATCH_KEY"]
    assert ab["match_keys"]["INS_FILT1_NAME"] == "H"
    # CONFIG_VERSION names the rule set (given here) and BATCH_ID/OBS_MODE are DFOS fields
    assert ab["CONFIG_VERSION"] == "hawki.oca+hawki_overlay.oca"
    assert ab["OBS_MODE"] == "SM" and ab["BATCH_ID"] == ""


def test_missing_tag_with_no_candidate_at_all(hawki_rules):
    sci = _frames("obj", SCIENCE, 1, 60310.2, "2024-01-02T03:00:00")
    (ab,) = build_abs(hawki_rules, sci, FramePool())
    assert ab.missing["MASTER_DARK"] == "no file with PRO.CATG == 'MASTER_DARK' in calibFiles"
    assert len(ab.missing) == 9

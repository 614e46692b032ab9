"""VIMOS: vimos.oca's pre-imaging classification and the overlay for vimos_ima_*.

Expected values are worked out by hand from Debian's vimos.oca (cpl-plugin-vimos
4.1.7); each assertion names the rule line that gives it.
"""

from __future__ import annotations

from pathlib import Path

from shared.oca import FramePool, build_abs, classify

CHIPS = ("BRIAN", "Keith", "Tom", "DAVID")


def _quadrants(prefix, mjd, tpl_start, tech="IMAGE,PRE", filt="R", exposures=1):
    """One file per quadrant and exposure, as VIMOS writes them (ESOREX.md 4.1)."""
    out = {}
    for e in range(exposures):
        for q, chip in enumerate(CHIPS, start=1):
            out[f"/raw/{prefix}_{e + 1}_q{q}.fits"] = {
                "INSTRUME": "VIMOS", "ESO DPR CATG": "SCIENCE", "ESO DPR TYPE": "OBJECT",
                "ESO DPR TECH": tech, "ESO DET CHIP1 ID": chip, "ESO OCS CON QUAD": q,
                f"ESO INS FILT{q} NAME": filt, "ESO TPL START": tpl_start,
                "ESO TPL EXPNO": e + 1, "MJD-OBS": mjd + e * 0.01,
                "DATE-OBS": f"{tpl_start[:17]}{e:02d}.000",
            }
    return out


def _pool(rules, flat_filters=("R", "I")):
    cal = {
        "/cal/bias.fits": {"INSTRUME": "VIMOS", "ESO PRO CATG": "MASTER_BIAS", "MJD-OBS": 60309.0},
        "/cal/dark.fits": {"INSTRUME": "VIMOS", "ESO PRO CATG": "MASTER_DARK", "MJD-OBS": 60309.0},
    }
    for i, f in enumerate(flat_filters):
        # the I flat is the closer in time: only the ?= filter match rejects it
        for catg in ("MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
            cal[f"/cal/{catg.lower()}_{f}.fits"] = {
                "ESO PRO CATG": catg, "ESO INS FILT1 NAME": f, "MJD-OBS": 60309.0 + i}
    for catg in ("MASTER_READGAIN", "PHOTCAL_TAB", "MASTER_LOCAL_CATALOGUE_ASTROM",
                 "MASTER_LOCAL_CATALOGUE_PHOTOM", "SCHLEGEL_MAP_NORTH", "SCHLEGEL_MAP_SOUTH"):
        cal[f"/cal/{catg.lower()}.fits"] = {"ESO PRO CATG": catg}
    return FramePool.from_headers(rules, cal)


def test_preimaging_classification(vimos_shipped):
    files = {**_quadrants("pre", 60310.1, "2024-01-02T03:00:00"),
             **_quadrants("sci", 60310.2, "2024-01-02T04:00:00", tech="IMAGE")}
    got = classify(vimos_shipped, files)
    pre = got[Path("/raw/pre_1_q1.fits")]
    # vimos.oca:97 (IMG_SCIENCE) matches first, vimos.oca:101 (DPR.TECH like %PRE%) last
    assert pre.values == {"DO.CATG": "IMG_PREIMAGING"}
    assert pre.rule_lines == {"DO.CATG": "vimos.oca:101"}
    sci = got[Path("/raw/sci_1_q3.fits")]
    assert (sci.category, sci.rule_lines["DO.CATG"]) == ("IMG_SCIENCE", "vimos.oca:97")
    flat = classify(vimos_shipped, {"f.fits": {
        "INSTRUME": "VIMOS", "ESO DPR CATG": "CALIB", "ESO DPR TYPE": "FLAT,SKY",
        "ESO DPR TECH": "IMAGE"}})
    # vimos.oca:69
    assert next(iter(flat.values())).rule_lines["DO.CATG"] == "vimos.oca:69"


def test_shipped_rules_make_one_ab_per_quadrant_with_uninstalled_recipe(vimos_shipped):
    files = _quadrants("pre", 60310.1, "2024-01-02T03:00:00")
    abs_ = build_abs(vimos_shipped, files)
    # vimos.oca:340: SIG.FRAME == 1 and DO.CATG == "IMG_PREIMAGING": one AB per file
    assert [(ab.action, ab.recipe, len(ab.raw)) for ab in abs_] == [
        ("vmImPreimaging", "vmimpreimaging", 1)] * 4
    assert abs_[0].raw[0][1] == "IMG_PREIMAGING"
    assert "MASTER_BIAS" in abs_[0].missing


def test_overlay_one_ab_per_template_for_vimos_ima_science(vimos_rules, tmp_path):
    files = {**_quadrants("pre", 60310.1, "2024-01-02T03:00:00", exposures=2),
             **_quadrants("sci", 60310.3, "2024-01-02T05:00:00", tech="IMAGE")}
    abs_ = build_abs(vimos_rules, files, _pool(vimos_rules), actions=["vmImPreimaging"])
    (ab,) = abs_
    # vimos_overlay.oca:48: SIG.TEMPLATE == 1: all 8 quadrant files of the template
    assert ab.rule == "vimos_overlay.oca:48"
    assert ab.recipe == "vimos_ima_science"
    assert [t for _, t in ab.raw] == ["OBJECT"] * 8  # tagmap IMG_PREIMAGING → OBJECT
    assert ab.complete, ab.missing
    # the R flat is chosen: inputFile (pre_1_q1) has INS.FILT1.NAME R; the I flat is rejected
    # by inputFile.INS.FILT1.NAME ?= INS.FILT1.NAME
    assert ab.calibs["MASTER_TWILIGHT_FLAT"] == [Path("/cal/master_twilight_flat_R.fits")]
    assert ab.calibs["MASTER_CONF"] == [Path("/cal/master_conf_R.fits")]
    assert set(ab.calibs) == {
        "MASTER_BIAS", "MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_READGAIN",
        "PHOTCAL_TAB", "MASTER_LOCAL_CATALOGUE_ASTROM", "MASTER_LOCAL_CATALOGUE_PHOTOM",
        "SCHLEGEL_MAP_NORTH", "SCHLEGEL_MAP_SOUTH"}


def test_maybe_equal_lets_other_quadrants_match(vimos_rules):
    # A flat carrying only INS.FILT3.NAME (another quadrant's keyword) matches: ?= is true
    # when the keyword is missing on either side.
    files = _quadrants("pre", 60310.1, "2024-01-02T03:00:00")
    pool = _pool(vimos_rules, flat_filters=())
    pool.add(next(iter(FramePool.from_headers(vimos_rules, {"/cal/flat_q3.fits": {
        "ESO PRO CATG": "MASTER_TWILIGHT_FLAT", "ESO INS FILT3 NAME": "I"}}).records)))
    (ab,) = build_abs(vimos_rules, files, pool, actions=["vmImPreimaging"])
    assert ab.calibs["MASTER_TWILIGHT_FLAT"] == [Path("/cal/flat_q3.fits")]
    assert set(ab.missing) == {"MASTER_CONF"}
    assert ab.missing["MASTER_CONF"] == (
        "no file with DO.CATG == 'MASTER_CONF' in calibFiles")


def test_sky_flats_get_the_installed_recipe_and_tag(vimos_rules):
    flats = {f"/raw/flat{i}.fits": {
        "INSTRUME": "VIMOS", "ESO DPR CATG": "CALIB", "ESO DPR TYPE": "FLAT,SKY",
        "ESO DPR TECH": "IMAGE", "ESO TPL START": "2024-01-01T23:00:00", "MJD-OBS": 60310.0 + i,
    } for i in range(3)}
    (ab,) = build_abs(vimos_rules, flats, _pool(vimos_rules))
    # vimos.oca:352 (vmImFlatSky, SIG.TEMPLATE) with the overlay's action
    assert (ab.action, ab.recipe) == ("vmImFlatSky", "vimos_ima_twilight_flat")
    assert ab.rule == "vimos.oca:352"
    assert {t for _, t in ab.raw} == {"FLAT_TWILIGHT"}
    assert set(ab.calibs) == {"MASTER_BIAS", "MASTER_DARK"} and ab.complete

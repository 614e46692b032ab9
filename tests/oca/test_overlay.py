"""Overlay merge rules: append classification, replace by action name, tag map, drop."""

from __future__ import annotations

from shared.oca import apply_overlay, build_abs, parse_rules

BASE = '''
if DPR.TYPE == "OBJECT" then { DO.CATG = "OBJ"; }
select execute(SCI) from inputFiles where SIG.FRAME == 1 and DO.CATG == "OBJ";
select execute(OLD) from inputFiles where SIG.FRAME == 1 and DO.CATG == "OBJ";
action SCI { recipe old_recipe; }
action OLD { recipe gone; }
'''
OVERLAY = '''
if DPR.TYPE == "OBJECT" and DPR.TECH like "%PRE%" then { DO.CATG = "PRE"; }
select execute(SCI) from inputFiles where SIG.FRAME == 1 and DO.CATG == "PRE";
action SCI { recipe new_recipe { "--x=1 --y=2"; } }
action NEW { recipe added; }
tagmap { PRE = "OBJECT"; }
drop action OLD;
'''


def test_overlay_merge():
    rules = apply_overlay(parse_rules(BASE, "base.oca"), parse_rules(OVERLAY, "ov.oca"))
    assert len(rules.classification) == 2
    assert [r.action for r in rules.organisation] == ["SCI"]
    assert rules.organisation[0].source == "ov.oca"
    assert [a.name for a in rules.actions] == ["SCI", "NEW"]
    assert rules.action("SCI").recipe.name == "new_recipe"
    assert rules.sof_tag("PRE") == "OBJECT" and rules.sof_tag("OBJ") == "OBJ"
    headers = {"/r/a.fits": {"ESO DPR TYPE": "OBJECT", "ESO DPR TECH": "IMAGE,PRE",
                             "MJD-OBS": 1.0},
               "/r/b.fits": {"ESO DPR TYPE": "OBJECT", "ESO DPR TECH": "IMAGE", "MJD-OBS": 2.0}}
    (ab,) = build_abs(rules, headers)
    # the overlay's rule wins for a.fits (last match); b.fits (OBJ) is no longer selected
    assert [(str(p), t) for p, t in ab.raw] == [("/r/a.fits", "OBJECT")]
    assert ab.recipe == "new_recipe" and ab.recipe_options == ("--x=1", "--y=2")

"""The indexed association chooses exactly what a full scan of the pool would."""

from __future__ import annotations

import random
from pathlib import Path

from shared.oca import FramePool, build_abs, make_records
from shared.oca.evaluate import compile_expr


def _brute_force(rules, ab, raw_record, pool):
    """Evaluate every select on every calibration and take the nearest by (|dt|, path)."""
    action = rules.action(ab.action)
    chosen = {}
    for sel in action.selects:
        cond = compile_expr(sel.condition)
        ok = [r for r in pool.records if cond(r.values, raw_record.values, None)]
        ok.sort(key=lambda r: (abs(r.mjd - raw_record.mjd), str(r.path)))
        if ok[: sel.max_ret]:
            chosen.setdefault(sel.tag, []).extend(r.path for r in ok[: sel.max_ret])
    return chosen


def test_indexed_choice_equals_full_scan(hawki_rules):
    rng = random.Random(3)
    dits, filters = (5.0, 10.0, 20.0), ("J", "H")
    cal = {}
    for j in range(300):
        catg = ("MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF")[j % 3]
        cal[f"/cal/{j:04d}.fits"] = {
            "INSTRUME": "HAWKI", "ESO PRO CATG": catg,
            # coarse MJDs: many ties, broken by path
            "MJD-OBS": 60000.0 + rng.randrange(40) * 0.25, "ESO DET DIT": rng.choice(dits),
            "ESO DET NCORRS NAME": "Double", "ESO INS FILT1 NAME": rng.choice(filters),
            "ESO INS FILT2 NAME": "OPEN"}
    for catg in ("MASTER_READGAIN", "PHOTCAL_TAB", "SCHLEGEL_MAP_NORTH"):
        cal[f"/cal/{catg}.fits"] = {"ESO PRO CATG": catg, "MJD-OBS": 60001.0}
    pool = FramePool.from_headers(hawki_rules, cal)
    raw = {}
    for i in range(40):
        raw[f"/raw/{i:03d}.fits"] = {
            "INSTRUME": "HAWKI", "ESO DPR CATG": "SCIENCE", "ESO DPR TECH": "IMAGE",
            "ESO DPR TYPE": "OBJECT", "MJD-OBS": 60000.0 + rng.random() * 10,
            "ESO TPL START": f"T{i}", "ESO OBS START": f"O{i}", "ESO DET DIT": rng.choice(dits),
            "ESO DET NDIT": 1, "ESO DET NCORRS NAME": "Double",
            "ESO INS FILT1 NAME": rng.choice(filters), "ESO INS FILT2 NAME": "OPEN"}
    records = make_records(hawki_rules, raw)
    by_path = {r.path: r for r in records}
    abs_ = build_abs(hawki_rules, records, pool)
    assert len(abs_) == 40
    for ab in abs_:
        raw_record = by_path[Path(ab.raw[0][0])]
        assert ab.calibs == _brute_force(hawki_rules, ab, raw_record, pool), ab.name

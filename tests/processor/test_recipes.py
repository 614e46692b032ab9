"""Real esorex, real recipes, synthetic data: successes and each kind of failure.

The HAWK-I runs use the options the processor gets for the default synthetic
set (its profile overlay: background cells small enough for the 128² windows).
QC values are asserted as plausible ranges; that they do not depend on where
the recipe runs is asserted on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import synth
from services.processor import esorex, products
from services.processor.judging import FAILED
from shared.fitsheader import read_keywords
from shared.profiles import load_profile
from tests.faults import truncate_file

pytestmark = pytest.mark.esorex

#: What the processor judges these recipes by: the shipped profiles' checks.
HAWKI_CHECK = load_profile("HAWKI", overlays=[]).recipe_checks["hawki_science_process"]
VIMOS_CHECK = load_profile("VIMOS", overlays=[]).recipe_checks["vimos_ima_science"]


def _qc(result: esorex.RecipeResult, catg: str, key: str) -> list[float]:
    """All values of one QC keyword (all extensions) over the products of one PRO.CATG."""
    values = [v for p in result.products if p.pro_catg == catg
              for k, v in p.qc.items() if k.split(":")[-1] == key]
    assert values, f"no {key} in any {catg} product"
    return values


def _processes_in(workdir: Path) -> list[int]:
    """PIDs of processes whose working directory is ``workdir`` (left-overs of a killed run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == workdir:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# -- successes -------------------------------------------------------------------------


def test_hawki_science_process_succeeds(hawki_cal, hawki_raw, hawki_recipe_dir, hawki_science_options, tmp_path):
    result = esorex.run_recipe(
        "hawki_science_process", synth.science_sof(hawki_raw, hawki_cal), tmp_path / "ab",
        recipe_dir=hawki_recipe_dir, check=HAWKI_CHECK, options=hawki_science_options,
    )

    assert result.ok, result.reason
    assert result.rc == 0 and result.signal is None and result.errors == ()
    assert HAWKI_CHECK.expected_products <= result.product_catgs()
    assert sum(p.pro_catg == "BASIC_CALIBRATED_SCI" for p in result.products) == 3
    assert result.log_path is not None and result.log_path.name == "esorex.log"
    # The instrument's own plugin directory is on the command line (libcasu clash, §6.4).
    assert f"--recipe-dir={hawki_recipe_dir}" in result.argv
    # Plausible QC: the synthetic zero point is 25 mag, pixel scale 0.106".
    assert all(23.5 < v < 26.5 for v in _qc(result, "JITTERED_IMAGE_SCI", "QC MAGZPT"))
    assert all(0.100 < v < 0.112 for v in _qc(result, "JITTERED_IMAGE_SCI", "QC WCS_SCALE"))
    assert all(0 <= v < 0.5 for v in _qc(result, "BASIC_CALIBRATED_SCI", "QC WCS_RMS"))
    assert all(v > 10 for v in _qc(result, "JITTERED_IMAGE_SCI", "QC MAGNZPT"))
    assert _qc(result, "OBJECT_CATALOGUE_JITTERED", "QC IMAGE_SIZE")


def test_hawki_science_process_gives_the_same_results_wherever_it_runs(
        hawki_cal, hawki_raw, hawki_recipe_dir, hawki_science_options, tmp_path):
    # With too few background cells per window the recipe filters its background grid
    # beyond its ends and reads heap garbage: the same frames then gave zero points
    # 25.39 to 25.89 in four working directories, and once a failed run (synth.hawki).
    # The heap layout follows the process's environment: here HOME and the path lengths.
    sof = synth.science_sof(hawki_raw, hawki_cal)
    runs = [esorex.run_recipe("hawki_science_process", sof, workdir, recipe_dir=hawki_recipe_dir,
                              check=HAWKI_CHECK, options=hawki_science_options)
            for workdir in (tmp_path / "a", tmp_path / ("b" * 60) / ("c" * 37))]

    assert all(r.ok for r in runs), [r.reason for r in runs]
    qc = [sorted((p.path.name, sorted(p.qc.items())) for p in r.products) for r in runs]
    assert len(qc[0]) == 12 and any(items for _, items in qc[0])
    assert qc[0] == qc[1]  # every QC value of every product, to the last bit
    assert _qc(runs[0], "JITTERED_IMAGE_SCI", "QC MAGZPT")  # the zero point is among them


def test_vimos_ima_science_succeeds(vimos_cal, vimos_raw, vimos_recipe_dir, tmp_path):
    result = esorex.run_recipe(
        "vimos_ima_science", synth.science_sof(vimos_raw, vimos_cal), tmp_path / "ab",
        recipe_dir=vimos_recipe_dir, check=VIMOS_CHECK,
    )

    assert result.ok, result.reason
    assert VIMOS_CHECK.expected_products <= result.product_catgs()
    # One exposure = four quadrant files = one BASIC_CALIBRATED_SCI with 4 extensions.
    assert sum(p.pro_catg == "BASIC_CALIBRATED_SCI" for p in result.products) == 1
    zp = _qc(result, "JITTERED_IMAGE_SCI", "QC MAGZPT")
    assert len(zp) == 4 and all(25.5 < v < 28.5 for v in zp)  # synthetic ZP 27
    assert all(0.195 < v < 0.215 for v in _qc(result, "JITTERED_IMAGE_SCI", "QC WCS_SCALE"))
    assert all(0 <= v < 0.5 for v in _qc(result, "BASIC_CALIBRATED_SCI", "QC WCS_RMS"))
    exts = {k.split(":")[0] for p in result.products if p.pro_catg == "JITTERED_IMAGE_SCI" for k in p.qc}
    assert exts == set(synth.VIMOS_CHIPS)


def test_products_are_renamed_and_moved(hawki_cal, hawki_raw, hawki_recipe_dir, hawki_science_options, tmp_path):
    result = esorex.run_recipe(
        "hawki_science_process", synth.science_sof(hawki_raw, hawki_cal), tmp_path / "ab",
        recipe_dir=hawki_recipe_dir, check=HAWKI_CHECK, options=hawki_science_options,
    )
    assert result.ok, result.reason

    date_obs = products.first_date_obs(read_keywords(p, ("DATE-OBS",))["DATE-OBS"] for p in hawki_raw)
    moved = products.move_products(result.products, tmp_path / "sci", "HAWKI", date_obs)
    logs = products.move_logs(result.workdir, tmp_path / "logs", "HAWKI.2026-11-20T01:02:03.456.ab_sci")

    names = sorted(p.path.name for p in moved)
    assert f"HAWKI.{date_obs}_jittered_image_sci_0000.fits" in names
    assert [n for n in names if "_basic_calibrated_sci_" in n] == [
        f"HAWKI.{date_obs}_basic_calibrated_sci_{i:04d}.fits" for i in range(3)]
    assert all(p.path.parent == tmp_path / "sci" and p.path.is_file() for p in moved)
    assert len(set(names)) == len(moved) == len(result.products)
    assert set(logs) == {"rblog", "sof", "out"}
    assert not (result.workdir / "esorex.log").exists()  # moved, not copied
    assert "hawki_science_process" in logs["rblog"].read_text()


# -- failures --------------------------------------------------------------------------


def test_truncated_raw_frame_fails_with_reason(hawki_cal, hawki_raw, hawki_recipe_dir, hawki_science_options, tmp_path):
    truncate_file(hawki_raw[1])

    result = esorex.run_recipe(
        "hawki_science_process", synth.science_sof(hawki_raw, hawki_cal), tmp_path / "ab",
        recipe_dir=hawki_recipe_dir, check=HAWKI_CHECK, options=hawki_science_options,
    )

    assert result.status == FAILED
    assert hawki_raw[1].name in result.reason
    assert "expected 4" in result.reason  # "Frame ... has N extensions, expected 4"
    assert result.log_path is not None and result.log_path.is_file()


def test_recipe_killed_by_signal_fails_naming_it(hawki_cal, hawki_raw, hawki_recipe_dir, tmp_path):
    # Background cells larger than the 128-px image make the sky code divide by zero (§3.7).
    result = esorex.run_recipe(
        "hawki_science_process", synth.science_sof(hawki_raw, hawki_cal), tmp_path / "ab",
        recipe_dir=hawki_recipe_dir, options=("--psm_nbsize=256", "--stk_cat_nbsize=256"), check=HAWKI_CHECK,
    )

    assert result.status == FAILED
    assert result.signal == "SIGFPE" and result.rc == -8
    assert "killed by SIGFPE" in result.reason
    assert result.log_path is not None and result.log_path.is_file()


def test_timeout_kills_the_recipe(hawki_cal, hawki_raw, hawki_recipe_dir, tmp_path):
    result = esorex.run_recipe(
        "hawki_science_process", synth.science_sof(hawki_raw, hawki_cal), tmp_path / "ab",
        recipe_dir=hawki_recipe_dir, timeout_s=0.3, check=HAWKI_CHECK,
    )

    assert result.status == FAILED and result.timed_out
    assert "timed out after 0.3 s" in result.reason
    assert result.duration_s < 0.3 + 6  # TERM, then KILL after the grace period at worst
    assert _processes_in(result.workdir) == []


def test_missing_calibration_fails_with_esorex_message(hawki_cal, hawki_raw, hawki_recipe_dir, tmp_path):
    sof = [entry for entry in synth.science_sof(hawki_raw, hawki_cal) if entry[1] != "MASTER_CONF"]

    result = esorex.run_recipe("hawki_science_process", sof, tmp_path / "ab", recipe_dir=hawki_recipe_dir,
                               check=HAWKI_CHECK)

    assert result.status == FAILED and result.rc == 255
    assert "No master confidence map file found" in result.reason


def test_workdir_must_be_fresh(hawki_cal, hawki_raw, hawki_recipe_dir, tmp_path):
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "left-over").write_text("x")
    with pytest.raises(FileExistsError):
        esorex.run_recipe("hawki_science_process", synth.science_sof(hawki_raw, hawki_cal), tmp_path / "ab")

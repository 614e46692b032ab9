"""Synthetic data headers, the calibration cache, ``preimg check``, and the pure helpers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from astropy.io import fits

import synth
from services.cli import main as preimg
from services.processor import esorex, judging, products
from services.processor.products import RecipeProduct
from shared.oca.classify import classify
from shared.oca.parser import parse_file
from shared.profiles import OVERLAY_ENV, ProfileError, RecipeCheck, load_profile
from synth import calibration_set
from tests.faults import truncate_file

#: Keywords the OCA rules of HAWK-I classify, group and associate on.
HAWKI_OCA_KEYS = (
    "INSTRUME", "HIERARCH ESO DPR CATG", "HIERARCH ESO DPR TYPE", "HIERARCH ESO DPR TECH",
    "HIERARCH ESO DET DIT", "HIERARCH ESO DET NDIT", "HIERARCH ESO DET NCORRS NAME",
    "HIERARCH ESO INS FILT1 NAME", "HIERARCH ESO INS FILT2 NAME", "HIERARCH ESO OBS START",
    "HIERARCH ESO TPL START",
)
#: ... and what the recipe reads (ESOREX.md §3.5), plus what reports show.
HAWKI_RECIPE_KEYS = (
    "MJD-OBS", "DATE-OBS", "ARCFILE", "OBJECT", "RA", "DEC", "EXPTIME",
    "HIERARCH ESO DET NDSAMPLES", "HIERARCH ESO TEL AIRM START", "HIERARCH ESO OBS ID",
    "HIERARCH ESO OBS PROG ID", "HIERARCH ESO TPL NEXP", "HIERARCH ESO TPL EXPNO",
)
VIMOS_KEYS = (
    "INSTRUME", "DATE-OBS", "MJD-OBS", "LST", "EXPTIME", "ARCFILE", "HIERARCH ESO DET CHIP1 ID",
    "HIERARCH ESO OCS CON QUAD", "HIERARCH ESO DET READ SPEED", "HIERARCH ESO DET READ CLOCK",
    "HIERARCH ESO DET READ MODE", "HIERARCH ESO DET WIN1 NY", "HIERARCH ESO DET WIN1 BINX",
    "HIERARCH ESO DET WIN1 BINY", "HIERARCH ESO TEL AIRM START", "CRPIX1", "CD1_1",
)


def _rules(instrument: str):
    return parse_file(load_profile(instrument).resolve_rules())


# -- raw frames ---------------------------------------------------------------------------


def test_hawki_raw_frames_carry_what_recipes_and_rules_use(hawki_raw):
    assert len(hawki_raw) == 3
    for path in hawki_raw:
        with fits.open(path) as hdul:
            h = hdul[0].header
            assert path.name == h["ARCFILE"] == f"HAWKI.{h['DATE-OBS']}.fits"
            for key in HAWKI_OCA_KEYS + HAWKI_RECIPE_KEYS:
                assert key in h, key
            assert (h["HIERARCH ESO DPR CATG"], h["HIERARCH ESO DPR TYPE"], h["HIERARCH ESO DPR TECH"]) == (
                "SCIENCE", "OBJECT", "IMAGE,PRE")
            assert hdul[0].data is None and len(hdul) == 5  # PHU + exactly 4 IMAGE extensions
            assert [e.header["EXTNAME"] for e in hdul[1:]] == list(synth.HAWKI_EXTNAMES)
            for ext in hdul[1:]:
                assert ext.data.shape == (128, 128)
                for key in ("CTYPE1", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD2_2", "PV2_1"):
                    assert key in ext.header
    # One template: the OCA groups by OBS.START.
    starts = {fits.getval(p, "HIERARCH ESO OBS START") for p in hawki_raw}
    assert len(starts) == 1


def test_vimos_raw_frames_are_16_bit_quadrants(vimos_raw):
    assert len(vimos_raw) == 4
    chips = []
    for path in vimos_raw:
        with fits.open(path, do_not_scale_image_data=True) as hdul:
            h = hdul[0].header
            assert h["BITPIX"] == 16 and h["BZERO"] == 32768
            assert hdul[0].data.shape == (synth.VIMOS_NY, synth.VIMOS_NX)
            for key in VIMOS_KEYS:
                assert key in h, key
            q = h["HIERARCH ESO OCS CON QUAD"]
            assert h[f"HIERARCH ESO INS FILT{q} NAME"] == "R"
            chips.append(h["HIERARCH ESO DET CHIP1 ID"])
    assert chips == list(synth.VIMOS_CHIPS)
    # The shipped VIMOS rules recognise them as pre-imaging.
    got = classify(_rules("VIMOS"), {p: fits.getheader(p) for p in vimos_raw})
    assert {c.category for c in got.values()} == {"IMG_PREIMAGING"}


def test_fors2_raw_frames(tmp_path):
    files = synth.make_raw_frames("FORS2", tmp_path, n_frames=2)
    assert len(files) == 4  # two chips per exposure
    for path in files:
        h = fits.getheader(path)
        assert h["INSTRUME"] == "FORS2" and h["HIERARCH ESO DPR TECH"] == "IMAGE,PRE"
        assert path.name == h["ARCFILE"]


def test_truncate_file_cuts_data(tmp_path):
    path = synth.make_raw_frames("HAWKI", tmp_path, n_frames=1)[0]
    size = path.stat().st_size
    truncate_file(path)
    assert path.stat().st_size < size and path.stat().st_size % 2880 == 0


# -- calibration set ----------------------------------------------------------------------


@pytest.mark.esorex
def test_hawki_calibration_pool_classifies_and_associates(hawki_cal, hawki_raw):
    root = hawki_cal.root
    assert (root / "2099-99-99").is_dir() and (root / "gen").is_dir()
    pool = {p: fits.getheader(p) for p in sorted((root / "2099-99-99").glob("*.fits"))}
    pool.update({p: fits.getheader(p) for p in sorted((root / "gen").glob("*.fits"))})
    got = {p.name: c.category for p, c in classify(_rules("HAWKI"), pool).items()}
    # Categories the shipped hawki.oca assigns from PRO.CATG (the local catalogues
    # are not in the shipped rules; an overlay adds them).
    for catg in ("MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_READGAIN",
                 "PHOTCAL_TAB", "SCHLEGEL_MAP_NORTH", "SCHLEGEL_MAP_SOUTH"):
        assert catg in got.values(), catg
    raw = fits.getheader(hawki_raw[0])
    dark = fits.getheader(hawki_cal.files["MASTER_DARK"])
    assert dark["HIERARCH ESO DET DIT"] == raw["HIERARCH ESO DET DIT"]  # inputFile.DET.DIT==DET.DIT
    for tag in ("MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
        h = fits.getheader(hawki_cal.files[tag])
        for key in ("HIERARCH ESO INS FILT1 NAME", "HIERARCH ESO INS FILT2 NAME", "HIERARCH ESO DET NCORRS NAME"):
            assert h[key] == raw[key], (tag, key)
        assert fits.getdata(hawki_cal.files[tag], 1).shape == (128, 128)  # cropped to the science window


@pytest.mark.esorex
def test_calibration_set_is_cached(hawki_cal, synth_cal_root):
    started = time.monotonic()
    again = synth.make_calibrations("HAWKI", synth_cal_root)
    assert not again.built and again.files == hawki_cal.files
    assert time.monotonic() - started < 5
    manifest = json.loads((hawki_cal.root / synth.MANIFEST_NAME).read_text())
    assert manifest["params"]["version"] == synth.SYNTH_VERSION
    # A different version or size is not "up to date".
    other = dict(manifest["params"], version=synth.SYNTH_VERSION + 1)
    assert calibration_set._manifest_current(hawki_cal.root, other) is None


@pytest.mark.esorex
def test_calibration_sets_follow_the_science_window(hawki_cal):
    """The twilight flat is made at least as large as the window, so a crop never has to enlarge it."""
    for tag in ("MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF"):
        assert fits.getdata(hawki_cal.files[tag], 1).shape == (128, 128), tag
    params = synth.read_manifest(hawki_cal.root)["params"]
    assert params["science_size"] == 128 and params["flat_size"] == synth.HAWKI_FLAT_SIZE
    assert calibration_set._params("HAWKI", 2048, synth.DEFAULT_SETUPS["HAWKI"])["flat_size"] == 2048
    # The default window is 4 cells of 32 px wide: those cells go into the set's overlay.
    cells = {"hawki_science_process": ["--psm_nbsize=32", "--stk_cat_nbsize=32"]}
    assert params["recipe_options"] == cells
    assert hawki_cal.profile_overlay == hawki_cal.root / synth.OVERLAY_NAME
    assert load_profile("HAWKI", overlays=[hawki_cal.profile_overlay]).recipe_options["hawki_science_process"] \
        == tuple(cells["hawki_science_process"])


# -- sizes and the options only synthetic data need ------------------------------------------


@pytest.mark.parametrize(("argv", "reason"), [
    (["-i", "HAWKI", "--size", "4096"], "a HAWK-I chip has 2048x2048 pixels"),
    (["-i", "HAWKI", "--size", "32"], "cannot fit the WCS"),
    (["-i", "HAWKI", "--size", "0"], "below 64x64"),
    (["-i", "VIMOS", "--size", "2048"], "VIMOS frames are always the full 2148x2440"),
    (["-i", "FORS2", "--size", "128"], "--size is for HAWKI"),
])
def test_sizes_the_recipes_cannot_take_are_refused(tmp_path, capsys, argv, reason):
    rc = preimg(["synth", *argv, "--out", str(tmp_path / "raw"), "--cal-root", str(tmp_path / "cal")])
    assert rc == 2 and reason in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() and not (tmp_path / "cal").exists()  # refused before writing


def test_small_windows_get_four_background_cells_per_side():
    def cells(size):
        return synth.synthetic_recipe_options("HAWKI", size)["hawki_science_process"]

    assert cells(64) == ("--psm_nbsize=16", "--stk_cat_nbsize=16")
    assert cells(None) == cells(128) == ("--psm_nbsize=32", "--stk_cat_nbsize=32")  # the default window
    assert cells(511) == ("--psm_nbsize=127", "--stk_cat_nbsize=127")
    for size in (512, 1024, 2048):  # 4 of the pipeline's 128-px cells or more
        assert synth.synthetic_recipe_options("HAWKI", size) == {}, size
    assert synth.synthetic_recipe_options("VIMOS") == {}
    with pytest.raises(ValueError, match="below 64x64"):
        synth.make_raw_frames("HAWKI", Path("/nonexistent"), size=48)


def test_shipped_profiles_run_the_recipes_with_default_parameters(monkeypatch):
    monkeypatch.delenv(OVERLAY_ENV, raising=False)
    for instrument in ("HAWKI", "VIMOS", "FORS2"):
        profile = load_profile(instrument)
        assert profile.recipe_options == {} and profile.overlays == (), instrument


def _overlay(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_profile_overlay_is_merged_for_its_instrument_only(tmp_path, monkeypatch):
    hawki = _overlay(tmp_path / "hawki.toml", 'instrument = "HAWKI"\nmax_parallel_abs = 1\n'
                     '[recipe_options]\nhawki_science_process = ["--psm_nbsize=32"]\n')
    vimos = _overlay(tmp_path / "vimos.toml", 'instrument = "VIMOS"\n[recipe_options]\nvimos_ima_science = ["--x=1"]\n')
    profile = load_profile("HAWKI", overlays=[hawki, vimos])
    assert profile.recipe_options == {"hawki_science_process": ("--psm_nbsize=32",)}
    assert profile.max_parallel_abs == 1 and profile.overlays == (str(hawki),)
    assert profile.oca_overlay == load_profile("HAWKI", overlays=[]).oca_overlay  # the rest is the shipped one
    # Through the environment, as `preimg run` and the services get it.
    monkeypatch.setenv(OVERLAY_ENV, f"{hawki}:{vimos}")
    assert load_profile("VIMOS").recipe_options == {"vimos_ima_science": ("--x=1",)}
    assert load_profile("FORS2").overlays == ()
    monkeypatch.delenv(OVERLAY_ENV)
    assert load_profile("HAWKI").recipe_options == {}


@pytest.mark.parametrize(("text", "message"), [
    (None, "cannot be read"),
    ("[recipe_options]\nx = []\n", "names its instrument"),
    ('instrument = "HAWKI"\nrecipe_timeout = 1\n', "recipe_timeout"),
    ('instrument = "HAWKI"\nrecipe_timeout_s = -1\n', "recipe_timeout_s"),
    ('instrument = "HAWKI"\n[recipe', "not valid TOML"),
    ('instrument = "HAWKI"\n[recipe_checks.hawki_science_process]\nexpected_products = ["jittered"]\n',
     "recipe_checks"),
    (('instrument = "HAWKI"\n[recipe_checks.hawki_science_process]\n'
     'per_exposure = {raw_tag = "OBJECT", files = 0, product = "BASIC_CALIBRATED_SCI"}\n'), "files"),
    ('instrument = "HAWKI"\n[recipe_checks.hawki_science_process]\nexpected = []\n', "expected"),
])
def test_a_bad_profile_overlay_is_named(tmp_path, text, message):
    path = tmp_path / "overlay.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ProfileError, match=message) as e:
        load_profile("HAWKI", overlays=[path])
    assert str(path) in str(e.value)


@pytest.mark.esorex
def test_small_synthetic_window_runs_with_the_overlay_synth_writes(esorex_available, cache_dir, tmp_path,
                                                                   hawki_recipe_dir, monkeypatch):
    # Its own calibration root: one set per <cal_root>/<INSTR>, and the default set is 128².
    cal = synth.make_calibrations("HAWKI", cache_dir / "synth" / "cal-hawki-64", size=64)
    assert cal.profile_overlay == cal.root / synth.OVERLAY_NAME and cal.profile_overlay.is_file()
    assert fits.getdata(cal.files["MASTER_CONF"], 1).shape == (64, 64)
    raw = synth.make_raw_frames("HAWKI", tmp_path / "raw", n_frames=3, size=64)
    monkeypatch.setenv(OVERLAY_ENV, str(cal.profile_overlay))
    options = load_profile("HAWKI").recipe_options["hawki_science_process"]
    assert options == ("--psm_nbsize=16", "--stk_cat_nbsize=16")
    check = load_profile("HAWKI").recipe_checks["hawki_science_process"]
    result = esorex.run_recipe("hawki_science_process", synth.science_sof(raw, cal), tmp_path / "ab",
                               recipe_dir=hawki_recipe_dir, options=options, check=check)
    assert result.ok, result.reason
    assert sum(p.pro_catg == "BASIC_CALIBRATED_SCI" for p in result.products) == 3
    # Without them the recipe's 128-px cells do not fit the 64-px chips (SIGFPE, ESOREX.md §3.7).
    bare = esorex.run_recipe("hawki_science_process", synth.science_sof(raw, cal), tmp_path / "ab2",
                             recipe_dir=hawki_recipe_dir, check=check)
    assert not bare.ok and "SIGFPE" in bare.reason


# -- preimg check -------------------------------------------------------------------------


@pytest.mark.esorex
def test_check_lists_missing_calibrations_for_empty_dirs(esorex_available, tmp_path, capsys):
    for sub in ("2099-99-99", "gen"):
        (tmp_path / "HAWKI" / sub).mkdir(parents=True)

    rc = preimg(["check", "-i", "HAWKI", "--cal-root", str(tmp_path)])

    out = capsys.readouterr().out
    assert rc == 1
    assert "ok       recipe hawki_science_process" in out
    for catg in ("MASTER_DARK", "MASTER_TWILIGHT_FLAT", "MASTER_CONF", "MASTER_READGAIN", "PHOTCAL_TAB",
                 "SCHLEGEL_MAP_NORTH", "SCHLEGEL_MAP_SOUTH", "MASTER_LOCAL_CATALOGUE_ASTROM"):
        assert f"MISSING  calibration {catg} " in out, catg


@pytest.mark.esorex
def test_check_json_and_missing_dirs(esorex_available, tmp_path, capsys):
    rc = preimg(["check", "-i", "VIMOS", "--cal-root", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and not report["ok"]
    assert any("calibration directory" in m and "does not exist" in m for m in report["missing"])
    assert any(m.startswith("calibration MASTER_BIAS") for m in report["missing"])


@pytest.mark.esorex
def test_check_warns_about_a_science_recipe_without_a_product_check(esorex_available, tmp_path, capsys):
    from services.processor.toolcheck import check_instrument

    profile = load_profile("HAWKI", overlays=[])
    assert check_instrument(profile, tmp_path).warnings == ()
    report = check_instrument(profile.model_copy(update={"recipe_checks": {}}), tmp_path)
    assert report.warnings == (("recipe hawki_science_process: no [recipe_checks.hawki_science_process] in the "
                               "profile, so a run with rc 0 and no [ ERROR ] line counts as SUCCESSFUL "
                               "whatever it wrote"),)
    assert "  WARNING  recipe hawki_science_process: no [recipe_checks" in report.format()
    assert set(report.missing) == set(check_instrument(profile, tmp_path).missing)  # a warning fails nothing


@pytest.mark.esorex
def test_check_finds_the_synthetic_set(hawki_cal, synth_cal_root, capsys):
    preimg(["check", "-i", "HAWKI", "--cal-root", str(synth_cal_root)])
    out = capsys.readouterr().out
    assert "MISSING  calibration" not in out and "MISSING  recipe" not in out


def test_check_without_pipeline_needs_no_recipes(tmp_path, capsys):
    assert preimg(["check", "-i", "FORS2", "--cal-root", str(tmp_path)]) == 0
    assert "PIPE_SUPPORT=NO" in capsys.readouterr().out


# -- pure helpers -------------------------------------------------------------------------


def _p(name: str, catg: str) -> RecipeProduct:
    return RecipeProduct(Path("/w/products") / name, catg)


def test_judge_requires_rc0_no_errors_and_products():
    good = [_p("a.fits", "MASTER_DARK")]
    check = RecipeCheck(expected_products=frozenset({"MASTER_DARK"}))
    assert judging.judge("hawki_dark_combine", 0, [], good, check=check) == (judging.SUCCESSFUL, "")
    status, reason = judging.judge("hawki_dark_combine", 0, ["x: Object and dark dimensions don't match"], good,
                                   check=check)
    assert status == judging.FAILED and "dimensions don't match" in reason
    status, reason = judging.judge("hawki_dark_combine", 0, [], [], check=check)
    assert status == judging.FAILED and "missing: MASTER_DARK" in reason
    # No check for a recipe: no expected products.
    assert judging.judge("hawki_dark_combine", 0, [], []) == (judging.SUCCESSFUL, "")
    status, reason = judging.judge("hawki_dark_combine", -11, ["r: Unable to load x -- Bad file format"], [])
    assert reason.startswith("recipe hawki_dark_combine killed by SIGSEGV (rc -11)") and "Bad file format" in reason
    status, reason = judging.judge("x", None, [], [], timed_out=True, timeout_s=900)
    assert reason == "recipe x timed out after 900 s and was killed"


def test_judge_counts_exposures():
    check = load_profile("VIMOS", overlays=[]).recipe_checks["vimos_ima_science"]
    prods = [_p(f"{c.lower()}.fits", c) for c in check.expected_products]
    status, reason = judging.judge("vimos_ima_science", 0, [], prods, check=check, n_exposures=3)
    assert status == judging.FAILED and "1 BASIC_CALIBRATED_SCI for 3 exposures" in reason
    sof = [(Path(f"q{i}"), "OBJECT") for i in range(12)] + [(Path("b"), "MASTER_BIAS")]
    assert judging.count_exposures(check, sof) == 3
    assert judging.count_exposures(None, sof) is None


def test_error_lines_merge_stdout_and_log():
    stdout = ("[ ERROR ] hawki_science_process: No master confidence map file found\n"
              "[ ERROR ] esorex: Execution of recipe 'hawki_science_process' failed, status = -1\n"
              "[WARNING] esorex: Unable to open directory /usr/lib/cpl/plugins\n")
    log = ("18:14:32 [ ERROR ] hawki_science_process: [tid=000] No master confidence map file found\n"
           "18:14:32 [ ERROR ] : [tid=000] Execution of recipe 'hawki_science_process' failed, status = -1\n")
    errors = judging.error_lines(stdout, log)
    assert errors == ["hawki_science_process: No master confidence map file found",
                      "esorex: Execution of recipe 'hawki_science_process' failed, status = -1"]
    assert judging.main_error(errors) == errors[0]


def test_product_names_follow_the_scheme():
    prods = [_p("exp_10.fits", "BASIC_CALIBRATED_SCI"), _p("exp_2.fits", "BASIC_CALIBRATED_SCI"),
             _p("stack_1.fits", "JITTERED_IMAGE_SCI"), _p("broken.fits", "")]
    plan = {p.path.name: n for p, n in products.plan_names(prods, "hawki", "2026-11-20T01:02:03.456")}
    assert plan == {
        "exp_2.fits": "HAWKI.2026-11-20T01:02:03.456_basic_calibrated_sci_0000.fits",
        "exp_10.fits": "HAWKI.2026-11-20T01:02:03.456_basic_calibrated_sci_0001.fits",
        "stack_1.fits": "HAWKI.2026-11-20T01:02:03.456_jittered_image_sci_0000.fits",
        "broken.fits": "HAWKI.2026-11-20T01:02:03.456_unknown_0000.fits",
    }


def test_move_products_never_overwrites(tmp_path):
    (tmp_path / "w").mkdir()
    src = tmp_path / "w" / "a.fits"
    src.write_text("x")
    (tmp_path / "sci").mkdir()
    (tmp_path / "sci" / "a.fits").write_text("old")
    with pytest.raises(FileExistsError):
        products.move_products([RecipeProduct(src, "X")], tmp_path / "sci")
    assert (tmp_path / "sci" / "a.fits").read_text() == "old"

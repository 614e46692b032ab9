"""Whole deliveries through the real recipe chain: `preimg run` and the processor with real esorex.

Synthetic pre-imaging frames (synth) and a calibration set
made by the real calibration recipes (cached under .cache/synth/cal). QC values:
presence and plausible ranges (exact equality across working directories is
tested in tests/processor/test_recipes.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from astropy.io import fits
from prometheus_client import CollectorRegistry

import synth
from services.app import describe_files
from services.ingest.handlers import handle_delivery
from services.ingest.service import build_ports as ingest_ports
from services.processor.handlers import handle_raw_ready
from services.processor.service import build_ports
from shared.messages import DeliveryAnnounced, ProductsReady
from shared.metrics import build_metrics
from shared.oca import read_ab
from shared.profiles import load_profile
from shared.settings import Settings
from tests.faults import truncate_file

pytestmark = [pytest.mark.esorex, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def preimg_run(instrument: str, raw: Path, data_root: Path, cal_root: Path) -> dict:
    out = subprocess.run(
        [str(REPO / ".venv/bin/preimg"), "run", "-i", instrument, str(raw), "--data-root", str(data_root),
         "--cal-root", str(cal_root), "--json"],
        capture_output=True, text=True, timeout=600, check=False)
    assert out.stdout.strip(), out.stderr[-3000:]
    doc = json.loads(out.stdout)
    doc["_rc"], doc["_stderr"] = out.returncode, out.stderr
    return doc


def quicklook_of(product: Path) -> tuple[int, int, float]:
    """The quick-look PNG of a product in the package: (height, width, pixel standard deviation)."""
    from matplotlib import image

    png = image.imread(product.parent / "quicklook" / f"{product.stem}.png")
    return png.shape[0], png.shape[1], float(png[..., :3].std())


def products_of(doc: dict) -> dict[str, list[Path]]:
    by_catg: dict[str, list[Path]] = {}
    for path in Path(doc["paths"]["products"]).glob("*.fits"):
        catg = fits.getheader(path, 0).get("HIERARCH ESO PRO CATG", "")
        by_catg.setdefault(catg, []).append(path)
    return by_catg


def qc(path: Path, key: str, ext: int = 0) -> float:
    with fits.open(path) as hdul:
        values = [h.header[f"HIERARCH ESO QC {key}"] for h in hdul if f"HIERARCH ESO QC {key}" in h.header]
    assert values, f"{path.name} has no QC {key}"
    return float(values[ext])


def test_hawki_preimaging_delivery_gives_science_products(tmp_path, hawki_cal):
    raw = tmp_path / "incoming"
    synth.make_raw_frames("HAWKI", raw, n_frames=3)
    doc = preimg_run("HAWKI", raw, tmp_path / "data", hawki_cal)
    assert doc["status"] == "ok" and doc["_rc"] == 0, doc["_stderr"][-3000:]
    products = products_of(doc)
    assert len(products["BASIC_CALIBRATED_SCI"]) == 3
    assert len(products["JITTERED_IMAGE_SCI"]) == 1
    stack = products["JITTERED_IMAGE_SCI"][0]
    assert 0.09 < qc(stack, "WCS_SCALE") < 0.12  # arcsec/px of HAWK-I (0.106)
    assert 15 < qc(stack, "MAGZPT") < 35
    height, width, spread = quicklook_of(stack)  # the four chips on one sky frame
    assert (height, width) == (1000, 1000) and spread > 0.05
    assert Path(doc["paths"]["report"]).is_file() and Path(doc["paths"]["userreport"]).is_file()
    report = Path(doc["paths"]["report"]).read_text()
    assert "hawki_science_process" in report and "SUCCESSFUL" in report
    [ab_file] = Path(doc["paths"]["logs"]).glob("*.ab")
    ab = read_ab(ab_file)  # as DFOS writes it: where the products went, the run's batch, the rules' version
    assert ab["PROD_PATH"] == doc["paths"]["products"] and ab["BATCH_ID"] == f"SCIENCE_{doc['run_id']}"
    assert ab["CONFIG_VERSION"] and ab["PROCESS_STATUS"] == "SUCCESSFUL"


def test_vimos_preimaging_delivery_gives_science_products(tmp_path, vimos_cal):
    raw = tmp_path / "incoming"
    synth.make_raw_frames("VIMOS", raw, n_frames=1)
    doc = preimg_run("VIMOS", raw, tmp_path / "data", vimos_cal)
    assert doc["status"] == "ok", doc["_stderr"][-3000:]
    products = products_of(doc)
    assert len(products["BASIC_CALIBRATED_SCI"]) == 1
    assert len(products["JITTERED_IMAGE_SCI"]) == 1
    assert 0.18 < qc(products["JITTERED_IMAGE_SCI"][0], "WCS_SCALE") < 0.23  # VIMOS 0.205 arcsec/px
    height, width, spread = quicklook_of(products["JITTERED_IMAGE_SCI"][0])
    assert (height, width) == (1000, 1000) and spread > 0.05


def test_fors2_without_pipeline_packages_the_raw_frames(tmp_path):
    raw = tmp_path / "incoming"
    frames = synth.make_raw_frames("FORS2", raw)
    doc = preimg_run("FORS2", raw, tmp_path / "data", tmp_path / "cal")
    assert doc["status"] == "ok", doc["_stderr"][-3000:]
    package = Path(doc["paths"]["products"])
    assert sorted(p.name for p in package.glob("*.fits")) == sorted(p.name for p in frames)
    # Each raw frame has its quick-look (the profile's quicklook_catgs = ["RAW"]), and nothing else is there.
    assert sorted(p.name for p in package.iterdir()) == sorted([p.name for p in frames] + ["quicklook"])
    assert sorted(p.name for p in (package / "quicklook").iterdir()) == sorted(
        n for p in frames for n in (f"{p.stem}.png", f"{p.stem}_thumb.png"))
    for frame in frames:
        height, width, spread = quicklook_of(package / frame.name)
        assert (height, width) == (1000, 1000) and spread > 0.01
    assert "PIPE_SUPPORT NO" in Path(doc["paths"]["report"]).read_text()


def _two_templates(raw: Path) -> tuple[list[Path], list[Path]]:
    first = synth.make_raw_frames("HAWKI", raw, n_frames=2)
    second = synth.make_raw_frames("HAWKI", raw, n_frames=2, start=datetime(2026, 11, 20, 3, 0, 0, tzinfo=UTC))
    return first, second


def test_truncated_frame_fails_its_ab_while_the_other_ab_succeeds(tmp_path, hawki_cal):
    raw = tmp_path / "incoming"
    _, second = _two_templates(raw)
    truncate_file(second[1])
    doc = preimg_run("HAWKI", raw, tmp_path / "data", hawki_cal)
    assert doc["status"] == "partial", doc
    state = json.loads(next(Path(doc["paths"]["state"]).glob("raw_ready.json")).read_text())
    [event] = state["events"]
    statuses = {ab["name"]: ab for ab in event["abs"]}
    assert sorted(ab["status"] for ab in statuses.values()) == ["FAILED", "SUCCESSFUL"]
    failed = next(ab for ab in statuses.values() if ab["status"] == "FAILED")
    assert second[1].name in " ".join(failed["raw"])
    assert "hawki_science_process" in failed["reason"] and Path(failed["log_path"]).is_file()
    report = Path(doc["paths"]["report"]).read_text()
    assert failed["reason"][:60] in report


def _processor_event(tmp_path: Path, cal_root: Path, profile_update: dict, raw_frames: list[Path]) -> ProductsReady:
    """Run ingest and the processor handler directly, with a modified HAWK-I profile."""
    settings = Settings(data_root=tmp_path / "data", delivery_area=raw_frames[0].parent, cal_root=cal_root)
    delivery = DeliveryAnnounced(run_id="r1", delivery_id="d1", instrument="HAWKI",
                                 files=tuple(describe_files(raw_frames, raw_frames[0].parent)))
    [raw_ready] = handle_delivery(delivery, ingest_ports(settings))
    profile = load_profile("HAWKI").model_copy(update=profile_update)
    ports = build_ports(settings, "HAWKI", build_metrics(CollectorRegistry()), profile=profile)
    [event] = handle_raw_ready(raw_ready, ports)
    return event


def test_missing_calibration_makes_the_ab_incomplete(tmp_path, hawki_cal):
    cal = tmp_path / "cal"
    shutil.copytree(hawki_cal / "HAWKI", cal / "HAWKI")
    for dark in (cal / "HAWKI" / "2099-99-99").glob("*MASTER_DARK*"):
        dark.unlink()
    frames = synth.make_raw_frames("HAWKI", tmp_path / "incoming", n_frames=2)
    event = _processor_event(tmp_path, cal, {}, frames)
    [ab] = event.abs
    assert ab.status == "INCOMPLETE" and "MASTER_DARK" in ab.missing
    assert "MASTER_DARK" in ab.reason and event.status == "failed" and event.products == ()


def test_recipe_killed_by_a_signal_fails_the_ab(tmp_path, hawki_cal):
    frames = synth.make_raw_frames("HAWKI", tmp_path / "incoming", n_frames=2)
    # Background cells larger than the 128-px chips: the recipe dies of SIGFPE (ESOREX.md 3.7).
    options = {"hawki_science_process": ("--psm_nbsize=512", "--stk_cat_nbsize=512")}
    event = _processor_event(tmp_path, hawki_cal, {"recipe_options": options}, frames)
    [ab] = event.abs
    assert ab.status == "FAILED" and "killed by SIG" in ab.reason, ab.reason
    assert Path(ab.log_path).is_file()
    assert list(Path(event.sci_dir).iterdir()) == []  # partial products are not delivered


def test_the_processor_judges_by_the_profiles_recipe_check(tmp_path, hawki_cal):
    frames = synth.make_raw_frames("HAWKI", tmp_path / "incoming", n_frames=2)
    shipped = load_profile("HAWKI").recipe_checks["hawki_science_process"]
    check = shipped.model_copy(update={"expected_products": shipped.expected_products | {"NO_SUCH_PRODUCT"}})
    event = _processor_event(tmp_path, hawki_cal, {"recipe_checks": {"hawki_science_process": check}}, frames)
    [ab] = event.abs
    assert ab.status == "FAILED" and "products are missing: NO_SUCH_PRODUCT" in ab.reason, ab.reason
    assert event.products == ()


def test_recipe_timeout_fails_the_ab(tmp_path, hawki_cal):
    frames = synth.make_raw_frames("HAWKI", tmp_path / "incoming", n_frames=2)
    event = _processor_event(tmp_path, hawki_cal, {"recipe_timeout_s": 0.3}, frames)
    [ab] = event.abs
    assert ab.status == "FAILED" and "timed out after 0.3 s" in ab.reason

"""The processor's handler with fake plan/execute ports: status logic and error paths, no esorex."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

import services.processor.products as products_module
from services.processor.handlers import ABOutcome, ProcessorPorts, handle_raw_ready
from services.processor.products import package_raw_frames
from services.processor.service import prepare_workspace
from shared.errors import PermanentError
from shared.files import deferred_syncs
from shared.messages import ABResult, Product, ProductsReady, RawDataReady, RawFrame
from shared.profiles import load_profile
from shared.settings import Settings

NOW = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)


def raw_ready(tmp_path: Path, instrument: str = "HAWKI", n: int = 2) -> RawDataReady:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    frames = []
    for i in range(n):
        path = raw / f"{instrument}.{i}.fits"
        path.write_bytes(b"\0" * 2880)
        frames.append(RawFrame(name=path.name, path=str(path), size=2880, checksum="sha256:" + "a" * 64,
                               headers={"DATE-OBS": f"2026-11-20T01:0{i}:00"}, classification={"DO.CATG": "OBJECT"}))
    return RawDataReady(run_id="run-1", delivery_id="d-1", instrument=instrument, raw_dir=str(raw),
                        frames=tuple(frames), delivered_at=NOW)


def ports_for(tmp_path: Path, plan, execute, instrument: str = "HAWKI") -> ProcessorPorts:
    """Fake plan and execute; the real workspace and raw packaging, in a tmp dir."""
    return ProcessorPorts(profile=load_profile(instrument), run_dirs=Settings(data_root=tmp_path / "data").run_dirs,
                          plan=plan, execute=execute, prepare_workspace=prepare_workspace,
                          package_raw=package_raw_frames, clock=lambda: NOW)


def outcome(name: str, status: str, n_products: int = 1) -> ABOutcome:
    products = tuple(Product(path=f"/sci/{name}_{i}.fits", pro_catg="JITTERED_IMAGE_SCI", ab=name,
                             checksum="sha256:" + "b" * 64) for i in range(n_products if status == "SUCCESSFUL" else 0))
    return ABOutcome(ABResult(name=name, status=status, reason="" if status == "SUCCESSFUL" else "recipe failed"),
                     products)


@pytest.mark.parametrize(("statuses", "expected"), [
    (("SUCCESSFUL", "SUCCESSFUL"), "ok"),
    (("SUCCESSFUL", "FAILED"), "partial"),
    (("SUCCESSFUL", "INCOMPLETE"), "partial"),
    (("FAILED", "INCOMPLETE"), "failed"),
])
def test_run_status_follows_the_abs(tmp_path, statuses, expected):
    planned = [f"AB{i}" for i in range(len(statuses))]
    by_name = dict(zip(planned, statuses, strict=True))
    ports = ports_for(tmp_path, plan=lambda msg, dirs: planned, execute=lambda ab, dirs: outcome(ab, by_name[ab]))
    [event] = handle_raw_ready(raw_ready(tmp_path), ports)
    assert isinstance(event, ProductsReady) and event.status == expected
    assert [ab.name for ab in event.abs] == planned
    assert len(event.products) == statuses.count("SUCCESSFUL")
    assert event.frames == raw_ready(tmp_path).frames  # the raw facts travel on, unread


def test_an_ab_that_raises_fails_alone_with_the_cause(tmp_path):
    def execute(ab, dirs):
        if ab == "bad":
            raise OSError(28, "No space left on device")
        return outcome(ab, "SUCCESSFUL")

    ports = ports_for(tmp_path, plan=lambda msg, dirs: ["good", "bad"], execute=execute)
    [event] = handle_raw_ready(raw_ready(tmp_path), ports)
    assert event.status == "partial"
    bad = next(ab for ab in event.abs if ab.name == "bad")
    assert bad.status == "FAILED" and "No space left on device" in bad.reason


def test_no_ab_is_a_permanent_failure_that_says_where_to_look(tmp_path):
    ports = ports_for(tmp_path, plan=lambda msg, dirs: [], execute=lambda ab, dirs: outcome(ab, "SUCCESSFUL"))
    with pytest.raises(PermanentError, match="preimg explain"):
        handle_raw_ready(raw_ready(tmp_path), ports)


def test_raw_data_of_another_instrument_is_refused(tmp_path):
    ports = ports_for(tmp_path, plan=lambda msg, dirs: ["x"], execute=lambda ab, dirs: outcome(ab, "SUCCESSFUL"))
    with pytest.raises(PermanentError, match="reached the HAWKI processor"):
        handle_raw_ready(raw_ready(tmp_path, instrument="VIMOS"), ports)


def test_leftovers_of_a_dead_attempt_are_wiped_before_work(tmp_path):
    dirs = Settings(data_root=tmp_path / "data").run_dirs("HAWKI", "run-1")
    for d in (dirs.sci, dirs.logs, dirs.work):
        d.mkdir(parents=True)
        (d / "half.fits").write_text("left by an attempt that died")
    seen = []
    ports = ports_for(tmp_path, plan=lambda msg, d: ["a"],
                      execute=lambda ab, d: seen.append(sorted(p.name for p in d.sci.iterdir())) or outcome(ab, "SUCCESSFUL"))
    handle_raw_ready(raw_ready(tmp_path), ports)
    assert seen == [[]]
    assert not dirs.work.exists()  # the dead attempt's working files are gone; recipes make their own


def test_a_run_without_recipes_makes_no_working_directory(tmp_path):
    ports = ports_for(tmp_path, plan=lambda msg, dirs: [], execute=None, instrument="FORS2")
    msg = raw_ready(tmp_path, "FORS2")
    handle_raw_ready(msg, ports)
    dirs = ports.run_dirs("FORS2", msg.run_id)
    assert dirs.sci.is_dir() and dirs.logs.is_dir() and not dirs.work.exists()


def test_without_pipeline_the_raw_frames_are_the_package(tmp_path):
    ports = ports_for(tmp_path, plan=lambda msg, dirs: pytest.fail("no AB without a pipeline"),
                      execute=lambda ab, dirs: pytest.fail("no recipe without a pipeline"), instrument="FORS2")
    msg = raw_ready(tmp_path, instrument="FORS2")
    [event] = handle_raw_ready(msg, ports)
    assert event.status == "ok" and not event.pipe_support and event.abs == ()
    assert [Path(p.path).name for p in event.products] == [f.name for f in msg.frames]
    assert all(p.pro_catg == "RAW" and p.checksum == f.checksum for p, f in zip(event.products, msg.frames, strict=True))
    assert all(Path(p.path).is_file() for p in event.products)


def test_new_run_directories_and_the_raw_package_are_synced_with_the_stage_record(tmp_path):
    # PIPE_SUPPORT=NO: the raw frames are linked into sci/. Under the runner, what the handler
    # asks to sync is synced in the round of the state record, before anything is acked.
    ports = ports_for(tmp_path, plan=lambda msg, dirs: [], execute=None, instrument="FORS2")
    msg = raw_ready(tmp_path, "FORS2")
    with deferred_syncs() as pending:
        [event] = handle_raw_ready(msg, ports)
    dirs = ports.run_dirs("FORS2", msg.run_id)
    assert [Path(p.path).parent for p in event.products] == [dirs.sci, dirs.sci]
    assert {dirs.sci, dirs.sci.parent, dirs.logs.parent} <= set(pending)
    # sci/FORS2 and logs/FORS2 are new too (the instrument's first run): their names as well
    assert {dirs.sci.parent.parent, dirs.logs.parent.parent} <= set(pending)


def test_products_are_synced_in_one_round_after_they_are_moved(tmp_path, monkeypatch):
    rounds = []
    monkeypatch.setattr(products_module, "sync_later", lambda paths: rounds.append(list(paths)))
    work, sci = tmp_path / "work", tmp_path / "sci"
    work.mkdir()
    made = []
    for i in range(3):
        (work / f"out_{i}.fits").write_bytes(b"x")
        made.append(products_module.RecipeProduct(work / f"out_{i}.fits", "X"))
    moved = products_module.move_products(made, sci)
    assert rounds == [[*(m.path for m in moved), sci]]
    assert all(m.path.parent == sci and m.path.is_file() for m in moved)

"""Ingest on real files: verification, staging, header reading, and every bad delivery."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from pydantic import ValidationError

from services.app import describe_files
from services.ingest.handlers import handle_delivery
from services.ingest.service import build_ports
from shared.errors import PermanentError
from shared.files import deferred_syncs, file_digest
from shared.messages import DeliveredFile, DeliveryAnnounced, RawDataReady
from shared.settings import Settings

#: A well-formed digest for files that are refused before their checksum is compared.
ANY_DIGEST = "sha256:" + "0" * 64


def write_frame(path: Path, obj: str = "NGC 1234", tech: str = "IMAGE,PRE") -> Path:
    hdu = fits.PrimaryHDU(np.zeros((8, 8), dtype=np.int16))
    h = hdu.header
    h["INSTRUME"] = "FORS2"
    h["OBJECT"] = obj
    h["MJD-OBS"] = 61000.1
    h["HIERARCH ESO DPR CATG"] = "SCIENCE"
    h["HIERARCH ESO DPR TYPE"] = "OBJECT"
    h["HIERARCH ESO DPR TECH"] = tech
    h["HIERARCH ESO DET DIT"] = 10.0
    hdu.writeto(path)
    return path


@pytest.fixture
def area(tmp_path: Path) -> Path:
    a = tmp_path / "incoming"
    a.mkdir()
    return a


@pytest.fixture
def settings(tmp_path: Path, area: Path) -> Settings:
    return Settings(data_root=tmp_path / "data", delivery_area=area)


def announce(files: list[DeliveredFile], run_id: str = "run-1", instrument: str = "FORS2") -> DeliveryAnnounced:
    return DeliveryAnnounced(run_id=run_id, delivery_id="d-1", instrument=instrument, files=tuple(files))


def test_good_delivery_is_staged_into_its_own_run_directory(settings, area):
    paths = [write_frame(area / f"FORS2.{i}.fits", obj=f"field {i}") for i in range(3)]
    [event] = handle_delivery(announce(describe_files(paths, area)), build_ports(settings))
    assert isinstance(event, RawDataReady)
    raw = Path(event.raw_dir)
    assert raw == (settings.data_root / "raw" / "FORS2" / "run-1").resolve()
    assert sorted(p.name for p in raw.iterdir()) == [p.name for p in paths]
    assert [f.headers["OBJECT"] for f in event.frames] == ["field 0", "field 1", "field 2"]
    assert event.frames[0].headers["DPR.TECH"] == "IMAGE,PRE"
    assert all(Path(f.path).parent == raw and f.problem == "" for f in event.frames)
    assert not list(raw.parent.glob(".*staging"))


def test_two_runs_of_one_instrument_do_not_share_a_directory(settings, area):
    paths = [write_frame(area / "a.fits")]
    ports = build_ports(settings)
    [e1] = handle_delivery(announce(describe_files(paths, area), run_id="run-a"), ports)
    [e2] = handle_delivery(announce(describe_files(paths, area), run_id="run-b"), ports)
    assert e1.raw_dir != e2.raw_dir and Path(e1.raw_dir, "a.fits").is_file() and Path(e2.raw_dir, "a.fits").is_file()


def _fails(settings, files, match, instrument="FORS2"):
    with pytest.raises(PermanentError, match=match):
        handle_delivery(announce(files, instrument=instrument), build_ports(settings))
    assert not (settings.data_root / "raw" / instrument / "run-1").exists()


def test_path_escaping_the_delivery_area_is_refused(settings, area):
    _fails(settings, [DeliveredFile(name="passwd", path="../../etc/passwd", size=1, checksum=ANY_DIGEST)],
           "outside the delivery area")


def test_absolute_path_elsewhere_is_refused(settings, area):
    _fails(settings, [DeliveredFile(name="passwd", path="/etc/passwd", size=1, checksum=ANY_DIGEST)],
           "outside the delivery area")


def test_symlink_pointing_out_is_refused(settings, area, tmp_path):
    outside = write_frame(tmp_path / "secret.fits")
    (area / "link.fits").symlink_to(outside)
    [entry] = describe_files([outside], area)
    _fails(settings, [entry.model_copy(update={"name": "link.fits", "path": "link.fits"})], "outside the delivery area")


def test_a_directory_linked_out_of_the_area_is_refused_for_each_of_its_files(settings, area, tmp_path):
    # The real path of a directory is looked up once per delivery and reused for its files.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    frames = [write_frame(outside / n) for n in ("a.fits", "b.fits")]
    (area / "sub").symlink_to(outside)
    entries = [e.model_copy(update={"path": f"sub/{e.name}"}) for e in describe_files(frames, outside)]
    with pytest.raises(PermanentError) as err:
        handle_delivery(announce(entries), build_ports(settings))
    assert "a.fits: path 'sub/a.fits' resolves to" in err.value.reason and "outside the delivery area" in err.value.reason


def test_a_file_linked_out_beside_plain_files_is_refused(settings, area, tmp_path):
    plain = write_frame(area / "plain.fits")
    outside = write_frame(tmp_path / "secret.fits")
    (area / "link.fits").symlink_to(outside)
    entries = describe_files([plain], area) + [
        describe_files([outside], tmp_path)[0].model_copy(update={"name": "link.fits", "path": "link.fits"})]
    _fails(settings, entries, "link.fits: path 'link.fits' resolves to .*outside the delivery area")


def test_missing_file_is_named(settings, area):
    _fails(settings, [DeliveredFile(name="gone.fits", path="gone.fits", size=1, checksum=ANY_DIGEST)],
           "gone.fits: file .* does not exist")


def test_truncated_file_and_checksum_mismatch_are_reported_together(settings, area):
    good, short, wrong = (write_frame(area / n) for n in ("good.fits", "short.fits", "wrong.fits"))
    entries = describe_files([good, short, wrong], area)
    with open(short, "r+b") as fh:
        fh.truncate(2880)
    with open(wrong, "r+b") as fh:
        fh.seek(3000)
        fh.write(b"\x01")
    with pytest.raises(PermanentError) as err:
        handle_delivery(announce(entries), build_ports(settings))
    reason = err.value.reason
    assert "short.fits is truncated: 2880 bytes on disk, 5760 announced" in reason
    assert "wrong.fits: sha256 checksum mismatch" in reason
    assert "good.fits" not in reason


def test_a_delivery_on_another_file_system_is_copied_and_hashed_in_one_pass(settings, area, monkeypatch):
    good, wrong = write_frame(area / "good.fits"), write_frame(area / "wrong.fits")
    entries = describe_files([good, wrong], area)
    with open(wrong, "r+b") as fh:  # corrupted in transit, after AOG computed its checksum
        fh.seek(3000)
        fh.write(b"\x01")

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # as when the delivery area is another volume
    read = []
    monkeypatch.setattr("services.ingest.staging.file_digest", lambda *a: read.append(a) or file_digest(*a))
    with pytest.raises(PermanentError, match="wrong.fits: sha256 checksum mismatch"):
        handle_delivery(announce(entries), build_ports(settings))
    [event] = handle_delivery(announce(entries[:1], run_id="run-2"), build_ports(settings))
    staged = Path(event.raw_dir) / "good.fits"
    assert staged.read_bytes() == good.read_bytes() and staged.stat().st_ino != good.stat().st_ino
    assert read == []  # the copy was hashed while it was written: no second read


def test_empty_file_list_and_unknown_instrument(settings, area):
    with pytest.raises(ValidationError, match="at least 1 item"):  # the contract refuses it before ingest
        announce([])
    paths = [write_frame(area / "a.fits")]
    _fails(settings, describe_files(paths, area), "unknown instrument 'ESPRESSO'", instrument="ESPRESSO")


def test_corrupt_fits_is_staged_with_its_problem_and_others_still_described(settings, area):
    good = write_frame(area / "good.fits")
    junk = area / "junk.fits"
    junk.write_bytes(os.urandom(5000))
    [event] = handle_delivery(announce(describe_files([good, junk], area)), build_ports(settings))
    by_name = {f.name: f for f in event.frames}
    assert by_name["good.fits"].problem == "" and by_name["good.fits"].headers["OBJECT"] == "NGC 1234"
    assert "junk.fits: not a readable FITS file" in by_name["junk.fits"].problem


def test_frames_are_classified_by_the_instruments_oca_rules(tmp_path, area):
    import synth
    from shared.profiles import load_profile

    if load_profile("HAWKI").resolve_rules() is None:
        pytest.skip("hawki.oca is not installed (cpl-plugin-hawki)")
    frames = synth.make_raw_frames("HAWKI", area, n_frames=2)
    settings = Settings(data_root=tmp_path / "data", delivery_area=area)
    delivery = DeliveryAnnounced(run_id="r-h", delivery_id="d-h", instrument="HAWKI",
                                 files=tuple(describe_files(frames, area)))
    [event] = handle_delivery(delivery, build_ports(settings))
    # hawki.oca + hawki_overlay.oca: DPR.TECH IMAGE,PRE science frames are pre-imaging frames.
    assert [f.classification for f in event.frames] == [{"DO.CATG": "IMG_PREIMAGING"}] * 2
    assert event.frames[0].headers["DPR.TECH"] == "IMAGE,PRE" and event.frames[0].headers["INSTRUME"] == "HAWKI"


def test_the_first_delivery_of_an_instrument_syncs_the_name_of_its_raw_directory(settings, area):
    # raw/<INSTR>/ is new on a fresh volume: its name is synced with the frames (ingest's record round).
    paths = [write_frame(area / "a.fits")]
    with deferred_syncs() as pending:
        handle_delivery(announce(describe_files(paths, area)), build_ports(settings))
    raw = (settings.data_root / "raw").resolve()
    assert {raw.parent, raw, raw / "FORS2"} <= set(pending)

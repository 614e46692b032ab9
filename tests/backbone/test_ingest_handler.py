"""Ingest's handler with fake ports: its decisions, no file system beyond what the fakes say."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.ingest.handlers import IngestPorts, handle_delivery
from shared.errors import PermanentError
from shared.messages import DeliveredFile, DeliveryAnnounced, RawDataReady
from shared.settings import Settings

NOW = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)


def delivery(*names: str, instrument: str = "HAWKI") -> DeliveryAnnounced:
    files = tuple(DeliveredFile(name=n, path=n, size=2880, checksum="sha256:" + "c" * 64) for n in names)
    return DeliveryAnnounced(run_id="run-1", delivery_id="d-1", instrument=instrument, files=files)


def fake_ports(tmp_path: Path, headers=None, classify=None, stage=None, staged: list | None = None) -> IngestPorts:
    """Ports whose stager only records what it was asked (into ``staged``)."""
    staged = [] if staged is None else staged

    def fake_stage(files, dest):
        staged.append((tuple(f.name for f in files), dest))
        return [dest / f.name for f in files]

    return IngestPorts(
        stage=stage or fake_stage,
        run_dirs=Settings(data_root=tmp_path).run_dirs,
        known_instruments=lambda: ["FORS2", "HAWKI"],
        read_header=headers or (lambda instrument, path: {"OBJECT": path.name, "DPR.CATG": "SCIENCE"}),
        classify=classify or (lambda instrument, header: {"DO.CATG": "OBJECT"}),
        clock=lambda: NOW,
    )


def test_a_good_delivery_is_staged_described_and_classified(tmp_path):
    staged: list = []
    [event] = handle_delivery(delivery("a.fits", "b.fits"), fake_ports(tmp_path, staged=staged))
    assert isinstance(event, RawDataReady) and event.delivered_at == NOW
    assert staged == [(("a.fits", "b.fits"), Settings(data_root=tmp_path).run_dirs("HAWKI", "run-1").raw)]
    assert [(f.name, f.headers["OBJECT"], f.classification, f.problem) for f in event.frames] == [
        ("a.fits", "a.fits", {"DO.CATG": "OBJECT"}, ""), ("b.fits", "b.fits", {"DO.CATG": "OBJECT"}, "")]


@pytest.mark.parametrize(("message", "reason"), [
    (delivery("a.fits", instrument="ESPRESSO"), "unknown instrument 'ESPRESSO'"),
    (delivery("a.fits", "b.fits", "a.fits"), "more than once: a.fits"),
])
def test_deliveries_that_cannot_be_processed_fail_before_anything_is_staged(tmp_path, message, reason):
    staged: list = []
    with pytest.raises(PermanentError, match=reason):
        handle_delivery(message, fake_ports(tmp_path, staged=staged))
    assert staged == []


def test_a_staging_refusal_reaches_aog_unchanged(tmp_path):
    def refuse(files, dest):
        raise PermanentError("the delivery failed verification: a.fits is truncated")

    with pytest.raises(PermanentError, match="a.fits is truncated"):
        handle_delivery(delivery("a.fits"), fake_ports(tmp_path, stage=refuse))


def test_unreadable_and_unclassifiable_frames_are_described_not_fatal(tmp_path):
    def read(instrument, path):
        if path.name == "bad.fits":
            raise ValueError("bad.fits: not a readable FITS file (truncated header)")
        return {"OBJECT": path.name}

    def classify(instrument, header):
        if header["OBJECT"] == "odd.fits":
            raise ValueError("rule hawki.oca:12: cannot compare text with a number")
        return {} if header["OBJECT"] == "none.fits" else {"DO.CATG": "OBJECT"}

    [event] = handle_delivery(delivery("good.fits", "bad.fits", "odd.fits", "none.fits"),
                              fake_ports(tmp_path, headers=read, classify=classify))
    problems = {f.name: f.problem for f in event.frames}
    assert problems["good.fits"] == ""
    assert problems["bad.fits"].startswith("header unreadable: bad.fits: not a readable FITS file")
    assert problems["odd.fits"] == "classification failed: rule hawki.oca:12: cannot compare text with a number"
    assert problems["none.fits"] == "no classification rule matched"
    assert next(f for f in event.frames if f.name == "bad.fits").headers == {}

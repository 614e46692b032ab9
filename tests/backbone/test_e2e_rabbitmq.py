"""End to end over real RabbitMQ: four services as separate OS processes.

FORS2 (PIPE_SUPPORT=NO) keeps these runs free of esorex, so they test the
backbone itself; the recipe chain has its own end-to-end tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.app import describe_files
from shared.bus.rabbitmq import RabbitClient
from shared.bus.topology import HEADER_REASON, dead_letter_queue, queue_name
from shared.messages import DeliveredFile, DeliveryAnnounced
from tests.backbone.cluster import PREIMG, REPO, Cluster, CompletionWatcher

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def make_frames(area: Path, n: int, prefix: str = "FORS2") -> list[Path]:
    area.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        hdu = fits.PrimaryHDU(np.full((16, 16), i, dtype=np.int16))
        h = hdu.header
        h["INSTRUME"] = "FORS2"
        h["OBJECT"] = f"<script>alert({i})</script>" if i == 0 else f"field {i}"
        h["DATE-OBS"] = f"2026-11-20T01:0{i % 10}:00.000"
        h["MJD-OBS"] = 61364.04 + i * 0.001
        h["HIERARCH ESO DPR CATG"] = "SCIENCE"
        h["HIERARCH ESO DPR TYPE"] = "OBJECT"
        h["HIERARCH ESO DPR TECH"] = "IMAGE,PRE"
        h["HIERARCH ESO OBS PROG ID"] = "112.ABCD.001"
        path = area / f"{prefix}.2026-11-20T01:0{i % 10}:{i:02d}.000.fits"
        hdu.writeto(path, overwrite=True)
        paths.append(path)
    return paths


@pytest.fixture
def cluster(rabbitmq_url: str, tmp_path: Path):
    c = Cluster(rabbitmq_url, tmp_path).start()
    yield c
    c.stop()


@pytest.fixture
def watcher(cluster: Cluster):
    w = CompletionWatcher(cluster.amqp_url)
    yield w
    w.close()


def deliver(cluster: Cluster, files: list[Path], run_id: str, wait: float = 60) -> tuple[int, dict]:
    out = subprocess.run(
        PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", run_id, "--wait", str(wait), "--test"],
        env=cluster.env(), cwd=REPO, capture_output=True, text=True, timeout=wait + 30, check=False)
    assert out.stdout.strip(), out.stderr + cluster.logs()
    return out.returncode, json.loads(out.stdout)


def test_one_delivery_gives_exactly_one_completion(cluster, watcher):
    files = make_frames(cluster.delivery_area, 3)
    rc, event = deliver(cluster, files, "e2e-one")
    assert rc == 0, event
    assert event["type"] == "preimg.completed.v1" and event["status"] == "ok"
    events = watcher.collect(until=1, timeout=10)
    watcher.settle(1.5)
    assert [e["run_id"] for e in events] == ["e2e-one"]
    names = {Path(m["name"]).name for m in event["manifest"]}
    assert {f.name for f in files} <= names  # PIPE_SUPPORT=NO packages the raw frames
    assert any(n.startswith("REPORT_FORS2_") for n in names)
    for svc in cluster.services.values():
        assert 'outcome="ok"' in svc.metrics()


def test_bad_inputs_are_dead_lettered_or_failed_and_a_good_delivery_still_completes(cluster, watcher):
    area = cluster.delivery_area
    good = make_frames(area, 2)
    entry = describe_files(good, area)[0]
    zero = "sha256:" + "0" * 64  # a well-formed digest; these files are refused before it is compared
    with RabbitClient(cluster.amqp_url, "preimg") as client:
        send = client.sender.publish_raw
        send("delivery.FORS2", b"{this is not json")
        send("delivery.FORS2", json.dumps({"type": "preimg.delivery_announced.v7", "run_id": "x"}).encode())

        def announce(run_id: str, files, instrument: str = "FORS2") -> None:
            # model_construct: sent as given, also what the contract refuses (no files)
            client.sender.publish(DeliveryAnnounced.model_construct(
                run_id=run_id, delivery_id=run_id, instrument=instrument, files=tuple(files), test=True))

        announce("bad-escape", [DeliveredFile(name="passwd", path="../../etc/passwd", size=1, checksum=zero)])
        announce("bad-absolute", [DeliveredFile(name="passwd", path="/etc/passwd", size=1, checksum=zero)])
        (area / "link.fits").symlink_to("/etc/hostname")
        announce("bad-symlink", [DeliveredFile(name="link.fits", path="link.fits", size=1, checksum=zero)])
        announce("bad-missing", [entry.model_copy(update={"name": "gone.fits", "path": "gone.fits"})])
        announce("bad-size", [entry.model_copy(update={"size": entry.size + 1})])
        announce("bad-checksum", [entry.model_copy(update={"checksum": "sha256:" + "0" * 64})])
        announce("bad-empty", [])
        announce("bad-instrument", [entry], instrument="ESPRESSO")
        # ESPRESSO is bound to nothing but ingest; it must fail there, not vanish.

    failures = watcher.collect(until=8, timeout=30)
    by_run = {e["run_id"]: e for e in failures}
    expected = {
        "bad-escape": "outside the delivery area",
        "bad-absolute": "outside the delivery area",
        "bad-symlink": "outside the delivery area",
        "bad-missing": "does not exist",
        "bad-size": "is truncated",
        "bad-checksum": "checksum mismatch",
        "bad-empty": "files: Tuple should have at least 1 item",
        "bad-instrument": "unknown instrument 'ESPRESSO'",
    }
    for run_id, text in expected.items():
        assert run_id in by_run, f"no RunFailed for {run_id}: {failures}\n{cluster.logs()}"
        assert by_run[run_id]["type"] == "preimg.run_failed.v1"
        assert text in by_run[run_id]["reason"], by_run[run_id]

    with RabbitClient(cluster.amqp_url, "preimg") as client:
        dead = client.get_all(dead_letter_queue(queue_name("ingest")))
    reasons = sorted(h[HEADER_REASON] for _, h in dead)
    assert len(reasons) == 3  # the empty delivery is answered and also dead-lettered for the operators
    assert "not valid JSON" in reasons[0] and "at least 1 item" in reasons[1]
    assert "unknown message type" in reasons[2]

    rc, event = deliver(cluster, good, "after-bad")
    assert rc == 0 and event["status"] == "ok", event
    assert all(svc.proc.poll() is None for svc in cluster.services.values())


def test_logs_are_json_lines_carrying_run_id_and_instrument(cluster):
    files = make_frames(cluster.delivery_area, 2)
    rc, event = deliver(cluster, files, "e2e-logs")
    assert rc == 0, event
    for name in ("ingest", "processor-FORS2", "reporter", "publisher"):
        lines = [json.loads(line) for line in cluster.services[name].log.read_text().splitlines() if line.strip()]
        mine = [entry for entry in lines if entry.get("run_id") == "e2e-logs"]
        assert mine, f"{name} logged nothing for the run:\n{lines[-5:]}"
        assert all(entry["instrument"] == "FORS2" and entry["service"] for entry in mine)


def test_probes_and_metrics_are_served(cluster):
    import urllib.error
    import urllib.request

    svc = cluster.services["ingest"]
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}{path}") as r:
            assert r.status == 200 and json.loads(r.read())["ok"] is True
    text = svc.metrics()
    assert "# TYPE preimg_messages_total counter" in text
    assert "# TYPE preimg_stage_duration_seconds histogram" in text
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/nothing")


def test_sigterm_stops_a_service_cleanly(cluster):
    cluster.kill("reporter", sig=15)
    assert cluster.services["reporter"].proc.returncode == 0
    log = cluster.services["reporter"].log.read_text()
    assert "received SIGTERM" in log


def test_deliver_wait_exits_nonzero_and_prints_the_failure(cluster, tmp_path):
    outside = make_frames(tmp_path / "elsewhere", 1)  # not inside the delivery area
    rc, event = deliver(cluster, outside, "e2e-fail")
    assert rc == 1
    assert event["type"] == "preimg.run_failed.v1" and event["status"] == "failed"
    assert "outside the delivery area" in event["reason"]

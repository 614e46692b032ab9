"""Seed step 0 at start-up: a processor without its calibrations does not consume, says why, and recovers."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest

import synth
from services.app import describe_files
from shared.bus.rabbitmq import RabbitClient
from shared.bus.topology import queue_name
from shared.messages import DeliveryAnnounced
from tests.backbone.cluster import Cluster, CompletionWatcher
from tests.backbone.test_exactly_once import queue_depth

pytestmark = [pytest.mark.rabbitmq, pytest.mark.esorex]


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_processor_waits_for_its_calibrations_and_a_delivery_waits_for_it(rabbitmq_url, tmp_path, hawki_cal):
    empty = tmp_path / "cal"
    empty.mkdir()
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(empty), "PREIMG_RECHECK_S": "0.5"})
    svc = cluster.start_service("processor-HAWKI")
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                code, body = readyz(svc.port)
                if "not run yet" not in body["detail"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, svc.log.read_text()
            time.sleep(0.2)
        assert code == 503 and "MASTER_DARK" in body["detail"], body
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/healthz") as r:
            assert r.status == 200  # alive: a liveness probe must not restart it in a loop

        # A delivery now waits in the processor's queue, declared although the checks fail.
        for name in ("ingest", "reporter", "publisher"):
            cluster.start_service(name)
        frames = synth.make_raw_frames("HAWKI", cluster.delivery_area, n_frames=3)
        with RabbitClient(rabbitmq_url, "preimg") as client:
            client.sender.publish(DeliveryAnnounced(
                run_id="cal-later", delivery_id="cal-later", instrument="HAWKI", test=True,
                files=tuple(describe_files(frames, cluster.delivery_area))))
        deadline = time.monotonic() + 60
        while queue_depth(rabbitmq_url, queue_name("processor", "HAWKI")) != 1:
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        assert watcher.collect(until=1, timeout=1) == []

        shutil.copytree(hawki_cal / "HAWKI", empty / "HAWKI")
        deadline = time.monotonic() + 30
        while readyz(svc.port)[0] != 200:
            assert time.monotonic() < deadline, svc.log.read_text()
            time.sleep(0.2)
        events = watcher.collect(until=1, timeout=240)
        watcher.settle(1)
        assert [(e["run_id"], e.get("status")) for e in events] == [("cal-later", "ok")], cluster.logs()
    finally:
        watcher.close()
        cluster.stop()

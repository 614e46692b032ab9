"""Seed step 0 at start-up: a processor without its calibrations does not consume, says why, and recovers."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest

from tests.backbone.cluster import Cluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.esorex]


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_processor_waits_for_its_calibrations(rabbitmq_url, tmp_path, hawki_cal):
    empty = tmp_path / "cal"
    empty.mkdir()
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(empty), "PREIMG_RECHECK_S": "0.5"})
    svc = cluster.start_service("processor-HAWKI")
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

        shutil.copytree(hawki_cal / "HAWKI", empty / "HAWKI")
        deadline = time.monotonic() + 30
        while readyz(svc.port)[0] != 200:
            assert time.monotonic() < deadline, svc.log.read_text()
            time.sleep(0.2)
    finally:
        cluster.stop()

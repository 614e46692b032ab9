"""`preimg serve <service> --once`: a Kubernetes Job's run takes one message, settles it, exits 0.

Real RabbitMQ, real processes (tests/backbone/cluster.py). The processor of the
Kubernetes ScaledJobs runs exactly this way; ingest (FORS2, no esorex) stands in
for it here because the consumer semantics are the same for every service.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.app import describe_files
from shared.bus.rabbitmq import RabbitClient
from shared.bus.topology import queue_name
from shared.messages import DeliveryAnnounced
from tests.backbone.cluster import PREIMG, REPO, Cluster
from tests.backbone.test_e2e_rabbitmq import make_frames
from tests.backbone.test_exactly_once import queue_depth, wait_until
from tests.ports import free_port

pytestmark = [pytest.mark.rabbitmq]


def _announce(amqp_url: str, area: Path, run_id: str) -> None:
    frames = make_frames(area / run_id, 2)
    with RabbitClient(amqp_url, "preimg", instruments=("FORS2",)) as client:
        client.sender.publish(DeliveryAnnounced(
            run_id=run_id, delivery_id=run_id, instrument="FORS2", test=True,
            files=tuple(describe_files(frames, area))))


def test_once_takes_one_message_settles_it_and_exits_0(rabbitmq_url: str, tmp_path: Path) -> None:
    cluster = Cluster(rabbitmq_url, tmp_path)
    cluster.delivery_area.mkdir(parents=True)
    for run_id in ("once-1", "once-2"):
        _announce(rabbitmq_url, cluster.delivery_area, run_id)
    assert queue_depth(rabbitmq_url, queue_name("ingest")) == 2

    env = {**cluster.env(), "PREIMG_HTTP_PORT": str(free_port())}
    proc = subprocess.run([*PREIMG, "serve", "ingest", "--once"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One delivery handled and acked (its raw_ready event published), the other still queued.
    assert queue_depth(rabbitmq_url, queue_name("ingest")) == 1, proc.stderr[-3000:]
    assert queue_depth(rabbitmq_url, queue_name("processor", "FORS2")) == 1
    assert "one message handled and settled" in proc.stderr


def test_once_with_failing_start_up_checks_exits_1_and_leaves_the_queue(rabbitmq_url: str,
                                                                         tmp_path: Path) -> None:
    cluster = Cluster(rabbitmq_url, tmp_path,
                      extra_env={"PREIMG_CAL_ROOT": str(tmp_path / "no-calibrations")})
    env = {**cluster.env(), "PREIMG_HTTP_PORT": str(free_port())}
    proc = subprocess.run([*PREIMG, "serve", "processor", "-i", "HAWKI", "--once"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "start-up checks failed; --once" in proc.stderr, proc.stderr[-2000:]


def test_startupz_answers_503_until_the_start_up_checks_pass(rabbitmq_url: str, tmp_path: Path) -> None:
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(tmp_path / "no-calibrations"),
                                 "PREIMG_RECHECK_S": "60"})
    svc = cluster.start_service("processor-HAWKI")
    try:
        def probe(path: str) -> tuple[int, dict] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}{path}", timeout=2) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
            except OSError:
                return None

        wait_until(lambda: (p := probe("/startupz")) and "not run yet" not in p[1]["detail"], 30,
                   "the start-up checks to run", svc.log.read_text)
        code, body = probe("/startupz")
        assert code == 503 and "MASTER_DARK" in body["detail"], body
        assert probe("/healthz")[0] == 200  # alive meanwhile: liveness must not restart it
        assert probe("/readyz")[0] == 503
    finally:
        cluster.stop()

    # ...and with the checks passing (the reporter has no calibrations to check), 200.
    others = Cluster(rabbitmq_url, tmp_path / "reporter")
    others.delivery_area.mkdir(parents=True)
    reporter = others.start_service("reporter")
    try:
        others.wait_ready(30)
        with urllib.request.urlopen(f"http://127.0.0.1:{reporter.port}/startupz", timeout=2) as r:
            assert r.status == 200 and json.loads(r.read())["ok"] is True
    finally:
        others.stop()

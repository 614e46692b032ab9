"""kill -9 of the processor while it runs a recipe: after a restart, one completion, no duplicated effect."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from services.app import describe_files
from services.processor import synth
from shared.bus.rabbitmq import RabbitClient
from shared.messages import DeliveryAnnounced
from tests.backbone.cluster import Cluster, CompletionWatcher

pytestmark = [pytest.mark.rabbitmq, pytest.mark.esorex, pytest.mark.slow]


def deliver_and_wait_for_esorex(cluster: Cluster, run_id: str) -> None:
    """Announce a HAWK-I delivery and return once esorex runs for its AB."""
    frames = synth.make_raw_frames("HAWKI", cluster.delivery_area, n_frames=3)
    with RabbitClient(cluster.amqp_url, "preimg") as client:
        client.sender.publish(DeliveryAnnounced(
            run_id=run_id, delivery_id=run_id, instrument="HAWKI", test=True,
            files=tuple(describe_files(frames, cluster.delivery_area))))
    work = cluster.root / "data" / "work" / "HAWKI" / run_id
    deadline = time.monotonic() + 60
    while not list(work.glob("*/esorex.out")):
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)


def test_processor_killed_mid_recipe_completes_once_after_restart(rabbitmq_url, tmp_path, hawki_cal):
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(hawki_cal)}).start()
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        deliver_and_wait_for_esorex(cluster, "crash-1")
        cluster.kill("processor-HAWKI")
        assert watcher.collect(until=1, timeout=2) == []  # nothing completed behind our back

        cluster.start_service("processor-HAWKI")
        events = watcher.collect(until=1, timeout=240)
        watcher.settle(3)
        assert [(e["run_id"], e["type"], e["status"]) for e in events] == [("crash-1", "preimg.completed.v1", "ok")], \
            cluster.logs()
        sci = tmp_path / "data" / "sci" / "HAWKI" / "crash-1"
        names = sorted(p.name for p in sci.glob("*.fits"))
        assert len(names) == 12 and len(set(names)) == 12  # one set of products, not two
        manifest = [m["name"] for m in events[0]["manifest"] if m["name"].endswith(".fits")]
        assert sorted(Path(m).name for m in manifest) == names
        state = json.loads((tmp_path / "data" / "state" / "HAWKI" / "crash-1" / "raw_ready.json").read_text())
        assert state["published_at"] and len(state["events"]) == 1
    finally:
        watcher.close()
        cluster.stop()


def test_sigterm_mid_recipe_finishes_the_message_then_exits(rabbitmq_url, tmp_path, hawki_cal):
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(hawki_cal)}).start()
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        deliver_and_wait_for_esorex(cluster, "term-1")
        cluster.kill("processor-HAWKI", sig=15)  # SIGTERM while esorex runs
        assert cluster.services["processor-HAWKI"].proc.returncode == 0
        # The processor finished the recipe and handed its result on before exiting.
        events = watcher.collect(until=1, timeout=60)
        assert [(e["run_id"], e["status"]) for e in events] == [("term-1", "ok")], cluster.logs()
        log = cluster.services["processor-HAWKI"].log.read_text()
        assert log.index("received SIGTERM") < log.index("handled preimg.raw_ready.v1")
    finally:
        watcher.close()
        cluster.stop()

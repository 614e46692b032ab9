"""A three-node RabbitMQ cluster with quorum queues under the services: node loss costs no run.

The services get the three nodes as one comma-separated ``PREIMG_AMQP_URL``;
they connect to the first that answers. AOG's side is a durable quorum queue
bound to completions and failures, read with the same failover.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pika
import pytest

import synth
from services.app import describe_files
from shared.bus.rabbitmq import BrokerUnavailable, RabbitClient, connection_parameters
from shared.bus.topology import QueueArguments, answer_keys
from shared.errors import PublishFailed
from shared.messages import DeliveryAnnounced
from shared.profiles import available_instruments
from tests.backbone.cluster import Cluster
from tests.backbone.test_e2e_rabbitmq import make_frames
from tests.chaos import (
    BrokerDisruption,
    Chaos,
    assert_each_run_answered_once,
    assert_one_result_per_run,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

QUORUM = QueueArguments("quorum")
AOG_QUEUE = "aog.answers"
DELAYS = (200, 500, 1000)


class AogInbox:
    """AOG's durable quorum queue, read through whichever node answers."""

    def __init__(self, urls: str, queue: str = AOG_QUEUE):
        self.urls = urls
        self.queue = queue
        self.events: list[dict] = []
        with self._connection() as connection:
            channel = connection.channel()
            channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            for key in answer_keys():
                channel.queue_bind(queue, "preimg", key)

    def _connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(connection_parameters(self.urls, 30, "aog-inbox"))

    def collect(self, runs: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len({e["run_id"] for e in self.events}) < runs and time.monotonic() < deadline:
            try:
                with self._connection() as connection:
                    channel = connection.channel()
                    while True:
                        method, _props, body = channel.basic_get(self.queue, auto_ack=True)
                        if method is None:
                            break
                        self.events.append(json.loads(body))
            except pika.exceptions.AMQPError:
                pass
            time.sleep(0.3)
        return self.events


def deliver(urls: str, cluster: Cluster, run_id: str, frames: list[Path], instrument: str = "FORS2",
            within_s: float = 60) -> None:
    """As AOG: a publish the cluster nacks (a queue electing a new leader after a node loss) or that
    a lost connection leaves unconfirmed is sent again (same ids: harmless)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with RabbitClient(urls, "preimg", instruments=available_instruments(), retry_delays_ms=DELAYS,
                              queue_args=QUORUM) as client:
                client.sender.publish(DeliveryAnnounced(
                    run_id=run_id, delivery_id=run_id, instrument=instrument, test=True,
                    files=tuple(describe_files(frames, cluster.delivery_area))))
            return
        except (PublishFailed, BrokerUnavailable, pika.exceptions.AMQPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def answered(inbox: AogInbox, run_id: str, timeout: float, logs) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inbox.collect(runs=len({e["run_id"] for e in inbox.events}) + 1, timeout=2)
        mine = [e for e in inbox.events if e["run_id"] == run_id]
        if mine:
            return mine[0]
    raise AssertionError(f"no answer for {run_id}\n{logs()}")


def test_node_loss_and_a_stopped_minority_node_cost_no_run(broker_cluster, tmp_path):
    urls = broker_cluster.urls
    services = Cluster(urls, tmp_path, extra_env={"PREIMG_QUEUE_TYPE": "quorum"}).start(timeout=120)
    frames = make_frames(services.delivery_area, 3)
    try:
        inbox = AogInbox(urls)
        deliver(urls, services, "cluster-0", [frames[0]])
        assert answered(inbox, "cluster-0", 90, services.logs)["status"] == "ok"
        first = broker_cluster.nodes[0]
        assert f"connected to the broker node 127.0.0.1:{first.amqp_port}" in \
            services.services["reporter"].log.read_text()

        broker_cluster.kill(0)  # kill -9 the node every consumer is on (and maybe leader of their queues)
        deliver(urls, services, "cluster-1", [frames[1]])
        assert answered(inbox, "cluster-1", 120, services.logs)["status"] == "ok"
        log = services.services["reporter"].log.read_text()
        assert any(f"connected to the broker node 127.0.0.1:{n.amqp_port}" in log for n in broker_cluster.nodes[1:])

        broker_cluster.start_node(0)
        broker_cluster.stop_node(2)  # a minority node away: the other two keep serving
        deliver(urls, services, "cluster-2", [frames[2]])
        assert answered(inbox, "cluster-2", 120, services.logs)["status"] == "ok"
        broker_cluster.start_node(2)

        inbox.collect(runs=4, timeout=3)  # anything late
        ids_per_run: dict[str, set[str]] = {}
        for e in inbox.events:
            ids_per_run.setdefault(e["run_id"], set()).add(e["message_id"])
        assert ids_per_run.keys() == {"cluster-0", "cluster-1", "cluster-2"}
        assert all(len(ids) == 1 for ids in ids_per_run.values()), ids_per_run
    finally:
        services.stop()
        for i, node in enumerate(broker_cluster.nodes):
            if not node.running:
                broker_cluster.start_node(i)


def test_chaos_on_the_cluster_loses_and_duplicates_nothing(broker_cluster, tmp_path, hawki_cal):
    """Deliveries (mostly FORS2, every tenth a real HAWK-I run) while broker nodes are killed -9
    (twice, each restarted) and a service is killed -9 every few seconds: every run answered once,
    ok, with one set of products and one monitor row. PREIMG_CLUSTER_CHAOS_RUNS sets the number of
    deliveries (default 100, the issue's size)."""
    n = int(os.environ.get("PREIMG_CLUSTER_CHAOS_RUNS", "100"))
    urls = broker_cluster.urls
    services = Cluster(urls, tmp_path, instruments=("FORS2", "HAWKI"),
                       extra_env={"PREIMG_QUEUE_TYPE": "quorum", "PREIMG_CAL_ROOT": str(hawki_cal)}).start(timeout=120)
    inbox = AogInbox(urls, "aog.chaos")
    run_ids = [f"chaos-{i:03d}" for i in range(n)]
    hawki = {i for i in range(n) if i % 10 == 5}
    fors2 = make_frames(services.delivery_area, n)
    hawki_frames = {i: synth.make_raw_frames("HAWKI", services.delivery_area / run_ids[i], n_frames=3)
                    for i in hawki}
    rng = random.Random(20261206)

    def kill_and_restart_a_node() -> None:
        index = rng.randrange(len(broker_cluster.nodes))
        broker_cluster.kill(index)
        time.sleep(rng.uniform(1.0, 3.0))
        broker_cluster.start_node(index)

    def deliver_one(i: int) -> None:
        if i in hawki:
            deliver(urls, services, run_ids[i], hawki_frames[i], instrument="HAWKI")
        else:
            deliver(urls, services, run_ids[i], [fors2[i]])

    chaos = Chaos(services, n, deliver_one,
                  victims=["ingest", "processor-FORS2", "processor-HAWKI", "reporter", "publisher"],
                  # both node kills while deliveries still arrive (~40 s of them)
                  disruptions=[BrokerDisruption(3.0, "kill -9 broker node", kill_and_restart_a_node),
                               BrokerDisruption(12.0, "kill -9 broker node", kill_and_restart_a_node)],
                  spacing_s=max(0.4, 40.0 / n))
    try:
        chaos.run(lambda: inbox.collect(runs=n, timeout=300 + 3 * n))
        inbox.collect(runs=n + 1, timeout=5)  # anything late, e.g. a duplicate
        assert_each_run_answered_once(inbox.events, set(run_ids), chaos)
        assert_one_result_per_run(tmp_path / "data", inbox.events, {"HAWKI": 12})
        assert chaos.log.count("kill -9 broker node") == 2 and chaos.kills() >= 4, chaos.log
    finally:
        services.stop()
        for i, node in enumerate(broker_cluster.nodes):
            if not node.running:
                broker_cluster.start_node(i)

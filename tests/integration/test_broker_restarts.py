"""The broker goes away while runs are in flight: every run still ends once, correctly.

A private RabbitMQ node (tests/broker_node.py) is restarted under the
services; the machine's broker is not touched. AOG's side is a durable queue
bound to completions and failures, read after each restart as AOG would.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime
from pathlib import Path

import pika
import pytest

import synth
from services.app import describe_files
from shared.bus.rabbitmq import RabbitClient
from shared.files import is_temp_name
from shared.ledger import FileLedger
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

AOG_QUEUE = "aog.answers"


class AogInbox:
    """A durable queue bound to completed.* and run_failed.*, read across broker restarts."""

    def __init__(self, amqp_url: str):
        self.url = amqp_url
        self.events: list[dict] = []
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        channel.exchange_declare("preimg", exchange_type="topic", durable=True,
                                 arguments={"alternate-exchange": "preimg.unroutable"})
        channel.queue_declare(AOG_QUEUE, durable=True)
        for key in ("completed.*", "run_failed.*"):
            channel.queue_bind(AOG_QUEUE, "preimg", key)
        connection.close()

    def collect(self, runs: int, timeout: float) -> list[dict]:
        """Read until ``runs`` distinct runs answered or the timeout; tolerate a broker that is away."""
        deadline = time.monotonic() + timeout
        while len({e["run_id"] for e in self.events}) < runs and time.monotonic() < deadline:
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self.url))
                try:
                    channel = connection.channel()
                    while True:
                        method, _props, body = channel.basic_get(AOG_QUEUE, auto_ack=True)
                        if method is None:
                            break
                        self.events.append(json.loads(body))
                finally:
                    connection.close()
            except pika.exceptions.AMQPError:
                pass
            time.sleep(0.3)
        return self.events


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and is_temp_name(p.name)]


def assert_no_overlap(history: list[dict]) -> None:
    spans = sorted((datetime.fromisoformat(h["acquired_at"]), datetime.fromisoformat(h["released_at"]))
                   for h in history)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"two copies worked on the run at once: {history}"


@pytest.mark.esorex
def test_broker_restarts_during_hawki_recipes_leave_every_run_ok(private_broker, tmp_path, hawki_cal):
    cluster = Cluster(private_broker.url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(hawki_cal)}).start()
    inbox = AogInbox(private_broker.url)
    ledger = FileLedger(tmp_path / "data" / "state")
    mid_recipe = 0
    try:
        for i in range(3):
            run_id = f"restart-{i}"
            frames = synth.make_raw_frames("HAWKI", cluster.delivery_area / run_id, n_frames=3)
            with RabbitClient(private_broker.url, "preimg", instruments=available_instruments(),
                              retry_delays_ms=(200, 500, 1000)) as client:
                client.sender.publish(DeliveryAnnounced(
                    run_id=run_id, delivery_id=run_id, instrument="HAWKI", test=True,
                    files=tuple(describe_files(frames, cluster.delivery_area))))
            work = tmp_path / "data" / "work" / "HAWKI" / run_id
            deadline = time.monotonic() + 120
            while not list(work.glob("*/esorex.out")):
                assert time.monotonic() < deadline, cluster.logs()
                time.sleep(0.02)
            private_broker.stop_app()
            mid_recipe += not list(work.glob("*/products.json"))  # esorex still running when the broker left
            private_broker.start_app()
            events = inbox.collect(runs=i + 1, timeout=240)
            assert [(e["run_id"], e["type"], e.get("status")) for e in events][i:] == \
                [(run_id, "preimg.completed.v1", "ok")], cluster.logs()
            products = sorted(p.name for p in (tmp_path / "data" / "sci" / "HAWKI" / run_id).glob("*.fits"))
            assert len(products) == 12 and len(set(products)) == 12
            history = ledger.lease_history("raw_ready", "HAWKI", run_id)
            assert_no_overlap(history)
            log = cluster.services["processor-HAWKI"].log.read_text().splitlines()
            handled = [line for line in log if run_id in line and "handled preimg.raw_ready.v1" in line]
            assert len(handled) == 1, "the recipe chain ran more than once"
        assert mid_recipe >= 2, f"only {mid_recipe} of 3 restarts landed while esorex ran"
        inbox.collect(runs=4, timeout=3)  # anything late
        assert len({e["message_id"] for e in inbox.events}) == 3  # duplicates (same id) are allowed, others not
        assert temp_files(tmp_path / "data") == []
    finally:
        cluster.stop()


def test_chaos_kills_and_broker_restarts_lose_and_duplicate_nothing(private_broker, tmp_path):
    """100 FORS2 deliveries; services killed with SIGKILL at random and the broker restarted twice."""
    n = 100
    cluster = Cluster(private_broker.url, tmp_path, instruments=("FORS2",)).start()
    inbox = AogInbox(private_broker.url)
    frames = make_frames(cluster.delivery_area, n)

    def deliver(i: int) -> None:
        with RabbitClient(private_broker.url, "preimg", instruments=available_instruments(),
                          retry_delays_ms=(200, 500, 1000)) as client:
            client.sender.publish(DeliveryAnnounced(
                run_id=f"chaos-{i:03d}", delivery_id=f"chaos-{i:03d}", instrument="FORS2", test=True,
                files=tuple(describe_files([frames[i]], cluster.delivery_area))))

    chaos = Chaos(cluster, n, deliver, victims=["ingest", "processor-FORS2", "reporter", "publisher"],
                  # while deliveries are still arriving (100 x 0.25 s)
                  disruptions=[BrokerDisruption(5.0, "broker restart", private_broker.restart),
                               BrokerDisruption(15.0, "broker restart", private_broker.restart)])
    try:
        chaos.run(lambda: inbox.collect(runs=n, timeout=400), send_timeout_s=300)
        inbox.collect(runs=n + 1, timeout=5)  # anything late, e.g. a duplicate
        assert_each_run_answered_once(inbox.events, {f"chaos-{i:03d}" for i in range(n)}, chaos)
        assert_one_result_per_run(tmp_path / "data", inbox.events, {})
        assert temp_files(tmp_path / "data") == []
        assert chaos.kills() >= 5 and chaos.log.count("broker restart") == 2
    finally:
        cluster.stop()

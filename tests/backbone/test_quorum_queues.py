"""Quorum queues: their arguments, the delivery limit on both buses, and a broker holding the other type.

The retry and dead-letter semantics under quorum queues are the bus contract's
``rabbitmq-quorum`` cases (tests/backbone/test_bus_contract.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pika
import pytest
from prometheus_client import CollectorRegistry

from shared.bus.memory import ConsumerDied, InProcessBus
from shared.bus.runner import MessageRunner
from shared.bus.topology import HEADER_REASON, QueueArguments, QueueSpec, dead_letter_queue
from shared.ledger import FileLedger
from shared.messages import DeliveredFile, DeliveryAnnounced, RunFailed, decode
from shared.metrics import build_metrics
from tests.backbone.cluster import PREIMG, REPO, Cluster
from tests.ports import free_port

SPEC = QueueSpec.for_service("ingest")
DELAYS = (50, 100, 200)
ONE_FILE = (DeliveredFile(name="a.fits", path="a.fits", size=2880, checksum="sha256:" + "0" * 64),)


def a_delivery(run_id: str = "limit-1") -> DeliveryAnnounced:
    return DeliveryAnnounced(run_id=run_id, delivery_id=run_id, instrument="HAWKI", files=ONE_FILE)


def runner(tmp_path: Path, handler, delivery_limit: int | None) -> MessageRunner:
    return MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, FileLedger(tmp_path / "state"),
                         build_metrics(CollectorRegistry()), max_attempts=4, delivery_limit=delivery_limit)


def test_classic_arguments_are_those_of_the_single_node_layout():
    classic = QueueArguments("classic")
    assert classic.service_queue("q") == {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "q.dlq"}
    assert classic.retry_queue("q", 1000) == {"x-message-ttl": 1000, "x-dead-letter-exchange": "",
                                              "x-dead-letter-routing-key": "q"}
    assert classic.plain_queue() == {}


def test_quorum_queues_dead_letter_at_least_once_and_limit_deliveries():
    quorum = QueueArguments("quorum", delivery_limit=7)
    service = quorum.service_queue("q")
    assert service["x-queue-type"] == "quorum" and service["x-delivery-limit"] == 7
    assert service["x-dead-letter-strategy"] == "at-least-once" and service["x-overflow"] == "reject-publish"
    retry = quorum.retry_queue("q", 500)
    assert retry["x-message-ttl"] == 500 and retry["x-dead-letter-routing-key"] == "q"
    assert retry["x-dead-letter-strategy"] == "at-least-once" and "x-delivery-limit" not in retry
    assert quorum.plain_queue() == {"x-queue-type": "quorum"}
    with pytest.raises(ValueError, match="unknown queue type"):
        QueueArguments("stream")


def test_in_process_a_message_whose_consumer_dies_each_time_is_answered_on_its_last_delivery(tmp_path):
    calls = []

    def dies(message):
        calls.append(message.run_id)
        raise ConsumerDied("kill -9")

    bus = InProcessBus(DELAYS, delivery_limit=3)
    bus.declare(SPEC)
    bus.declare_sink("sink", ("run_failed.*",))
    bus.subscribe(SPEC.name, runner(tmp_path, dies, delivery_limit=3).process)
    bus.publish(a_delivery())
    bus.drain(timeout_s=10)
    assert len(calls) == 3  # deliveries 0, 1, 2 died; the 4th (3 returns) is answered unhandled
    [answer] = [decode(m.body) for m in bus.messages("sink")]
    assert isinstance(answer, RunFailed) and "came back 3 times unsettled" in answer.reason
    [dead] = bus.messages(dead_letter_queue(SPEC.name))
    assert "x-delivery-limit 3" in dead.headers[HEADER_REASON]


def test_in_process_past_the_delivery_limit_the_bus_dead_letters_by_itself(tmp_path):
    bus = InProcessBus(DELAYS, delivery_limit=2)
    bus.declare(SPEC)
    bus.subscribe(SPEC.name, lambda incoming: (_ for _ in ()).throw(ConsumerDied("lost")))
    bus.publish(a_delivery())
    bus.drain(timeout_s=10)
    [dead] = bus.messages(dead_letter_queue(SPEC.name))
    assert dead.headers[HEADER_REASON].startswith("delivery_limit")


def test_on_the_broker_a_message_returned_to_its_limit_is_answered_and_dead_lettered(rabbitmq_url, tmp_path):
    from shared.bus.rabbitmq import RabbitClient, RabbitConsumer

    quorum = QueueArguments("quorum", delivery_limit=2)
    with RabbitClient(rabbitmq_url, "preimg", queue_args=quorum) as client:
        client.declare(SPEC, DELAYS)
        channel = client.channel
        channel.queue_declare("sink", durable=True)
        channel.queue_bind("sink", "preimg", "run_failed.*")
        client.sender.publish(a_delivery())
        for _ in range(2):  # a consumer takes it and dies holding it, twice
            taker = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
            method, _props, _body = taker.channel().basic_get(SPEC.name, auto_ack=False)
            assert method is not None
            taker.close()
        handled = []
        consumer = RabbitConsumer(rabbitmq_url, "preimg", SPEC, runner(tmp_path, handled.append, 2).process,
                                  DELAYS, queue_args=quorum)
        import threading

        stop = threading.Event()
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            answers: list = []
            while not answers and time.monotonic() < deadline:
                answers = client.get_all("sink")
                time.sleep(0.1)
            assert handled == []
            [(body, _)] = answers
            assert "came back 2 times unsettled" in json.loads(body)["reason"]
            [(_, headers)] = client.get_all(dead_letter_queue(SPEC.name))
            assert "x-delivery-limit 2" in headers[HEADER_REASON]
        finally:
            stop.set()
            thread.join(10)


def test_a_command_meeting_queues_of_the_other_type_names_the_migration(rabbitmq_url):
    from shared.bus.rabbitmq import BrokerUnavailable, RabbitClient

    with RabbitClient(rabbitmq_url, "preimg", instruments=["FORS2"], retry_delays_ms=DELAYS):
        pass  # classic layout
    quorum_client = RabbitClient(rabbitmq_url, "preimg", instruments=["FORS2"], retry_delays_ms=DELAYS,
                                 queue_args=QueueArguments("quorum"))
    with pytest.raises(BrokerUnavailable) as refused, quorum_client:
        pass
    text = str(refused.value)
    assert "as a classic queue" in text and "PREIMG_QUEUE_TYPE is quorum" in text
    assert "PREIMG_QUEUE_TYPE=quorum preimg broker migrate" in text and "guest" not in text


def test_a_service_meeting_queues_of_the_other_type_says_so_and_keeps_waiting(rabbitmq_url, tmp_path):
    """No crash loop: the service stays up, not ready, /readyz and the log name the migration."""
    cluster = Cluster(rabbitmq_url, tmp_path)
    env = cluster.env()
    subprocess.run(PREIMG + ["dlq", "list", "preimg.reporter"], env={**env, "PREIMG_QUEUE_TYPE": "quorum"},
                   cwd=REPO, check=True, capture_output=True, timeout=60)  # a quorum layout
    port = free_port()
    log = tmp_path / "reporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(PREIMG + ["serve", "reporter"], cwd=REPO, stdout=out, stderr=out,
                                env={**env, "PREIMG_QUEUE_TYPE": "classic", "PREIMG_HTTP_PORT": str(port)})
    try:
        deadline = time.monotonic() + 40
        while "as a quorum queue" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
        detail = json.loads(not_ready.value.read())["detail"]
        assert "QueueTypeMismatch" in detail and "PREIMG_QUEUE_TYPE" in detail
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()


def test_preimg_broker_migrate_changes_the_queue_type_and_keeps_every_message(rabbitmq_url, tmp_path):
    """Classic layout with messages waiting; `preimg broker migrate` refuses while a queue has a
    consumer, then makes every preimg queue quorum with the same messages, headers and bindings,
    leaves nothing aside, and a second run changes nothing."""
    from shared.bus.rabbitmq import RabbitClient
    from shared.profiles import available_instruments

    env = Cluster(rabbitmq_url, tmp_path).env()
    delays = (200, 500, 1000)  # the cluster's PREIMG_RETRY_DELAYS_MS
    with RabbitClient(rabbitmq_url, "preimg", instruments=available_instruments(), retry_delays_ms=delays) as client:
        for i in range(2):
            client.sender.publish_raw("delivery.FORS2", f"waiting-{i}".encode())
        client.sender.send_to_queue("preimg.reporter.dlq", b"dead", {HEADER_REASON: "why it died"})

    def migrate(queue_type: str) -> subprocess.CompletedProcess:
        return subprocess.run(PREIMG + ["broker", "migrate"], env={**env, "PREIMG_QUEUE_TYPE": queue_type},
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)

    consumer = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    consumer.channel().basic_consume("preimg.reporter", lambda *a: None)
    refused = migrate("quorum")
    consumer.close()
    assert refused.returncode == 3 and "preimg.reporter has 1 consumer(s): stop the services" in refused.stderr

    out = migrate("quorum")
    assert out.returncode == 0, out.stderr
    changed = {c["queue"]: c for c in json.loads(out.stdout)["changed"]}
    assert changed["preimg.ingest"]["messages"] == 2 and changed["preimg.reporter.dlq"]["messages"] == 1
    assert {c["to"] for c in changed.values()} == {"quorum"}
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    listing = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type", "--no-table-headers"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    types = dict(line.split("\t") for line in listing if line.strip())
    assert not any(name.endswith(".migrating") for name in types), types
    assert {t for name, t in types.items() if name.startswith("preimg.")} == {"quorum"}, types
    assert set(changed) == {name for name in types if name.startswith("preimg.")}
    with RabbitClient(rabbitmq_url, "preimg", instruments=available_instruments(), retry_delays_ms=delays,
                      queue_args=QueueArguments("quorum")) as client:  # the quorum layout, no mismatch
        assert sorted(b for b, _ in client.get_all("preimg.ingest")) == [b"waiting-0", b"waiting-1"]
        [(body, headers)] = client.get_all("preimg.reporter.dlq")
        assert body == b"dead" and headers[HEADER_REASON] == "why it died"
        client.sender.publish_raw("delivery.FORS2", b"after")  # bound again
        assert [b for b, _ in client.get_all("preimg.ingest")] == [b"after"]
    again = migrate("quorum")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] == []
    with RabbitClient(rabbitmq_url, "preimg", queue_args=QueueArguments("quorum")) as client:
        client.sender.publish_raw("delivery.FORS2", b"back")
    back = migrate("classic")  # and back again, for a cluster given up
    assert back.returncode == 0, back.stderr
    assert {c["queue"]: c["messages"] for c in json.loads(back.stdout)["changed"]}["preimg.ingest"] == 1
    with RabbitClient(rabbitmq_url, "preimg", instruments=available_instruments(), retry_delays_ms=delays) as client:
        assert [b for b, _ in client.get_all("preimg.ingest")] == [b"back"]

"""One contract for both buses: the in-process bus and RabbitMQ behave the same.

Each test runs three times: against ``InProcessBus`` and against a real
RabbitMQ broker on a private virtual host, with classic and with quorum queues
(retry TTLs and dead-lettering must mean the same with both).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shared.bus.memory import InProcessBus
from shared.bus.runner import Incoming, MessageRunner
from shared.bus.topology import (
    CLASSIC,
    HEADER_ATTEMPT,
    HEADER_LEASE_WAIT_SINCE,
    HEADER_REASON,
    HEADER_REPLAYS,
    UNROUTABLE_QUEUE,
    QueueArguments,
    QueueSpec,
    dead_letter_queue,
)
from shared.errors import (
    IgnorableMessage,
    OperatorActionRequired,
    PermanentError,
    PublishFailed,
    RetryableError,
)
from shared.ledger import FileLedger, LeaseBusy
from shared.messages import (
    DeliveredFile,
    DeliveryAnnounced,
    Envelope,
    PreImagingCompleted,
    RawDataReady,
    RunFailed,
    decode,
)
from shared.metrics import build_metrics

RETRY_DELAYS_MS = (50, 100, 200)
SINK = "test.sink"
SINK_KEYS = ("raw_ready.*", "run_failed.*", "completed.*")
SPEC = QueueSpec.for_service("ingest")


ONE_FILE = (DeliveredFile(name="a.fits", path="a.fits", size=2880, checksum="sha256:" + "0" * 64),)


def delivery(delivery_id: str, run_id: str | None = None) -> DeliveryAnnounced:
    return DeliveryAnnounced(run_id=run_id or f"run-{delivery_id}", delivery_id=delivery_id, instrument="HAWKI",
                             files=ONE_FILE)


class ScriptedHandler:
    """A handler whose behaviour the delivery id chooses; counts its calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, msg: DeliveryAnnounced) -> list[Envelope]:
        n = self.calls[msg.delivery_id] = self.calls.get(msg.delivery_id, 0) + 1
        kind = msg.delivery_id.split("-")[0]
        if kind == "permanent":
            raise PermanentError("the frames are unusable: deliver them again")
        if kind == "ignore":
            raise IgnorableMessage("not for us")
        if kind == "flaky" and n < 3:
            raise RetryableError(f"disk busy (call {n})")
        if kind == "crash":
            raise RuntimeError("boom")
        if kind == "operator":
            raise OperatorActionRequired("S3 put refused: NoSuchBucket; create the bucket")
        return [RawDataReady(run_id=msg.run_id, delivery_id=msg.delivery_id, instrument=msg.instrument,
                             raw_dir="/nowhere", frames=(), delivered_at=msg.created_at)]


class MemoryHarness:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bus = InProcessBus(RETRY_DELAYS_MS)

    def start(self, runner: MessageRunner) -> None:
        self.bus.declare(SPEC)
        self.bus.declare_sink(SINK, SINK_KEYS)
        self.bus.subscribe(SPEC.name, runner.process)

    def publish_raw(self, routing_key: str, body: bytes) -> None:
        self.bus.publish_raw(routing_key, body)

    def wait(self, done: Callable[[], bool], timeout: float = 10) -> None:
        self.bus.drain(timeout_s=timeout)
        assert done()

    def sink(self) -> list[Envelope]:
        return [decode(m.body) for m in self.bus.messages(SINK)]

    def dead_letters(self) -> list[tuple[bytes, dict]]:
        return [(m.body, dict(m.headers)) for m in self.bus.messages(dead_letter_queue(SPEC.name))]

    def replay(self) -> None:
        """What ``preimg dlq replay`` does: dead letters back onto the queue, replay counted."""
        for m in self.bus.take(dead_letter_queue(SPEC.name)):
            headers = {k: v for k, v in m.headers.items() if not k.startswith("x-preimg-")}
            headers[HEADER_REPLAYS] = int(m.headers.get(HEADER_REPLAYS, 0)) + 1
            self.bus.send_to_queue(SPEC.name, m.body, headers)

    def stop(self) -> None:
        pass


class RabbitHarness:
    def __init__(self, tmp: Path, url: str, queue_args: QueueArguments = CLASSIC):
        from shared.bus.rabbitmq import RabbitClient

        self.tmp = tmp
        self.url = url
        self.queue_args = queue_args
        self.client = RabbitClient(url, "preimg", queue_args=queue_args).__enter__()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self._sink: list[Envelope] = []
        self._dead: list[tuple[bytes, dict]] = []

    def start(self, runner: MessageRunner) -> None:
        from shared.bus.rabbitmq import RabbitConsumer

        self.client.declare(SPEC, RETRY_DELAYS_MS)
        ch = self.client.channel
        ch.queue_declare(SINK, durable=True)
        for key in SINK_KEYS:
            ch.queue_bind(SINK, "preimg", key)
        consumer = RabbitConsumer(self.url, "preimg", SPEC, runner.process, RETRY_DELAYS_MS, shutdown_grace_s=5,
                                  queue_args=self.queue_args)
        self.thread = threading.Thread(target=consumer.run, args=(self.stop_event,), daemon=True)
        self.thread.start()
        assert consumer.connected.wait(10)

    def publish_raw(self, routing_key: str, body: bytes) -> None:
        self.client.sender.publish_raw(routing_key, body)

    def wait(self, done: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._collect()
            if done():
                time.sleep(0.3)  # let anything unexpected arrive too
                self._collect()
                return
            time.sleep(0.05)
        raise AssertionError("condition not reached over RabbitMQ")

    def _collect(self) -> None:
        self._sink += [decode(b) for b, _ in self.client.get_all(SINK)]
        self._dead += self.client.get_all(dead_letter_queue(SPEC.name))

    def sink(self) -> list[Envelope]:
        return list(self._sink)

    def dead_letters(self) -> list[tuple[bytes, dict]]:
        return list(self._dead)

    def replay(self) -> None:
        """Put the collected dead letters back on the dead-letter queue, then ``preimg dlq replay``."""
        for body, headers in self._dead:
            self.client.sender.send_to_queue(dead_letter_queue(SPEC.name), body, headers)
        self._dead.clear()
        assert self.client.replay_dead_letters(SPEC.name) >= 1

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread:
            self.thread.join(10)
        self.client.__exit__(None, None, None)


#: The cases where quorum queues could differ from classic ones: TTL retries and broker dead-lettering.
QUORUM_CASES = {
    "test_good_message_emits_its_event_once",
    "test_malformed_json_is_dead_lettered_with_reason",
    "test_retryable_error_is_retried_through_delay_queues_then_succeeds",
    "test_retries_exhausted_dead_letter_with_attempts_and_run_failed",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every contract test on both buses; the quorum cases also on quorum queues."""
    if "harness" in metafunc.fixturenames:
        buses = ["memory", "rabbitmq"] + (["rabbitmq-quorum"] if metafunc.function.__name__ in QUORUM_CASES else [])
        metafunc.parametrize("harness", buses, indirect=True)


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "memory":
        h = MemoryHarness(tmp_path)
    elif request.param == "rabbitmq":
        h = RabbitHarness(tmp_path, request.getfixturevalue("rabbitmq_url"))
    else:
        h = RabbitHarness(tmp_path, request.getfixturevalue("rabbitmq_url"), QueueArguments("quorum"))
    yield h
    h.stop()


@pytest.fixture
def handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
def runner(harness, handler: ScriptedHandler, tmp_path: Path) -> MessageRunner:
    r = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, FileLedger(tmp_path / "state"),
                      build_metrics(CollectorRegistry()), max_attempts=4)
    harness.start(r)
    return r


def test_good_message_emits_its_event_once(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("good-1").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    [event] = harness.sink()
    assert isinstance(event, RawDataReady) and event.delivery_id == "good-1"
    assert handler.calls == {"good-1": 1}
    assert harness.dead_letters() == []


def test_routing_by_instrument_key_reaches_the_bound_queue_only(harness, runner, handler):
    harness.publish_raw("raw_ready.HAWKI", delivery("misrouted-1").to_json())  # not bound to ingest
    harness.publish_raw("delivery.VIMOS", delivery("good-2").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    assert handler.calls == {"good-2": 1}


def test_malformed_json_is_dead_lettered_with_reason(harness, runner):
    harness.publish_raw("delivery.HAWKI", b"{not json")
    harness.publish_raw("delivery.HAWKI", delivery("good-3").to_json())
    harness.wait(lambda: len(harness.dead_letters()) >= 1 and len(harness.sink()) >= 1)
    [(body, headers)] = harness.dead_letters()
    assert body == b"{not json"
    assert "not valid JSON" in headers[HEADER_REASON]


def test_unknown_type_and_version_are_dead_lettered(harness, runner):
    harness.publish_raw("delivery.HAWKI", b'{"type": "preimg.delivery_announced.v9", "run_id": "x"}')
    harness.publish_raw("delivery.HAWKI", b'{"type": "preimg.delivery_announced.v1", "run_id": "x"}')
    harness.wait(lambda: len(harness.dead_letters()) >= 2)
    reasons = sorted(h[HEADER_REASON] for _, h in harness.dead_letters())
    assert "unknown message type 'preimg.delivery_announced.v9'" in reasons[1]
    assert "invalid preimg.delivery_announced.v1" in reasons[0] and "delivery_id" in reasons[0]


def test_permanent_error_becomes_run_failed_and_is_not_retried(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("permanent-1").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    [event] = harness.sink()
    assert isinstance(event, RunFailed)
    assert event.reason == "the frames are unusable: deliver them again" and event.failed_stage == "ingest"
    assert handler.calls == {"permanent-1": 1}


def test_retryable_error_is_retried_through_delay_queues_then_succeeds(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("flaky-1").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    assert handler.calls == {"flaky-1": 3}
    [event] = harness.sink()
    assert isinstance(event, RawDataReady)


def test_retries_exhausted_dead_letter_with_attempts_and_run_failed(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("crash-1").to_json())
    harness.wait(lambda: len(harness.dead_letters()) >= 1 and len(harness.sink()) >= 1)
    assert handler.calls == {"crash-1": 4}
    [(_, headers)] = harness.dead_letters()
    assert int(headers[HEADER_ATTEMPT]) == 3
    assert "gave up after 4 attempts: RuntimeError: boom" in headers[HEADER_REASON]
    [event] = harness.sink()
    assert isinstance(event, RunFailed) and "RuntimeError: boom" in event.reason


def test_ignorable_message_is_acked_without_events(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("ignore-1").to_json())
    harness.publish_raw("delivery.HAWKI", delivery("good-4").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    assert [e.delivery_id for e in harness.sink()] == ["good-4"]
    assert handler.calls == {"ignore-1": 1, "good-4": 1}


def test_duplicate_message_is_absorbed_not_redone(harness, runner, handler):
    body = delivery("good-5").to_json()
    harness.publish_raw("delivery.HAWKI", body)
    harness.wait(lambda: len(harness.sink()) >= 1)
    harness.publish_raw("delivery.HAWKI", body)  # a redelivery after the work was confirmed
    harness.publish_raw("delivery.HAWKI", delivery("good-6").to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    assert handler.calls == {"good-5": 1, "good-6": 1}
    assert sorted(e.delivery_id for e in harness.sink()) == ["good-5", "good-6"]


def test_recorded_but_unconfirmed_result_is_re_emitted_without_redoing(harness, handler, tmp_path):
    # The stage did its work and recorded it, then crashed before publishing.
    ledger = FileLedger(tmp_path / "state")
    msg = delivery("good-7")
    [event] = handler(msg)
    ledger.record("delivery", msg, [event])
    handler.calls.clear()
    r = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, ledger, build_metrics(CollectorRegistry()))
    harness.start(r)
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    assert handler.calls == {}
    [re_emitted] = harness.sink()
    assert re_emitted.message_id == event.message_id
    assert ledger.lookup("delivery", "HAWKI", msg.run_id).published_at is not None


def test_reused_run_id_from_another_delivery_fails_the_newcomer(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("good-8", run_id="shared-run").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    harness.publish_raw("delivery.HAWKI", delivery("good-9", run_id="shared-run").to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    second = harness.sink()[1]
    assert isinstance(second, RunFailed) and "already used by delivery 'good-8'" in second.reason
    assert handler.calls == {"good-8": 1}


def test_long_work_keeps_the_connection_alive(rabbitmq_url, tmp_path):
    """A handler busy for several heartbeat intervals: the connection thread keeps answering."""
    from shared.bus.rabbitmq import RabbitClient, RabbitConsumer

    calls = []

    def slow(msg: DeliveryAnnounced) -> list[Envelope]:
        calls.append(msg.delivery_id)
        time.sleep(6)  # a recipe; the broker would drop a silent client after ~2 missed heartbeats of 1 s
        return ScriptedHandler()(msg)

    runner = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: slow}, FileLedger(tmp_path / "state"),
                           build_metrics(CollectorRegistry()))
    consumer = RabbitConsumer(rabbitmq_url, "preimg", SPEC, runner.process, RETRY_DELAYS_MS, heartbeat_s=1)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert consumer.connected.wait(10)
        with RabbitClient(rabbitmq_url, "preimg") as client:
            ch = client.channel
            ch.queue_declare(SINK, durable=True)
            ch.queue_bind(SINK, "preimg", "raw_ready.*")
            client.sender.publish(delivery("good-slow"))
            deadline = time.monotonic() + 30
            got = []
            while not got and time.monotonic() < deadline:
                got = client.get_all(SINK)
                time.sleep(0.1)
        assert len(got) == 1 and calls == ["good-slow"]
        assert consumer.connected.is_set()
    finally:
        stop.set()
        thread.join(10)


# --- every delivery gets exactly one answer ---------------------------------------------


def test_invalid_message_with_readable_ids_is_answered_and_dead_lettered(harness, runner, handler):
    good = json.loads(delivery("x").to_json())
    bodies = {
        "inv-extra": {**good, "priority": 3},
        "inv-notype": {k: v for k, v in good.items() if k != "type"},
        "inv-version": {**good, "type": "preimg.delivery_announced.v9"},
        "inv-checksum": {**good, "files": [{**good["files"][0], "checksum": "crc32:1234"}]},
    }
    for run_id, body in bodies.items():
        harness.publish_raw("delivery.HAWKI", json.dumps({**body, "run_id": run_id, "delivery_id": run_id}).encode())
    harness.publish_raw("delivery.HAWKI", json.dumps({**good, "run_id": "no/such id", "extra": 1}).encode())
    harness.wait(lambda: len(harness.sink()) >= 4 and len(harness.dead_letters()) >= 5)
    by_run = {e.run_id: e for e in harness.sink()}
    assert set(by_run) == set(bodies)  # the message without a usable run id is only dead-lettered
    assert all(isinstance(e, RunFailed) and e.failed_stage == "ingest" for e in by_run.values())
    assert "priority" in by_run["inv-extra"].reason
    assert "unknown message type None" in by_run["inv-notype"].reason
    assert "preimg.delivery_announced.v9" in by_run["inv-version"].reason
    assert "files.0.checksum" in by_run["inv-checksum"].reason
    assert handler.calls == {}


def test_a_delivery_sent_again_after_its_run_failed_gets_the_same_failure_again(harness, runner, handler):
    msg = delivery("permanent-resend")
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    harness.publish_raw("delivery.HAWKI", msg.model_copy(update={"message_id": "aog-resent-it"}).to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    first, again = harness.sink()
    assert isinstance(first, RunFailed) and again.model_dump() == first.model_dump()
    assert handler.calls == {"permanent-resend": 1}


def test_a_delivery_sent_again_after_its_run_completed_gets_the_completion_again(harness, runner, handler, tmp_path):
    msg = delivery("good-finished")
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    completed = PreImagingCompleted(**msg.follow_up("completed"), status="ok", package_dir="/p",
                                    package_url="file:///p", manifest=())
    FileLedger(tmp_path / "state").record_terminal(completed)  # what the publisher records at the end
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    assert isinstance(harness.sink()[0], RawDataReady)
    assert harness.sink()[1].model_dump() == completed.model_dump()
    assert handler.calls == {"good-finished": 1}


def test_a_delivery_sent_again_while_its_run_is_in_progress_is_absorbed(harness, runner, handler):
    msg = delivery("good-busy")
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.publish_raw("delivery.HAWKI", delivery("good-after").to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    assert [e.delivery_id for e in harness.sink()] == ["good-busy", "good-after"]


def test_two_failures_of_one_run_are_two_messages(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("crash-twice").to_json())
    harness.wait(lambda: len(harness.dead_letters()) >= 1 and len(harness.sink()) >= 1)
    harness.replay()  # the operator replays before mending the fault: it fails again
    harness.wait(lambda: len(harness.dead_letters()) >= 1 and len(harness.sink()) >= 2)
    first, second = harness.sink()
    assert isinstance(first, RunFailed) and isinstance(second, RunFailed)
    assert first.message_id != second.message_id
    assert handler.calls == {"crash-twice": 8}


def test_a_corrupt_state_record_fails_the_run_naming_the_file(harness, runner, handler, tmp_path):
    record = tmp_path / "state" / "HAWKI" / "run-good-corrupt" / "delivery.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"stage": "delivery", "events": [')
    harness.publish_raw("delivery.HAWKI", delivery("good-corrupt").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    [event] = harness.sink()
    assert isinstance(event, RunFailed) and str(record) in event.reason and "corrupt" in event.reason
    assert handler.calls == {}
    assert record.read_text() == '{"stage": "delivery", "events": ['  # the evidence is kept


class DiskFullOnce(FileLedger):
    """A ledger whose first write fails as on a full disk."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.failures = 1

    def record(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().record(*args, **kwargs)


def test_a_full_disk_while_recording_is_retried_with_the_reason(harness, handler, tmp_path):
    r = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, DiskFullOnce(tmp_path / "state"),
                      build_metrics(CollectorRegistry()), max_attempts=4)
    harness.start(r)
    harness.publish_raw("delivery.HAWKI", delivery("good-full").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    [event] = harness.sink()
    assert isinstance(event, RawDataReady)
    assert handler.calls == {"good-full": 2} and harness.dead_letters() == []


class EntrySyncFailsOnce(FileLedger):
    """A ledger whose first record cannot be made durable: its directory's sync fails as on a bad disk."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.failures = 1
        self.waits = 0
        self.resyncs = 0

    def record(self, *args, **kwargs):
        durable = super().record(*args, **kwargs)

        def wait() -> None:
            self.waits += 1
            durable()
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EIO, "Input/output error")

        return wait

    def sync_record_entry(self, *args, **kwargs):
        self.resyncs += 1
        return super().sync_record_entry(*args, **kwargs)


def test_a_record_that_cannot_be_made_durable_is_not_acked_and_its_result_comes_again(harness, handler, tmp_path):
    ledger = EntrySyncFailsOnce(tmp_path / "state")
    r = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, ledger,
                      build_metrics(CollectorRegistry()), max_attempts=4)
    harness.start(r)
    msg = delivery("good-eio")
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    # Published while the record's last sync ran; that sync failed, so the message was not acked
    # but retried, and the retry re-emitted the recorded event (same id) without redoing the work.
    assert {e.message_id for e in harness.sink()} == {harness.sink()[0].message_id}
    assert all(isinstance(e, RawDataReady) for e in harness.sink())
    assert handler.calls == {"good-eio": 1} and ledger.waits == 1 and ledger.resyncs == 1
    assert harness.dead_letters() == []
    harness.wait(lambda: ledger.lookup("delivery", "HAWKI", msg.run_id).published_at is not None)


def test_an_event_nobody_can_route_is_retried_then_dead_lettered_with_the_reason(tmp_path):
    bus = InProcessBus(RETRY_DELAYS_MS)
    bus.declare(SPEC)  # nothing bound to raw_ready.* or run_failed.*, and no alternate exchange
    handler = ScriptedHandler()
    runner = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, FileLedger(tmp_path / "state"),
                           build_metrics(CollectorRegistry()), max_attempts=3)
    bus.subscribe(SPEC.name, runner.process)
    bus.publish_raw("delivery.HAWKI", delivery("good-lost").to_json())
    bus.drain(timeout_s=10)
    [dead] = bus.messages(dead_letter_queue(SPEC.name))
    reason = dead.headers[HEADER_REASON]
    assert "gave up after 3 attempts" in reason and "no queue is bound to routing key 'raw_ready.HAWKI'" in reason
    assert "RunFailed could not be published either" in reason
    assert handler.calls == {"good-lost": 1}  # the retries re-emit the recorded result; the work ran once


def test_the_alternate_exchange_collects_what_no_binding_takes_on_both_buses(rabbitmq_url):
    from shared.bus.rabbitmq import RabbitClient, RabbitSender

    bus = InProcessBus(RETRY_DELAYS_MS)
    bus.declare(SPEC)
    with pytest.raises(PublishFailed, match="completed.HAWKI"):
        bus.publish_raw("completed.HAWKI", b"{}")
    bus.declare_topology(["HAWKI"])
    bus.publish_raw("completed.HAWKI", b"{}")
    assert [m.routing_key for m in bus.messages(UNROUTABLE_QUEUE)] == ["completed.HAWKI"]

    with RabbitClient(rabbitmq_url, "preimg", instruments=["HAWKI"], retry_delays_ms=RETRY_DELAYS_MS) as client:
        client.sender.publish_raw("completed.HAWKI", b"{}")  # AOG has bound no queue yet
        assert [b for b, _ in client.get_all(UNROUTABLE_QUEUE)] == [b"{}"]
        # Without an alternate exchange the broker returns the message: an error, not a success.
        client.channel.exchange_declare("legacy", exchange_type="topic")
        sender = RabbitSender.open(client._connection, "legacy")
        with pytest.raises(PublishFailed, match="returned"):
            sender.publish_raw("completed.HAWKI", b"{}")


def _rabbitmqctl(*args: str) -> None:
    import shutil

    subprocess.run([shutil.which("rabbitmqctl") or "rabbitmqctl", "-q", *args], check=True, capture_output=True,
                   timeout=60)


def test_a_result_the_broker_refuses_to_take_is_handed_back_and_published_later(rabbitmq_url, tmp_path, caplog):
    """The broker nacks both the event and the retry-queue send (a quorum queue without a leader
    for a moment after a node loss, a full disk): the message goes back to its queue after a pause,
    never to the dead-letter queue (where the run would wait for an operator), and once the broker
    takes messages again the recorded result is published; the work ran once."""
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    refusing = rf"^({re.escape(SINK)}|{re.escape(SPEC.name)}\.retry\..+)$"
    harness = RabbitHarness(tmp_path, rabbitmq_url)
    handler = ScriptedHandler()
    runner = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, FileLedger(tmp_path / "state"),
                           build_metrics(CollectorRegistry()), max_attempts=4)
    try:
        harness.start(runner)
        _rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", "refuse", refusing,
                     json.dumps({"max-length": 0, "overflow": "reject-publish"}))
        harness.publish_raw("delivery.HAWKI", delivery("good-refused").to_json())
        deadline = time.monotonic() + 20
        while caplog.text.count("could not settle the message") < 2:  # handed back, refused again
            assert time.monotonic() < deadline, caplog.text[-3000:]
            time.sleep(0.1)
        assert "handing it back to its queue in 1 s" in caplog.text
        assert "handing it back to its queue in 2 s" in caplog.text  # backing off
        _rabbitmqctl("clear_policy", "-p", vhost, "refuse")
        harness.wait(lambda: len(harness.sink()) >= 1, timeout=30)
        [event] = harness.sink()
        assert isinstance(event, RawDataReady) and event.delivery_id == "good-refused"
        assert harness.dead_letters() == []
        assert handler.calls == {"good-refused": 1}
    finally:
        harness.stop()


def test_an_exchange_declared_without_the_alternate_exchange_still_works(rabbitmq_url, caplog):
    import pika

    from shared.bus.rabbitmq import RabbitClient

    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    connection.channel().exchange_declare("preimg", exchange_type="topic", durable=True)  # an older preimg
    connection.close()
    with RabbitClient(rabbitmq_url, "preimg", instruments=["HAWKI"], retry_delays_ms=RETRY_DELAYS_MS) as client:
        client.sender.publish(delivery("good-legacy"))
        with pytest.raises(PublishFailed):
            client.sender.publish_raw("completed.HAWKI", b"{}")
    assert "exists without the alternate exchange" in caplog.text


# --- one copy of a run per stage at a time -------------------------------------------------


def test_a_second_copy_waits_for_the_lease_without_spending_an_attempt(tmp_path):
    ledger = FileLedger(tmp_path / "state")
    handler = ScriptedHandler()
    now = [1000.0]
    runner = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, ledger,
                           build_metrics(CollectorRegistry()), max_attempts=4, lease_wait_limit_s=60,
                           clock=lambda: now[0])
    msg = delivery("good-lease")
    with ledger.lease("delivery", "HAWKI", msg.run_id):  # another copy is working on the run
        waiting = runner.process(Incoming(msg.to_json(), "delivery.HAWKI", {HEADER_ATTEMPT: 2}))
        assert (waiting.action, waiting.label, waiting.next_attempt) == ("retry", "lease_busy", 2)
        assert "lease busy" in waiting.reason and f"pid {os.getpid()}" in waiting.reason
        now[0] += 61  # held past the limit: from now on the waits count as failed attempts
        late = runner.process(Incoming(msg.to_json(), "delivery.HAWKI", {HEADER_ATTEMPT: 2, **waiting.headers}))
        assert (late.action, late.next_attempt) == ("retry", 3) and "held the run for over 60 s" in late.reason
    assert handler.calls == {}
    done = runner.process(Incoming(msg.to_json(), "delivery.HAWKI", {HEADER_ATTEMPT: 2, **waiting.headers}))
    assert done.action == "ack" and handler.calls == {"good-lease": 1}
    history = ledger.lease_history("delivery", "HAWKI", msg.run_id)
    assert [h["token"] for h in history] == [1, 2] and waiting.headers[HEADER_LEASE_WAIT_SINCE] == 1000.0
    assert ledger.lookup("delivery", "HAWKI", msg.run_id).lease_token == 2


def test_a_lease_dies_with_its_holder(tmp_path):
    ledger = FileLedger(tmp_path / "state")
    script = (
        "import time; from pathlib import Path; from shared.ledger import FileLedger\n"
        f"with FileLedger(Path({str(tmp_path / 'state')!r})).lease('raw_ready', 'HAWKI', 'run-1'):\n"
        "    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseBusy, match="held"), ledger.lease("raw_ready", "HAWKI", "run-1"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with ledger.lease("raw_ready", "HAWKI", "run-1") as lease:
            assert lease.token == 2  # a new token: anything the dead holder meant to write is fenced off
    finally:
        holder.kill()


def test_housekeeping_runs_only_when_an_earlier_attempt_may_have_left_something(harness, handler, tmp_path):
    """The prepare hook (removing an interrupted write's temporary files) costs a walk of the run's
    directories: a first attempt has nothing to clean, a retry or a redelivery after a crash may."""
    prepared: list[str] = []
    r = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, FileLedger(tmp_path / "state"),
                      build_metrics(CollectorRegistry()), max_attempts=4,
                      prepare=lambda msg: prepared.append(msg.delivery_id))
    harness.start(r)
    harness.publish_raw("delivery.HAWKI", delivery("good-clean").to_json())
    harness.publish_raw("delivery.HAWKI", delivery("flaky-clean").to_json())
    harness.wait(lambda: len(harness.sink()) >= 2)
    assert handler.calls == {"good-clean": 1, "flaky-clean": 3}
    assert prepared == ["flaky-clean", "flaky-clean"]  # before the second and the third call


def test_a_copy_killed_while_writing_its_record_leaves_no_temporary_file(harness, handler, tmp_path):
    ledger = FileLedger(tmp_path / "state")
    msg = delivery("good-killed")
    with ledger.lease("delivery", "HAWKI", msg.run_id):
        pass  # the copy that was killed held the lease ...
    run_dir = ledger.run_dir("HAWKI", msg.run_id)
    interrupted = run_dir / ".delivery.json.k1ll3d.tmp"  # ... and was writing its record
    interrupted.write_text('{"stage": "deliv')
    other = run_dir / ".raw_ready.json.wr1t1n.tmp"  # another stage's write, maybe in progress
    other.write_text("{")
    r = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, ledger, build_metrics(CollectorRegistry()))
    harness.start(r)
    harness.publish_raw("delivery.HAWKI", msg.to_json())
    harness.wait(lambda: len(harness.sink()) >= 1)
    assert not interrupted.exists() and other.exists()
    assert ledger.lookup("delivery", "HAWKI", msg.run_id) is not None


def test_a_refusal_only_an_operator_can_mend_is_dead_lettered_at_once_with_an_answer(harness, runner, handler):
    harness.publish_raw("delivery.HAWKI", delivery("operator-1").to_json())
    harness.wait(lambda: len(harness.sink()) >= 1 and len(harness.dead_letters()) >= 1)
    [event] = harness.sink()
    assert isinstance(event, RunFailed) and event.details["attempts"] == 1
    assert "needs an operator" in event.reason and "create the bucket" in event.reason
    assert f"preimg dlq replay {SPEC.name}" in event.reason
    assert handler.calls == {"operator-1": 1}  # not retried: nothing changes until someone acts


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_a_new_runs_state_directory_is_made_durable_with_its_first_record(tmp_path, monkeypatch, outcome):
    """The first stage of a run makes ``state/<INSTR>/<run_id>``: on a file system without a journal
    its name survives a crash only once its parent is synced, which happens with the record's bytes
    (one round of syncs: none before the handler, none of its own), the record of a result or of
    the RunFailed that answers a permanent failure."""
    from shared import files

    rounds: list[set[Path]] = []
    real_sync_all = files.sync_all

    def recording_sync_all(paths):
        paths = list(paths)
        rounds.append(set(paths))
        real_sync_all(paths)

    monkeypatch.setattr(files, "sync_all", recording_sync_all)
    ledger = FileLedger(tmp_path / "state")
    seen_rounds = []

    def handler(msg):
        seen_rounds.append(len(rounds))
        if outcome == "failed":
            raise PermanentError("the delivery cannot be processed")
        return []

    runner = MessageRunner("ingest", SPEC.name, {DeliveryAnnounced: handler}, ledger,
                           build_metrics(CollectorRegistry()))
    msg = delivery("good-new-run")
    result = runner.process(Incoming(msg.to_json(), "delivery.HAWKI", {}))
    assert result.action == "ack" and [type(e) for e in result.events] == ([] if outcome == "done" else [RunFailed])
    assert seen_rounds == [0]  # nothing synced before the handler ran
    record_rounds = [r for r in rounds if any(p.name.startswith(".delivery.json") for p in r)]
    assert record_rounds, f"the record was synced without the new directory's parent: {rounds}"
    assert {tmp_path / "state", tmp_path / "state" / "HAWKI"} <= record_rounds[0]
    assert sum(1 for r in rounds if tmp_path / "state" / "HAWKI" in r) == 1

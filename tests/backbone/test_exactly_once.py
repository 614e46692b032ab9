"""AOG's contract end to end: every delivery gets exactly one answer, whatever the order of start-up.

Real RabbitMQ, the services as OS processes. FORS2 (PIPE_SUPPORT=NO) keeps
these runs free of esorex; the recipe chain under broker restarts is in
tests/integration/test_broker_restarts.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pika
import pytest

from services.app import serve
from shared.bus.topology import queue_name
from shared.settings import Settings
from tests.backbone.cluster import PREIMG, REPO, Cluster, CompletionWatcher
from tests.backbone.test_e2e_rabbitmq import make_frames
from tests.ports import free_port

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def wait_until(condition, timeout: float, what: str, logs=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.1)


def test_deliver_before_any_service_ran_completes_once(rabbitmq_url, tmp_path):
    cluster = Cluster(rabbitmq_url, tmp_path)
    files = make_frames(cluster.delivery_area, 2)
    watcher = CompletionWatcher(rabbitmq_url)  # AOG's queue; declares only the exchanges
    deliver = subprocess.Popen(
        PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", "first-1", "--wait", "120", "--test"],
        env=cluster.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _exists(rabbitmq_url, queue_name("ingest")) and queue_depth(rabbitmq_url, "preimg.ingest"),
                   30, "the delivery to wait in preimg.ingest")
        time.sleep(5)
        cluster.start()
        out, err = deliver.communicate(timeout=150)
        assert deliver.returncode == 0, out + err + cluster.logs()
        assert json.loads(out)["status"] == "ok"
        events = watcher.collect(until=1, timeout=10)
        watcher.settle(2)
        assert [(e["run_id"], e["type"]) for e in events] == [("first-1", "preimg.completed.v1")]
    finally:
        deliver.kill()
        watcher.close()
        cluster.stop()


def _exists(amqp_url: str, queue: str) -> bool:
    try:
        queue_depth(amqp_url, queue)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False


def test_a_delivery_waits_in_its_processor_queue_until_the_processor_runs(rabbitmq_url, tmp_path):
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=()).start()  # no FORS2 processor yet
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        files = make_frames(cluster.delivery_area, 2)
        out = subprocess.run(PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", "waits-1", "--test"],
                             env=cluster.env(), cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: queue_depth(rabbitmq_url, queue_name("processor", "FORS2")) == 1, 30,
                   "RawDataReady to wait in preimg.processor.FORS2", cluster.logs)
        assert watcher.collect(until=1, timeout=1) == []  # no answer yet, and nothing lost
        cluster.start_service("processor-FORS2")
        events = watcher.collect(until=1, timeout=60)
        watcher.settle(1)
        assert [(e["run_id"], e.get("status")) for e in events] == [("waits-1", "ok")], cluster.logs()
    finally:
        watcher.close()
        cluster.stop()


def test_a_resent_delivery_of_a_finished_run_gets_its_completion_again(rabbitmq_url, tmp_path):
    cluster = Cluster(rabbitmq_url, tmp_path).start()
    try:
        files = make_frames(cluster.delivery_area, 1)
        args = PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", "again-1", "--wait", "60", "--test"]
        first = subprocess.run(args, env=cluster.env(), cwd=REPO, capture_output=True, text=True, check=False, timeout=90)
        again = subprocess.run(args, env=cluster.env(), cwd=REPO, capture_output=True, text=True, check=False, timeout=90)
        assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr + cluster.logs()
        a, b = json.loads(first.stdout), json.loads(again.stdout)
        assert a["type"] == "preimg.completed.v1" and a == b  # the same event, same message id
    finally:
        cluster.stop()


def test_deliver_to_an_unreachable_broker_exits_non_zero_with_the_reason(tmp_path):
    frame = make_frames(tmp_path / "incoming", 1)
    env = {**Cluster("amqp://guest:secret@127.0.0.1:1/%2F", tmp_path).env()}
    out = subprocess.run(PREIMG + ["deliver", "-i", "FORS2", str(frame[0])], env=env, cwd=REPO,
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 3
    assert "cannot reach the broker at 127.0.0.1:1/" in out.stderr and "nothing was delivered" in out.stderr
    assert "secret" not in out.stderr


def test_a_service_keeps_retrying_an_unresolvable_broker_host_and_stops_on_sigterm(tmp_path):
    port = free_port()
    cluster = Cluster("amqp://guest:guest@no-such-host.invalid:5672/%2F", tmp_path)
    log = tmp_path / "reporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(PREIMG + ["serve", "reporter"], env={**cluster.env(), "PREIMG_HTTP_PORT": str(port)},
                                cwd=REPO, stdout=out, stderr=out)
    try:
        wait_until(lambda: "unreachable" in log.read_text() and log.read_text().count("reconnecting") >= 2,
                   30, "two reconnect attempts", log.read_text)
        assert proc.poll() is None, log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
        assert "not connected to the broker" in json.loads(not_ready.value.read())["detail"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        proc.kill()


def test_serve_exits_non_zero_when_the_consumer_thread_dies(monkeypatch, tmp_path):
    from shared.bus import rabbitmq

    def die(self, stop):
        raise MemoryError("the consumer could not go on")

    monkeypatch.setattr(rabbitmq.RabbitConsumer, "run", die)
    settings = Settings(data_root=tmp_path, http_port=0, http_host="127.0.0.1")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(serve("reporter", settings)))
    thread.start()
    thread.join(30)
    assert result == [1]


def test_sigterm_on_an_idle_service_after_a_broker_restart_exits_at_once(private_broker, tmp_path):
    cluster = Cluster(private_broker.url, tmp_path).start()
    try:
        files = make_frames(cluster.delivery_area, 1)
        args = PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--wait", "60", "--test"]
        assert subprocess.run(args, env=cluster.env(), cwd=REPO, capture_output=True, check=False, timeout=90).returncode == 0
        private_broker.restart()
        cluster.wait_ready(60)
        out = subprocess.run(args, env=cluster.env(), cwd=REPO, capture_output=True, text=True, check=False, timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr + cluster.logs()
        for name in ("reporter", "processor-FORS2"):
            started = time.monotonic()
            cluster.kill(name, sig=signal.SIGTERM)
            assert cluster.services[name].proc.returncode == 0
            assert time.monotonic() - started < 5, f"{name} took {time.monotonic() - started:.1f} s"
    finally:
        cluster.stop()

"""The private broker node harness (tests/broker_node.py) does what broker-restart tests need."""

from __future__ import annotations

import subprocess

import pika
import pytest

from tests.broker_node import BrokerNode

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

QUEUE = "preimg.test.durable"


def beam_lines(node: BrokerNode) -> list[str]:
    """``ps`` lines of Erlang VMs running this node (found by the node name on beam's command
    line)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if "beam" in line and node.node in line]


def publish_persistent(url: str, body: bytes) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(QUEUE, durable=True)
        ch.basic_publish("", QUEUE, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        conn.close()


def get_one(url: str) -> bytes | None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.queue_declare(QUEUE, durable=True, passive=True)
        method, _props, body = ch.basic_get(QUEUE, auto_ack=True)
        return body if method else None
    finally:
        conn.close()


def test_persistent_message_survives_restart_and_the_machine_broker_is_untouched(
    private_broker: BrokerNode, rabbitmq_url: str
) -> None:
    node = private_broker
    assert node.amqp_port != 5672 and node.url.startswith("amqp://guest:guest@127.0.0.1:")
    publish_persistent(node.url, b"kept across restart")
    held = pika.BlockingConnection(pika.URLParameters(node.url))

    machine = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    machine_ch = machine.channel()
    witness = machine_ch.queue_declare("", exclusive=True).method.queue
    try:
        node.restart()

        # the private broker really went away: its clients were disconnected
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            held.process_data_events(time_limit=1)
            held.channel()
        # the machine's broker did not: the same connection and exclusive queue still work
        machine.process_data_events(time_limit=0)
        assert machine.is_open
        assert machine_ch.queue_declare(witness, passive=True).method.message_count == 0

        listed = node.ctl("-q", "list_queues", "name", "messages", "durable").stdout
        assert f"{QUEUE}\t1\ttrue" in listed
        assert get_one(node.url) == b"kept across restart"
        assert get_one(node.url) is None
    finally:
        machine.close()
        if held.is_open:
            held.close()


def test_stop_app_start_app_and_a_full_node_restart_keep_messages_and_stop_leaves_no_vm(
    private_broker: BrokerNode,
) -> None:
    node = private_broker
    url = node.url
    publish_persistent(url, b"one")
    publish_persistent(url, b"two")

    node.stop_app()
    assert not node.amqp_ready()
    assert node.running  # the Erlang VM stays up without the broker application
    node.start_app()
    assert get_one(url) == b"one"

    assert len(beam_lines(node)) == 1
    node.restart_node()  # stop() + start(): a new VM on the same data, name and ports
    assert node.url == url
    assert get_one(url) == b"two"

    node.stop()
    assert beam_lines(node) == []
    assert not node.running and not node.amqp_ready()
    assert not node.ping()


def test_a_node_restarted_from_a_thread_that_ends_keeps_running(private_broker: BrokerNode) -> None:
    """The chaos tests restart nodes from their monkey thread: the node must outlive that thread
    (the die-with-parent signal follows the forking thread, not the process)."""
    import threading
    import time

    node = private_broker
    node.stop()
    restarter = threading.Thread(target=node.start)
    restarter.start()
    restarter.join(120)
    assert not restarter.is_alive() and node.running
    time.sleep(2)  # a pdeathsig would have arrived by now
    assert node.running and node.amqp_ready()

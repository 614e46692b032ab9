"""RabbitMQ adapter: the only module that imports pika.

* ``RabbitSender`` publishes events on the durable topic exchange with
  publisher confirms and persistent delivery (the CLI's ``deliver`` and the
  consumer both use it).
* ``declare_topology`` declares the exchange, a service queue, its fixed-delay
  retry queues and its dead-letter queue; declaring twice is harmless.
* ``RabbitConsumer`` consumes one queue with manual acks. The handler runs on
  a worker thread so the connection thread keeps heartbeats flowing during a
  long recipe; the worker hands the outcome back with
  ``connection.add_callback_threadsafe`` and the connection thread publishes
  the events (confirmed), then acks. On SIGTERM the consumer stops taking new
  messages, lets the message in hand finish (or hands it back unacked when the
  grace period runs out) and closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from shared.bus.port import settle
from shared.bus.runner import Incoming, Outcome
from shared.bus.topology import QueueSpec, dead_letter_queue, retry_queue
from shared.messages import Envelope

_log = logging.getLogger(__name__)

PERSISTENT = pika.DeliveryMode.Persistent


def connection_parameters(amqp_url: str, heartbeat_s: int, name: str) -> pika.URLParameters:
    params = pika.URLParameters(amqp_url)
    params.heartbeat = heartbeat_s
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    return params


def declare_topology(
    channel: BlockingChannel, exchange: str, spec: QueueSpec | None, retry_delays_ms: tuple[int, ...]
) -> None:
    """Declare the exchange and, with ``spec``, one consuming queue with its retry and dead-letter queues."""
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    if spec is None:
        return
    dlq = dead_letter_queue(spec.name)
    channel.queue_declare(queue=dlq, durable=True)
    # A message the runner cannot settle (a bug) is nacked without requeue and lands in the DLQ.
    channel.queue_declare(
        queue=spec.name,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq},
    )
    for key in spec.bindings:
        channel.queue_bind(queue=spec.name, exchange=exchange, routing_key=key)
    for tier, delay_ms in enumerate(retry_delays_ms):
        channel.queue_declare(
            queue=retry_queue(spec.name, tier),
            durable=True,
            arguments={
                "x-message-ttl": int(delay_ms),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": spec.name,
            },
        )


def _properties(headers: Mapping[str, Any] | None, message_id: str | None = None) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        headers=dict(headers or {}),
        message_id=message_id,
    )


class RabbitSender:
    """Publishes with confirms on a channel it owns (created by ``open``)."""

    def __init__(self, channel: BlockingChannel, exchange: str):
        self._channel = channel
        self._exchange = exchange

    @classmethod
    def open(cls, connection: pika.BlockingConnection, exchange: str) -> RabbitSender:
        channel = connection.channel()
        channel.confirm_delivery()
        return cls(channel, exchange)

    def publish(self, event: Envelope) -> None:
        self.publish_raw(event.routing_key, event.to_json(), message_id=event.message_id)

    def publish_raw(
        self, routing_key: str, body: bytes, headers: Mapping[str, Any] | None = None, message_id: str | None = None
    ) -> None:
        # With confirms on, basic_publish returns once the broker has the message (or raises).
        self._channel.basic_publish(self._exchange, routing_key, body, _properties(headers, message_id))

    def send_to_queue(self, queue: str, body: bytes, headers: Mapping[str, Any]) -> None:
        self._channel.basic_publish("", queue, body, _properties(headers), mandatory=True)


class RabbitConsumer:
    """Consumes one queue; ``process`` (the MessageRunner) does the work on a worker thread."""

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        spec: QueueSpec,
        process: Callable[[Incoming], Outcome],
        retry_delays_ms: tuple[int, ...],
        heartbeat_s: int = 30,
        shutdown_grace_s: float = 60.0,
        name: str = "preimg",
    ):
        self._amqp_url = amqp_url
        self._exchange = exchange
        self._spec = spec
        self._process = process
        self._retry_delays_ms = tuple(retry_delays_ms)
        self._heartbeat_s = heartbeat_s
        self._grace_s = shutdown_grace_s
        self._name = name
        self.connected = threading.Event()
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._in_flight > 0

    def run(self, stop: threading.Event, reconnect_delay_s: float = 2.0) -> None:
        """Consume until ``stop`` is set, reconnecting after broker failures."""
        while not stop.is_set():
            try:
                self._run_connection(stop)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, ConnectionError) as e:
                self.connected.clear()
                if stop.is_set():
                    break
                if getattr(e, "reply_code", None) == 406:
                    _log.error(
                        "the broker refuses our topology (%s): a queue exists with other arguments, e.g. "
                        "after PREIMG_RETRY_DELAYS_MS changed; delete that queue (it holds only retries) "
                        "or restore the setting", e,
                    )
                _log.warning("broker connection lost (%s: %s); reconnecting in %.0f s", type(e).__name__, e, reconnect_delay_s)
                stop.wait(reconnect_delay_s)

    def _run_connection(self, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(
            connection_parameters(self._amqp_url, self._heartbeat_s, f"{self._name}:{self._spec.name}")
        )
        try:
            channel = connection.channel()
            declare_topology(channel, self._exchange, self._spec, self._retry_delays_ms)
            channel.basic_qos(prefetch_count=self._spec.prefetch)
            sender = RabbitSender.open(connection, self._exchange)
            on_message = self._make_on_message(connection, channel, sender)
            consumer_tag = channel.basic_consume(self._spec.name, on_message, auto_ack=False)
            self.connected.set()
            _log.info("consuming %s", self._spec.name)
            while not stop.is_set():
                connection.process_data_events(time_limit=0.2)
            # Graceful stop: take nothing new, let the message in hand settle.
            channel.basic_cancel(consumer_tag)
            deadline = time.monotonic() + self._grace_s
            while self.busy and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.2)
            if self.busy:
                _log.warning("grace period over with a message in hand: handing it back to the broker unacked")
        finally:
            self.connected.clear()
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _make_on_message(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, sender: RabbitSender
    ) -> Callable[..., None]:
        def on_message(ch: BlockingChannel, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
            incoming = Incoming(
                body=body,
                routing_key=method.routing_key,
                headers=dict(properties.headers or {}),
                redelivered=bool(method.redelivered),
            )
            tag = method.delivery_tag
            with self._lock:
                self._in_flight += 1

            def work() -> None:
                try:
                    outcome: Outcome | None = self._process(incoming)
                except Exception:  # noqa: BLE001 - a runner bug must not kill the consumer
                    _log.exception("message runner failed; the message goes to the dead-letter queue")
                    outcome = None
                connection.add_callback_threadsafe(lambda: finish(outcome))

            def finish(outcome: Outcome | None) -> None:
                try:
                    if outcome is None:
                        channel.basic_nack(tag, requeue=False)
                    else:
                        settle(outcome, incoming, self._spec.name, len(self._retry_delays_ms), sender)
                        channel.basic_ack(tag)
                except pika.exceptions.AMQPError:
                    # Not acked: the broker redelivers it, and the ledger absorbs the repeat.
                    _log.exception("could not settle message; it will be redelivered")
                finally:
                    with self._lock:
                        self._in_flight -= 1

            threading.Thread(target=work, name=f"handler-{self._spec.name}", daemon=True).start()

        return on_message


class RabbitClient:
    """A short-lived publishing connection for commands and tests (``preimg deliver``)."""

    def __init__(self, amqp_url: str, exchange: str, heartbeat_s: int = 30):
        self._amqp_url = amqp_url
        self._exchange = exchange
        self._heartbeat_s = heartbeat_s
        self._connection: pika.BlockingConnection | None = None
        self._sender: RabbitSender | None = None

    def __enter__(self) -> RabbitClient:
        self._connection = pika.BlockingConnection(connection_parameters(self._amqp_url, self._heartbeat_s, "preimg-client"))
        channel = self._connection.channel()
        declare_topology(channel, self._exchange, None, ())
        self._sender = RabbitSender.open(self._connection, self._exchange)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    @property
    def sender(self) -> RabbitSender:
        assert self._sender is not None, "use RabbitClient as a context manager"
        return self._sender

    @property
    def channel(self) -> BlockingChannel:
        assert self._connection is not None
        return self._connection.channel()

    def declare(self, spec: QueueSpec, retry_delays_ms: tuple[int, ...]) -> None:
        declare_topology(self.channel, self._exchange, spec, retry_delays_ms)

    def bind_private_queue(self, binding_keys: tuple[str, ...]) -> tuple[BlockingChannel, str]:
        """An exclusive, auto-deleted queue bound to ``binding_keys`` (for waiting on completions)."""
        channel = self.channel
        result = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        name = result.method.queue
        for key in binding_keys:
            channel.queue_bind(queue=name, exchange=self._exchange, routing_key=key)
        return channel, name

    def wait_for(
        self, channel: BlockingChannel, queue: str, accept: Callable[[bytes], bool], timeout_s: float
    ) -> bytes | None:
        """Return the first message body on ``queue`` that ``accept`` takes, or None at the timeout."""
        deadline = time.monotonic() + timeout_s
        for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.2):
            if method is not None and accept(body):
                channel.cancel()
                return body
            if time.monotonic() > deadline:
                channel.cancel()
                return None
        return None

    def replay_dead_letters(self, queue: str, limit: int | None = None) -> int:
        """Move messages from ``queue``'s dead-letter queue back onto ``queue``, attempts reset.

        Each message is acked on the dead-letter queue only after the broker
        confirmed it on ``queue``: a crash in between duplicates, never loses.
        """
        channel = self.channel
        moved = 0
        while limit is None or moved < limit:
            method, props, body = channel.basic_get(dead_letter_queue(queue), auto_ack=False)
            if method is None:
                break
            headers = {k: v for k, v in (props.headers or {}).items() if not k.startswith("x-preimg-")
                       and k != "x-death"}
            self.sender.send_to_queue(queue, body, headers)
            channel.basic_ack(method.delivery_tag)
            moved += 1
        return moved

    def get_all(self, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Drain ``queue`` with basic_get (tests and operators reading a dead-letter queue)."""
        channel = self.channel
        out = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))

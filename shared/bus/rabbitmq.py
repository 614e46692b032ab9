"""RabbitMQ adapter: the only module that imports pika.

* ``declare_topology`` declares the whole layout of ``shared.bus.topology``:
  the exchange with its alternate exchange (anything no binding takes lands in
  ``preimg.unroutable``), every service queue, one processor queue per
  instrument, their retry and dead-letter queues. Everyone who publishes calls
  it first, so nothing is published into a layout that does not exist yet;
  declaring twice is harmless.
* ``RabbitSender`` publishes with publisher confirms, persistent delivery and
  ``mandatory``: a message the broker returns or nacks raises
  ``PublishFailed``, never passes for a success.
* ``RabbitConsumer`` consumes one queue with manual acks. The handler runs on
  a worker thread so the connection thread keeps heartbeats flowing during a
  long recipe; the worker hands the outcome back with
  ``connection.add_callback_threadsafe`` and the connection thread publishes
  the events (confirmed), then acks. After a lost connection it reconnects
  with back-off, whatever the error (refused, reset, DNS, TLS), but only once
  the handler of the lost connection has finished: one consumer never works
  on two copies of a message. The lost message's result is in the ledger, so
  the redelivered copy is answered from it. On SIGTERM the consumer stops
  taking new messages, lets the message in hand finish (or hands it back
  unacked when the grace period runs out) and closes.

* ``migrate_queue_types`` re-declares the queues a broker holds with the other
  queue type (``preimg broker migrate``), keeping their messages.

Why one module of about 600 lines: the house rule is that pika lives in one
module, so everything that touches a pika object (declaring, publishing,
consuming, the operators' dead-letter browsing, the queue-type migration) is
here; the broker-free parts (layout, routing, retry tiers) are in
``shared.bus.topology``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from shared.bus.port import settle
from shared.bus.runner import Incoming, Outcome
from shared.bus.tls import TlsFiles
from shared.bus.topology import (
    CLASSIC,
    HEADER_REPLAYS,
    UNROUTABLE_QUEUE,
    QueueArguments,
    QueueSpec,
    alternate_exchange,
    dead_letter_queue,
    retry_queue,
    topology_specs,
)
from shared.errors import PublishFailed
from shared.messages import Envelope

_log = logging.getLogger(__name__)

PERSISTENT = pika.DeliveryMode.Persistent
_PRECONDITION_FAILED = 406
_ACCESS_REFUSED = 403
#: Longest wait before a message whose settling the broker refused goes back to its queue (1, 2, 4 ... s).
SETTLE_BACKOFF_MAX_S = 30.0


def broker_urls(amqp_url: str) -> list[str]:
    """The AMQP URLs of a comma-separated list (one per cluster node; commas in a password: ``%2C``)."""
    urls = [u.strip() for u in amqp_url.split(",") if u.strip()]
    if not urls:
        raise ValueError("no AMQP URL given")
    return urls


def connection_parameters(amqp_url: str, heartbeat_s: int, name: str,
                          tls: TlsFiles | None = None) -> list[pika.URLParameters]:
    """One parameter set per node of ``amqp_url`` (a comma-separated list): pika tries them in order,
    so a client connects to the first node that answers and fails over to the next. ``amqps://``
    nodes are verified against ``tls.ca_file`` (certificate and host name)."""
    out = []
    for url in broker_urls(amqp_url):
        params = pika.URLParameters(url)
        if url.lower().startswith("amqps://"):
            params.ssl_options = pika.SSLOptions((tls or TlsFiles()).context(), server_hostname=params.host)
        params.heartbeat = heartbeat_s
        params.blocked_connection_timeout = 300
        params.connection_attempts = 1
        params.client_properties = {"connection_name": name}
        out.append(params)
    return out


def describe_broker(amqp_url: str) -> str:
    """``host:port/vhost`` of each node of an AMQP URL list, without the credentials (for messages)."""
    described = []
    for url in broker_urls(amqp_url):
        params = pika.URLParameters(url)
        described.append(f"{params.host}:{params.port}/{params.virtual_host}")
    return ",".join(described)


def connected_node(connection: pika.BlockingConnection) -> str:
    """``host:port`` of the node a connection went to."""
    params = connection._impl.params  # pika keeps the chosen parameters only there
    return f"{params.host}:{params.port}"


def _access_refused(e: BaseException) -> bool:
    """A refused login or permission (ACCESS_REFUSED, AMQP 403)."""
    return getattr(e, "reply_code", None) == _ACCESS_REFUSED or isinstance(
        e, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError)


def describe_error(e: BaseException) -> str:
    """``Type: text`` of a connection error; pika's connection errors keep the reason only in ``args``
    (with several nodes: the last node's)."""
    text = str(e) or "; ".join(str(a) or repr(a) for a in e.args)
    return f"{type(e).__name__}: {text}"


class QueueTypeMismatch(ConnectionError):
    """The broker holds one of our queues with the other queue type; the message says how to migrate."""


def _refused_declaration(e: pika.exceptions.ChannelClosedByBroker, queue: str, args: QueueArguments) -> Exception:
    """A clear error for a queue the broker holds with other arguments (PRECONDITION_FAILED)."""
    text = e.reply_text or ""
    type_args = ("x-queue-type", "x-dead-letter-strategy", "x-overflow", "x-delivery-limit")
    if any(a in text for a in type_args):
        return QueueTypeMismatch(
            f"the broker holds queue {queue!r} as a {args.other_type} queue (or with other quorum arguments), "
            f"but PREIMG_QUEUE_TYPE is {args.queue_type} ({text}). A queue's type cannot change in place. "
            f"Either set PREIMG_QUEUE_TYPE={args.other_type} again, or stop the services and run "
            f"`PREIMG_QUEUE_TYPE={args.queue_type} preimg broker migrate` (it re-declares every preimg queue "
            "of the other type, keeping its messages), then start them"
        )
    return e


def declare_topology(
    connection: pika.BlockingConnection,
    exchange: str,
    instruments: Iterable[str] | None,
    retry_delays_ms: tuple[int, ...],
    extra: Iterable[QueueSpec] = (),
    queue_args: QueueArguments = CLASSIC,
) -> None:
    """Declare the exchange and, unless ``instruments`` is None, every queue of the layout.

    ``extra`` adds queues (e.g. a consumer's own when its instrument has no
    profile yet). An exchange declared earlier without the alternate exchange
    is used as it is, with a warning: unroutable messages then come back to
    their publisher (``mandatory``) instead of being collected. A queue held
    with the other queue type raises ``QueueTypeMismatch`` naming the migration.
    """
    channel = connection.channel()
    try:
        _declare_exchanges(connection, channel, exchange, queue_args)
        if instruments is None and not extra:
            return
        specs = {s.name: s for s in (*topology_specs(instruments or ()), *extra)}
        for spec in specs.values():
            _declare_queues(channel, _queues_of(spec, exchange, retry_delays_ms, queue_args), queue_args)
    finally:
        if channel.is_open:
            channel.close()


def _declare(channel: BlockingChannel, queue: str, arguments: dict[str, Any], queue_args: QueueArguments) -> None:
    try:
        channel.queue_declare(queue=queue, durable=True, arguments=arguments or None)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != _PRECONDITION_FAILED:
            raise
        raise _refused_declaration(e, queue, queue_args) from e


def _declare_exchanges(connection: pika.BlockingConnection, channel: BlockingChannel, exchange: str,
                       queue_args: QueueArguments) -> None:
    """The topic exchange, its alternate exchange, and ``preimg.unroutable`` collecting what no binding takes."""
    _declare_exchange_pair(connection, channel, exchange)
    _declare_queues(channel, [_unroutable_queue(exchange, queue_args)], queue_args)


def _declare_exchange_pair(connection: pika.BlockingConnection, channel: BlockingChannel, exchange: str) -> None:
    """The topic exchange with its alternate exchange (an older exchange without it is used, with a warning)."""
    alternate = alternate_exchange(exchange)
    channel.exchange_declare(exchange=alternate, exchange_type="fanout", durable=True)
    probe = connection.channel()  # the broker closes a channel whose declaration it refuses
    try:
        probe.exchange_declare(
            exchange=exchange, exchange_type="topic", durable=True, arguments={"alternate-exchange": alternate}
        )
        probe.close()
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != _PRECONDITION_FAILED:
            raise
        channel.exchange_declare(exchange=exchange, passive=True)
        _log.warning(
            "exchange %r exists without the alternate exchange %r, so unroutable messages are returned to their "
            "publisher instead of collected in %s; to add it, delete the exchange when the system is idle "
            "(rabbitmqctl delete_exchange is not enough while bindings exist: `rabbitmqadmin delete exchange "
            "name=%s`) and restart the services, or set a policy: rabbitmqctl set_policy --apply-to exchanges "
            "preimg-ae '^%s$' '{\"alternate-exchange\":\"%s\"}'",
            exchange, alternate, UNROUTABLE_QUEUE, exchange, exchange, alternate,
        )


@dataclass(frozen=True)
class _QueueDecl:
    """One queue of the layout as it is declared: its name, ``x-`` arguments and bindings (exchange, key)."""

    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...] = ()


def _unroutable_queue(exchange: str, queue_args: QueueArguments) -> _QueueDecl:
    return _QueueDecl(UNROUTABLE_QUEUE, queue_args.plain_queue(), ((alternate_exchange(exchange), ""),))


def _queues_of(spec: QueueSpec, exchange: str, retry_delays_ms: tuple[int, ...],
               queue_args: QueueArguments) -> list[_QueueDecl]:
    """A consuming queue's part of the layout, in declaration order: its dead-letter queue (a message
    the runner cannot settle, a bug, is nacked there without requeue), the queue with its bindings,
    its retry queues."""
    return [
        _QueueDecl(dead_letter_queue(spec.name), queue_args.plain_queue()),
        _QueueDecl(spec.name, queue_args.service_queue(spec.name), tuple((exchange, k) for k in spec.bindings)),
        *(_QueueDecl(retry_queue(spec.name, tier), queue_args.retry_queue(spec.name, delay_ms))
          for tier, delay_ms in enumerate(retry_delays_ms)),
    ]


def _declare_queues(channel: BlockingChannel, queues: Iterable[_QueueDecl], queue_args: QueueArguments) -> None:
    for queue in queues:
        _declare(channel, queue.name, queue.arguments, queue_args)
        for source, key in queue.bindings:
            channel.queue_bind(queue=queue.name, exchange=source, routing_key=key)


def _properties(headers: Mapping[str, Any] | None, message_id: str | None = None) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        headers=dict(headers or {}),
        message_id=message_id,
    )


class RabbitSender:
    """Publishes with confirms and ``mandatory`` on a channel it owns (created by ``open``)."""

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
        self._publish(self._exchange, routing_key, body, _properties(headers, message_id),
                      f"routing key {routing_key!r} on exchange {self._exchange!r}")

    def send_to_queue(self, queue: str, body: bytes, headers: Mapping[str, Any]) -> None:
        self._publish("", queue, body, _properties(headers), f"queue {queue!r}")

    def _publish(self, exchange: str, key: str, body: bytes, props: pika.BasicProperties, where: str) -> None:
        # With confirms on, basic_publish returns once the broker has the message, or raises.
        try:
            self._channel.basic_publish(exchange, key, body, props, mandatory=True)
        except pika.exceptions.UnroutableError as e:
            raise PublishFailed(f"no queue took the message for {where}: the broker returned it") from e
        except pika.exceptions.NackError as e:
            raise PublishFailed(f"the broker refused (nacked) the message for {where}") from e


class RabbitConsumer:
    """Consumes one queue; ``process`` (the MessageRunner) does the work on a worker thread.

    Without ``process`` at construction the consumer connects and declares the
    topology but takes no message until ``start_consuming(process)``: a
    service declares its queues before its start-up checks pass.

    ``max_messages=1`` (a Kubernetes Job's run, ``serve --once``): once the
    first message is handled the consumer cancels its subscription, then settles
    the message (prefetch 1: no second one is delivered while the first is
    unacked, so none arrives before the cancel), and ``run`` returns
    (``finished`` set). The subscription stays while the message is worked on,
    so the broker's consumer count shows a busy Job as a consumer. A connection lost before the settlement consumes again
    until one message is settled (the redelivered copy is answered from the record).
    """

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        spec: QueueSpec,
        process: Callable[[Incoming], Outcome] | None,
        retry_delays_ms: tuple[int, ...],
        instruments: Iterable[str] = (),
        heartbeat_s: int = 30,
        shutdown_grace_s: float = 60.0,
        name: str = "preimg",
        reconnect_delay_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        max_messages: int | None = None,
        queue_args: QueueArguments = CLASSIC,
        tls: TlsFiles | None = None,
    ):
        if max_messages not in (None, 1):
            raise ValueError("max_messages: None (consume until stopped) or 1 (one message)")
        self._once = max_messages == 1
        #: Settles the broker refused in a row (the back-off before handing a message back).
        self._settle_failures = 0
        self.finished = threading.Event()
        self._amqp_url = amqp_url
        self._queue_args = queue_args
        self._tls = tls
        self._exchange = exchange
        self._spec = spec
        self._retry_delays_ms = tuple(retry_delays_ms)
        self._instruments = tuple(instruments)
        self._heartbeat_s = heartbeat_s
        self._grace_s = shutdown_grace_s
        self._name = name
        self._reconnect_delay_s = reconnect_delay_s
        self._reconnect_max_s = reconnect_max_s
        self.connected = threading.Event()
        self.consuming = threading.Event()
        self._process = process
        self._may_consume = threading.Event()
        if process is not None:
            self._may_consume.set()
        self._lock = threading.Lock()
        self._handlers: set[threading.Thread] = set()
        self._unsettled = 0  # deliveries of the current connection not yet acked or nacked
        self.last_error = ""

    def start_consuming(self, process: Callable[[Incoming], Outcome]) -> None:
        self._process = process
        self._may_consume.set()

    @property
    def busy(self) -> bool:
        """A message is in hand: a handler runs, or a result waits to be settled."""
        with self._lock:
            self._handlers = {t for t in self._handlers if t.is_alive()}
            return self._unsettled > 0 or bool(self._handlers)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting after any broker or network failure."""
        delay = self._reconnect_delay_s
        while not stop.is_set() and not self.finished.is_set():
            if not self._wait_for_handlers(stop):
                break
            started = time.monotonic()
            try:
                self._run_connection(stop)
            except Exception as e:  # noqa: BLE001 - refused, reset, DNS, TLS, channel closed: all mean reconnect
                self.connected.clear()
                self.consuming.clear()
                if stop.is_set():
                    break
                if time.monotonic() - started > 60:
                    delay = self._reconnect_delay_s  # it worked for a while: start the back-off again
                self.last_error = describe_error(e)
                if isinstance(e, QueueTypeMismatch):
                    _log.error("%s", e)
                elif _access_refused(e):
                    _log.error("the broker refused this identity a permission (%s): check the user and password "
                               "in PREIMG_AMQP_URL and its permissions (`preimg broker setup`); retrying", e)
                elif getattr(e, "reply_code", None) == _PRECONDITION_FAILED:
                    _log.error(
                        "the broker refuses our topology (%s): a queue exists with other arguments, e.g. "
                        "after PREIMG_RETRY_DELAYS_MS changed; delete that queue (it holds only retries) "
                        "or restore the setting", e,
                    )
                _log.warning("broker %s unreachable or connection lost (%s); reconnecting in %.0f s",
                             describe_broker(self._amqp_url), self.last_error, delay)
                stop.wait(delay)
                delay = min(delay * 2, self._reconnect_max_s)

    def _wait_for_handlers(self, stop: threading.Event) -> bool:
        """Before consuming again, let the handler of a lost connection finish; False to stop."""
        if not self.busy:
            return True
        _log.warning("a handler of the lost connection is still working: not consuming until it finishes "
                     "(its result is recorded, the redelivered copy is answered from the record)")
        deadline = None
        while self.busy:
            if stop.is_set():
                deadline = deadline or time.monotonic() + self._grace_s
                if time.monotonic() > deadline:
                    _log.warning("grace period over with a handler still working")
                    return False
            time.sleep(0.2)
        return not stop.is_set()

    def _run_connection(self, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(
            connection_parameters(self._amqp_url, self._heartbeat_s, f"{self._name}:{self._spec.name}", self._tls)
        )
        try:
            declare_topology(connection, self._exchange, self._instruments, self._retry_delays_ms,
                             extra=(self._spec,), queue_args=self._queue_args)
            self.connected.set()
            _log.info("connected to the broker node %s", connected_node(connection))
            while not self._may_consume.is_set() and not stop.is_set():
                connection.process_data_events(time_limit=0.2)
            if stop.is_set():
                return
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self._spec.prefetch)
            sender = RabbitSender.open(connection, self._exchange)
            consumer_tag = channel.basic_consume(self._spec.name, self._make_on_message(connection, channel, sender),
                                                 auto_ack=False)
            self.consuming.set()
            self.last_error = ""
            _log.info("consuming %s", self._spec.name)
            while not stop.is_set() and not self.finished.is_set():
                connection.process_data_events(time_limit=0.2)
                if not channel.is_open:
                    raise ConnectionError(f"the channel consuming {self._spec.name} was closed")
            if self.finished.is_set():
                return
            # Graceful stop: take nothing new, let the message in hand settle.
            channel.basic_cancel(consumer_tag)
            deadline = time.monotonic() + self._grace_s
            while self.busy and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.2)
            if self.busy:
                _log.warning("grace period over with a message in hand: handing it back to the broker unacked")
        finally:
            self.connected.clear()
            self.consuming.clear()
            with self._lock:
                self._unsettled = 0  # what this connection held unacked is the broker's again
            if connection.is_open:
                try:
                    connection.close()
                except Exception as e:  # noqa: BLE001 - closing a broken connection may fail in any way
                    _log.debug("closing the connection: %s", e)

    def _make_on_message(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, sender: RabbitSender
    ) -> Callable[..., None]:
        process = self._process
        assert process is not None

        def on_message(ch: BlockingChannel, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
            incoming = Incoming(
                body=body,
                routing_key=method.routing_key,
                headers=dict(properties.headers or {}),
            )
            tag = method.delivery_tag
            consumer_tag = method.consumer_tag

            def work() -> None:
                try:
                    outcome: Outcome | None = process(incoming)
                except Exception:  # noqa: BLE001 - a runner bug must not kill the consumer
                    _log.exception("message runner failed; the message goes to the dead-letter queue")
                    outcome = None
                try:
                    connection.add_callback_threadsafe(lambda: finish(outcome))
                except Exception as e:  # noqa: BLE001 - the connection is gone
                    _log.warning("connection lost before the result could be settled (%s); the broker "
                                 "redelivers the message and the recorded result answers it", e)

            def finish(outcome: Outcome | None) -> None:
                if self._once:  # cancel before the ack: prefetch 1, so no second message comes
                    channel.basic_cancel(consumer_tag)
                try:
                    if outcome is None:
                        channel.basic_nack(tag, requeue=False)
                        return
                    try:
                        settle(outcome, incoming, self._spec.name, len(self._retry_delays_ms), sender)
                    except PublishFailed as e:
                        # The broker refused a publish (a quorum queue without a leader for a moment after
                        # a node loss, a full disk): the result is recorded, so the message goes back to
                        # its queue and its next delivery publishes the recorded events. Not at once: a
                        # broker that refuses now would refuse again. Never dead-lettered for this: a run
                        # in a DLQ has no answer until an operator replays it.
                        self._settle_failures += 1
                        delay = min(SETTLE_BACKOFF_MAX_S, 2.0 ** (self._settle_failures - 1))
                        _log.error("could not settle the message (%s); handing it back to its queue in %.0f s",
                                   e, delay)
                        connection.call_later(delay, lambda: channel.is_open and channel.basic_nack(tag, requeue=True))
                        return
                    self._settle_failures = 0
                    channel.basic_ack(tag)
                finally:
                    with self._lock:
                        self._unsettled = max(self._unsettled - 1, 0)
                    if self._once:
                        self.finished.set()

            thread = threading.Thread(target=work, name=f"handler-{self._spec.name}", daemon=True)
            with self._lock:
                self._unsettled += 1
                self._handlers.add(thread)
            thread.start()

        return on_message


class RabbitClient:
    """A short-lived publishing connection for commands and tests (``preimg deliver``, ``preimg dlq``).

    With ``instruments`` it declares the whole layout first (what ``deliver``
    and ``dlq replay`` need: nothing published may vanish); without, only the
    exchanges.
    """

    def __init__(self, amqp_url: str, exchange: str, heartbeat_s: int = 30,
                 instruments: Iterable[str] | None = None, retry_delays_ms: tuple[int, ...] = (),
                 queue_args: QueueArguments = CLASSIC, tls: TlsFiles | None = None):
        self._amqp_url = amqp_url
        self._queue_args = queue_args
        self._tls = tls
        self._exchange = exchange
        self._heartbeat_s = heartbeat_s
        self._instruments = None if instruments is None else tuple(instruments)
        self._retry_delays_ms = tuple(retry_delays_ms)
        self._connection: pika.BlockingConnection | None = None
        self._sender: RabbitSender | None = None

    def __enter__(self) -> Self:
        try:
            self._connection = pika.BlockingConnection(
                connection_parameters(self._amqp_url, self._heartbeat_s, "preimg-client", self._tls))
        except Exception as e:  # refused, DNS, TLS, auth: one clear error for the command
            raise BrokerUnavailable(f"cannot reach the broker at {describe_broker(self._amqp_url)}: "
                                    f"{describe_error(e)}") from e
        try:
            declare_topology(self._connection, self._exchange, self._instruments, self._retry_delays_ms,
                             queue_args=self._queue_args)
        except QueueTypeMismatch as e:
            self.close()
            raise BrokerUnavailable(f"the broker at {describe_broker(self._amqp_url)}: {e}") from e
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == _ACCESS_REFUSED and self._connection.is_open:
                # AOG's identity may not declare preimg's layout: `preimg broker setup` and the
                # services did; a publish nothing takes still comes back (mandatory).
                _log.info("this identity may not declare the layout (%s); relying on it being there", e.reply_text)
                self._sender = RabbitSender.open(self._connection, self._exchange)
                return self
            self.close()
            if e.reply_code != _PRECONDITION_FAILED:
                raise
            raise BrokerUnavailable(
                f"the broker at {describe_broker(self._amqp_url)} holds a queue declared with other arguments "
                f"({e.reply_text}); give this command the services' PREIMG_RETRY_DELAYS_MS") from e
        self._sender = RabbitSender.open(self._connection, self._exchange)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
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
        assert self._connection is not None
        declare_topology(self._connection, self._exchange, None, retry_delays_ms, extra=(spec,),
                         queue_args=self._queue_args)

    def bind_private_queue(self, binding_keys: tuple[str, ...],
                           optional_keys: tuple[str, ...] = ()) -> tuple[BlockingChannel, str]:
        """An exclusive, auto-deleted queue bound to ``binding_keys`` (for waiting on completions), and to
        ``optional_keys`` where this identity may bind them (AOG's may bind only its answers)."""
        channel = self.channel
        result = channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        name = result.method.queue
        for key in binding_keys:
            channel.queue_bind(queue=name, exchange=self._exchange, routing_key=key)
        for key in optional_keys:
            probe = self.channel  # a refused bind closes its channel
            try:
                probe.queue_bind(queue=name, exchange=self._exchange, routing_key=key)
                probe.close()
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code != _ACCESS_REFUSED:
                    raise
                _log.info("this identity may not bind %s (%s); waiting for the answer only", key, e.reply_text)
                break
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
            old = props.headers or {}
            headers = {k: v for k, v in old.items() if not k.startswith("x-preimg-") and k != "x-death"}
            # Counted, so a failure after the replay is a new RunFailed (its id includes the count).
            headers[HEADER_REPLAYS] = int(old.get(HEADER_REPLAYS, 0) or 0) + 1
            self.sender.send_to_queue(queue, body, headers)
            channel.basic_ack(method.delivery_tag)
            moved += 1
        return moved

    def browse_dead_letters(self, queue: str) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Each message waiting in ``queue``'s dead-letter queue (body, headers), none consumed.

        The messages are taken unacknowledged on a channel of their own and
        all go back to the queue, in order, when it closes.
        """
        channel = self.channel
        try:
            while True:
                method, props, body = channel.basic_get(dead_letter_queue(queue), auto_ack=False)
                if method is None:
                    return
                yield body, dict(props.headers or {})
        finally:
            if channel.is_open:
                channel.close()

    def get_all(self, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
        """Drain ``queue`` with basic_get (tests and operators reading a dead-letter queue)."""
        channel = self.channel
        out = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, refused the login or our topology; the message says where and why."""


# ---------------------------------------------------------------------------------------- migration


class MigrationRefused(RuntimeError):
    """The queue-type migration would be unsafe now (a queue still has consumers); the message says why."""


def _holding_queue(queue: str) -> str:
    """Where a queue's messages wait while the queue is deleted and declared anew."""
    return f"{queue}.migrating"


def migrate_queue_types(amqp_url: str, exchange: str, instruments: Iterable[str], retry_delays_ms: tuple[int, ...],
                        queue_args: QueueArguments, tls: TlsFiles | None = None) -> list[dict[str, Any]]:
    """Make every queue of the layout a ``queue_args.queue_type`` queue, keeping its messages.

    A queue's type cannot change in place: each queue held with the other type
    is emptied into a holding queue (``<queue>.migrating``, each message acked
    only after the broker confirmed its copy), deleted, declared anew with its
    bindings, and refilled. The retry queues of a service go first, so that no
    retry expires into a service queue that is being replaced. Refused while a
    queue has consumers (stop the services). Idempotent, and safe to run again
    after a crash: a holding queue left over is emptied back into its queue.
    Returns ``{"queue", "from", "to", "messages"}`` per queue changed.
    """
    where = describe_broker(amqp_url)
    try:
        connection = pika.BlockingConnection(connection_parameters(amqp_url, 30, "preimg-migrate", tls))
    except Exception as e:  # refused, DNS, TLS, auth
        raise BrokerUnavailable(f"cannot reach the broker at {where}: {describe_error(e)}") from e
    try:
        return _migrate(connection, exchange, instruments, retry_delays_ms, queue_args)
    except (pika.exceptions.AMQPError, OSError) as e:
        raise BrokerUnavailable(f"the broker at {where}: {describe_error(e)}; run it again (it resumes; "
                                "messages set aside wait in <queue>.migrating)") from e
    finally:
        if connection.is_open:
            connection.close()


def _migrate(connection: pika.BlockingConnection, exchange: str, instruments: Iterable[str],
             retry_delays_ms: tuple[int, ...], queue_args: QueueArguments) -> list[dict[str, Any]]:
    channel = connection.channel()
    _declare_exchange_pair(connection, channel, exchange)
    channel.close()
    layout = [_unroutable_queue(exchange, queue_args)]
    for spec in topology_specs(instruments):
        dead_letters, queue, *retries = _queues_of(spec, exchange, retry_delays_ms, queue_args)
        layout += [*retries, queue, dead_letters]  # no retry may expire into a queue being replaced
    changed = [q for q in layout if not _holds_as(connection, q.name, q.arguments)]
    channel = connection.channel()
    channel.confirm_delivery()
    for q in changed:
        consumers = channel.queue_declare(q.name, passive=True).method.consumer_count
        if consumers:
            raise MigrationRefused(f"queue {q.name} has {consumers} consumer(s): stop the services first")
    report = []
    for q in changed:  # 1: unbind (new messages go elsewhere), move aside, delete
        for source, key in q.bindings:
            channel.queue_unbind(queue=q.name, exchange=source, routing_key=key)
        channel.queue_declare(_holding_queue(q.name), durable=True, arguments=queue_args.plain_queue() or None)
        moved = _move_messages(channel, q.name, _holding_queue(q.name))
        _delete_empty(channel, q.name)
        report.append({"queue": q.name, "from": queue_args.other_type, "to": queue_args.queue_type,
                       "messages": moved})
    channel.close()
    # 2: declare anew, refill (also what a crash left aside). A channel of its own: a channel that
    # used the old queue keeps its type in a cache and crashes publishing to the new one (3.10).
    channel = connection.channel()
    channel.confirm_delivery()
    for q in layout:
        _declare_queues(channel, [q], queue_args)
        _restore_holding(connection, channel, q.name)
    return report


def _holds_as(connection: pika.BlockingConnection, queue: str, arguments: dict[str, Any]) -> bool:
    """True when ``queue`` is absent (declared now) or held with ``arguments``; False for the other type."""
    probe = connection.channel()
    try:
        probe.queue_declare(queue=queue, durable=True, arguments=arguments or None)
        probe.close()
        return True
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != _PRECONDITION_FAILED:
            raise
        return False


def _restore_holding(connection: pika.BlockingConnection, channel: BlockingChannel, queue: str) -> None:
    probe = connection.channel()
    try:
        probe.queue_declare(_holding_queue(queue), passive=True)
        probe.close()
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code != 404:
            raise
        return  # nothing set aside for this queue
    _move_messages(channel, _holding_queue(queue), queue)
    _delete_empty(channel, _holding_queue(queue))


def _delete_empty(channel: BlockingChannel, queue: str) -> None:
    """Delete ``queue`` after checking it is empty (quorum queues do not take ``if_empty``)."""
    left = channel.queue_declare(queue, passive=True).method.message_count
    if left:
        raise MigrationRefused(f"queue {queue} still holds {left} message(s) after moving them: "
                               "something publishes to it; stop the services and AOG's deliveries, then run again")
    channel.queue_delete(queue)


def _move_messages(channel: BlockingChannel, source: str, target: str) -> int:
    """Move every message of ``source`` to ``target`` (body and properties); each is acked on
    ``source`` only after the broker confirmed its copy: a crash duplicates, never loses."""
    moved = 0
    while True:
        method, props, body = channel.basic_get(source, auto_ack=False)
        if method is None:
            return moved
        try:
            channel.basic_publish("", target, body, props, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            channel.basic_nack(method.delivery_tag, requeue=True)
            raise PublishFailed(f"moving a message from {source} to {target}: {e}") from e
        channel.basic_ack(method.delivery_tag)
        moved += 1

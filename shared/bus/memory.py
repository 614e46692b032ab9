"""The in-process bus: RabbitMQ's semantics inside one process, for the embedded mode and tests.

Same topology as the broker (topic routing by binding key, one queue per
consumer, fixed-delay retry queues that dead-letter back to their queue, a
dead-letter queue per queue), same settlement order (``shared.bus.port.settle``),
and a quorum queue's delivery limit: a consumer that dies holding a message
(``ConsumerDied``) hands it back counted in ``x-delivery-count``; returned more
than ``delivery_limit`` times, it is dead-lettered.
Delivery is single-threaded: ``drain`` hands messages to their consumers one at
a time until nothing is due, waiting for retry delays when messages are pending.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.bus.port import settle
from shared.bus.runner import Incoming, Outcome
from shared.bus.topology import (
    HEADER_DELIVERY_COUNT,
    HEADER_REASON,
    UNROUTABLE_QUEUE,
    QueueSpec,
    dead_letter_queue,
    retry_queue,
    topic_matches,
    topology_specs,
)
from shared.errors import PublishFailed
from shared.messages import Envelope

_log = logging.getLogger(__name__)

Consumer = Callable[[Incoming], Outcome]


class ConsumerDied(BaseException):
    """Raised by a consumer (or a handler: like SystemExit it passes the runner) to act out dying
    with the message in hand (kill -9, lost connection)."""


@dataclass
class _Queue:
    name: str
    bindings: tuple[str, ...] = ()
    ttl_s: float | None = None  # retry queues: messages expire back to ``expire_to``
    expire_to: str | None = None
    items: deque[tuple[float, Incoming]] = field(default_factory=deque)


class InProcessBus:
    """A topic exchange and its queues in memory."""

    def __init__(self, retry_delays_ms: Iterable[int] = (1000, 5000, 30000), clock: Callable[[], float] = time.monotonic,
                 delivery_limit: int | None = 20):
        self._delivery_limit = delivery_limit
        self._retry_delays_s = tuple(d / 1000.0 for d in retry_delays_ms)
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._consumers: dict[str, Consumer] = {}

    # --- topology ------------------------------------------------------------

    def declare(self, spec: QueueSpec) -> None:
        """Declare a consuming queue with its retry queues and dead-letter queue (idempotent)."""
        q = self._queues.setdefault(spec.name, _Queue(spec.name))
        q.bindings = tuple(sorted(set(q.bindings) | set(spec.bindings)))
        for tier, delay in enumerate(self._retry_delays_s):
            self._queues.setdefault(retry_queue(spec.name, tier), _Queue(retry_queue(spec.name, tier), ttl_s=delay, expire_to=spec.name))
        self._queues.setdefault(dead_letter_queue(spec.name), _Queue(dead_letter_queue(spec.name)))

    def declare_topology(self, instruments: Iterable[str]) -> None:
        """The whole layout, as every publisher declares it on the broker (``topology_specs``),
        plus the queue of the alternate exchange that collects unroutable messages."""
        for spec in topology_specs(instruments):
            self.declare(spec)
        self._queues.setdefault(UNROUTABLE_QUEUE, _Queue(UNROUTABLE_QUEUE))

    def declare_sink(self, name: str, bindings: Iterable[str]) -> None:
        """A queue nobody consumes from here (e.g. AOG's completion queue), read with ``messages``."""
        q = self._queues.setdefault(name, _Queue(name))
        q.bindings = tuple(sorted(set(q.bindings) | set(bindings)))

    @property
    def n_retry_tiers(self) -> int:
        return len(self._retry_delays_s)

    # --- Sender ---------------------------------------------------------------

    def publish(self, event: Envelope) -> None:
        self.publish_raw(event.routing_key, event.to_json())

    def publish_raw(self, routing_key: str, body: bytes, headers: Mapping[str, Any] | None = None) -> None:
        routed = False
        for q in self._queues.values():
            if any(topic_matches(b, routing_key) for b in q.bindings):
                q.items.append((self._clock(), Incoming(body, routing_key, dict(headers or {}))))
                routed = True
        if routed:
            return
        # As on the broker: the alternate exchange takes what no binding does; without it a
        # mandatory publish comes back, and that is an error, never a silent drop.
        alternate = self._queues.get(UNROUTABLE_QUEUE)
        if alternate is None:
            raise PublishFailed(f"no queue is bound to routing key {routing_key!r}: the message was returned")
        _log.warning("unroutable message %s collected in %s", routing_key, UNROUTABLE_QUEUE)
        alternate.items.append((self._clock(), Incoming(body, routing_key, dict(headers or {}))))

    def send_to_queue(self, queue: str, body: bytes, headers: Mapping[str, Any]) -> None:
        q = self._queues.get(queue)
        if q is None:
            raise PublishFailed(f"queue {queue!r} does not exist: the message was returned")
        routing_key = str(headers.get("x-preimg-routing-key", queue))
        q.items.append((self._clock(), Incoming(body, routing_key, dict(headers))))

    # --- consuming --------------------------------------------------------------

    def subscribe(self, queue: str, consumer: Consumer) -> None:
        if queue not in self._queues:
            raise KeyError(f"queue {queue!r} is not declared")
        self._consumers[queue] = consumer

    def drain(self, timeout_s: float = 600.0) -> int:
        """Deliver messages until none is due or pending; return how many were handled."""
        deadline = self._clock() + timeout_s
        handled = 0
        while True:
            self._expire_retries()
            queue = next((n for n, q in self._queues.items() if q.items and n in self._consumers), None)
            if queue is not None:
                _, incoming = self._queues[queue].items.popleft()
                try:
                    outcome = self._consumers[queue](incoming)
                    settle(outcome, incoming, queue, self.n_retry_tiers, self)
                except ConsumerDied:
                    self.return_unsettled(queue, incoming)
                except Exception as e:  # noqa: BLE001 - as on the broker: nack without requeue -> dead letter
                    _log.exception("message on %s could not be settled; dead-lettered", queue)
                    headers = {**incoming.headers, HEADER_REASON: f"could not be settled: {type(e).__name__}: {e}"}
                    dead = Incoming(incoming.body, incoming.routing_key, headers)
                    self._queues[dead_letter_queue(queue)].items.append((self._clock(), dead))
                handled += 1
                continue
            wait = self._next_expiry()
            if wait is None:
                return handled
            if self._clock() + wait > deadline:
                raise TimeoutError(f"in-process bus still has delayed messages after {timeout_s} s")
            time.sleep(max(wait, 0.0))

    def return_unsettled(self, queue: str, incoming: Incoming) -> None:
        """What a quorum queue does with a message whose consumer died holding it: back to the head of
        the queue with ``x-delivery-count`` raised; past the delivery limit, into the dead-letter queue."""
        returned = incoming.deliveries_returned + 1
        if self._delivery_limit is not None and returned > self._delivery_limit:
            _log.error("message on %s returned %d times: dead-lettered (delivery limit)", queue, returned)
            headers = {**incoming.headers, HEADER_REASON: f"delivery_limit: returned {returned} times unsettled"}
            self._queues[dead_letter_queue(queue)].items.append((self._clock(), Incoming(incoming.body, incoming.routing_key, headers)))
            return
        headers = {**incoming.headers, HEADER_DELIVERY_COUNT: returned}
        self._queues[queue].items.appendleft((self._clock(), Incoming(incoming.body, incoming.routing_key, headers)))

    def messages(self, queue: str) -> list[Incoming]:
        """The messages waiting on ``queue`` (not removed)."""
        return [m for _, m in self._queues[queue].items]

    def take(self, queue: str) -> list[Incoming]:
        items = [m for _, m in self._queues[queue].items]
        self._queues[queue].items.clear()
        return items

    # --------------------------------------------------------------------------------

    def _expire_retries(self) -> None:
        now = self._clock()
        for q in self._queues.values():
            while q.ttl_s is not None and q.items and q.items[0][0] + q.ttl_s <= now:
                _, incoming = q.items.popleft()
                self._queues[q.expire_to].items.append((now, incoming))  # type: ignore[index]

    def _next_expiry(self) -> float | None:
        now = self._clock()
        waits = [q.items[0][0] + q.ttl_s - now for q in self._queues.values() if q.ttl_s is not None and q.items and q.expire_to in self._consumers]
        return min(waits) if waits else None

"""Every exchange, queue and routing-key name, in one place.

Services, tests and the deployment files take names from these functions;
nothing spells a queue name by hand twice.

Layout (RabbitMQ, mirrored by the in-process bus)::

    exchange "preimg" (topic, durable)
      delivery.<INSTR>        -> preimg.ingest
      raw_ready.<INSTR>       -> preimg.processor.<INSTR>   (one queue per instrument)
      products_ready.<INSTR>  -> preimg.reporter
      reports_ready.<INSTR>   -> preimg.publisher
      run_failed.<INSTR>      -> preimg.publisher           (failed runs reach the monitor page)
      completed.<INSTR>       -> (AOG binds its own queue)

    <queue>.retry.<n>  fixed-delay retry queue n (TTL, dead-letters back to <queue>)
    <queue>.dlq        dead-letter queue; the reason is in the message headers

Queue type (``QueueArguments``): ``quorum`` (replicated over the cluster's
nodes, the setting for operations) or ``classic`` (one node, the default).
With quorum queues the service queues carry a delivery limit (a message
returned that often, because its consumer died with it each time, is
dead-lettered, answered with a RunFailed on its last delivery), and every
broker-side dead-lettering (retry TTL back to the queue, nack to the DLQ) is
at-least-once: the broker keeps the message until the target queue confirmed
it, which needs ``x-overflow: reject-publish``.

    exchange "preimg.unroutable" (fanout, durable): the alternate exchange of
      "preimg"; whatever no binding takes lands in queue "preimg.unroutable"

Everyone who publishes declares the whole layout first (``topology_specs``), so
a message published before its consumer ever ran waits in its queue instead of
vanishing: a processor still waiting for its calibrations lets its queue fill.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

EXCHANGE = "preimg"
QUEUE_PREFIX = "preimg"

SERVICES = ("ingest", "processor", "reporter", "publisher")

#: The routing-key stages each service consumes.
CONSUMED_STAGES: dict[str, tuple[str, ...]] = {
    "ingest": ("delivery",),
    "processor": ("raw_ready",),
    "reporter": ("products_ready",),
    "publisher": ("reports_ready", "run_failed"),
}

#: The queue collecting what no binding of the exchange takes (through its alternate exchange).
UNROUTABLE_QUEUE = f"{QUEUE_PREFIX}.unroutable"

#: The stage AOG publishes to; a resend of a finished delivery is answered with its terminal event.
ENTRY_STAGE = "delivery"
#: Stages whose events end a run for AOG.
TERMINAL_STAGES = ("completed", "run_failed")

#: Header names carried by retried and dead-lettered messages.
HEADER_ATTEMPT = "x-preimg-attempt"
#: Since when (epoch seconds) a message waits because another copy of its run holds the stage's lease.
HEADER_LEASE_WAIT_SINCE = "x-preimg-lease-wait-since"
#: How often an operator replayed the message from a dead-letter queue.
HEADER_REPLAYS = "x-preimg-replays"
HEADER_REASON = "x-preimg-reason"
HEADER_ORIGINAL_KEY = "x-preimg-routing-key"
HEADER_FAILED_AT = "x-preimg-failed-at"
HEADER_QUEUE = "x-preimg-queue"


def alternate_exchange(exchange: str) -> str:
    """The fanout exchange receiving what ``exchange`` cannot route."""
    return f"{exchange}.unroutable"


def routing_key(stage: str, instrument: str) -> str:
    return f"{stage}.{instrument}"


def answer_keys(instrument: str = "*") -> tuple[str, ...]:
    """Routing keys of a run's answer to AOG (completion or failure): one instrument's, or all (``*``)."""
    return tuple(routing_key(stage, instrument) for stage in TERMINAL_STAGES)


def queue_name(service: str, instrument: str | None = None) -> str:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
    if service == "processor":
        if not instrument:
            raise ValueError("the processor has one queue per instrument: give the instrument")
        return f"{QUEUE_PREFIX}.processor.{instrument}"
    return f"{QUEUE_PREFIX}.{service}"


def binding_keys(service: str, instrument: str | None = None) -> tuple[str, ...]:
    stages = CONSUMED_STAGES[service]
    if service == "processor":
        return tuple(routing_key(s, instrument or "*") for s in stages)
    return tuple(f"{s}.*" for s in stages)


def retry_queue(queue: str, tier: int) -> str:
    return f"{queue}.retry.{tier}"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def retry_tier(attempt: int, n_tiers: int) -> int:
    """Retry queue index (0-based) for the given attempt number (1 = first retry)."""
    return min(max(attempt, 1), n_tiers) - 1


QUEUE_TYPES = ("classic", "quorum")
#: Header a quorum queue sets on a redelivered message: how often it was returned unsettled.
HEADER_DELIVERY_COUNT = "x-delivery-count"


@dataclass(frozen=True)
class QueueArguments:
    """The ``x-`` arguments of each kind of queue, for one queue type.

    Classic queues get exactly the arguments of the single-node layout (so
    an existing classic broker stays equivalent); quorum queues add the type,
    the delivery limit and at-least-once dead-lettering.
    """

    queue_type: str = "classic"
    delivery_limit: int = 20

    def __post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(f"unknown queue type {self.queue_type!r}; one of {', '.join(QUEUE_TYPES)}")
        if self.delivery_limit < 1:
            raise ValueError("the delivery limit must be at least 1")

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"

    def _typed(self, args: dict[str, Any], dead_letters: bool) -> dict[str, Any]:
        if not self.quorum:
            return args
        args = {"x-queue-type": "quorum", **args}
        if dead_letters:
            args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        return args

    def service_queue(self, name: str) -> dict[str, Any]:
        """A consuming queue: what its consumer nacks (or returns too often) goes to its DLQ."""
        args = self._typed({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_queue(name)}, True)
        if self.quorum:
            args["x-delivery-limit"] = self.delivery_limit
        return args

    def retry_queue(self, back_to: str, delay_ms: int) -> dict[str, Any]:
        """A fixed-delay queue whose messages expire back onto ``back_to``."""
        return self._typed({"x-message-ttl": int(delay_ms), "x-dead-letter-exchange": "",
                            "x-dead-letter-routing-key": back_to}, True)

    def plain_queue(self) -> dict[str, Any]:
        """A queue that only holds messages (dead letters, unroutable ones)."""
        return self._typed({}, False)

    @property
    def other_type(self) -> str:
        return "classic" if self.quorum else "quorum"


#: Classic queues, the default layout.
CLASSIC = QueueArguments()


@dataclass(frozen=True)
class QueueSpec:
    """One consuming queue with its bindings on the topic exchange."""

    name: str
    bindings: tuple[str, ...]
    prefetch: int = 1

    @classmethod
    def for_service(cls, service: str, instrument: str | None = None) -> QueueSpec:
        return cls(queue_name(service, instrument), binding_keys(service, instrument), prefetch=1)


def topology_specs(instruments: Iterable[str]) -> tuple[QueueSpec, ...]:
    """Every consuming queue: the three shared services and one processor queue per instrument."""
    specs = [QueueSpec.for_service(s) for s in SERVICES if s != "processor"]
    specs += [QueueSpec.for_service("processor", i) for i in sorted(set(instruments))]
    return tuple(specs)


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match_words(pattern.split("."), key.split("."))


def _match_words(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match_words(rest, words[1:])

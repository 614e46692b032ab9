"""The one place that turns a handler's result or exception into what the bus must do.

A handler is a plain function ``(message) -> list[events]`` (its ports are
bound in by the service's composition root). ``MessageRunner.process`` decodes
the body, consults the idempotency ledger, calls the handler, records the
events, counts metrics, and returns an ``Outcome``: publish these events, then
ack; or retry later; or dead-letter with a reason. The bus adapters (RabbitMQ
and in-process) carry out the outcome in that order, so a message is only ever
acked after its stage's output is durable and its events are confirmed.

Error handling, by exception type (``shared.errors``):

* undecodable body / unknown type / invalid fields -> dead letter at once;
* ``PermanentError`` -> a RunFailed event carrying the reason, then ack;
* ``IgnorableMessage`` -> ack;
* ``RetryableError`` or any other exception -> retry through the fixed-delay
  retry queues; once ``max_attempts`` is reached -> dead letter, and a RunFailed
  event so that AOG is not left waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from shared.bus.topology import HEADER_ATTEMPT
from shared.errors import IgnorableMessage, InvalidMessage, PermanentError
from shared.ledger import FileLedger
from shared.logs import log_context
from shared.messages import (
    Envelope,
    MessageDecodeError,
    RunFailed,
    decode,
)
from shared.metrics import Metrics

_log = logging.getLogger(__name__)

Handler = Callable[[Any], list[Envelope]]


@dataclass(frozen=True)
class Incoming:
    """A message as it came off a queue, independent of the transport."""

    body: bytes
    routing_key: str
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False

    @property
    def attempt(self) -> int:
        """How many times this message was already retried (0 on first delivery)."""
        try:
            return int(self.headers.get(HEADER_ATTEMPT, 0))
        except (TypeError, ValueError):
            return 0


@dataclass(frozen=True)
class Outcome:
    """What the bus adapter must do with the message in hand, in this order.

    1. publish ``events`` (with confirms), then call ``on_published``;
    2. ``ack``, or publish to the retry queue for ``next_attempt`` and ack, or
       publish to the dead-letter queue with ``reason`` and ack.
    """

    action: Literal["ack", "retry", "dead_letter"]
    events: tuple[Envelope, ...] = ()
    reason: str = ""
    next_attempt: int = 0
    label: str = "ok"
    on_published: Callable[[], None] | None = None


class MessageRunner:
    """Runs one service's handlers on messages from its queue."""

    def __init__(
        self,
        service: str,
        queue: str,
        handlers: Mapping[type[Envelope], Handler],
        ledger: FileLedger,
        metrics: Metrics,
        max_attempts: int = 4,
    ):
        self.service = service
        self.queue = queue
        self._handlers = dict(handlers)
        self._ledger = ledger
        self._metrics = metrics
        self._max_attempts = max_attempts

    def process(self, incoming: Incoming) -> Outcome:
        try:
            message = decode(incoming.body)
        except MessageDecodeError as e:
            return self._dead_letter(f"invalid message on {self.queue}: {e.reason}", "-", "-")
        handler = self._handlers.get(type(message))
        stage = message.stage
        instrument = message.instrument
        if handler is None:
            return self._dead_letter(
                f"{self.queue} has no handler for {message.type} (routing key {incoming.routing_key})",
                stage,
                instrument,
            )
        with log_context(run_id=message.run_id, instrument=instrument, stage=stage, service=self.service):
            return self._process_message(message, handler, incoming)

    # ------------------------------------------------------------------

    def _process_message(self, message: Envelope, handler: Handler, incoming: Incoming) -> Outcome:
        stage, instrument = message.stage, message.instrument
        record = self._ledger.lookup(stage, instrument, message.run_id)
        if record is not None:
            if record.delivery_id != message.delivery_id:
                return self._failed(
                    message,
                    PermanentError(
                        f"run id {message.run_id!r} is already used by delivery {record.delivery_id!r}; "
                        "send this delivery again with a new run id"
                    ),
                    record_it=False,
                )
            self._count(stage, instrument, "replayed")
            if record.published_at:
                _log.info("duplicate of a finished message: absorbed")
                return Outcome("ack", label="replayed")
            _log.info("redelivered before its events were confirmed: re-emitting the recorded events")
            return Outcome(
                "ack",
                events=record.events,
                label="replayed",
                on_published=self._marker(stage, instrument, message.run_id),
            )

        gauge = self._metrics.in_progress.labels(stage, instrument)
        gauge.inc()
        started = time.perf_counter()
        try:
            events = list(handler(message))
        except PermanentError as e:
            return self._failed(message, e)
        except IgnorableMessage as e:
            _log.info("ignored: %s", e)
            self._count(stage, instrument, "ignored")
            return Outcome("ack", label="ignored")
        except InvalidMessage as e:
            return self._dead_letter(f"{message.type}: {e}", stage, instrument)
        except Exception as e:  # noqa: BLE001 - every other failure is retried, then dead-lettered
            return self._retry_or_give_up(message, incoming, e)
        finally:
            gauge.dec()
            elapsed = time.perf_counter() - started
            self._metrics.stage_duration.labels(stage, instrument).observe(elapsed)

        self._ledger.record(stage, message, events)
        _log.info("handled %s in %.3f s; emits %s", message.type, elapsed, ", ".join(e.type for e in events) or "nothing")
        self._count(stage, instrument, "ok")
        self._observe_end_to_end(message, events)
        return Outcome("ack", events=tuple(events), on_published=self._marker(stage, instrument, message.run_id))

    def _failed(self, message: Envelope, error: PermanentError, record_it: bool = True) -> Outcome:
        _log.warning("run failed permanently: %s", error.reason)
        event = self._run_failed(message, error.reason, error.details)
        if record_it:
            self._ledger.record(message.stage, message, [event])
        self._count(message.stage, message.instrument, "failed")
        self._observe_end_to_end(message, [event])
        if isinstance(message, RunFailed):  # never answer a failure with another failure
            return Outcome("ack", label="failed")
        return Outcome(
            "ack",
            events=(event,),
            label="failed",
            on_published=self._marker(message.stage, message.instrument, message.run_id) if record_it else None,
        )

    def _retry_or_give_up(self, message: Envelope, incoming: Incoming, error: Exception) -> Outcome:
        stage, instrument = message.stage, message.instrument
        attempt = incoming.attempt + 1
        reason = f"{type(error).__name__}: {error}"
        if error.__cause__ is not None:
            reason += f" (caused by {type(error.__cause__).__name__}: {error.__cause__})"
        if attempt < self._max_attempts:
            _log.warning("attempt %d of %d failed, will retry: %s", attempt, self._max_attempts, reason)
            self._count(stage, instrument, "retried")
            self._metrics.retries.labels(stage, instrument).inc()
            return Outcome("retry", reason=reason, next_attempt=attempt, label="retried")
        _log.error("giving up after %d attempts: %s", attempt, reason, exc_info=error)
        final = f"{self.service} gave up after {attempt} attempts: {reason}"
        outcome = self._dead_letter(final, stage, instrument)
        if isinstance(message, RunFailed):
            return outcome
        # Not recorded in the ledger: the stage never finished, so replaying the dead letter
        # (``preimg dlq replay``) once the fault is mended does the work for real.
        event = self._run_failed(message, final, {"attempts": attempt})
        return Outcome("dead_letter", events=(event,), reason=final, label="dead_lettered")

    def _dead_letter(self, reason: str, stage: str, instrument: str) -> Outcome:
        _log.error("dead-lettered: %s", reason)
        self._count(stage, instrument, "dead_lettered")
        self._metrics.dead_letters.labels(self.queue, _reason_label(reason)).inc()
        return Outcome("dead_letter", reason=reason, label="dead_lettered")

    def _run_failed(self, message: Envelope, reason: str, details: Mapping[str, Any]) -> RunFailed:
        return RunFailed(
            **message.follow_up(message.stage, "run_failed"),
                        failed_stage=self.service,
            reason=reason,
            details={k: v for k, v in details.items() if _jsonable(v)},
        )

    def _marker(self, stage: str, instrument: str, run_id: str) -> Callable[[], None]:
        return lambda: self._ledger.mark_published(stage, instrument, run_id)

    def _count(self, stage: str, instrument: str, outcome: str) -> None:
        self._metrics.messages.labels(stage, instrument, outcome).inc()

    def _observe_end_to_end(self, message: Envelope, events: list[Envelope]) -> None:
        delivered_at = getattr(message, "delivered_at", None)
        for event in events:
            status = getattr(event, "status", None) or ("failed" if isinstance(event, RunFailed) else None)
            if event.stage in ("completed", "run_failed") and delivered_at is not None:
                elapsed = (datetime.now(UTC) - delivered_at).total_seconds()
                self._metrics.end_to_end.labels(message.instrument, status).observe(max(elapsed, 0.0))


def _reason_label(reason: str) -> str:
    """A low-cardinality label for the dead-letter counter."""
    for key in ("invalid message", "no handler", "gave up"):
        if key in reason:
            return key.replace(" ", "_")
    return "other"


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict, tuple))

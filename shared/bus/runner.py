"""The one place that turns a handler's result or exception into what the bus must do.

A handler is a plain function ``(message) -> list[events]`` (its ports are
bound in by the service's composition root). ``MessageRunner.process`` decodes
the body, consults the idempotency ledger, calls the handler, records the
events, counts metrics, and returns an ``Outcome``: publish these events, then
ack; or retry later; or dead-letter with a reason. The bus adapters (RabbitMQ
and in-process) carry out the outcome in that order, so a message is only ever
acked after its stage's output is durable and its events are confirmed.

Error handling, by exception type (``shared.errors``):

* undecodable body / unknown type / invalid fields -> dead letter at once; when
  the body still names a readable ``run_id``, ``delivery_id`` and ``instrument``
  a RunFailed carrying the validation error answers it too;
* ``PermanentError`` -> a RunFailed event carrying the reason, then ack;
* ``IgnorableMessage`` -> ack;
* ``RetryableError`` or any other exception -> retry through the fixed-delay
  retry queues; once ``max_attempts`` is reached -> dead letter, and a RunFailed
  event so that AOG is not left waiting;
* events the broker does not take (``PublishFailed``: unroutable or nacked) ->
  the same retry, then dead letter.

At most one copy of a message works on a run at a time: the runner holds the
ledger's (stage, run) lease from before the idempotency lookup until the
result is recorded. A copy that finds the lease held goes back to a retry
queue without spending an attempt. Ledger faults are classified like handler
faults: an unreadable disk is retried, a corrupt record fails the run with the
file named.

Every RunFailed gets a message id of its own failure (run, stage, input
message, attempt, replay count): two failures of one run are two messages,
while a re-emitted recorded failure keeps its id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from shared.bus.topology import (
    ENTRY_STAGE,
    HEADER_ATTEMPT,
    HEADER_DELIVERY_COUNT,
    HEADER_LEASE_WAIT_SINCE,
    HEADER_REPLAYS,
    TERMINAL_STAGES,
)
from shared.errors import (
    IgnorableMessage,
    InvalidMessage,
    OperatorActionRequired,
    PermanentError,
    PublishFailed,
    RetryableError,
)
from shared.files import deferred_syncs
from shared.layout import INSTRUMENT_PATTERN
from shared.ledger import CorruptRecord, FileLedger, Lease, LeaseBusy, LeaseLost
from shared.logs import log_context
from shared.messages import (
    RUN_ID_PATTERN,
    Envelope,
    MessageDecodeError,
    RunFailed,
    decode,
    derived_message_id,
    type_name,
)
from shared.metrics import Metrics

_log = logging.getLogger(__name__)

Handler = Callable[[Any], list[Envelope]]
#: A service's handlers by the message type each takes (what a service's ``build`` returns).
Handlers = Mapping[type[Envelope], Handler]


@dataclass(frozen=True)
class Incoming:
    """A message as it came off a queue, independent of the transport."""

    body: bytes
    routing_key: str
    headers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        """How many times this message was already retried (0 on first delivery)."""
        return _int_header(self.headers, HEADER_ATTEMPT)

    @property
    def deliveries_returned(self) -> int:
        """How often the broker got this delivery back unsettled (a quorum queue's ``x-delivery-count``)."""
        return _int_header(self.headers, HEADER_DELIVERY_COUNT)

    @property
    def replays(self) -> int:
        """How often an operator replayed this message from its dead-letter queue."""
        return _int_header(self.headers, HEADER_REPLAYS)


@dataclass(frozen=True)
class Outcome:
    """What the bus adapter must do with the message in hand, in this order.

    1. publish ``events`` (with confirms), then wait for ``recorded_durably``
       (the stage's state record, whose last sync overlaps the publishing),
       then call ``on_published``; if the broker does not take an event or the
       record cannot be made durable, settle ``if_not_published(reason)``
       instead;
    2. ``ack``, or publish to the retry queue for ``next_attempt`` (tier
       ``retry_tier`` when given) with ``headers`` added and ack, or publish to
       the dead-letter queue with ``reason`` and ack.
    """

    action: Literal["ack", "retry", "dead_letter"]
    events: tuple[Envelope, ...] = ()
    reason: str = ""
    next_attempt: int = 0
    label: str = "ok"
    on_published: Callable[[], None] | None = None
    recorded_durably: Callable[[], None] | None = None
    if_not_published: Callable[[str], Outcome] | None = None
    retry_tier: int | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)


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
        prepare: Callable[[Envelope], None] | None = None,
        lease_wait_limit_s: float = 4 * 3600.0,
        clock: Callable[[], float] = time.time,
        delivery_limit: int | None = None,
    ):
        """
        Parameters
        ----------
        prepare : callable, optional
            Called with the message once the lease is held, before the handler,
            when an earlier holder of the lease may have left something behind
            (the composition root removes the run's stale temporary files). The
            first holder of a (stage, run) lease has no predecessor: skipped.
        lease_wait_limit_s : float
            How long a copy may wait for another copy's lease before its waits
            count as failed attempts.
        delivery_limit : int, optional
            The queue's ``x-delivery-limit`` (quorum queues): on the last
            delivery the broker allows, the message is not handled again but
            answered with a RunFailed and dead-lettered, so a message whose
            handling kills the consumer every time still ends in an answer.
        """
        self.service = service
        self.queue = queue
        self._handlers = dict(handlers)
        self._ledger = ledger
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._prepare = prepare
        self._lease_wait_limit_s = lease_wait_limit_s
        self._clock = clock
        self._delivery_limit = delivery_limit

    def process(self, incoming: Incoming) -> Outcome:
        try:
            message = decode(incoming.body)
        except MessageDecodeError as e:
            return self._answer_invalid(incoming, e)
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
            returned = incoming.deliveries_returned
            if self._delivery_limit is not None and returned >= self._delivery_limit:
                return self._retry_or_give_up(message, incoming, OperatorActionRequired(
                    f"the message came back {returned} times unsettled (x-delivery-limit {self._delivery_limit}): "
                    "its consumer died or lost the broker each time it held it (killed, out of memory, a recipe "
                    "taking the node down); find why in the service's log"))
            try:
                # The syncs the lease (a new run's state directory) and the handler (the directories
                # it renamed outputs into) ask for are done with the record's bytes: one round of
                # syncs fewer; nothing is recorded, emitted or acked before.
                with deferred_syncs() as pending, self._ledger.lease(stage, instrument, message.run_id) as lease:
                    return self._process_message(message, handler, incoming, lease, pending)
            except LeaseBusy as busy:
                return self._wait_for_lease(message, incoming, busy)
            except OSError as e:  # the state directory cannot be made or locked
                return self._retry_or_give_up(message, incoming, e)

    # ------------------------------------------------------------------

    def _process_message(self, message: Envelope, handler: Handler, incoming: Incoming, lease: Lease,
                         pending: Iterable[Path]) -> Outcome:
        stage, instrument = message.stage, message.instrument
        try:
            record = self._ledger.lookup(stage, instrument, message.run_id)
            if isinstance(message, RunFailed) and record is not None and record.input_message_id != message.message_id:
                record = None  # another failure of the run, not a copy of the one recorded
            terminal = None
            if record is not None and record.published_at and stage == ENTRY_STAGE:
                terminal = self._ledger.terminal(instrument, message.run_id)
        except CorruptRecord as e:
            return self._failed(message, incoming, PermanentError(str(e), record=str(e.path)), record_it=False)
        except OSError as e:
            return self._retry_or_give_up(message, incoming, e)

        if record is not None:
            if record.delivery_id != message.delivery_id:
                return self._failed(
                    message,
                    incoming,
                    PermanentError(
                        f"run id {message.run_id!r} is already used by delivery {record.delivery_id!r}; "
                        "send this delivery again with a new run id"
                    ),
                    record_it=False,
                )
            self._count(stage, instrument, "replayed")
            if record.published_at:
                if terminal is not None:
                    _log.info("delivery sent again after its run finished: answering with the recorded %s",
                              terminal.type)
                    return Outcome("ack", events=(terminal,), label="replayed")
                _log.info("duplicate of a finished message: absorbed")
                return Outcome("ack", label="replayed")
            _log.info("redelivered before its events were confirmed: re-emitting the recorded events")
            # The record's last sync may be what failed the first time: done again before the ack.
            return self._emit(message, incoming, record.events, label="replayed",
                              recorded_for=record.input_message_id,
                              recorded_durably=self._ledger.sync_record_entry(stage, instrument, message.run_id))

        if lease.token > 1:  # an earlier holder may have left something behind
            try:
                for path in self._ledger.remove_interrupted_record(stage, instrument, message.run_id):
                    _log.info("removed the temporary file of a record whose writing was interrupted: %s", path)
                if self._prepare is not None:
                    self._prepare(message)
            except Exception:  # noqa: BLE001 - housekeeping must not stop the work
                _log.warning("preparing the run failed; going on", exc_info=True)

        gauge = self._metrics.in_progress.labels(stage, instrument)
        gauge.inc()
        started = time.perf_counter()
        try:
            events = list(handler(message))
        except PermanentError as e:
            # The failure is the run's answer: recorded, with a new run's state directory made durable.
            return self._failed(message, incoming, e, lease=lease, sync_first=_existing(pending))
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

        try:
            recorded_durably = self._record(message, events, lease, sync_first=_existing(pending))
        except (OSError, LeaseLost) as e:
            return self._retry_or_give_up(message, incoming, e)
        _log.info("handled %s in %.3f s; emits %s", message.type, elapsed, ", ".join(e.type for e in events) or "nothing")
        self._count(stage, instrument, "ok")
        self._observe_end_to_end(message, events)
        return self._emit(message, incoming, tuple(events), recorded_durably=recorded_durably)

    def _record(self, message: Envelope, events: list[Envelope], lease: Lease | None,
                sync_first: Sequence[Path] = ()) -> Callable[[], None]:
        """Record the stage's result; returns the wait for the record's last sync (see ``Outcome``).

        The outputs and the record's bytes are durable when this returns; the record's
        directory entry is synced while the events are published, and the message is acked
        only once it is. Publishing first is safe: a record lost with its entry (a power cut in
        between) only means that the unacked message comes again and the stage runs again,
        emitting events with the same message ids, which the next stage absorbs as duplicates.
        """
        answers = [e for e in events if e.stage in TERMINAL_STAGES]
        return self._ledger.record(message.stage, message, events, lease=lease,
                                   terminal=answers[-1] if answers else None, sync_first=sync_first,
                                   entry_synced_later=True)

    def _emit(self, message: Envelope, incoming: Incoming, events: tuple[Envelope, ...],
              label: str = "ok", recorded_for: str | None = None,
              recorded_durably: Callable[[], None] | None = None) -> Outcome:
        """Publish recorded events and ack; if the broker does not take them, retry the message.

        ``recorded_for`` is the input message id the record was made for (a
        resend may carry another id).
        """
        return Outcome(
            "ack",
            events=events,
            label=label,
            on_published=self._marker(message, recorded_for or message.message_id),
            recorded_durably=recorded_durably,
            if_not_published=lambda reason: self._not_published(message, incoming, reason),
        )

    def _not_published(self, message: Envelope, incoming: Incoming, reason: str) -> Outcome:
        self._metrics.publish_failures.labels(message.stage, message.instrument).inc()
        return self._retry_or_give_up(message, incoming, PublishFailed(reason))

    def _failed(self, message: Envelope, incoming: Incoming, error: PermanentError, record_it: bool = True,
                lease: Lease | None = None, sync_first: Sequence[Path] = ()) -> Outcome:
        _log.warning("run failed permanently: %s", error.reason)
        event = self._run_failed(message, incoming, error.reason, error.details)
        recorded_durably = None
        if record_it:
            try:
                recorded_durably = self._record(message, [event], lease, sync_first=sync_first)
            except (OSError, LeaseLost) as e:
                return self._retry_or_give_up(message, incoming, e)
        self._count(message.stage, message.instrument, "failed")
        self._observe_end_to_end(message, [event])
        if isinstance(message, RunFailed):  # never answer a failure with another failure
            return Outcome("ack", label="failed", recorded_durably=recorded_durably)
        if not record_it:
            return Outcome("ack", events=(event,), label="failed")
        return self._emit(message, incoming, (event,), label="failed", recorded_durably=recorded_durably)

    def _retry_or_give_up(self, message: Envelope, incoming: Incoming, error: Exception) -> Outcome:
        stage, instrument = message.stage, message.instrument
        attempt = incoming.attempt + 1
        reason = f"{type(error).__name__}: {error}"
        if error.__cause__ is not None:
            reason += f" (caused by {type(error.__cause__).__name__}: {error.__cause__})"
        needs_operator = isinstance(error, OperatorActionRequired)
        if attempt < self._max_attempts and not needs_operator:
            _log.warning("attempt %d of %d failed, will retry: %s", attempt, self._max_attempts, reason)
            self._count(stage, instrument, "retried")
            self._metrics.retries.labels(stage, instrument).inc()
            return Outcome("retry", reason=reason, next_attempt=attempt, label="retried")
        if needs_operator:
            _log.error("an operator must act; not retrying: %s", reason)
            final = (f"{self.service} needs an operator: {error}. Once mended, replay the dead letter "
                     f"(preimg dlq replay {self.queue})")
        else:
            _log.error("giving up after %d attempts: %s", attempt, reason, exc_info=error)
            final = f"{self.service} gave up after {attempt} attempts: {reason}"
        outcome = self._dead_letter(final, stage, instrument)
        if isinstance(message, RunFailed):
            return outcome
        # Not recorded as the stage's result: the stage never finished, so replaying the dead
        # letter (``preimg dlq replay``) once the fault is mended does the work for real.
        event = self._run_failed(message, incoming, final, {"attempts": attempt})
        try:
            self._ledger.record_terminal(event)
        except OSError as e:
            _log.warning("could not keep the run's terminal event: %s", e)
        return Outcome("dead_letter", events=(event,), reason=final, label="dead_lettered")

    def _wait_for_lease(self, message: Envelope, incoming: Incoming, busy: LeaseBusy) -> Outcome:
        """Another copy works on the run: come back later without spending an attempt."""
        now = self._clock()
        try:
            since = float(incoming.headers.get(HEADER_LEASE_WAIT_SINCE, now))
        except (TypeError, ValueError):
            since = now
        if now - since > self._lease_wait_limit_s:
            return self._retry_or_give_up(message, incoming, RetryableError(
                f"another copy of the message has held the run for over {self._lease_wait_limit_s:.0f} s: {busy}"))
        _log.warning("another copy of this message is being worked on (%s); trying again later", busy)
        self._count(message.stage, message.instrument, "lease_busy")
        return Outcome("retry", reason=f"lease busy: {busy}", next_attempt=incoming.attempt, retry_tier=1,
                       label="lease_busy", headers={HEADER_LEASE_WAIT_SINCE: since})

    def _answer_invalid(self, incoming: Incoming, error: MessageDecodeError) -> Outcome:
        """Dead-letter a message that fails validation; answer AOG when the run can still be named."""
        reason = f"invalid message on {self.queue}: {error.reason}"
        identity = readable_identity(incoming.body)
        if identity is None or identity.get("type") == type_name(RunFailed):
            return self._dead_letter(reason, "-", "-")
        with log_context(run_id=identity["run_id"], instrument=identity["instrument"], service=self.service):
            self._dead_letter(reason, "-", identity["instrument"])
            event = RunFailed(
                message_id=derived_message_id(identity["run_id"], self.service, "invalid",
                                              hashlib.sha256(incoming.body).hexdigest(), str(incoming.replays)),
                run_id=identity["run_id"],
                delivery_id=identity["delivery_id"],
                instrument=identity["instrument"],
                test=identity["test"],
                failed_stage=self.service,
                reason=f"{self.service} could not accept the message: {error.reason}. "
                       "Correct it and send it again (the message was dead-lettered)",
                details={"message_type": str(identity.get("type"))},
            )
            _log.warning("answered an invalid message with a RunFailed")
        return Outcome("dead_letter", events=(event,), reason=reason, label="dead_lettered")

    def _dead_letter(self, reason: str, stage: str, instrument: str) -> Outcome:
        _log.error("dead-lettered: %s", reason)
        self._count(stage, instrument, "dead_lettered")
        self._metrics.dead_letters.labels(self.queue, _reason_label(reason)).inc()
        return Outcome("dead_letter", reason=reason, label="dead_lettered")

    def _run_failed(self, message: Envelope, incoming: Incoming, reason: str, details: Mapping[str, Any]) -> RunFailed:
        return RunFailed(
            **{
                **message.follow_up(message.stage, "run_failed"),
                # One id per failure: a second failure of the run (after a replay) is a new message.
                "message_id": derived_message_id(message.run_id, self.service, "run_failed", message.message_id,
                                                 str(incoming.attempt), str(incoming.replays)),
            },
            failed_stage=self.service,
            reason=reason,
            details={k: v for k, v in details.items() if _jsonable(v)},
        )

    def _marker(self, message: Envelope, input_message_id: str) -> Callable[[], None]:
        return lambda: self._ledger.mark_published(message.stage, message.instrument, message.run_id,
                                                   input_message_id)

    def _count(self, stage: str, instrument: str, outcome: str) -> None:
        self._metrics.messages.labels(stage, instrument, outcome).inc()

    def _observe_end_to_end(self, message: Envelope, events: list[Envelope]) -> None:
        delivered_at = getattr(message, "delivered_at", None)
        for event in events:
            status = getattr(event, "status", None) or ("failed" if isinstance(event, RunFailed) else None)
            if event.stage in TERMINAL_STAGES and delivered_at is not None:
                elapsed = (datetime.now(UTC) - delivered_at).total_seconds()
                self._metrics.end_to_end.labels(message.instrument, status).observe(max(elapsed, 0.0))


def readable_identity(body: bytes) -> dict[str, Any] | None:
    """``run_id``, ``delivery_id``, ``instrument``, ``test`` and ``type`` of a body, if the run can be named.

    For a message that failed validation: the ids must be well-formed, or the
    answer could not be routed (instrument) or matched (run and delivery ids).
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    run_id, delivery_id, instrument = data.get("run_id"), data.get("delivery_id"), data.get("instrument")
    if not (isinstance(run_id, str) and re.fullmatch(RUN_ID_PATTERN, run_id)):
        return None
    if not (isinstance(instrument, str) and re.fullmatch(INSTRUMENT_PATTERN, instrument)):
        return None
    if not (isinstance(delivery_id, str) and 0 < len(delivery_id) <= 200):
        return None
    test = data.get("test")
    return {"run_id": run_id, "delivery_id": delivery_id, "instrument": instrument,
            "test": test if isinstance(test, bool) else False, "type": data.get("type")}


def _int_header(headers: Mapping[str, Any], name: str) -> int:
    try:
        return int(headers.get(name, 0))
    except (TypeError, ValueError):
        return 0


def _reason_label(reason: str) -> str:
    """A low-cardinality label for the dead-letter counter."""
    for key in ("invalid message", "no handler", "gave up"):
        if key in reason:
            return key.replace(" ", "_")
    return "other"


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict, tuple))


def _existing(paths: Iterable[Path]) -> list[Path]:
    """The paths put off for the record's round that still exist: a path the handler removed again
    after asking for its sync (an emptied directory) needs none."""
    return [p for p in paths if os.path.lexists(p)]

"""The bus port: what a service needs from a message broker, and how an Outcome is settled.

Two adapters implement it: ``shared.bus.rabbitmq`` (pika, the distributed
set-up) and ``shared.bus.memory`` (one process, no broker). Both settle an
``Outcome`` with ``settle`` below, so the order of effects is the same:
events are published and confirmed first, then the message is retried,
dead-lettered or simply acked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from shared.bus.runner import Incoming, Outcome
from shared.bus.topology import (
    HEADER_ATTEMPT,
    HEADER_FAILED_AT,
    HEADER_ORIGINAL_KEY,
    HEADER_QUEUE,
    HEADER_REASON,
    dead_letter_queue,
    retry_queue,
    retry_tier,
)
from shared.errors import PublishFailed
from shared.messages import Envelope

_log = logging.getLogger(__name__)


class Sender(Protocol):
    def publish(self, event: Envelope) -> None:
        """Publish an event on the topic exchange under its routing key; return once confirmed.

        Raises ``PublishFailed`` when no queue takes it or the broker nacks it.
        """

    def send_to_queue(self, queue: str, body: bytes, headers: Mapping[str, Any]) -> None:
        """Put a message straight onto a named queue; return once confirmed (``PublishFailed`` if not)."""


def settle(outcome: Outcome, incoming: Incoming, queue: str, n_retry_tiers: int, sender: Sender) -> None:
    """Carry out ``outcome`` for ``incoming`` (taken from ``queue``), short of the final ack.

    Raises ``PublishFailed`` only when the broker refuses a message and the
    outcome has no fallback (the adapter then dead-letters the message itself).
    """
    try:
        for event in outcome.events:
            sender.publish(event)
        if outcome.recorded_durably is not None:
            try:
                outcome.recorded_durably()
            except OSError as e:
                raise PublishFailed(f"the stage's state record could not be made durable: {e}") from e
    except PublishFailed as e:
        _log.warning("the result could not be settled: %s", e)
        if outcome.if_not_published is not None:
            settle(outcome.if_not_published(str(e)), incoming, queue, n_retry_tiers, sender)
            return
        if outcome.action != "dead_letter":
            raise
        outcome = replace(outcome, reason=f"{outcome.reason}; its RunFailed could not be published either: {e}")
    if outcome.on_published is not None:
        try:
            outcome.on_published()
        except Exception:  # noqa: BLE001 - a missed mark costs a harmless duplicate (same message ids)
            _log.warning("could not mark the events as published", exc_info=True)
    if outcome.action == "retry":
        headers = {**incoming.headers, **outcome.headers,
                   HEADER_ATTEMPT: outcome.next_attempt, HEADER_REASON: outcome.reason[:1000]}
        tier = retry_tier(outcome.next_attempt, n_retry_tiers)
        if outcome.retry_tier is not None:
            tier = min(outcome.retry_tier, n_retry_tiers - 1)
        sender.send_to_queue(retry_queue(queue, tier), incoming.body, headers)
    elif outcome.action == "dead_letter":
        headers = {
            **incoming.headers,
            HEADER_REASON: outcome.reason[:4000],
            HEADER_ORIGINAL_KEY: incoming.routing_key,
            HEADER_QUEUE: queue,
            HEADER_ATTEMPT: incoming.attempt,
            HEADER_FAILED_AT: datetime.now(UTC).isoformat(),
        }
        sender.send_to_queue(dead_letter_queue(queue), incoming.body, headers)

"""Exceptions named by what the message runner must do with the message in hand.

Handlers raise these; the runner (``shared.bus.runner``) turns them into a
retry, a RunFailed event or a dead letter. Keep the cause: ``raise ... from e``.
"""

from __future__ import annotations


class PreimgError(Exception):
    """Base of the errors the runner understands."""


class RetryableError(PreimgError):
    """A passing fault (broker, S3 or SMTP down, disk full): try the message again later."""


class OperatorActionRequired(PreimgError):
    """A refusal only an operator can mend (no such bucket, access denied, bad credentials).

    Retrying before someone acts only delays the answer, so the runner does
    not: the message is dead-lettered at once with this reason, AOG gets a
    RunFailed saying so, and ``preimg dlq replay`` finishes the run once the
    configuration is mended. The text must name what to fix.
    """


class PermanentError(PreimgError):
    """The input cannot be processed as it is; retrying will not help.

    The runner acks the message and emits a RunFailed event carrying ``str(e)``
    as the reason, so the text must say what went wrong and what to do.
    """

    def __init__(self, reason: str, **details: object):
        super().__init__(reason)
        self.reason = reason
        self.details = details


class InvalidMessage(PreimgError):
    """The message cannot be understood at all: it goes to the dead-letter queue."""


class IgnorableMessage(PreimgError):
    """Nothing to do (e.g. an event for another instrument): ack and move on."""


class PublishFailed(PreimgError):
    """The broker did not take a published message: returned as unroutable, or nacked.

    Raised by the bus adapters; the runner answers it like a passing fault
    (retry, then dead letter with the reason), never as a success.
    """

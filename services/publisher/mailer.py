"""The e-mail port (EMAIL_NOTE) and its SMTP adapter."""

from __future__ import annotations

import logging
import smtplib
from email.message import EmailMessage
from typing import Protocol

_log = logging.getLogger(__name__)

#: What a failed send raises; the publisher logs and counts these and completes the run.
MAIL_ERRORS = (OSError, smtplib.SMTPException)


class Mailer(Protocol):
    def send(self, message: EmailMessage) -> None:
        """Deliver the message or raise one of :data:`MAIL_ERRORS`."""


class SmtpMailer:
    """Plain SMTP to a relay (no auth: the QC machines' local relay, as DFOS used ``mail``)."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s

    def send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
            smtp.send_message(message)
        _log.info("mail %r sent to %s via %s:%d", message["Subject"], message["To"], self.host,
                  self.port)

"""One broker identity per party, with least-privilege permissions (broker-free: the table and its uses).

Each party gets a RabbitMQ user with vhost permissions (configure, write,
read: regexes on exchange and queue names) and topic permissions on the
exchange ``preimg`` (write: the routing keys it may publish; read: the
binding keys it may bind with):

* ``aog`` publishes only ``delivery.<INSTR>`` and reads only its own queues
  (``aog.*``, or a server-named one) bound to ``completed.*``/``run_failed.*``;
* each service consumes only its own queues and publishes only its stage's
  routing keys plus ``run_failed.*``; services declare the whole layout
  (configure on ``preimg.*``) so nothing is published into a void;
* ``keda`` reads queue lengths through the management API (tag
  ``monitoring``, no AMQP rights);
* ``preimg-operator`` runs ``preimg dlq`` and ``preimg broker setup``.

``definitions`` renders them as a RabbitMQ definitions document (passwords
as salted SHA-256 hashes, from the environment at setup time, never in git);
``preimg broker setup`` applies them to a running broker through the
management API (``shared.bus.broker_admin``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.bus.topology import EXCHANGE, QUEUE_PREFIX, alternate_exchange

_Q = re.escape(QUEUE_PREFIX)
_X = re.escape(EXCHANGE)
#: Every exchange and queue of the layout, and the default exchange (retry and dead-letter sends).
_LAYOUT = rf"^({_X}|{re.escape(alternate_exchange(EXCHANGE))}|{_Q}\..+)$"
_LAYOUT_AND_DEFAULT = rf"^({_X}|{re.escape(alternate_exchange(EXCHANGE))}|{_Q}\..+|amq\.default)$"
_INSTR = r"[A-Za-z0-9_-]+"


def _own_queues(queue_pattern: str) -> str:
    """A service's queues with their retry and dead-letter queues, plus the exchanges it binds from."""
    return rf"^({_X}|{re.escape(alternate_exchange(EXCHANGE))}|{_Q}\.unroutable|{queue_pattern}(\.retry\.\d+|\.dlq)?)$"


@dataclass(frozen=True)
class Identity:
    user: str
    purpose: str
    tags: tuple[str, ...] = ()
    configure: str = "^$"
    write: str = "^$"
    read: str = "^$"
    topic_write: str = "^$"
    topic_read: str = "^$"

    @property
    def password_env(self) -> str:
        """The environment variable holding this identity's password at setup time."""
        return f"PREIMG_BROKER_PASSWORD_{self.user.upper().replace('-', '_')}"


def _stage_keys(*stages: str) -> str:
    return rf"^({'|'.join(stages)})\.{_INSTR}$"


IDENTITIES: tuple[Identity, ...] = (
    Identity("aog", "publishes deliveries, reads its answers",
             configure=r"^(aog\..+|amq\.gen-.+)$",
             write=rf"^({_X}|aog\..+|amq\.gen-.+)$",
             read=rf"^({_X}|aog\..+|amq\.gen-.+)$",
             topic_write=_stage_keys("delivery"),
             topic_read=rf"^(completed|run_failed)\.({_INSTR}|\*)$"),
    Identity("ingest", "consumes preimg.ingest, publishes raw_ready and run_failed",
             configure=_LAYOUT, write=_LAYOUT_AND_DEFAULT, read=_own_queues(rf"{_Q}\.ingest"),
             topic_write=_stage_keys("raw_ready", "run_failed"), topic_read=".*"),
    Identity("processor", "consumes preimg.processor.<INSTR>, publishes products_ready and run_failed",
             configure=_LAYOUT, write=_LAYOUT_AND_DEFAULT, read=_own_queues(rf"{_Q}\.processor\.{_INSTR}"),
             topic_write=_stage_keys("products_ready", "run_failed"), topic_read=".*"),
    Identity("reporter", "consumes preimg.reporter, publishes reports_ready and run_failed",
             configure=_LAYOUT, write=_LAYOUT_AND_DEFAULT, read=_own_queues(rf"{_Q}\.reporter"),
             topic_write=_stage_keys("reports_ready", "run_failed"), topic_read=".*"),
    Identity("publisher", "consumes preimg.publisher, publishes completed and run_failed",
             configure=_LAYOUT, write=_LAYOUT_AND_DEFAULT, read=_own_queues(rf"{_Q}\.publisher"),
             topic_write=_stage_keys("completed", "run_failed"), topic_read=".*"),
    Identity("keda", "reads queue lengths through the management API (read-only)", tags=("monitoring",)),
    Identity("preimg-operator", "preimg dlq list/replay, preimg broker setup",
             tags=("administrator",), configure=".*", write=".*", read=".*", topic_write=".*", topic_read=".*"),
)


def identity(user: str) -> Identity:
    for ident in IDENTITIES:
        if ident.user == user:
            return ident
    raise KeyError(f"no identity {user!r}; known: {', '.join(i.user for i in IDENTITIES)}")


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def passwords_from_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Each identity's password from ``PREIMG_BROKER_PASSWORD_<USER>``; missing ones raise, naming them."""
    missing = [i.password_env for i in IDENTITIES if not env.get(i.password_env)]
    if missing:
        raise KeyError(f"set the passwords in the environment (or a Kubernetes Secret): {', '.join(missing)}")
    return {i.user: env[i.password_env] for i in IDENTITIES}


def definitions(passwords: Mapping[str, str] | None, vhost: str = "/") -> dict[str, Any]:
    """A RabbitMQ definitions document (``load_definitions``) with every identity and its permissions.

    Without ``passwords`` the users have none (``password_hash`` empty: no password login) until
    ``preimg broker setup`` sets them from the environment: the form that can live in git.
    """
    return {
        "users": [{"name": i.user, "password_hash": password_hash(passwords[i.user]) if passwords else "",
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": list(i.tags)}
                  for i in IDENTITIES],
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": i.user, "vhost": vhost, "configure": i.configure, "write": i.write, "read": i.read}
                        for i in IDENTITIES],
        "topic_permissions": [{"user": i.user, "vhost": vhost, "exchange": EXCHANGE,
                               "write": i.topic_write, "read": i.topic_read} for i in IDENTITIES],
    }

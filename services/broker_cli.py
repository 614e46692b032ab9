"""``preimg broker setup|definitions|migrate``: the broker's identities and queue layout.

``setup`` is idempotent (run it on every deploy): through the management API
(``PREIMG_MANAGEMENT_URL``, an administrator such as ``preimg-operator``) it
creates or updates the users of ``shared.bus.identities`` with their
permissions and topic permissions, passwords from ``PREIMG_BROKER_PASSWORD_<USER>``;
then, over AMQP (``PREIMG_AMQP_URL``), it declares the whole layout so that
AOG's first delivery has its queue even though AOG may not declare queues.
``definitions`` prints the same as a RabbitMQ definitions document (password
hashes, never the passwords) for ``load_definitions`` at broker start.
``migrate`` turns every preimg queue the broker holds with the other queue
type into a ``PREIMG_QUEUE_TYPE`` queue, keeping its messages (services
stopped: it refuses while a queue has consumers).

Exit codes: 0 done, 2 a password or setting is missing, 3 the broker refused or
could not be reached (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shared.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    broker = subparsers.add_parser("broker", help="set up the broker's identities and layout")
    broker.add_argument("action", choices=("setup", "definitions", "migrate"))
    broker.add_argument("--vhost", default="/", help="virtual host (default /)")
    broker.add_argument("--management-url", default=os.environ.get("PREIMG_MANAGEMENT_URL"),
                        help="http(s)://USER:PASS@host:15672 (default $PREIMG_MANAGEMENT_URL)")
    broker.add_argument("--without-passwords", action="store_true",
                        help="definitions: users without passwords (the file in git; setup sets them)")
    broker.add_argument("--output", metavar="FILE",
                        help="definitions: write the document to FILE (atomically, readable by the broker's "
                             "user) instead of stdout, e.g. for load_definitions at broker start")
    broker.set_defaults(func=run_broker)


def run_broker(args: argparse.Namespace) -> int:
    from shared.bus.identities import definitions, passwords_from_env

    if args.action == "migrate":
        return _migrate()
    if args.action == "definitions" and args.without_passwords:
        return _emit(json.dumps(definitions(None, args.vhost), indent=2), args.output)
    try:
        passwords = passwords_from_env()
    except KeyError as e:
        print(f"preimg broker: {e.args[0]}", file=sys.stderr)
        return 2
    if args.action == "definitions":
        return _emit(json.dumps(definitions(passwords, args.vhost), indent=2), args.output)
    return _setup(args, passwords)


def _emit(document: str, output: str | None) -> int:
    """Print the document, or write it to ``output``: whole or not at all, mode 0644 (the broker runs
    as another user; the document holds salted hashes, never passwords)."""
    if output is None:
        print(document)
        return 0
    from pathlib import Path

    from shared.files import write_atomic

    try:
        write_atomic(Path(output), (document + "\n").encode(), mode=0o644)
    except OSError as e:
        print(f"preimg broker definitions: cannot write {output}: {e}", file=sys.stderr)
        return 2
    print(f"definitions written to {output}", file=sys.stderr)
    return 0


def _setup(args: argparse.Namespace, passwords: dict[str, str]) -> int:
    from shared.bus.broker_admin import BrokerAdminError, ManagementApi, apply_identities
    from shared.bus.rabbitmq import BrokerUnavailable, RabbitClient
    from shared.profiles import available_instruments

    if not args.management_url:
        print("preimg broker setup: give the management URL (--management-url or PREIMG_MANAGEMENT_URL)",
              file=sys.stderr)
        return 2
    settings = Settings()
    try:
        users = apply_identities(ManagementApi(args.management_url, settings.amqp_ca_file), passwords, args.vhost)
    except BrokerAdminError as e:
        print(f"preimg broker setup: {e}", file=sys.stderr)
        return 3
    try:
        with RabbitClient(settings.amqp_url, settings.exchange, settings.heartbeat_s,
                          instruments=available_instruments(), retry_delays_ms=settings.retry_delays_ms,
                          queue_args=settings.queue_arguments(), tls=settings.tls()):
            pass
    except BrokerUnavailable as e:
        print(f"preimg broker setup: identities set, but the layout could not be declared: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"vhost": args.vhost, "users": users, "layout": "declared"}))
    return 0


def _migrate() -> int:
    from shared.bus.rabbitmq import BrokerUnavailable, MigrationRefused, migrate_queue_types
    from shared.errors import PublishFailed
    from shared.profiles import available_instruments

    settings = Settings()
    try:
        changed = migrate_queue_types(settings.amqp_url, settings.exchange, available_instruments(),
                                      settings.retry_delays_ms, settings.queue_arguments(), settings.tls())
    except (MigrationRefused, BrokerUnavailable, PublishFailed) as e:
        print(f"preimg broker migrate: {e}", file=sys.stderr)
        return 3
    print(json.dumps({"queue_type": settings.queue_type, "changed": changed}))
    return 0

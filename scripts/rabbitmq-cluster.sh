#!/usr/bin/env bash
# A private three-node RabbitMQ cluster on loopback (Debian's rabbitmq-server), for tests and
# trying out failover. Never touches the machine's broker on 5672.
#
#   scripts/rabbitmq-cluster.sh start [--dir DIR] &   # foreground: prints the nodes and the URL list
#   scripts/rabbitmq-cluster.sh status                # JSON: nodes, ports, PREIMG_AMQP_URL value
#   scripts/rabbitmq-cluster.sh kill N                # kill -9 of node N's Erlang VM (0, 1, 2)
#   scripts/rabbitmq-cluster.sh stop-node N | start-node N
#   scripts/rabbitmq-cluster.sh stop                  # stops every node cleanly
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
cd "$here"
exec "$python" -m tests.broker_cluster "$@"

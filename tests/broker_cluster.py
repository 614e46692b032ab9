"""A private three-node RabbitMQ cluster on loopback, built from ``BrokerNode``s.

``BrokerCluster(base_dir).start()`` starts three private nodes (own names, AMQP
and distribution ports, data dirs) sharing one Erlang cookie, joins the second
and third to the first, and waits until all three report the cluster. The
machine's broker on 5672 is never touched. ``kill(i)`` is a kill -9 of node i's
Erlang VM, ``stop_node(i)`` a clean stop, ``start_node(i)`` brings it back (it
rejoins from its own data). ``urls`` is the comma-separated list the services
take as ``PREIMG_AMQP_URL``.

Also a command line (``scripts/rabbitmq-cluster.sh`` wraps it)::

    python -m tests.broker_cluster start|stop|status|kill N|stop-node N|start-node N [--dir DIR]

``start`` keeps running in the foreground (the nodes die with it, as in
tests); ``kill``, ``stop-node``, ``start-node`` and ``status`` act on a running
cluster described by ``DIR/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.broker_node import BrokerError, BrokerNode

N_NODES = 3


@dataclass
class BrokerCluster:
    base_dir: Path
    size: int = N_NODES
    nodes: list[BrokerNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        if not self.nodes:
            prefix = f"preimg-{secrets.token_hex(3)}"
            self.nodes = [BrokerNode(self.base_dir / f"node{i}", name=f"{prefix}-{i}") for i in range(self.size)]

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def seed(self) -> BrokerNode:
        return self.nodes[0]

    def _share_cookie(self) -> None:
        cookie = secrets.token_hex(16).upper()
        for node in self.nodes:
            home = node.base_dir / "home"
            home.mkdir(parents=True, exist_ok=True)
            path = home / ".erlang.cookie"
            if path.exists():
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(cookie)

    def start(self) -> BrokerCluster:
        """Start the nodes and join them into one cluster (a node that was joined before rejoins)."""
        self._share_cookie()
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes[1:]:
                if self.seed.node in self.running_nodes(node):
                    continue
                node.stop_app()
                node.ctl("join_cluster", self.seed.node)
                node.start_app()
            self.wait_formed()
        except BaseException:
            self.stop()
            raise
        return self

    def running_nodes(self, via: BrokerNode) -> list[str]:
        res = via.ctl("cluster_status", "--formatter", "json", check=False)
        if res.returncode != 0:
            return []
        try:
            return list(json.loads(res.stdout).get("running_nodes", []))
        except ValueError:
            return []

    def wait_formed(self, timeout: float = 60) -> None:
        want = sorted(n.node for n in self.nodes if n.running)
        deadline = time.monotonic() + timeout
        while sorted(self.running_nodes(self.nodes[[n.running for n in self.nodes].index(True)])) != want:
            if time.monotonic() > deadline:
                raise BrokerError(f"cluster not formed after {timeout} s: want {want}")
            time.sleep(0.5)

    def kill(self, index: int) -> None:
        """kill -9 of node ``index``'s Erlang VM (no clean shutdown), as a crashed machine."""
        node = self.nodes[index]
        pid = node.beam_pid or node._read_beam_pid()
        if pid is None:
            raise BrokerError(f"node {node.node} has no VM to kill")
        os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(timeout=30)
        node.stop()  # reaps what is left; the data stay

    def stop_node(self, index: int) -> None:
        self.nodes[index].stop()

    def start_node(self, index: int) -> None:
        self.nodes[index].start()
        self.wait_formed()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop()
            except BrokerError as e:
                print(f"stopping {node.node}: {e}", file=sys.stderr)

    def describe(self) -> dict:
        return {"urls": self.urls, "nodes": [
            {"index": i, "node": n.node, "amqp_port": n.amqp_port, "dist_port": n.dist_port,
             "base_dir": str(n.base_dir), "beam_pid": n.beam_pid, "running": n.running}
            for i, n in enumerate(self.nodes)]}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- command line -----------------------------------------------------------------------


def _state(base: Path) -> dict:
    try:
        return json.loads((base / "cluster.json").read_text())
    except OSError as e:
        raise SystemExit(f"rabbitmq-cluster: no running cluster under {base} ({e}); run start first") from e


def _signal_foreground(base: Path, command: dict) -> int:
    """Ask the foreground ``start`` process (which owns the nodes) to act, and wait for its answer."""
    state = _state(base)
    request, answer = base / "request.json", base / "answer.json"
    answer.unlink(missing_ok=True)
    request.write_text(json.dumps(command))
    os.kill(state["pid"], signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not answer.exists():
        if time.monotonic() > deadline:
            print("rabbitmq-cluster: no answer from the cluster process", file=sys.stderr)
            return 1
        time.sleep(0.2)
    result = json.loads(answer.read_text())
    answer.unlink()
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rabbitmq-cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status", "kill", "stop-node", "start-node"))
    parser.add_argument("index", nargs="?", type=int, help="node 0, 1 or 2 (kill, stop-node, start-node)")
    parser.add_argument("--dir", type=Path, default=Path(".cache/rabbitmq-cluster"))
    args = parser.parse_args(argv)
    base = args.dir.resolve()
    if args.action in ("kill", "stop-node", "start-node") and args.index is None:
        parser.error(f"{args.action} needs the node's index (0-{N_NODES - 1})")
    if args.action == "start":
        base.mkdir(parents=True, exist_ok=True)
        cluster = BrokerCluster(base)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        pending: list[int] = []
        signal.signal(signal.SIGUSR1, lambda *_: pending.append(1))
        cluster.start()
        (base / "cluster.json").write_text(json.dumps({**cluster.describe(), "pid": os.getpid()}))
        print(json.dumps(cluster.describe()), flush=True)
        try:
            while not stop:
                if pending:
                    pending.clear()
                    command = json.loads((base / "request.json").read_text())
                    try:
                        getattr(cluster, command["action"])(command["index"])
                        result = {"ok": True, **cluster.describe()}
                    except Exception as e:  # noqa: BLE001 - reported to the asking command
                        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    (base / "cluster.json").write_text(json.dumps({**cluster.describe(), "pid": os.getpid()}))
                    (base / "answer.json").write_text(json.dumps(result))
                time.sleep(0.2)
        finally:
            cluster.stop()
            (base / "cluster.json").unlink(missing_ok=True)
        return 0
    if args.action == "status":
        print(json.dumps(_state(base)))
        return 0
    if args.action == "stop":
        state = _state(base)
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 120
        while (base / "cluster.json").exists():
            if time.monotonic() > deadline:
                print("rabbitmq-cluster: the cluster did not stop within 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    action = {"kill": "kill", "stop-node": "stop_node", "start-node": "start_node"}[args.action]
    return _signal_foreground(base, {"action": action, "index": args.index})


if __name__ == "__main__":
    sys.exit(main())

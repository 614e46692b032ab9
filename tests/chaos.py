"""Chaos for the end-to-end tests: deliveries keep arriving while services and brokers are killed.

One shape for every chaos test (a single broker restarted, a cluster losing
nodes): a sender thread delivers the runs as AOG would (a publish that fails is
sent again: same ids, harmless), a monkey thread kills a random service with
SIGKILL every few seconds and restarts it, and at given moments disturbs the
broker. Afterwards :func:`assert_each_run_answered_once` and
:func:`assert_one_result_per_run` check what AOG got and what is on disk.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.backbone.cluster import Cluster


@dataclass
class BrokerDisruption:
    """``action`` (e.g. kill -9 of a node and its restart) once ``after_s`` passed since the start."""

    after_s: float
    label: str
    action: Callable[[], None]


@dataclass
class Chaos:
    """Deliver ``n`` runs with ``deliver(i)`` every ``spacing_s`` while the services of ``cluster``
    are killed at random and ``disruptions`` happen; :meth:`run` returns when every delivery was
    sent and ``wait_answers`` returned (the monkey keeps going until then)."""

    cluster: Cluster
    n: int
    deliver: Callable[[int], None]
    victims: Sequence[str]
    disruptions: list[BrokerDisruption] = field(default_factory=list)
    spacing_s: float = 0.25
    seed: int = 20261202
    log: list[str] = field(default_factory=list)

    def run(self, wait_answers: Callable[[], None], send_timeout_s: float = 600) -> None:
        done = threading.Event()
        sender = threading.Thread(target=self._send_all, name="chaos-sender")
        monkey = threading.Thread(target=self._monkey, args=(done, sender), name="chaos-monkey")
        sender.start()
        monkey.start()
        try:
            sender.join(send_timeout_s)
            assert not sender.is_alive(), f"deliveries still not sent after {send_timeout_s} s; chaos: {self.log}"
            wait_answers()
        finally:
            done.set()
            monkey.join(180)

    def _send_all(self) -> None:
        sent = 0
        while sent < self.n:
            try:
                self.deliver(sent)
                sent += 1
                time.sleep(self.spacing_s)
            except Exception:  # noqa: BLE001 - the broker or a node went away: send the same one again
                time.sleep(0.5)

    def _monkey(self, done: threading.Event, sender: threading.Thread) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        pending = sorted(self.disruptions, key=lambda d: d.after_s)
        while pending or (not done.is_set() and sender.is_alive()):
            if pending and time.monotonic() - started >= pending[0].after_s:
                disruption = pending.pop(0)
                self.log.append(disruption.label)
                disruption.action()
                continue
            name = rng.choice(list(self.victims))
            self.log.append(f"kill -9 {name}")
            self.cluster.kill(name)
            time.sleep(rng.uniform(0.2, 1.0))
            self.cluster.start_service(name)
            done.wait(rng.uniform(1.0, 3.0))

    def kills(self) -> int:
        return sum(entry.startswith("kill -9 ") for entry in self.log)


def assert_each_run_answered_once(events: list[dict], run_ids: set[str], chaos: Chaos) -> None:
    """Every run answered, ok, and by one event (a redelivered copy has the same message id)."""
    answered = {e["run_id"] for e in events}
    assert answered == run_ids, \
        f"{len(run_ids - answered)} runs unanswered: {sorted(run_ids - answered)[:5]}; chaos: {chaos.log}\n" \
        f"{chaos.cluster.logs()}"
    failed = [e for e in events if e["type"] != "preimg.completed.v1" or e["status"] != "ok"]
    assert failed == [], failed[:3]
    ids_per_run: dict[str, set[str]] = {}
    for e in events:
        ids_per_run.setdefault(e["run_id"], set()).add(e["message_id"])
    assert all(len(ids) == 1 for ids in ids_per_run.values()), \
        {run: ids for run, ids in ids_per_run.items() if len(ids) > 1}


def assert_one_result_per_run(data_root: Path, events: list[dict], products_per_instrument: dict[str, int]) -> None:
    """On disk, one result per run however often it was killed: the products the completion's
    manifest names and no others (a second recipe run would leave a second set), the expected
    number of products per instrument, one monitor row and one monitor index entry per run."""
    completions = {e["run_id"]: e for e in events if e["type"] == "preimg.completed.v1"}
    for run_id, event in completions.items():
        sci = data_root / "sci" / event["instrument"] / run_id
        on_disk = sorted(p.name for p in sci.glob("*.fits"))
        in_manifest = sorted(Path(m["name"]).name for m in event["manifest"] if m["name"].endswith(".fits"))
        assert on_disk == in_manifest, (run_id, on_disk, in_manifest)
        expected = products_per_instrument.get(event["instrument"])
        assert expected is None or len(on_disk) == expected, (run_id, len(on_disk), expected)
    rows = [p.stem for p in data_root.glob("qc/**/monitor/rows/*.json")]
    assert sorted(rows) == sorted(completions), "monitor rows are not one per run"
    index = [p.stem.split("_", 1)[1] for p in data_root.glob("qc/**/monitor/recent/*.json")]
    assert sorted(index) == sorted(completions), "monitor index entries are not one per run"

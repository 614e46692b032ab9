"""kill -9 of the processor while it runs a recipe: after a restart, one completion, no duplicated effect."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import synth
from services.app import describe_files
from shared.bus.rabbitmq import RabbitClient
from shared.ledger import FileLedger
from shared.messages import DeliveryAnnounced
from tests.backbone.cluster import Cluster, CompletionWatcher

pytestmark = [pytest.mark.rabbitmq, pytest.mark.esorex, pytest.mark.slow]


def deliver_and_wait_for_esorex(cluster: Cluster, run_id: str) -> None:
    """Announce a HAWK-I delivery and return once esorex runs for its AB."""
    frames = synth.make_raw_frames("HAWKI", cluster.delivery_area, n_frames=3)
    with RabbitClient(cluster.amqp_url, "preimg") as client:
        client.sender.publish(DeliveryAnnounced(
            run_id=run_id, delivery_id=run_id, instrument="HAWKI", test=True,
            files=tuple(describe_files(frames, cluster.delivery_area))))
    # The process itself, not its output file: the processor opens esorex.out before it forks,
    # and on a busy machine the fork and exec come measurably later.
    deadline = time.monotonic() + 60
    while not esorex_processes_under(cluster.root):
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.02)


def esorex_processes_under(root: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the live esorex processes whose cwd or arguments lie under ``root``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(entry.path, "stat").read_text().rpartition(")")[2].split()[0]
            cwd = os.readlink(Path(entry.path, "cwd"))
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        if "esorex" in cmdline and state != "Z" and (str(root) in cmdline or cwd.startswith(str(root))):
            found.append((int(entry.name), cmdline))
    return found


def test_processor_killed_mid_recipe_completes_once_after_restart(rabbitmq_url, tmp_path, hawki_cal):
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(hawki_cal)}).start()
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        deliver_and_wait_for_esorex(cluster, "crash-1")
        assert esorex_processes_under(tmp_path)  # the check below can see a recipe
        cluster.kill("processor-HAWKI")
        # esorex dies with its processor (PR_SET_PDEATHSIG), it does not go on writing into the
        # working directory the restarted processor reuses. The kernel delivers the signal
        # asynchronously: allow it a moment.
        deadline = time.monotonic() + 2
        while esorex_processes_under(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert esorex_processes_under(tmp_path) == []
        assert watcher.collect(until=1, timeout=2) == []  # nothing completed behind our back

        cluster.start_service("processor-HAWKI")
        events = watcher.collect(until=1, timeout=240)
        watcher.settle(3)
        assert [(e["run_id"], e["type"], e["status"]) for e in events] == [("crash-1", "preimg.completed.v1", "ok")], \
            cluster.logs()
        sci = tmp_path / "data" / "sci" / "HAWKI" / "crash-1"
        names = sorted(p.name for p in sci.glob("*.fits"))
        assert len(names) == 12 and len(set(names)) == 12  # one set of products, not two
        manifest = [m["name"] for m in events[0]["manifest"] if m["name"].endswith(".fits")]
        assert sorted(Path(m).name for m in manifest) == names
        record = FileLedger(tmp_path / "data" / "state").lookup("raw_ready", "HAWKI", "crash-1")
        assert record.published_at and len(record.events) == 1
    finally:
        watcher.close()
        cluster.stop()


def test_sigterm_mid_recipe_finishes_the_message_then_exits(rabbitmq_url, tmp_path, hawki_cal):
    cluster = Cluster(rabbitmq_url, tmp_path, instruments=("HAWKI",),
                      extra_env={"PREIMG_CAL_ROOT": str(hawki_cal)}).start()
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        deliver_and_wait_for_esorex(cluster, "term-1")
        cluster.kill("processor-HAWKI", sig=15)  # SIGTERM while esorex runs
        assert cluster.services["processor-HAWKI"].proc.returncode == 0
        # The processor finished the recipe and handed its result on before exiting.
        events = watcher.collect(until=1, timeout=60)
        assert [(e["run_id"], e["status"]) for e in events] == [("term-1", "ok")], cluster.logs()
        log = cluster.services["processor-HAWKI"].log.read_text()
        assert log.index("received SIGTERM") < log.index("handled preimg.raw_ready.v1")
    finally:
        watcher.close()
        cluster.stop()

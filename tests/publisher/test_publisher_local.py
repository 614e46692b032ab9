"""Publisher with the embedded default QC server (a local directory), and the prune command."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.publisher.handlers import handle_reports_ready
from shared.settings import Settings
from tests.publisher.conftest import ports_for, reports_ready, s3_settings

BASE = "PREIMG/HAWKI"
REPO = Path(__file__).resolve().parents[2]


def _rows(qc_dir: Path) -> list[str]:
    page = (qc_dir / BASE / "preimgMonitor.html").read_text()
    return re.findall(r'data-run-id="([^"]+)"', page)


def _preimg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO,
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=120,
                          check=False)


def test_local_package_has_the_bucket_layout(tmp_path):
    settings = Settings(data_root=tmp_path)
    msg = reports_ready(tmp_path)
    [event] = handle_reports_ready(msg, ports_for(settings))
    qc = settings.qc_local_dir()
    assert event.package_url.startswith("file://")
    for entry in event.manifest:
        path = qc / BASE / "runs" / msg.run_id / entry.name
        assert path.is_file() and path.stat().st_size == entry.size
    assert _rows(qc) == ["run-0001"]
    assert not list(qc.rglob("*.tmp")), "no temp file left behind"


def test_local_page_recreated_when_deleted(tmp_path):
    settings = Settings(data_root=tmp_path)
    handle_reports_ready(reports_ready(tmp_path, run_id="a-1"), ports_for(settings))
    (settings.qc_local_dir() / BASE / "preimgMonitor.html").unlink()
    handle_reports_ready(reports_ready(tmp_path, run_id="b-2"), ports_for(settings))
    assert sorted(_rows(settings.qc_local_dir())) == ["a-1", "b-2"]


def test_local_two_publishers_in_threads_lose_no_row(tmp_path):
    settings = Settings(data_root=tmp_path)
    messages = [reports_ready(tmp_path, run_id=f"t-{i:02d}") for i in range(20)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def publisher(batch):
        ports = ports_for(settings)  # each its own adapter instance
        barrier.wait()
        try:
            for msg in batch:
                handle_reports_ready(msg, ports)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(messages[k::2],)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sorted(_rows(settings.qc_local_dir())) == [f"t-{i:02d}" for i in range(20)]


def test_prune_command_removes_test_runs_locally(tmp_path):
    settings = Settings(data_root=tmp_path)
    handle_reports_ready(reports_ready(tmp_path, run_id="ops-1"), ports_for(settings))
    handle_reports_ready(reports_ready(tmp_path, run_id="test-1", test=True), ports_for(settings))
    qc = settings.qc_local_dir()
    assert sorted(_rows(qc)) == ["ops-1", "test-1"]

    refused = _preimg("monitor", "prune", "-i", "HAWKI", env={"PREIMG_DATA_ROOT": str(tmp_path)})
    assert refused.returncode == 2 and "--test" in refused.stderr and refused.stdout == ""

    done = _preimg("monitor", "prune", "-i", "HAWKI", "--test",
                   env={"PREIMG_DATA_ROOT": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "removed test run test-1" in done.stdout
    assert _rows(qc) == ["ops-1"]
    assert not (qc / BASE / "runs" / "test-1").exists()
    assert (qc / BASE / "runs" / "ops-1").is_dir()


def test_prune_command_against_s3(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    handle_reports_ready(reports_ready(tmp_path, run_id="ops-1"), ports_for(settings))
    handle_reports_ready(reports_ready(tmp_path, run_id="test-1", test=True), ports_for(settings))
    env = {"PREIMG_QC_MODE": "s3", "PREIMG_S3_ENDPOINT_URL": s3_server.url,
           "PREIMG_S3_BUCKET": bucket, "PREIMG_S3_PREFIX": "qc",
           "PREIMG_S3_ACCESS_KEY_ID": "testing", "PREIMG_S3_SECRET_ACCESS_KEY": "testing",
           "PREIMG_DATA_ROOT": str(tmp_path)}
    done = _preimg("monitor", "prune", "-i", "HAWKI", "--test", env=env)
    assert done.returncode == 0, done.stderr
    client = s3_server.client()
    page = client.get_object(Bucket=bucket, Key=f"qc/{BASE}/preimgMonitor.html")["Body"].read()
    assert re.findall(rb'data-run-id="([^"]+)"', page) == [b"ops-1"]
    left = client.list_objects_v2(Bucket=bucket, Prefix=f"qc/{BASE}/runs/test-1/")
    assert left.get("KeyCount", 0) == 0


def test_a_batch_syncs_its_objects_and_shows_them_at_its_end(tmp_path, monkeypatch):
    from services.publisher import qc_local
    from shared import files

    rounds: list[list[Path]] = []

    def record(paths):
        paths = sorted(paths)
        rounds.append(paths)
        files.sync_all(paths)

    monkeypatch.setattr(qc_local, "sync_all", record)
    monkeypatch.setattr(qc_local, "sync_later", record)  # sync_all outside a runner
    qc = qc_local.LocalQcServer(tmp_path / "qc")
    qc.put("a/one.txt", b"1", content_type="text/plain")
    # outside a batch a put is durable when it returns: written from bytes (no digest given,
    # so no replay skips it), it is renamed, then its bytes and directory synced in one round
    assert rounds == [[tmp_path / "qc" / "a", tmp_path / "qc" / "a" / "one.txt"]]
    assert (tmp_path / "qc" / "a" / "one.txt").read_bytes() == b"1"
    with qc.batch():
        for i in range(5):
            qc.put(f"b/{i}.txt", str(i).encode(), content_type="text/plain")
        qc.put("c/x.txt", b"x", content_type="text/plain")
        assert len(rounds) == 1
        assert not (tmp_path / "qc" / "b" / "4.txt").exists()  # nothing shows before the batch ends
    assert rounds[1] == sorted([tmp_path / "qc" / "b", tmp_path / "qc" / "c", tmp_path / "qc" / "c" / "x.txt",
                                *(tmp_path / "qc" / "b" / f"{i}.txt" for i in range(5))])
    assert (tmp_path / "qc" / "b" / "4.txt").read_bytes() == b"4"
    assert qc.head("b/4.txt").sha256 == hashlib.sha256(b"4").hexdigest()
    # with the caller's digest a replay may skip the object: its bytes are durable before it appears
    with qc.batch():
        qc.put("d/k.txt", b"k", content_type="text/plain", sha256=hashlib.sha256(b"k").hexdigest())
    assert len(rounds[2]) == 1 and files.is_temp_name(rounds[2][0].name)
    assert rounds[3] == [tmp_path / "qc" / "d"]


def test_inside_a_runner_a_batch_leaves_its_directories_to_the_state_record_round(tmp_path, monkeypatch):
    """Under deferred_syncs (the runner around a handler) the directories are synced with the
    record's bytes, before the record is renamed into place; the record's own directory at once."""
    from services.publisher import qc_local
    from shared import files
    from shared import ledger as ledger_module
    from shared.ledger import FileLedger
    from shared.messages import RunFailed

    rounds: list[list[Path]] = []
    real_sync_all, real_fsync_dir = files.sync_all, files.fsync_path

    def record(paths):
        paths = sorted(paths)
        rounds.append(paths)
        real_sync_all(paths)

    def record_dir(path):
        rounds.append([path])
        real_fsync_dir(path)

    monkeypatch.setattr(files, "sync_all", record)
    monkeypatch.setattr(qc_local, "sync_all", record)
    monkeypatch.setattr(ledger_module, "fsync_dir", record_dir)
    qc = qc_local.LocalQcServer(tmp_path / "qc")
    digest = hashlib.sha256(b"2").hexdigest()
    with files.deferred_syncs() as pending, qc.batch():
        qc.put("b/1.txt", b"1", content_type="text/plain")
        qc.put("c/2.txt", b"2", content_type="text/plain", sha256=digest)
    # only the bytes of the object with the caller's digest so far
    assert len(rounds) == 1 and len(rounds[0]) == 1 and files.is_temp_name(rounds[0][0].name)
    # the new directories' names (their parents), the directories renamed into, the bytes of the other
    assert sorted(pending) == [tmp_path, tmp_path / "qc", tmp_path / "qc" / "b", tmp_path / "qc" / "b" / "1.txt",
                               tmp_path / "qc" / "c"]
    ledger = FileLedger(tmp_path / "state")
    ledger.run_dir("HAWKI", "r-1").mkdir(parents=True)  # made by the lease the runner holds
    event = RunFailed(run_id="r-1", delivery_id="d-1", instrument="HAWKI", failed_stage="publisher", reason="x")
    ledger.record("reports_ready", event, [], sync_first=pending)
    record_round, record_dir_round = rounds[1], rounds[2]
    assert [p for p in record_round if files.is_temp_name(p.name)] and \
        [p for p in record_round if not files.is_temp_name(p.name)] == sorted(pending)
    assert record_dir_round == [tmp_path / "state" / "HAWKI" / "r-1"]
    assert len(rounds) == 3


def test_a_failing_batch_leaves_no_object_and_no_temporary_file(tmp_path):
    from services.publisher import qc_local

    qc = qc_local.LocalQcServer(tmp_path / "qc")
    with pytest.raises(RuntimeError), qc.batch():
        qc.put("b/1.txt", b"1", content_type="text/plain")
        raise RuntimeError("the upload of the next file failed")
    assert [p.name for p in (tmp_path / "qc" / "b").iterdir()] == []


def test_a_known_file_on_another_file_system_is_copied_with_its_digest(tmp_path, monkeypatch):
    import errno
    import hashlib

    from services.publisher import qc_local

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    source = tmp_path / "product.fits"
    source.write_bytes(b"x" * 5000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setattr(qc_local.os, "link", cross_device)
    qc = qc_local.LocalQcServer(tmp_path / "qc")
    assert qc.put("runs/r/product.fits", source, content_type="application/fits", sha256=digest) == digest
    copy = tmp_path / "qc" / "runs" / "r" / "product.fits"
    assert copy.read_bytes() == source.read_bytes() and copy.stat().st_ino != source.stat().st_ino
    assert not [p for p in copy.parent.iterdir() if p.name.endswith(".tmp")]


class MemoryRunFiles:
    """The publisher's run files in a dict: what it marks and notes, without a disk."""

    def __init__(self, texts: dict[Path, str]):
        self.data = {p: t.encode() for p, t in texts.items()}
        self.touched: list[Path] = []

    def read_text(self, path):
        return self.data[path].decode() if path in self.data else None

    def write(self, path, data, durable=True):
        self.data[path] = data

    def exists(self, path):
        return path in self.data

    def touch(self, path):
        self.touched.append(path)


def test_run_files_port_missing_readme_noted_once_and_executed_flag(tmp_path):
    settings = Settings(data_root=tmp_path, write_executed_flag=True)
    msg = reports_ready(tmp_path)
    files = MemoryRunFiles({Path(msg.report): "REPORT\n"})
    ports = ports_for(settings, files=files)
    handle_reports_ready(msg, ports)
    handle_reports_ready(msg, ports)  # a replay
    report = files.read_text(Path(msg.report))
    assert report.startswith("REPORT\n") and report.count("was not found on the QC server") == 1
    assert files.touched == [Path(msg.sci_dir) / "EXECUTED"] * 2


class CountingQc:
    """The real local QC server, counting the objects read (``get``)."""

    def __init__(self, root: Path):
        from services.publisher.qc_local import LocalQcServer

        self._qc = LocalQcServer(root)
        self.gets: list[str] = []

    def get(self, key: str):
        self.gets.append(key)
        return self._qc.get(key)

    def __getattr__(self, name: str):
        return getattr(self._qc, name)


def test_a_publish_reads_only_the_newest_rows_and_the_page_shows_them_newest_first(tmp_path):
    from datetime import timedelta

    settings = Settings(data_root=tmp_path, monitor_max_rows=3)
    qc = CountingQc(settings.qc_local_dir())
    ports = ports_for(settings, qc=qc)
    for i in range(8):  # delivered one hour apart, published in a shuffled order
        n = (5, 2, 7, 0, 3, 6, 1, 4)[i]
        msg = reports_ready(tmp_path / f"r{n}", run_id=f"run-{n}")
        msg = msg.model_copy(update={"delivered_at": msg.delivered_at + timedelta(hours=n)})
        handle_reports_ready(msg, ports)
    assert _rows(settings.qc_local_dir()) == ["run-7", "run-6", "run-5"]

    qc.gets.clear()
    msg = reports_ready(tmp_path / "r8", run_id="run-8")
    handle_reports_ready(msg.model_copy(update={"delivered_at": msg.delivered_at + timedelta(hours=8)}), ports)
    assert _rows(settings.qc_local_dir()) == ["run-8", "run-7", "run-6"]
    monitor_reads = [k for k in qc.gets if "/monitor/" in k]
    # its own previous row, and the one new index entry: the other rows are known by their ETags
    assert len(monitor_reads) <= 2, monitor_reads


def test_the_index_keeps_the_newest_rows_only_and_grows_again_with_max_rows(tmp_path):
    from datetime import timedelta

    settings = Settings(data_root=tmp_path, monitor_max_rows=3)
    ports = ports_for(settings)
    for n in range(6):
        msg = reports_ready(tmp_path / f"r{n}", run_id=f"run-{n}")
        handle_reports_ready(msg.model_copy(update={"delivered_at": msg.delivered_at + timedelta(hours=n)}), ports)
    monitor = settings.qc_local_dir() / BASE / "monitor"
    index = sorted(p.name.split("_", 1)[1] for p in (monitor / "recent").iterdir())
    assert index == ["run-3.json", "run-4.json", "run-5.json"]  # a publish lists max_rows entries, not every run
    assert len(list((monitor / "rows").iterdir())) == 6  # the rows themselves stay
    assert _rows(settings.qc_local_dir()) == ["run-5", "run-4", "run-3"]

    wider = ports_for(Settings(data_root=tmp_path, monitor_max_rows=10))  # a publisher configured for more rows
    msg = reports_ready(tmp_path / "r6", run_id="run-6")
    handle_reports_ready(msg.model_copy(update={"delivered_at": msg.delivered_at + timedelta(hours=6)}), wider)
    assert _rows(settings.qc_local_dir()) == [f"run-{n}" for n in range(6, -1, -1)]


def test_rows_written_before_the_index_existed_reach_the_page(tmp_path):
    settings = Settings(data_root=tmp_path)
    ports = ports_for(settings)
    handle_reports_ready(reports_ready(tmp_path / "a", run_id="run-a"), ports)
    monitor = settings.qc_local_dir() / BASE / "monitor"
    shutil.rmtree(monitor / "recent")  # as a deployment from before the index left it
    (monitor / "rows" / "legacy-1.json").write_text(
        (monitor / "rows" / "run-a.json").read_text().replace("run-a", "legacy-1"))
    upgraded = ports_for(settings)  # the first publisher process that knows the index
    handle_reports_ready(reports_ready(tmp_path / "b", run_id="run-b"), upgraded)
    assert sorted(_rows(settings.qc_local_dir())) == ["legacy-1", "run-a", "run-b"]
    assert len(list((monitor / "recent").iterdir())) == 3


def test_a_failure_shown_before_the_delivery_time_was_known_leaves_one_row(tmp_path):
    from services.publisher.handlers import handle_run_failed
    from shared.messages import RunFailed

    settings = Settings(data_root=tmp_path)
    ports = ports_for(settings)
    msg = reports_ready(tmp_path, run_id="run-late")
    failed = RunFailed(run_id="run-late", delivery_id=msg.delivery_id, instrument=msg.instrument, test=msg.test,
                       failed_stage="publisher", reason="S3 down")
    handle_run_failed(failed, ports)
    handle_reports_ready(msg, ports)  # replayed after the fault was mended
    assert _rows(settings.qc_local_dir()) == ["run-late"]
    assert len(list((settings.qc_local_dir() / BASE / "monitor" / "recent").iterdir())) == 1

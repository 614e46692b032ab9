"""Publisher against a real S3-protocol server (moto, its own process) and a real SMTP server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.publisher.handlers import handle_reports_ready, handle_run_failed
from shared.errors import OperatorActionRequired, PermanentError, RetryableError
from shared.messages import PreImagingCompleted, RunFailed, derived_message_id
from shared.profiles import load_profile
from tests.ports import free_port
from tests.publisher.conftest import ports_for, reports_ready, s3_settings
from tests.publisher.servers import MotoServer

BASE = "qc/PREIMG/HAWKI"
HERE = Path(__file__).resolve().parent


def _objects(server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = server.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def _page(server, bucket: str) -> str:
    return _objects(server, bucket, f"{BASE}/preimgMonitor.html")[f"{BASE}/preimgMonitor.html"].decode()


def _row_ids(page: str) -> list[str]:
    return re.findall(r'data-run-id="([^"]+)"', page)


def _assert_package_complete(server, bucket: str, event: PreImagingCompleted) -> None:
    objects = _objects(server, bucket, f"{BASE}/runs/{event.run_id}/")
    for entry in event.manifest:
        key = f"{BASE}/runs/{event.run_id}/{entry.name}"
        assert key in objects, f"{entry.name} missing on the QC server"
        assert len(objects[key]) == entry.size
        assert "sha256:" + hashlib.sha256(objects[key]).hexdigest() == entry.checksum
    sums = objects[f"{BASE}/runs/{event.run_id}/SHA256SUMS"].decode().splitlines()
    assert sorted(sums) == sorted(f"{e.checksum[7:]}  {e.name}" for e in event.manifest)


def test_package_objects_exist_with_recorded_checksums(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket, write_executed_flag=True)
    readme = b"Dear PI,\nthese are your HAWK-I pre-imaging frames.\n"
    s3_server.client().put_object(Bucket=bucket, Key=f"{BASE}/HAWKI_PRE_README.txt", Body=readme)
    msg = reports_ready(tmp_path)

    [event] = handle_reports_ready(msg, ports_for(settings))

    assert isinstance(event, PreImagingCompleted)
    assert (event.run_id, event.delivery_id, event.instrument, event.test) == (
        msg.run_id, msg.delivery_id, msg.instrument, msg.test)
    assert event.message_id == derived_message_id(msg.run_id, "completed")
    assert event.status == "partial"
    assert event.package_url == f"s3://{bucket}/{BASE}/runs/run-0001/"
    assert event.monitor_url == f"s3://{bucket}/{BASE}/preimgMonitor.html"
    assert event.package_dir == msg.sci_dir
    names = {e.name for e in event.manifest}
    assert {"REPORT_HAWKI_2026-11-20_run-0001.log", "USERREPORT_HAWKI_2026-11-20_run-0001.log",
            "list_mcalib_2026-11-20", "HAWKI_PRE_README.txt",
            "products/r.HAWKI.2026-11-19T01:10:00.000_0000.fits",
            "logs/HAWKI.2026-11-19T01:10:00.000.ab.log"} <= names
    _assert_package_complete(s3_server, bucket, event)
    # The README is part of the package and also copied into the log dir (as DFOS did).
    assert (Path(msg.log_dir) / "HAWKI_PRE_README.txt").read_bytes() == readme
    # The legacy flag, zero size, in the run's science directory.
    executed = Path(msg.sci_dir) / "EXECUTED"
    assert executed.is_file() and executed.stat().st_size == 0
    assert _row_ids(_page(s3_server, bucket)) == ["run-0001"]


def test_missing_readme_is_noted_in_the_report_not_fatal(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    msg = reports_ready(tmp_path)
    [event] = handle_reports_ready(msg, ports_for(settings))
    report = Path(msg.report).read_text()
    assert "NOTE (publisher): PI README HAWKI_PRE_README.txt was not found" in report
    assert "HAWKI_PRE_README.txt" not in {e.name for e in event.manifest}
    uploaded = _objects(s3_server, bucket, f"{BASE}/runs/run-0001/{Path(msg.report).name}")
    assert b"was not found on the QC server" in next(iter(uploaded.values()))
    # A replay does not add the note twice.
    handle_reports_ready(msg, ports_for(settings))
    assert Path(msg.report).read_text().count("NOTE (publisher)") == 1


def test_mail_arrives_once_per_run(tmp_path, s3_server, bucket, smtp_server):
    settings = s3_settings(tmp_path, s3_server, bucket, smtp_port=smtp_server.port,
                           operator_email="qc-ops@example.org")
    profile = load_profile("HAWKI").model_copy(update={"email_note": True})
    ports = ports_for(settings, load_profile=lambda instr: profile)
    msg = reports_ready(tmp_path)

    handle_reports_ready(msg, ports)
    deadline = time.monotonic() + 10
    while not smtp_server.mails() and time.monotonic() < deadline:
        time.sleep(0.05)
    [mail] = smtp_server.mails()
    assert "To: qc-ops@example.org" in mail
    assert "Subject: [preimg] HAWKI run-0001: partial" in mail
    assert "1 successful, 1 failed" in mail
    assert f"s3://{bucket}/{BASE}/runs/run-0001/" in mail

    handle_reports_ready(msg, ports)  # replay: recorded in the state dir, not sent again
    time.sleep(0.3)
    assert len(smtp_server.mails()) == 1


def test_smtp_down_run_completes_failure_counted(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket, smtp_port=free_port(),
                           operator_email="qc-ops@example.org", smtp_timeout_s=2)
    profile = load_profile("HAWKI").model_copy(update={"email_note": True})
    failures: list[str] = []
    ports = ports_for(settings, load_profile=lambda instr: profile,
                      count_notification_failure=failures.append)
    [event] = handle_reports_ready(reports_ready(tmp_path), ports)
    assert isinstance(event, PreImagingCompleted)
    assert failures == ["HAWKI"]
    assert not (settings.run_dirs("HAWKI", "run-0001").state / "publisher.notified.json").exists()


def test_replay_three_times_one_row(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    msg = reports_ready(tmp_path)
    events = [handle_reports_ready(msg, ports_for(settings))[0] for _ in range(3)]
    assert len({e.message_id for e in events}) == 1
    assert events[0].manifest == events[2].manifest
    assert _row_ids(_page(s3_server, bucket)) == ["run-0001"]
    assert len(_objects(s3_server, bucket, f"{BASE}/monitor/rows/")) == 1


def test_two_publisher_processes_20_runs_20_rows(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    files = []
    for i in range(20):
        msg = reports_ready(tmp_path, run_id=f"conc-{i:02d}", test=i % 2 == 0)
        path = tmp_path / f"msg-{i:02d}.json"
        path.write_bytes(msg.to_json())
        files.append(str(path))
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]))
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"PREIMG_{name.upper()}"] = (json.dumps(value) if isinstance(value, (list, dict))
                                             else str(value))
    env["PREIMG_S3_SECRET_ACCESS_KEY"] = "testing"
    start_at = str(time.time() + 2.0)
    script = str(HERE / "publish_runs.py")
    procs = [subprocess.Popen([sys.executable, script, start_at, *files[k::2]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert len(out.splitlines()) == 10
    rows = _row_ids(_page(s3_server, bucket))
    assert sorted(rows) == [f"conc-{i:02d}" for i in range(20)]
    assert len(_objects(s3_server, bucket, f"{BASE}/monitor/rows/")) == 20


def test_run_failed_gets_a_failed_row(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    failed = RunFailed(run_id="broken-1", delivery_id="d1", instrument="HAWKI", test=True,
                       failed_stage="processor", reason="no SCIENCE frame in the delivery")
    assert handle_run_failed(failed, ports_for(settings)) == []
    page = _page(s3_server, bucket)
    assert _row_ids(page) == ["broken-1"]
    assert "processor: no SCIENCE frame in the delivery" in page


def test_missing_package_file_is_permanent(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    msg = reports_ready(tmp_path)
    Path(msg.files[-1]).unlink()
    with pytest.raises(PermanentError, match="missing"):
        handle_reports_ready(msg, ports_for(settings))


# ---------------------------------------------------------------------------
# S3 outage
# ---------------------------------------------------------------------------


@pytest.fixture
def own_s3(tmp_path):
    """A moto process of this test alone, which the test stops and starts."""
    server = MotoServer(free_port(), tmp_path / "moto-own.log")
    server.start()
    server.create_bucket("qc-outage")
    yield server
    server.stop()


def _with_many_logs(tmp_path, msg, count: int = 150):
    extra = []
    for i in range(count):
        path = Path(msg.log_dir) / f"extra-{i:03d}.log"
        path.write_text(f"log line {i}\n" * 200)
        extra.append(str(path))
    return msg.model_copy(update={"files": msg.files + tuple(extra)})


def test_s3_stopped_during_a_run_then_restarted(tmp_path, own_s3):
    settings = s3_settings(tmp_path, own_s3, "qc-outage", write_executed_flag=True,
                           s3_max_attempts=3, s3_timeout_s=1.0)
    msg = _with_many_logs(tmp_path, reports_ready(tmp_path))
    outcome: dict[str, object] = {}

    def publish() -> None:
        try:
            outcome["events"] = handle_reports_ready(msg, ports_for(settings))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    worker = threading.Thread(target=publish)
    worker.start()
    client = own_s3.client()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = client.list_objects_v2(Bucket="qc-outage", Prefix=f"{BASE}/runs/")
        if listed.get("KeyCount", 0) >= 3:
            break
        time.sleep(0.005)
    own_s3.stop()  # mid-upload: some objects are there, most are not
    worker.join(60)

    assert isinstance(outcome.get("error"), RetryableError), outcome
    assert "events" not in outcome
    assert not (Path(msg.sci_dir) / "EXECUTED").exists(), "reported complete without its files"

    own_s3.start()
    own_s3.create_bucket("qc-outage")  # moto forgets everything; a real bucket would persist
    [event] = handle_reports_ready(msg, ports_for(settings))  # the broker's later retry
    assert len(event.manifest) >= 150
    _assert_package_complete(own_s3, "qc-outage", event)
    assert (Path(msg.sci_dir) / "EXECUTED").exists()
    assert _row_ids(_page(own_s3, "qc-outage")) == ["run-0001"]


def test_s3_back_within_the_retry_window_completes_in_one_call(tmp_path, own_s3):
    """The endpoint hangs (process frozen) for a while: timeouts, back-off, then success."""
    settings = s3_settings(tmp_path, own_s3, "qc-outage", s3_max_attempts=8,
                           s3_timeout_s=0.5)
    msg = reports_ready(tmp_path)
    retries: list[str] = []
    from services.publisher.service import build_qc_server

    ports = ports_for(settings, qc=build_qc_server(settings, on_retry=retries.append))
    own_s3.pause()
    resumer = threading.Timer(2.0, own_s3.resume)
    resumer.start()
    try:
        [event] = handle_reports_ready(msg, ports)
    finally:
        resumer.join()
    assert retries, "the adapter retried with back-off while the endpoint was down"
    _assert_package_complete(own_s3, "qc-outage", event)


def test_a_missing_bucket_needs_an_operator_and_says_what_to_fix(tmp_path, s3_server):
    settings = s3_settings(tmp_path, s3_server, "no-such-bucket")
    with pytest.raises(OperatorActionRequired, match="NoSuchBucket.*create the bucket or correct PREIMG_S3_BUCKET"):
        handle_reports_ready(reports_ready(tmp_path), ports_for(settings))


@pytest.mark.parametrize(("code", "names"), [
    ("InvalidAccessKeyId", "PREIMG_S3_ACCESS_KEY_ID"),
    ("SignatureDoesNotMatch", "PREIMG_S3_SECRET_ACCESS_KEY"),
    ("AccessDenied", "write access"),
])
def test_refusals_of_the_credentials_need_an_operator_and_name_the_setting(code, names):
    """The classification alone (moto does not check credentials): S3's error codes for a bad
    identity are answered at once, naming the setting to correct; an unknown code stays retryable."""
    from botocore.exceptions import ClientError

    from services.publisher.qc_s3 import S3QcServer

    qc = S3QcServer(endpoint_url="http://s3.invalid", bucket="qc")
    refused = qc._refused("put x", ClientError({"Error": {"Code": code, "Message": "no"}}, "PutObject"))
    assert isinstance(refused, OperatorActionRequired) and names in str(refused)
    other = qc._refused("put x", ClientError({"Error": {"Code": "SomethingNew", "Message": "?"}}, "PutObject"))
    assert isinstance(other, RetryableError)

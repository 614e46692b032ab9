"""The distributed set-up with its QC server: four processes over RabbitMQ, S3 (moto) as the QC server.

The S3 endpoint stops answering during a run (the process frozen: connections
hang and time out, its buckets kept) and comes back: the run completes with all
its objects, and nothing is reported complete before they are there.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from services.app import describe_files
from shared.bus.rabbitmq import RabbitClient
from shared.messages import DeliveryAnnounced
from tests.backbone.cluster import Cluster, CompletionWatcher
from tests.backbone.test_e2e_rabbitmq import make_frames
from tests.ports import free_port
from tests.publisher.servers import MotoServer

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def monitor_page_when(client, bucket: str, key: str, shows, timeout: float = 30) -> str:
    """The monitor page once ``shows(page)`` holds (or the last one read after ``timeout``):
    the publisher rebuilds it just after the completion."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            page = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            page = ""
        if shows(page) or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_s3_outage_during_a_run_delays_completion_until_every_object_is_there(rabbitmq_url, tmp_path):
    s3 = MotoServer(free_port(), tmp_path / "moto.log")
    s3.start()
    bucket = f"qc-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    cluster = Cluster(rabbitmq_url, tmp_path, extra_env={
        "PREIMG_QC_MODE": "s3", "PREIMG_S3_ENDPOINT_URL": s3.url, "PREIMG_S3_BUCKET": bucket,
        "PREIMG_S3_PREFIX": "qc", "PREIMG_S3_ACCESS_KEY_ID": "testing", "PREIMG_S3_SECRET_ACCESS_KEY": "testing",
        "PREIMG_S3_MAX_ATTEMPTS": "2", "PREIMG_S3_TIMEOUT_S": "1",
        "PREIMG_RETRY_DELAYS_MS": "[500,1000,2000]", "PREIMG_MAX_ATTEMPTS": "30",
    }).start()
    watcher = CompletionWatcher(rabbitmq_url)
    try:
        # The QC server does not answer when the run reaches the publisher. Frozen rather than
        # restarted: a restarted moto has lost the bucket, and a retry landing before the test
        # re-created it would rightly be a NoSuchBucket for the operator (RunFailed), not an outage.
        s3.pause()
        frames = make_frames(cluster.delivery_area, 3)
        with RabbitClient(rabbitmq_url, "preimg") as client:
            client.sender.publish(DeliveryAnnounced(run_id="s3-down", delivery_id="s3-down", instrument="FORS2",
                                                    test=True, files=tuple(describe_files(frames, cluster.delivery_area))))
        deadline = time.monotonic() + 30
        while 'preimg_retries_total{instrument="FORS2",stage="reports_ready"}' not in cluster.services["publisher"].metrics():
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        assert watcher.collect(until=1, timeout=3) == []  # not complete while its files are not uploaded

        s3.resume()
        [event] = watcher.collect(until=1, timeout=60)
        watcher.settle(1)
        assert len(watcher.events) == 1, watcher.events
        assert event["type"] == "preimg.completed.v1" and event["status"] == "ok", event.get("reason")
        client = s3.client()
        for entry in event["manifest"]:
            key = f"qc/PREIMG/FORS2/runs/s3-down/{entry['name']}"
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert len(body) == entry["size"]
            assert entry["checksum"] == "sha256:" + hashlib.sha256(body).hexdigest()
        names = {e["name"].split("/")[-1] for e in event["manifest"]}
        assert {f.name for f in frames} <= names
        page = monitor_page_when(client, bucket, "qc/PREIMG/FORS2/preimgMonitor.html", lambda p: "s3-down" in p)
        assert "s3-down" in page, cluster.logs()
    finally:
        watcher.close()
        cluster.stop()
        s3.resume()
        s3.stop()


def test_dead_lettered_run_completes_when_replayed_after_the_fault_is_mended(rabbitmq_url, tmp_path):
    import json
    import subprocess

    from tests.backbone.cluster import PREIMG, REPO

    s3 = MotoServer(free_port(), tmp_path / "moto.log")
    s3.start()
    bucket = f"qc-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(rabbitmq_url, tmp_path, extra_env={
        "PREIMG_QC_MODE": "s3", "PREIMG_S3_ENDPOINT_URL": s3.url, "PREIMG_S3_BUCKET": bucket,
        "PREIMG_S3_ACCESS_KEY_ID": "testing", "PREIMG_S3_SECRET_ACCESS_KEY": "testing",
        "PREIMG_S3_MAX_ATTEMPTS": "1", "PREIMG_RETRY_DELAYS_MS": "[100]", "PREIMG_MAX_ATTEMPTS": "4",
    }).start()
    watcher = CompletionWatcher(rabbitmq_url)
    try:  # the bucket does not exist yet: a misconfigured QC server
        frames = make_frames(cluster.delivery_area, 2)
        with RabbitClient(rabbitmq_url, "preimg") as client:
            client.sender.publish(DeliveryAnnounced(run_id="dlq-1", delivery_id="dlq-1", instrument="FORS2",
                                                    test=True, files=tuple(describe_files(frames, cluster.delivery_area))))
        [failed] = watcher.collect(until=1, timeout=30)
        # Only an operator can create the bucket: no retries, an answer at once that says what to fix.
        assert failed["type"] == "preimg.run_failed.v1", failed
        assert "needs an operator" in failed["reason"] and "NoSuchBucket" in failed["reason"], failed
        assert "create the bucket or correct PREIMG_S3_BUCKET" in failed["reason"], failed
        assert "preimg dlq replay preimg.publisher" in failed["reason"], failed
        assert failed["details"]["attempts"] == 1, failed

        listed = subprocess.run(PREIMG + ["dlq", "list", "preimg.publisher"], env=cluster.env(), cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=False)
        entries = {e["type"]: e for e in map(json.loads, listed.stdout.splitlines())}
        # The publisher could not record the failed row either (same bucket): both wait in its DLQ.
        assert set(entries) == {"preimg.reports_ready.v1", "preimg.run_failed.v1"}, listed.stdout
        entry = entries["preimg.reports_ready.v1"]
        assert entry["run_id"] == "dlq-1" and "needs an operator" in entry["reason"]

        s3.create_bucket(bucket)  # the operator mends the fault, then replays
        replay = subprocess.run(PREIMG + ["dlq", "replay", "preimg.publisher"], env=cluster.env(), cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=False)
        assert json.loads(replay.stdout) == {"queue": "preimg.publisher", "replayed": 2}, replay.stderr
        events = watcher.collect(until=2, timeout=30)
        assert [(e["type"], e.get("status")) for e in events[1:]] == [("preimg.completed.v1", "ok")], cluster.logs()
        page = monitor_page_when(s3.client(), bucket, "PREIMG/FORS2/preimgMonitor.html",
                                 lambda p: "dlq-1" in p and ">ok<" in p.replace(" ", ""))
        assert "dlq-1" in page and ">ok<" in page.replace(" ", ""), cluster.logs()
    finally:
        watcher.close()
        cluster.stop()
        s3.resume()
        s3.stop()

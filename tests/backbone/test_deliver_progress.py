"""`preimg deliver --wait` against four service processes over real RabbitMQ: progress on stderr.

FORS2 (PIPE_SUPPORT=NO, no esorex): each stage's event of the run is shown on
stderr as it passes, stdout stays the one completion object, and the
completion names the run page; the raw frames' quick-looks are in the manifest.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.backbone.cluster import PREIMG, REPO, Cluster
from tests.backbone.test_e2e_rabbitmq import make_frames

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def cluster(rabbitmq_url: str, tmp_path):
    c = Cluster(rabbitmq_url, tmp_path).start()
    yield c
    c.stop()


def test_deliver_wait_reports_each_stage_on_stderr(cluster):
    files = make_frames(cluster.delivery_area, 2)
    out = subprocess.run(
        PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", "progress-1", "--wait", "90", "--test"],
        env=cluster.env(), cwd=REPO, capture_output=True, text=True, timeout=150, check=False)
    event = json.loads(out.stdout)  # all of stdout: one JSON object
    assert out.returncode == 0 and event["status"] == "ok", out.stderr + cluster.logs()
    stages = [line.split("] ", 1)[1] for line in out.stderr.splitlines() if line.startswith("[")]
    assert stages == ["ingest finished", "processor finished", "reporter finished"], out.stderr
    assert event["run_page_url"].endswith("/runs/progress-1/index.html")
    names = {m["name"] for m in event["manifest"]}
    assert {f"products/quicklook/{f.stem}.png" for f in files} <= names
    assert "index.html" in names

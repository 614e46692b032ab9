"""The monitor page, served by the S3 server process, opened in headless Chromium.

Evidence that the rows are there and that header text such as
``<script>alert(1)</script>`` is shown as text: the hostile OBJECT values
below would change the page title or add an attribute if they ran.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from services.publisher.handlers import handle_reports_ready
from tests.conftest import IN_CI
from tests.publisher.conftest import ports_for, reports_ready, s3_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = (
    "<script>alert(1)</script>",
    "<script>document.title='XSS-RAN'</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-xss','ran')\">",
)


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
         *extra, url],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("chromium is required in CI (Debian package chromium)")
        pytest.skip("chromium not installed")
    return CHROMIUM


def test_monitor_page_in_chromium(tmp_path, s3_server, bucket, chromium, artifacts_dir):
    settings = s3_settings(tmp_path, s3_server, bucket)
    ports = ports_for(settings)
    for i, hostile in enumerate(HOSTILE):
        msg = reports_ready(tmp_path / f"r{i}", run_id=f"xss-{i}", obj2=hostile, test=i == 1)
        handle_reports_ready(msg, ports)
    plain = reports_ready(tmp_path / "plain", run_id="plain-run", obj2="M 31")
    handle_reports_ready(plain, ports)

    # The page as a browser gets it from the QC server: a presigned GET, the bucket is private.
    url = s3_server.client().generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "qc/PREIMG/HAWKI/preimgMonitor.html"},
        ExpiresIn=600)
    dumped = _chromium(url, tmp_path / "chrome-dom", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout

    rows = re.findall(r'<tr class="run( test)?" data-run-id="([^"]+)"', dom)
    assert sorted(run for _, run in rows) == ["plain-run", "xss-0", "xss-1", "xss-2"]
    assert [run for test, run in rows if test] == ["xss-1"], "the test run is marked"
    assert "<title>preimg monitor HAWKI</title>" in dom, "no script changed the title"
    assert "XSS-RAN" not in re.search(r"<title>.*?</title>", dom).group(0)
    assert "data-xss" not in dom.split("<body", 1)[1].split(">", 1)[0], "onerror did not run"
    # Shown as text: escaped in the serialised DOM, never a live <script> or <img> element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "&lt;img src=x onerror=" in dom
    assert "<img" not in dom  # these runs have no quick-looks (thumbnails): no <img> at all
    # The page's own filter script (status, test flag) is the only one.
    assert dom.count("<script") == 1 and 'id="filter-status"' in dom

    shot = artifacts_dir / "preimgMonitor.png"
    shot.unlink(missing_ok=True)
    taken = _chromium(url, tmp_path / "chrome-shot", f"--screenshot={shot}",
                      "--window-size=1600,600")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 1000

"""The run page and the monitor page of real runs, opened in headless Chromium.

Two embedded runs (`preimg run` in this process, real esorex recipes) whose
raw frames carry a hostile OBJECT value; the second delivery also holds a
frame that is not FITS, so its run is partial with a failure to show. The QC
server is the local directory, served over HTTP as a browser would get it.
A harness page of the same origin loads each page in an iframe and records
what the browser made of it: every ``<img>`` loaded (naturalWidth > 0), the
hostile value present as text and no ``<img src=x>`` element, without which
its ``onerror`` cannot run. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from astropy.io import fits

import synth
from services.app import run_embedded
from shared.settings import Settings
from tests.conftest import IN_CI

pytestmark = [pytest.mark.esorex, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: The issue's example; it fits one header card, so every stage reads it whole.
HOSTILE = "<img src=x onerror=alert(1)>"

HARNESS = """<!DOCTYPE html><html><head><title>harness</title></head><body>
<iframe id="page" src="{src}" width="1400" height="900"></iframe>
<script>
window.addEventListener("load", function () {{
  var d = document.getElementById("page").contentDocument;
  var imgs = Array.prototype.slice.call(d.images);
  var result = {{
    title: d.title,
    images: imgs.length,
    broken: imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }}).map(function (i) {{ return i.src; }}),
    hostile_text: d.body.textContent.indexOf({hostile}) >= 0,
    hostile_elements: d.querySelectorAll('img[src="x"]').length,
    links: Array.prototype.map.call(d.querySelectorAll("a.run-page"), function (a) {{ return a.getAttribute("href"); }}),
    trends: d.querySelectorAll("#trends svg").length,
    qc_rows: d.querySelectorAll("#qc tr.in, #qc tr.out, #qc tr.missing").length,
    failures: d.querySelectorAll("#failures tr").length
  }};
  var out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
}});
</script></body></html>"""


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("chromium is required in CI (Debian package chromium)")
        pytest.skip("chromium not installed")
    return CHROMIUM


@pytest.fixture
def artifacts_dir(repo_root: Path) -> Path:
    path = repo_root / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def _serve(root: Path):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _chromium(chromium: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url],
        capture_output=True, text=True, timeout=120, check=False)


def _inspect(chromium: str, root: Path, base_url: str, page: str, tmp: Path) -> dict:
    harness = root / f"harness-{tmp.name}.html"
    harness.write_text(HARNESS.format(src=page, hostile=json.dumps(HOSTILE)))
    dumped = _chromium(chromium, f"{base_url}/{harness.name}", tmp / "profile", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    found = re.search(r'<pre id="result">(.*?)</pre>', dumped.stdout, re.DOTALL)
    assert found, f"the harness did not report: {dumped.stdout[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def _delivery(directory: Path, broken: bool) -> Path:
    frames = synth.make_raw_frames("HAWKI", directory, n_frames=3)
    for frame in frames:
        with fits.open(frame, mode="update") as hdul:
            hdul[0].header["OBJECT"] = HOSTILE
    if broken:
        (directory / "HAWKI.2026-11-20T03:00:00.000.fits").write_bytes(b"SIMPLE  =  this is not FITS" * 40)
    return directory


def test_run_page_and_monitor_in_chromium(tmp_path, hawki_cal, chromium, artifacts_dir):
    settings = Settings(data_root=tmp_path / "data", cal_root=hawki_cal)
    first = run_embedded("HAWKI", _delivery(tmp_path / "in1", broken=False), settings, run_id="run-ok")
    second = run_embedded("HAWKI", _delivery(tmp_path / "in2", broken=True), settings, run_id="run-partial")
    assert first.status == "ok", first.reason
    assert second.status == "partial"
    assert "HAWKI.2026-11-20T03:00:00.000.fits" in second.reason, second.reason

    # The quick-look and thumbnail are in the manifest, with the checksums of what the QC server holds.
    pngs = {m["name"]: m for m in first.event["manifest"] if m["name"].endswith(".png")}
    assert sorted(pngs) == [f"products/quicklook/{n}" for n in sorted(
        p.name for p in (Path(first.paths["products"]) / "quicklook").iterdir())]
    assert len(pngs) == 2
    for name, entry in pngs.items():
        held = settings.qc_local_dir() / "PREIMG/HAWKI/runs/run-ok" / name
        assert entry["checksum"] == "sha256:" + hashlib.sha256(held.read_bytes()).hexdigest()

    qc = settings.qc_local_dir()
    server = _serve(qc)
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for run in ("run-ok", "run-partial"):
            page = f"PREIMG/HAWKI/runs/{run}/index.html"
            seen = _inspect(chromium, qc, base_url, page, tmp_path / f"chrome-{run}")
            assert seen["title"] == f"preimg run {run}"
            assert seen["images"] >= 2, seen  # the quick-look and its thumbnail in the products table
            assert seen["broken"] == [], f"images that did not load: {seen['broken']}"
            assert seen["hostile_text"], "the hostile OBJECT is shown as text"
            assert seen["hostile_elements"] == 0, "the hostile value became an element"
            assert seen["qc_rows"] == 4, seen
            shot = artifacts_dir / f"runpage-{run}.png"
            shot.unlink(missing_ok=True)
            taken = _chromium(chromium, f"{base_url}/{page}", tmp_path / f"shot-{run}", f"--screenshot={shot}",
                              "--window-size=1400,2400")
            assert taken.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000
        partial = _inspect(chromium, qc, base_url, "PREIMG/HAWKI/runs/run-partial/index.html", tmp_path / "c3")
        assert partial["failures"] >= 2, "the failed frame is listed with its reason"

        monitor = _inspect(chromium, qc, base_url, "PREIMG/HAWKI/preimgMonitor.html", tmp_path / "chrome-monitor")
        assert sorted(monitor["links"]) == ["runs/run-ok/index.html", "runs/run-partial/index.html"]
        assert monitor["images"] == 2 and monitor["broken"] == [], monitor
        assert monitor["hostile_text"] and monitor["hostile_elements"] == 0
        assert monitor["trends"] >= 2, "turnaround and key QC trend plots"
        shot = artifacts_dir / "preimgMonitor-runs.png"
        shot.unlink(missing_ok=True)
        taken = _chromium(chromium, f"{base_url}/PREIMG/HAWKI/preimgMonitor.html", tmp_path / "shot-monitor",
                          f"--screenshot={shot}", "--window-size=1600,1000")
        assert taken.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000
    finally:
        server.shutdown()

"""Each byte read once: how often the Python processes open each raw frame and each product.

One embedded run (`preimg run`, all four stages in one process) under an audit
hook (``sys.addaudithook``) that records every ``open`` of a file under the
data root; esorex runs in its own process and is not counted. The script runs
in a subprocess: an audit hook cannot be removed once installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import synth

pytestmark = [pytest.mark.esorex, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

AUDITED_RUN = """
import json, os, sys
from pathlib import Path

data_root = os.path.realpath(sys.argv[1])
opens = []

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(data_root):
            opens.append(path)

sys.addaudithook(audit)
from services.cli import main
rc = main(sys.argv[3:])
Path(sys.argv[2]).write_text(json.dumps({"rc": rc, "opens": opens}))
"""


def test_each_raw_frame_and_product_is_opened_at_most_twice(tmp_path, hawki_cal):
    incoming = tmp_path / "incoming"
    frames = synth.make_raw_frames("HAWKI", incoming, n_frames=3)
    data_root = tmp_path / "data"
    out = tmp_path / "opens.json"
    run = subprocess.run(
        [sys.executable, "-c", AUDITED_RUN, str(data_root), str(out),
         "run", "-i", "HAWKI", str(incoming), "--data-root", str(data_root), "--cal-root", str(hawki_cal), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    opens = Counter(Path(p) for p in result["opens"])
    summary = json.loads(run.stdout)
    assert summary["status"] == "ok"

    # Raw frames: ingest stages them (a hard link: no read), hashes them and reads their header.
    staged = Path(summary["paths"]["raw"])
    for frame in frames:
        assert opens[staged / frame.name] <= 2, f"{frame.name} opened {opens[staged / frame.name]} times"
    assert not [p for p in opens if p.parent == staged and p.name not in {f.name for f in frames}]

    # Products: read once where the recipe wrote them (header, QC and checksum in one pass); packaged
    # into the local QC directory by a hard link (a copy, read once, on another file system); the
    # reporter opens none. A science product's quick-look needs its pixels: one more open of that
    # product (header and pixels in the same pass), and of no other.
    sci = Path(summary["paths"]["products"])
    products = sorted(sci.glob("*.fits"))
    assert len(products) == 12
    with_quicklook = [p for p in products if "_jittered_image_sci_" in p.name]
    assert len(with_quicklook) == 1 and (sci / "quicklook" / (with_quicklook[0].stem + ".png")).is_file()
    in_work = [p for p in opens if "/work/" in str(p) and p.suffix == ".fits"]
    assert all(opens[p] == 1 for p in in_work), {p.name: opens[p] for p in in_work if opens[p] > 1}
    assert len(in_work) == len(products)
    budget = {p: 2 if p in with_quicklook else 1 for p in products}
    assert all(opens[p] <= budget[p] for p in products), {p.name: opens[p] for p in products if opens[p] > budget[p]}
    assert sum(opens[p] for p in in_work + products) <= 2 * len(products) + len(with_quicklook)
    # The quick-looks are written, never read back: their checksums come from the bytes written.
    assert not [p for p in opens if p.suffix == ".png" and "/qc/" not in str(p)]

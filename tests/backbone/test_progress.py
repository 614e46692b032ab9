"""Progress on stderr: plain lines off a terminal, a redrawn bar on one; deliver --wait's stage lines."""

from __future__ import annotations

import io
import json

from services.cli import _answer_for
from services.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_when_not_a_terminal():
    out, clock = io.StringIO(), _Clock()
    progress = Progress(out, clock=clock)  # StringIO is not a TTY
    clock.now += 1.5
    progress.stage_finished("ingest")
    clock.now += 30
    progress.ab_finished(1, 2, "HAWKI.x_tpl", "SUCCESSFUL", 29.04)
    progress.close()
    assert out.getvalue().splitlines() == [
        "[    1.5 s] ingest finished",
        "[   31.5 s] AB 1 of 2 finished: HAWKI.x_tpl SUCCESSFUL (29.0 s)",
    ]


def test_a_bar_redrawn_in_place_on_a_terminal():
    out, clock = io.StringIO(), _Clock()
    progress = Progress(out, tty=True, clock=clock)
    progress.stage_finished("ingest")
    progress.ab_finished(1, 2, "a", "SUCCESSFUL", 1.0)
    progress.ab_finished(2, 2, "b", "FAILED", 1.0)
    progress.stage_finished("processor")
    progress.close()
    text = out.getvalue()
    assert "\n" not in text.rstrip("\n") and text.endswith("\n")  # one line, redrawn with \r
    frames = text.strip("\n").split("\r")[1:]
    assert len(frames) == 4
    bars = [f.split("[", 2)[2].split("]")[0] for f in frames]
    assert [b.count("#") for b in bars] == [5, 8, 10, 10]  # 20 wide: 1/4, +1/8, +1/8, 2/4
    assert frames[-1].rstrip().endswith("processor finished")


def _body(kind: str, delivery_id: str) -> bytes:
    return json.dumps({"type": f"preimg.{kind}.v1", "delivery_id": delivery_id}).encode()


def test_deliver_wait_shows_the_runs_stages_and_stops_at_its_answer():
    out = io.StringIO()
    progress = Progress(out, clock=_Clock())
    assert not _answer_for(_body("raw_ready", "d1"), "d1", progress)
    assert not _answer_for(_body("products_ready", "other"), "d1", progress)  # another run: silent
    assert not _answer_for(_body("products_ready", "d1"), "d1", progress)
    assert not _answer_for(_body("reports_ready", "d1"), "d1", progress)
    assert _answer_for(_body("completed", "d1"), "d1", progress)
    assert _answer_for(_body("run_failed", "d1"), "d1", progress)
    assert [line.split("] ")[1] for line in out.getvalue().splitlines()] == [
        "ingest finished", "processor finished", "reporter finished"]

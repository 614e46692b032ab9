"""Progress of a run on stderr, for `preimg run` and `preimg deliver --wait`.

Stdout stays for the result (one JSON object with ``--json``); progress goes
to stderr: a redrawn one-line bar when stderr is a terminal, plain lines
otherwise (a log file, CI, a pipe), one per event:

    [  12.3 s] ingest finished
    [  40.1 s] AB 1 of 2 finished: HAWKI.2026-11-20T01:02:03.456_tpl SUCCESSFUL (27.6 s)
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

#: The stages of a run, in order, as the progress names them.
STAGES = ("ingest", "processor", "reporter", "publisher")
#: The event each stage emits when it has finished (the first part of its routing key).
STAGE_OF_EVENT = {"raw_ready": "ingest", "products_ready": "processor", "reports_ready": "reporter",
                  "completed": "publisher"}


class Progress:
    """Thread-safe reporter of stage and AB completions; ``tty`` None: decided from the stream."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._stream = stream if stream is not None else sys.stderr
        self._tty = tty if tty is not None else bool(getattr(self._stream, "isatty", lambda: False)())
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._stages_done = 0
        self._abs = (0, 0)
        self._last = ""

    def elapsed(self) -> float:
        return self._clock() - self._started

    def stage_finished(self, stage: str) -> None:
        with self._lock:
            if stage in STAGES:
                self._stages_done = max(self._stages_done, STAGES.index(stage) + 1)
            self._emit(f"{stage} finished")

    def stage_failed(self, stage: str) -> None:
        with self._lock:
            self._emit(f"{stage} failed")

    def ab_finished(self, done: int, total: int, name: str, status: str, seconds: float) -> None:
        with self._lock:
            self._abs = (done, total)
            self._emit(f"AB {done} of {total} finished: {name} {status} ({seconds:.1f} s)")

    def close(self) -> None:
        with self._lock:
            if self._tty and self._last:
                self._stream.write("\n")
                self._stream.flush()
                self._last = ""

    def _emit(self, text: str) -> None:
        stamp = f"[{self.elapsed():7.1f} s]"
        if not self._tty:
            self._stream.write(f"{stamp} {text}\n")
        else:
            width = 20
            done = self._stages_done / len(STAGES)
            if self._abs[1] and self._stages_done == 1:  # within the processor: its ABs move the bar
                done += self._abs[0] / self._abs[1] / len(STAGES)
            filled = round(done * width)
            line = f"\r{stamp} [{'#' * filled}{'.' * (width - filled)}] {text}"
            pad = max(0, len(self._last) - len(line))
            self._stream.write(line + " " * pad)
            self._last = line
        self._stream.flush()

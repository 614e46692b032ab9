"""One publisher process for the concurrency test: handles the ReportsReady files it is given.

Settings come from the environment (PREIMG_*), as in a deployed publisher.
Usage: python publish_runs.py START_AT MESSAGE.json...
START_AT is a time.time() value both processes wait for, so that they collide.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.publisher.handlers import handle_reports_ready
from services.publisher.service import build_ports
from shared.messages import decode
from shared.settings import Settings


def main(argv: list[str]) -> int:
    start_at = float(argv[0])
    messages = [decode(Path(p).read_bytes()) for p in argv[1:]]
    ports = build_ports(Settings())
    time.sleep(max(start_at - time.time(), 0))
    for msg in messages:
        [event] = handle_reports_ready(msg, ports)
        print(event.run_id, event.status, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

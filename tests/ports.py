"""Loopback ports for the servers the tests start (services' HTTP, broker nodes, moto, SMTP).

A port the kernel hands out for ``bind(0)`` lies in its ephemeral range, the range it also
gives every outgoing connection: between the test picking such a port and the server binding
it, a client connecting anywhere can take it ("Address already in use", seen in CI for a
service restarted by a chaos test). Ports are therefore taken below that range, where only
explicit binds land, checked free, and never handed out twice by one test process.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

_LOCAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000
_lock = threading.Lock()
_given: set[int] = set()


def _below_ephemeral() -> range:
    try:
        ephemeral_low = int(_LOCAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    return range(_LOWEST, max(ephemeral_low, _LOWEST + 1000))


def free_port() -> int:
    """A free loopback port outside the ephemeral range, not given out before by this process."""
    candidates = _below_ephemeral()
    start = random.Random(os.getpid()).randrange(len(candidates))  # test processes side by side differ
    with _lock:
        for i in range(len(candidates)):
            port = candidates[(start + i) % len(candidates)]
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {candidates}")

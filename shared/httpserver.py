"""The small HTTP side of every service: ``/metrics``, ``/startupz``, ``/healthz`` and ``/readyz``.

``/startupz`` answers 200 once the service's start-up checks (configuration,
tools, calibrations) have passed, 503 with what is missing before: the target of
a startupProbe, which holds the liveness probe off until then. ``/healthz``
answers 200 while the consumer thread lives (a liveness probe restarts a wedged
process), checks passed or not; ``/readyz`` answers 200 only while the service
is connected to its broker and consuming, which needs the checks passed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, str]]


class ServiceHttpServer:
    """Serves metrics and probes on a background thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, live: Probe, ready: Probe,
                 started: Probe | None = None):
        self._host, self._port = host, port
        self._registry, self._live, self._ready = registry, live, ready
        self._probes = {"/healthz": live, "/readyz": ready, "/startupz": started or ready}
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(outer._registry), CONTENT_TYPE_LATEST)
                elif self.path in outer._probes:
                    ok, detail = outer._probes[self.path]()
                    body = json.dumps({"ok": ok, "detail": detail}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                _log.debug("http: " + fmt, *args)

        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

"""The four services as separate OS processes against a real RabbitMQ, for end-to-end tests and the bench."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.bus.rabbitmq import RabbitClient
from shared.bus.topology import CLASSIC, QueueArguments
from shared.profiles import OVERLAY_ENV
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PREIMG = [sys.executable, "-m", "services.cli"]


@dataclass
class ServiceProcess:
    name: str
    args: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            return r.read().decode()


@dataclass
class Cluster:
    """ingest, processor(s), reporter and publisher as processes sharing one data root."""

    amqp_url: str
    root: Path
    instruments: tuple[str, ...] = ("FORS2",)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Per service name ("ingest", "processor-FORS2", ...): more environment, e.g. its own broker identity.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def delivery_area(self) -> Path:
        return self.root / "incoming"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREIMG_")}
        # ...except the synthetic calibration set's overlay the session exported
        # (tests/integration/conftest.py): its data need those recipe options.
        if OVERLAY_ENV in os.environ:
            env[OVERLAY_ENV] = os.environ[OVERLAY_ENV]
        env.update(
            PREIMG_AMQP_URL=self.amqp_url,
            PREIMG_DATA_ROOT=str(self.root / "data"),
            PREIMG_DELIVERY_AREA=str(self.delivery_area),
            PREIMG_RETRY_DELAYS_MS="[200,500,1000]",
            PREIMG_SHUTDOWN_GRACE_S="10",
            PYTHONPATH=str(REPO),
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60) -> Cluster:
        self.delivery_area.mkdir(parents=True, exist_ok=True)
        names = ["ingest", "reporter", "publisher"] + [f"processor-{i}" for i in self.instruments]
        for name in names:
            self.start_service(name)
        self.wait_ready(timeout)
        return self

    def start_service(self, name: str) -> ServiceProcess:
        if name.startswith("processor-"):
            args = ["serve", "processor", "-i", name.split("-", 1)[1]]
        else:
            args = ["serve", name]
        svc = self.services.get(name) or ServiceProcess(name, args, free_port(), self.root / f"{name}.log")
        env = {**self.env(), **self.service_env.get(name, {}), "PREIMG_HTTP_PORT": str(svc.port)}
        with open(svc.log, "ab") as log:  # the child keeps its own copy of the descriptor
            svc.proc = subprocess.Popen(PREIMG + args, env=env, stdout=log, stderr=log, cwd=REPO)
        self.services[name] = svc
        return svc

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for svc in self.services.values():
            while not svc.ready():
                if svc.proc and svc.proc.poll() is not None:
                    raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{svc.name} not ready:\n{svc.log.read_text()[-3000:]}")
                time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        svc = self.services[name]
        assert svc.proc is not None
        svc.proc.send_signal(sig)
        svc.proc.wait(timeout=60)

    def stop(self) -> None:
        for svc in self.services.values():
            if svc.proc and svc.proc.poll() is None:
                svc.proc.send_signal(signal.SIGTERM)
        for svc in self.services.values():
            if svc.proc:
                try:
                    svc.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    svc.proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log.read_text()[-4000:]}" for s in self.services.values() if s.log.exists())


class CompletionWatcher:
    """A private queue bound to completions and failures, as AOG would bind one."""

    def __init__(self, amqp_url: str, queue_args: QueueArguments = CLASSIC):
        self._client = RabbitClient(amqp_url, "preimg", queue_args=queue_args).__enter__()
        self._channel, self._queue = self._client.bind_private_queue(("completed.*", "run_failed.*"))
        self.events: list[dict] = []

    def _pull(self, timeout: float) -> None:
        """Take the messages that arrive within ``timeout`` (push-based, no polling sleep)."""
        deadline = time.monotonic() + timeout
        for method, _props, body in self._channel.consume(self._queue, auto_ack=True, inactivity_timeout=0.02):
            if method is not None:
                self.events.append(json.loads(body))
                return
            if time.monotonic() >= deadline:
                return

    def collect(self, until: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.events) < until and time.monotonic() < deadline:
            self._pull(deadline - time.monotonic())
        return self.events

    def settle(self, quiet_s: float = 1.0) -> list[dict]:
        """Collect whatever else arrives within ``quiet_s``."""
        end = time.monotonic() + quiet_s
        while time.monotonic() < end:
            self._pull(end - time.monotonic())
        return self.events

    def close(self) -> None:
        self._client.__exit__(None, None, None)

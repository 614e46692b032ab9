"""The preimg stack as containers in one podman pod, for tests/stack.

One pod with its own network namespace holding only loopback (``--network
none``): RabbitMQ (Debian's, image docker/rabbitmq/Dockerfile) and the four
services reach each other on 127.0.0.1, as containers of one Kubernetes pod
would, and nothing collides with a broker or exporter on the host. The
services run as Kubernetes runs them (k8s/*.yaml): uid 10001, read-only root
file system, every capability dropped, no privilege escalation; the data root
is a host directory mounted at /data, as the shared claim is.

Anything inside the pod's network namespace (Prometheus, HTTP requests of the
test) runs through ``nsenter --net`` into it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PODMAN_ENV = {
    **os.environ,
    "CONTAINERS_CONF": str(REPO / "docker" / "podman" / "containers.conf"),
    "CONTAINERS_STORAGE_CONF": str(REPO / "docker" / "podman" / "storage.conf"),
}
#: Each service's HTTP port inside the pod (they share one network namespace).
PORTS = {"ingest": 9101, "processor-hawki": 9102, "reporter": 9103, "publisher": 9104}
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCKED_DOWN = [
    "--read-only",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
]
SERVICE_USER = "10001:10001"


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=PODMAN_ENV,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def read_images(path: Path) -> dict[str, str]:
    """name -> reference, from the dist/images.env ``make images`` writes."""
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            name, ref = line.strip().split("=", 1)
            out[name] = ref
    return out


@dataclass
class PodStack:
    images: dict[str, str]
    root: Path
    #: The calibration set came with a profile overlay (/data/cal/HAWKI/profile-overlay.toml).
    overlay: bool = False
    name: str = field(default_factory=lambda: f"preimg-stack-{os.getpid()}")
    prometheus: subprocess.Popen | None = None

    # ------------------------------------------------------------------ pod

    def container(self, service: str) -> str:
        return f"{self.name}-{service}"

    def create(self) -> None:
        podman("pod", "create", "--name", self.name, "--network", "none")
        self.pid = int(podman("inspect", "--format", "{{.State.Pid}}", self.infra()).stdout)
        if not self.pid:  # the infra container starts with the first container; start it now
            podman("pod", "start", self.name)
            self.pid = int(podman("inspect", "--format", "{{.State.Pid}}", self.infra()).stdout)

    def infra(self) -> str:
        return podman("pod", "inspect", "--format", "{{.InfraContainerID}}", self.name).stdout.strip()

    def remove(self) -> None:
        if self.prometheus and self.prometheus.poll() is None:
            self.prometheus.terminate()
            try:
                self.prometheus.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.prometheus.kill()
        podman("pod", "rm", "--force", "--time", "5", self.name, check=False, timeout=120)

    def in_pod(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a host command inside the pod's network namespace."""
        return subprocess.run(["nsenter", "--target", str(self.pid), "--net", *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def http(self, url: str, data: dict | None = None, auth: tuple[str, str] | None = None) -> str:
        """GET (or POST ``data`` as JSON) ``url`` from inside the pod; raises on an HTTP error."""
        code = (
            "import json, sys, urllib.request\n"
            "url, body, auth = sys.argv[1], sys.argv[2], sys.argv[3]\n"
            "req = urllib.request.Request(url, data=body.encode() or None,"
            " headers={'Content-Type': 'application/json'})\n"
            "if auth: req.add_header('Authorization', 'Basic ' + auth)\n"
            "sys.stdout.write(urllib.request.urlopen(req, timeout=10).read().decode())\n"
        )
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else ""
        result = self.in_pod("python3", "-c", code, url, json.dumps(data) if data else "", token)
        if result.returncode != 0:
            raise RuntimeError(f"{url}: {result.stderr.strip().splitlines()[-1:]}")
        return result.stdout

    # ------------------------------------------------------------ containers

    def start_broker(self) -> None:
        lib, logs = self.root / "rabbitmq" / "lib", self.root / "rabbitmq" / "log"
        lib.mkdir(parents=True)
        logs.mkdir(parents=True)
        podman(
            "run", "--detach", "--pod", self.name, "--name", self.container("rabbitmq"),
            *LOCKED_DOWN,
            "--env", "RABBITMQ_NODENAME=rabbit@localhost",
            "--volume", f"{lib}:/var/lib/rabbitmq:U",
            "--volume", f"{logs}:/var/log/rabbitmq:U",
            self.images["preimg-rabbitmq"],
        )

    def service_env(self, service: str) -> list[str]:
        env = {
            "PREIMG_AMQP_URL": AMQP_URL,
            "PREIMG_DATA_ROOT": "/data",
            "PREIMG_DELIVERY_AREA": "/data/incoming",
            "PREIMG_CAL_ROOT": "/data/cal",
            "PREIMG_HTTP_PORT": str(PORTS.get(service, 9100)),
            "PREIMG_RETRY_DELAYS_MS": "[200,500,1000]",
            "PREIMG_SHUTDOWN_GRACE_S": "20",
        }
        if self.overlay:
            env["PREIMG_PROFILE_OVERLAY"] = "/data/cal/HAWKI/profile-overlay.toml"
        return [a for k, v in env.items() for a in ("--env", f"{k}={v}")]

    def start_service(self, service: str) -> None:
        image = self.images["preimg-processor" if service.startswith("processor") else "preimg"]
        argv = ["serve", "processor", "--instrument", "HAWKI"] if service == "processor-hawki" else ["serve", service]
        podman(
            "run", "--detach", "--pod", self.name, "--name", self.container(service),
            *LOCKED_DOWN, "--user", SERVICE_USER,
            "--volume", f"{self.root / 'data'}:/data",
            *self.service_env(service),
            image, *argv,
        )

    def run_once(self, image: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A one-shot container in the pod (``preimg deliver``), locked down like the services."""
        return podman(
            "run", "--rm", "--pod", self.name, *LOCKED_DOWN, "--user", SERVICE_USER,
            "--volume", f"{self.root / 'data'}:/data", *self.service_env("deliver"),
            image, *argv, check=False, timeout=timeout,
        )

    def logs(self, service: str) -> str:
        result = podman("logs", self.container(service), check=False)
        return result.stdout + result.stderr

    def wait_ready(self, service: str, timeout: float = 120) -> None:
        url = f"http://127.0.0.1:{PORTS[service]}/readyz"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.http(url)
                return
            except RuntimeError as e:
                state = podman("inspect", "--format", "{{.State.Status}}", self.container(service)).stdout.strip()
                if state != "running" or time.monotonic() > deadline:
                    raise TimeoutError(f"{service} not ready ({state}, {e}):\n{self.logs(service)[-3000:]}") from e
                time.sleep(1)

    def wait_broker(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = podman("exec", self.container("rabbitmq"), "rabbitmq-diagnostics", "-q",
                            "check_port_connectivity", check=False, timeout=60)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ did not start:\n{self.logs('rabbitmq')[-3000:]}")
            time.sleep(2)

    def stop(self, service: str, grace_s: int = 60) -> int:
        """SIGTERM (podman's stop signal), SIGKILL only after ``grace_s``; the exit code."""
        podman("stop", "--time", str(grace_s), self.container(service), timeout=grace_s + 60)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.container(service)).stdout)

    # ------------------------------------------------------------ prometheus

    def start_prometheus(self, config: Path, storage: Path, log: Path) -> None:
        with log.open("wb") as out:
            self.prometheus = subprocess.Popen(
                ["nsenter", "--target", str(self.pid), "--net", "prometheus",
                 f"--config.file={config}", f"--storage.tsdb.path={storage}",
                 "--web.listen-address=127.0.0.1:9090"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def prom_query(self, path: str) -> dict:
        body = json.loads(self.http(f"http://127.0.0.1:9090{path}"))
        assert body["status"] == "success", body
        return body["data"]

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.prom_query("/api/v1/alerts")["alerts"]
                if a["state"] == "firing"}

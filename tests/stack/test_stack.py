"""The built images run for real: `make stack-test` (needs root, podman, nsenter, prometheus).

RabbitMQ and the four services (processor for HAWK-I) run as containers of
one pod with the Kubernetes security settings (tests/stack/podstack.py). A real
Prometheus, the host's Debian ``prometheus``, runs inside the pod's network
namespace with the shipped scrape configuration (docker/prometheus/prometheus.yml:
jobs, labels and rule file kept; targets pointed at the pod's loopback ports,
intervals 2 s) and the shipped alert rules (expressions unchanged; ``for``
shortened to a few seconds so an hour-long condition is seen within the test).

The tests run in file order against one pod: identity and lock-down, image
HEALTHCHECKs, a HAWK-I delivery through ``preimg deliver --wait``, Prometheus
scraping every container, every metric the dashboard and alerts name exported by
a live service, the dead-letter alerts, then SIGTERM to each container (exit 0)
and, with the processor stopped, the backlog alerts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import synth
from tests.deploy.test_manifests import (
    ALERTS,
    PROM_CONFIG,
    RABBITMQ_METRICS,
    _all_exprs,
    promql_metric_names,
)
from tests.stack.podstack import PORTS, REPO, PodStack, podman, read_images

IMAGES_ENV = Path(os.environ.get("PREIMG_STACK_IMAGES", REPO / "dist" / "images.env"))
SERVICES = ("ingest", "processor-hawki", "reporter", "publisher")
ALERT_FOR = "4s"


def _require(tool: str) -> None:
    if not shutil.which(tool):
        pytest.fail(f"{tool} not installed: `make stack-deps` installs what the stack test needs")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    for tool in ("podman", "nsenter", "prometheus"):
        _require(tool)
    if os.geteuid() != 0:
        pytest.fail("the stack test runs rootful podman: run it as root")
    if not IMAGES_ENV.is_file():
        pytest.fail(f"{IMAGES_ENV} missing: `make images` builds the images and writes it")
    images = read_images(IMAGES_ENV)
    root = tmp_path_factory.mktemp("stack")
    # Synthetic HAWK-I raw frames and calibrations, made on the host (the calibration set
    # is the cached one the other tests use: made once by the real recipes), copied onto
    # the data volume and owned by the service user.
    cal = synth.make_calibrations("HAWKI", REPO / ".cache" / "synth" / "cal")
    shutil.copytree(cal.root, root / "data" / "cal" / "HAWKI")
    synth.make_raw_frames("HAWKI", root / "data" / "incoming" / "HAWKI", n_frames=3)
    subprocess.run(["chown", "-R", "10001:10001", str(root / "data")], check=True)

    pod = PodStack(images, root, overlay=cal.profile_overlay is not None)
    pod.create()
    try:
        pod.start_broker()
        pod.wait_broker()
        for service in SERVICES:
            pod.start_service(service)
        for service in SERVICES:
            pod.wait_ready(service)
        pod.start_prometheus(_prometheus_config(root), root / "prometheus", root / "prometheus.log")
        yield pod
    finally:
        for service in ("rabbitmq", *SERVICES):
            log = pod.logs(service) if podman("container", "exists", pod.container(service),
                                              check=False).returncode == 0 else ""
            (root / f"{service}.log").write_text(log)
        pod.remove()


def _prometheus_config(root: Path) -> Path:
    """The shipped scrape config and rules, pointed at the pod's ports, with short intervals."""
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval="2s", evaluation_interval="2s")
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name == "rabbitmq":
            targets = ["127.0.0.1:15692"]
        elif name == "prometheus":
            targets = job["static_configs"][0]["targets"]
        elif name.removeprefix("preimg-") in PORTS:
            targets = [f"127.0.0.1:{PORTS[name.removeprefix('preimg-')]}"]
        else:  # processors of other instruments: not in this pod
            continue
        for static in job["static_configs"]:
            static["targets"] = targets
        jobs.append(job)
    config["scrape_configs"] = jobs
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = ALERT_FOR
    (root / "alerts.yml").write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(root / "alerts.yml")]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for(what: str, check, timeout: float, pod: PodStack | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


# --------------------------------------------------------------------------- identity, health


def test_containers_run_locked_down_as_the_service_user(stack: PodStack) -> None:
    for service in SERVICES:
        ctr = stack.container(service)
        info = json.loads(podman("inspect", ctr).stdout)[0]
        image_user = json.loads(podman("image", "inspect", info["ImageName"]).stdout)[0]["Config"]["User"]
        ids = podman("exec", ctr, "id").stdout.strip()
        print(f"{service}: image {info['ImageName']} USER {image_user}; in the container: {ids}")
        assert image_user == "10001:10001", f"{service}: image user {image_user}"
        assert ids.startswith("uid=10001(preimg) gid=10001(preimg)"), ids
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        caps = podman("exec", ctr, "grep", "^CapEff", "/proc/self/status").stdout.split()[1]
        assert int(caps, 16) == 0, f"{service}: effective capabilities {caps}"
        write = podman("exec", ctr, "touch", "/opt/preimg/x", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
        sbom = podman("exec", ctr, "cat", "/opt/preimg/share/sbom/pip-freeze.txt").stdout
        assert "preimg==" in sbom and "pika==" in sbom, sbom[:500]
    broker = podman("exec", stack.container("rabbitmq"), "id", "-un").stdout.strip()
    print(f"rabbitmq: runs as {broker}")
    assert broker == "rabbitmq"


def test_image_healthchecks_pass(stack: PodStack) -> None:
    for service in (*SERVICES, "rabbitmq"):
        result = podman("healthcheck", "run", stack.container(service), check=False, timeout=60)
        print(f"{service}: HEALTHCHECK -> {result.stdout.strip() or result.returncode}")
        assert result.returncode == 0, f"{service}: {result.stdout}{result.stderr}"


# --------------------------------------------------------------------------- the run


def test_hawki_delivery_completes(stack: PodStack) -> None:
    incoming = stack.root / "data" / "incoming" / "HAWKI"
    files = sorted(f"/data/incoming/HAWKI/{p.name}" for p in incoming.glob("*.fits"))
    assert files
    started = time.monotonic()
    result = stack.run_once(stack.images["preimg"], "deliver", "-i", "HAWKI", "--test", "--wait", "600",
                            *files, timeout=700)
    print(f"preimg deliver --wait: exit {result.returncode} after {time.monotonic() - started:.0f} s")
    print(result.stdout[-2000:])
    assert result.returncode == 0, (
        result.stdout + result.stderr + "\n".join(stack.logs(s)[-2000:] for s in SERVICES)
    )
    event = json.loads(result.stdout[result.stdout.index("{"):])
    assert event["status"] == "ok", event


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_container(stack: PodStack) -> None:
    def all_up():
        targets = stack.prom_query("/api/v1/targets")["activeTargets"]
        up = {t["labels"]["job"]: t["health"] for t in targets}
        return up if len(up) == len(SERVICES) + 2 and set(up.values()) == {"up"} else None

    up = _wait_for("every scrape target up", all_up, 60)
    print(f"Prometheus targets: {up}")
    assert {f"preimg-{s}" for s in SERVICES} | {"rabbitmq", "prometheus"} == up.keys()


def _exported(text: str) -> set[str]:
    """Series names a /metrics page exports, families without samples yet included."""
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",), "summary": ("", "_count", "_sum")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()[:4]
            base = family.removesuffix("_total") if kind == "counter" else family
            names.update(base + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_every_metric_of_dashboard_and_alerts_is_exported_live(stack: PodStack) -> None:
    exported: set[str] = set()
    for port in PORTS.values():
        exported |= _exported(stack.http(f"http://127.0.0.1:{port}/metrics"))
    broker = stack.http("http://127.0.0.1:15692/metrics")
    exported |= _exported(broker)
    exported.add("up")
    # Per-queue series: on /metrics through prometheus.return_per_object_metrics (compose),
    # on /metrics/per-object whatever the setting (what k8s/servicemonitor.yaml scrapes).
    per_object = stack.http("http://127.0.0.1:15692/metrics/per-object")
    for name in RABBITMQ_METRICS:
        for where, text in (("/metrics", broker), ("/metrics/per-object", per_object)):
            assert f'{name}{{vhost="/",queue="preimg.ingest"}}' in text, f"{where}: no per-queue {name}"
    referenced = set().union(*(promql_metric_names(e) for _, e in _all_exprs()))
    missing = sorted(referenced - exported)
    assert not missing, f"referenced but exported by no live service: {missing}"


def _publish(stack: PodStack, routing_key: str, payload: str, exchange: str = "preimg") -> None:
    body = stack.http(
        f"http://127.0.0.1:15672/api/exchanges/%2F/{exchange}/publish",
        data={"properties": {}, "routing_key": routing_key, "payload": payload,
              "payload_encoding": "string"},
        auth=("guest", "guest"),
    )
    assert json.loads(body)["routed"] is True, body


def test_dead_letter_alerts_fire(stack: PodStack) -> None:
    _publish(stack, "delivery.HAWKI", "this is not a preimg message")
    firing = _wait_for("PreimgDeadLetterQueueNotEmpty firing",
                       lambda: (f := stack.firing()) >= {"PreimgDeadLetterQueueNotEmpty"} and f, 90)
    print(f"after a malformed delivery, firing: {sorted(firing)}")
    firing = _wait_for("PreimgDeadLetters firing",
                       lambda: (f := stack.firing()) >= {"PreimgDeadLetters"} and f, 60)
    print(f"firing: {sorted(firing)}")


# --------------------------------------------------------------------------- SIGTERM, backlog


def test_sigterm_stops_the_processor_with_exit_0_and_the_backlog_alerts_fire(stack: PodStack) -> None:
    code = stack.stop("processor-hawki")
    print(f"processor-hawki: SIGTERM -> exit {code}")
    assert code == 0, stack.logs("processor-hawki")[-3000:]
    for i in range(6):
        _publish(stack, "preimg.processor.HAWKI", f"waiting {i}", exchange="amq.default")
    firing = _wait_for(
        "PreimgProcessorQueueBacklog and PreimgConsumersAbsent firing",
        lambda: (f := stack.firing()) >= {"PreimgProcessorQueueBacklog", "PreimgConsumersAbsent"} and f,
        90,
    )
    print(f"with the processor stopped and 6 runs waiting, firing: {sorted(firing)}")


@pytest.mark.parametrize("service", ["ingest", "reporter", "publisher"])
def test_sigterm_stops_each_service_with_exit_0(stack: PodStack, service: str) -> None:
    code = stack.stop(service)
    print(f"{service}: SIGTERM -> exit {code}")
    assert code == 0, stack.logs(service)[-3000:]

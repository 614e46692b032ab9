"""Fixtures every test area can use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


#: Fixtures that mean a test needs what a marker names: the marker follows from the fixture,
#: so ``-m "not rabbitmq and not esorex and not slow"`` cannot pick a test that needs more.
MARKER_FIXTURES = {
    "rabbitmq": {"rabbitmq_url", "rabbitmq_available", "private_broker", "private_broker_module", "cluster",
                 "broker_cluster"},
    "esorex": {"esorex_available", "esorex_installed", "hawki_cal", "vimos_cal", "hawki_fullsize_cal",
               "synth_cal_root", "hawki_recipe_dir", "vimos_recipe_dir"},
    "slow": {"s3_server", "own_s3", "bucket", "smtp_server", "private_broker", "private_broker_module",
             "broker_cluster"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(str(v).startswith("rabbitmq") for v in params.values()):  # a contract test run against the broker
            used.add("rabbitmq_url")
        for marker, fixtures in MARKER_FIXTURES.items():
            if used & fixtures and not item.get_closest_marker(marker):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A directory that survives between test runs (synthetic data, downloaded rule files)."""
    path = REPO / ".cache"
    path.mkdir(exist_ok=True)
    return path


def _broker_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_available() -> None:
    """Skip locally without a broker; in CI a missing broker is a failure."""
    if not _broker_reachable():
        if IN_CI:
            pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 in CI")
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")


@pytest.fixture
def rabbitmq_url(rabbitmq_available: None):
    """An AMQP URL on a fresh virtual host, deleted afterwards: tests never share queues."""
    import shutil
    import subprocess
    import uuid

    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        if IN_CI:
            pytest.fail("rabbitmqctl is not installed in CI (apt-get install rabbitmq-server)")
        pytest.skip("rabbitmqctl is needed to make a private virtual host")
    vhost = f"preimg-test-{uuid.uuid4().hex[:10]}"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run([ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], capture_output=True, timeout=60, check=False)


def _need_rabbitmq_server() -> None:
    """Skip locally without Debian's rabbitmq-server; in CI its absence is a failure."""
    from tests.broker_node import rabbitmq_scripts_dir

    if rabbitmq_scripts_dir() is None:
        if IN_CI:
            pytest.fail("rabbitmq-server is not installed in CI (apt-get install rabbitmq-server)")
        pytest.skip("rabbitmq-server is not installed (a private broker node needs it)")


def _private_broker(tmp_path_factory: pytest.TempPathFactory):
    from tests.broker_node import BrokerNode

    _need_rabbitmq_server()
    node = BrokerNode(tmp_path_factory.mktemp("broker"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def private_broker(tmp_path_factory: pytest.TempPathFactory):
    """A running private RabbitMQ node (own name, ports and data) that the test may restart(),
    stop_app()/start_app() or stop()/start(); always stopped afterwards. ~6 s to start (up to
    12 s on a loaded machine). The machine's broker on 5672 is not touched."""
    yield from _private_broker(tmp_path_factory)


@pytest.fixture(scope="module")
def private_broker_module(tmp_path_factory: pytest.TempPathFactory):
    """``private_broker`` shared by a module's tests: each test must leave it running."""
    yield from _private_broker(tmp_path_factory)


# tests/stack runs the built images in podman (root, minutes): only `make stack-test`
# (which builds the images first and sets PREIMG_STACK_IMAGES) collects it.
collect_ignore = [] if os.environ.get("PREIMG_STACK_IMAGES") else ["stack"]


@pytest.fixture(scope="module")
def broker_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A private three-node RabbitMQ cluster (tests/broker_cluster.py) shared by a module's tests;
    each test leaves all three nodes running. 30-60 s to start on a loaded machine."""
    from tests.broker_cluster import BrokerCluster

    _need_rabbitmq_server()
    cluster = BrokerCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

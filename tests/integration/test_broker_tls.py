"""amqps:// with certificate verification: a run completes; a broker signed by another CA is refused, clearly.

A private node with a TLS listener; the CA and the certificates are made here
with ``openssl`` (the server's for 127.0.0.1 and localhost).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.backbone.cluster import PREIMG, REPO, Cluster
from tests.backbone.test_e2e_rabbitmq import make_frames
from tests.broker_node import BrokerNode
from tests.conftest import _need_rabbitmq_server
from tests.ports import free_port

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def make_server_cert(d: Path, ca: str) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem", cwd=d)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    _need_rabbitmq_server()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the certificates")
    certs = tmp_path_factory.mktemp("certs")
    make_ca(certs, "test-ca")
    make_ca(certs, "other-ca")
    make_server_cert(certs, "test-ca")
    port = free_port()
    node = BrokerNode(tmp_path_factory.mktemp("tls"), extra_config=(
        f"listeners.ssl.1 = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {certs / 'test-ca.pem'}\n"
        f"ssl_options.certfile = {certs / 'server.pem'}\n"
        f"ssl_options.keyfile = {certs / 'server.key'}\n"
        "ssl_options.verify = verify_none\n"
    ))
    try:
        node.start()
        yield node, port, certs
    finally:
        node.stop()


def test_a_delivery_completes_over_amqps_with_verification(tls_broker, tmp_path):
    _node, port, certs = tls_broker
    url = f"amqps://guest:guest@127.0.0.1:{port}/%2F"
    services = Cluster(url, tmp_path, extra_env={"PREIMG_AMQP_CA_FILE": str(certs / "test-ca.pem")}).start()
    try:
        files = make_frames(services.delivery_area, 1)
        out = subprocess.run(PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--wait", "90", "--test"],
                             env=services.env(), cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stdout + out.stderr + services.logs()
        assert json.loads(out.stdout)["status"] == "ok"
    finally:
        services.stop()


def test_a_broker_certificate_from_another_ca_is_refused_with_the_reason(tls_broker, tmp_path):
    _node, port, certs = tls_broker
    url = f"amqps://guest:guest@127.0.0.1:{port}/%2F"
    env = {**Cluster(url, tmp_path).env(), "PREIMG_AMQP_CA_FILE": str(certs / "other-ca.pem")}
    frame = make_frames(tmp_path / "incoming", 1)
    out = subprocess.run(PREIMG + ["deliver", "-i", "FORS2", str(frame[0])], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 3
    assert "certificate verify failed" in out.stderr.lower(), out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "nothing was delivered" in out.stderr

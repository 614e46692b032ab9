"""One identity per party against a real broker: least privilege holds, a wrong identity says why.

A private node with the management plugin; ``preimg broker setup`` creates the
identities (the node's guest is the operator here).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pika
import pytest

from shared.bus.identities import IDENTITIES, definitions, password_hash
from tests.backbone.cluster import PREIMG, REPO, Cluster
from tests.backbone.test_e2e_rabbitmq import make_frames
from tests.broker_node import BrokerNode
from tests.conftest import _need_rabbitmq_server
from tests.ports import free_port

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

PASSWORDS = {i.user: f"pw-{i.user}-{i.user[::-1]}" for i in IDENTITIES}


@pytest.fixture(scope="module")
def managed_broker(tmp_path_factory):
    _need_rabbitmq_server()
    node = BrokerNode(tmp_path_factory.mktemp("managed"), plugins=("rabbitmq_management",))
    try:
        node.start()
        # as compose loads it at boot: the users and permissions, no passwords; setup sets them
        node.ctl("import_definitions", str(REPO / "docker" / "rabbitmq" / "definitions.json"))
        env = {**Cluster(node.url, tmp_path_factory.mktemp("setup")).env(),
               "PREIMG_MANAGEMENT_URL": f"http://guest:guest@127.0.0.1:{node.management_port}",
               **{i.password_env: PASSWORDS[i.user] for i in IDENTITIES}}
        deadline = time.monotonic() + 60
        while True:  # the management listener comes up a little after AMQP
            out = subprocess.run(PREIMG + ["broker", "setup"], env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=120, check=False)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.returncode == 0, out.stderr
        again = subprocess.run(PREIMG + ["broker", "setup"], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=120, check=False)
        assert again.returncode == 0, again.stderr  # idempotent
        yield node
    finally:
        node.stop()


def url_for(node: BrokerNode, user: str) -> str:
    return f"amqp://{user}:{PASSWORDS[user]}@127.0.0.1:{node.amqp_port}/%2F"


def refused(node: BrokerNode, user: str, act) -> str:
    """The ACCESS_REFUSED text of ``act(channel)``, or '' if the broker allowed it."""
    connection = pika.BlockingConnection(pika.URLParameters(url_for(node, user)))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        try:
            act(channel)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 403, e
            return e.reply_text
        return ""
    finally:
        if connection.is_open:
            connection.close()


def publish(key: str):
    return lambda ch: ch.basic_publish("preimg", key, b"{}", mandatory=True)


def test_aog_may_only_announce_deliveries_and_read_its_answers(managed_broker):
    assert "ACCESS_REFUSED" in refused(managed_broker, "aog", publish("completed.HAWKI"))
    assert "ACCESS_REFUSED" in refused(managed_broker, "aog", publish("raw_ready.HAWKI"))
    assert "ACCESS_REFUSED" in refused(
        managed_broker, "aog", lambda ch: ch.basic_get("preimg.processor.HAWKI", auto_ack=False))
    assert refused(managed_broker, "aog", publish("delivery.HAWKI")) == ""  # routed to preimg.ingest, confirmed

    def own_queue(ch):
        ch.queue_declare("aog.answers", durable=True)
        for key in ("completed.*", "run_failed.*"):
            ch.queue_bind("aog.answers", "preimg", key)

    assert refused(managed_broker, "aog", own_queue) == ""
    assert "ACCESS_REFUSED" in refused(
        managed_broker, "aog", lambda ch: ch.queue_bind("aog.answers", "preimg", "raw_ready.*"))


@pytest.mark.parametrize(("user", "own", "foreign"), [
    ("ingest", "raw_ready.HAWKI", "completed.HAWKI"),
    ("processor", "products_ready.HAWKI", "reports_ready.HAWKI"),
    ("reporter", "reports_ready.HAWKI", "completed.HAWKI"),
    ("publisher", "completed.HAWKI", "delivery.HAWKI"),
])
def test_each_service_publishes_only_its_stage(managed_broker, user, own, foreign):
    assert refused(managed_broker, user, publish(own)) == ""
    assert refused(managed_broker, user, publish("run_failed.HAWKI")) == ""
    assert "ACCESS_REFUSED" in refused(managed_broker, user, publish(foreign))
    other = "preimg.publisher" if user != "publisher" else "preimg.ingest"
    assert "ACCESS_REFUSED" in refused(managed_broker, user, lambda ch: ch.basic_get(other, auto_ack=False))


def test_a_service_with_the_wrong_identity_names_the_refusal_and_keeps_retrying(managed_broker, tmp_path):
    port = free_port()
    env = {**Cluster(url_for(managed_broker, "aog"), tmp_path).env(), "PREIMG_HTTP_PORT": str(port)}
    log = tmp_path / "reporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(PREIMG + ["serve", "reporter"], env=env, cwd=REPO, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 40
        while log.read_text().count("refused this identity a permission") < 2:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "ACCESS_REFUSED" in log.read_text()
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
        assert "ACCESS_REFUSED" in json.loads(not_ready.value.read())["detail"]
        assert PASSWORDS["aog"] not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()


def test_a_run_completes_with_every_party_on_its_own_identity(managed_broker, tmp_path):
    users = {"ingest": "ingest", "reporter": "reporter", "publisher": "publisher", "processor-FORS2": "processor"}
    services = Cluster(url_for(managed_broker, "aog"), tmp_path,
                       service_env={name: {"PREIMG_AMQP_URL": url_for(managed_broker, user)}
                                    for name, user in users.items()}).start()
    try:
        files = make_frames(services.delivery_area, 1)
        out = subprocess.run(PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", "least-1",
                                       "--wait", "90", "--test"],
                             env=services.env(), cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stdout + out.stderr + services.logs()
        assert json.loads(out.stdout)["status"] == "ok"
        assert "ACCESS_REFUSED" not in services.logs()
    finally:
        services.stop()


def test_the_definitions_file_in_git_is_the_identity_table_without_passwords():
    shipped = json.loads((REPO / "docker" / "rabbitmq" / "definitions.json").read_text())
    assert shipped == definitions(None), "regenerate: preimg broker definitions --without-passwords"
    assert {u["password_hash"] for u in shipped["users"]} == {""}


def test_definitions_carry_hashes_not_passwords():
    doc = json.dumps(definitions(PASSWORDS))
    assert not any(p in doc for p in PASSWORDS.values())
    assert len(json.loads(doc)["topic_permissions"]) == len(IDENTITIES)
    assert password_hash("x", salt=b"\0\0\0\0") == password_hash("x", salt=b"\0\0\0\0")


def test_a_broker_started_with_rendered_definitions_serves_each_identity(tmp_path):
    """As compose runs it: `preimg broker definitions --output` renders the identities with hashes of
    the passwords in the environment, the broker loads them at start (no default guest then), and
    each party logs in with its own password and nothing more."""
    _need_rabbitmq_server()
    rendered = tmp_path / "defs" / "definitions.json"
    rendered.parent.mkdir()
    env = {**Cluster("amqp://unused", tmp_path).env(), **{i.password_env: PASSWORDS[i.user] for i in IDENTITIES}}
    out = subprocess.run(PREIMG + ["broker", "definitions", "--output", str(rendered)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert oct(rendered.stat().st_mode & 0o777) == "0o644"  # the broker runs as another user
    assert not any(p in rendered.read_text() for p in PASSWORDS.values())
    missing = subprocess.run(PREIMG + ["broker", "definitions", "--output", str(tmp_path / "x.json")],
                             env={k: v for k, v in env.items() if k != "PREIMG_BROKER_PASSWORD_KEDA"},
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "PREIMG_BROKER_PASSWORD_KEDA" in missing.stderr
    assert not (tmp_path / "x.json").exists()

    node = BrokerNode(tmp_path / "node", extra_config=f"load_definitions = {rendered}\n",
                      credentials=f"preimg-operator:{PASSWORDS['preimg-operator']}")
    try:
        node.start()
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/%2F"))
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(f"amqp://aog:wrong@127.0.0.1:{node.amqp_port}/%2F"))
        services = Cluster(url_for(node, "aog"), tmp_path / "run", service_env={
            name: {"PREIMG_AMQP_URL": url_for(node, user)} for name, user in
            {"ingest": "ingest", "reporter": "reporter", "publisher": "publisher",
             "processor-FORS2": "processor"}.items()}).start()
        try:
            assert "ACCESS_REFUSED" in refused(node, "ingest", publish("completed.FORS2"))
            files = make_frames(services.delivery_area, 1)
            out = subprocess.run(PREIMG + ["deliver", "-i", "FORS2", *map(str, files), "--run-id", "boot-1",
                                           "--wait", "90", "--test"], env=services.env(), cwd=REPO,
                                 capture_output=True, text=True, timeout=120, check=False)
            assert out.returncode == 0, out.stdout + out.stderr + services.logs()
            assert json.loads(out.stdout)["status"] == "ok"
        finally:
            services.stop()
    finally:
        node.stop()

"""Fixtures of the publisher tests: real S3 (moto) and SMTP (aiosmtpd) processes."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.publisher.service import build_ports as publisher_ports
from services.reporter.handlers import handle_products_ready
from services.reporter.service import build_ports as reporter_ports
from shared.settings import Settings
from tests.ports import free_port
from tests.publisher.servers import MotoServer, SmtpServer
from tests.reporter.sample import REPORTED, products_ready

COMPLETED = datetime(2026, 11, 20, 9, 20, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def artifacts_dir(repo_root) -> Path:
    path = repo_root / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"qc-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def smtp_server(tmp_path):
    server = SmtpServer(free_port(), tmp_path / "mails", tmp_path / "smtp.log")
    server.start()
    yield server
    server.stop()


def s3_settings(root: Path, server: MotoServer, bucket: str, **overrides) -> Settings:
    values = {
        "data_root": root, "qc_mode": "s3", "s3_endpoint_url": server.url, "s3_bucket": bucket,
        "s3_prefix": "qc", "s3_access_key_id": "testing", "s3_secret_access_key": "testing",
        "s3_max_attempts": 3, "s3_timeout_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


def ports_for(settings: Settings, **replace):
    ports = dataclasses.replace(publisher_ports(settings), clock=lambda: COMPLETED)
    return dataclasses.replace(ports, **replace) if replace else ports


def reports_ready(root: Path, run_id: str = "run-0001", **kwargs):
    """Run the real reporter over the sample run: the publisher's input, with real files."""
    msg = products_ready(root / "data", run_id=run_id, **kwargs)
    ports = dataclasses.replace(reporter_ports(Settings(data_root=root)), clock=lambda: REPORTED)
    [event] = handle_products_ready(msg, ports)
    return event

"""The published contracts under validators that are not pydantic.

AOG codes against ``docs/schemas`` and ``docs/asyncapi.json`` with its own
tools. Ajv (JSON Schema 2020-12, strict mode, with ajv-formats) must compile
every schema and give the same verdict as ``decode`` on good and bad messages;
the AsyncAPI parser must read the AsyncAPI document without errors. Node and
npm are needed: skipped locally without them, a failure in CI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.messages import (
    MESSAGE_TYPES,
    DeliveredFile,
    DeliveryAnnounced,
    MessageDecodeError,
    decode,
)
from tests.backbone.test_messages import COMMON, examples
from tests.conftest import IN_CI

#: npm installs the validators on first use (minutes on a cold cache).
pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
STAMP = HERE / "node_modules" / ".preimg-lock-sha256"
DELIVERY = "preimg.delivery_announced.v1"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the locked npm packages installed under tests/contracts/node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are needed for the contract checks (apt-get install nodejs npm)")
    lock = hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()
    if not STAMP.is_file() or STAMP.read_text() != lock:
        # --ignore-scripts: the checks need no install script (one dependency's only phones home).
        out = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=HERE,
                             capture_output=True, text=True, timeout=300, check=False)
        if out.returncode != 0:
            _unavailable(f"npm ci failed in {HERE}:\n{out.stdout}{out.stderr}")
        STAMP.write_text(lock)
    return node


def _payload(message) -> dict:
    return json.loads(message.to_json())


def samples() -> list[dict]:
    """Good messages made by the models, and bad ones the models refuse."""
    good = [(f"example {m.type}", m.type, _payload(m), True) for m in examples()]
    delivery = _payload(DeliveryAnnounced(**COMMON, files=(
        DeliveredFile(name="a.fits", path="a.fits", size=1, checksum="md5:" + "0A" * 16),)))
    upper = json.loads(json.dumps(delivery))
    upper["files"][0]["checksum"] = "sha256:" + "AB" * 32

    def bad(name: str, **change) -> tuple[str, str, dict, bool]:
        body = {**delivery, **change}
        return name, DELIVERY, {k: v for k, v in body.items() if v is not None}, False

    def bad_checksum(checksum: str) -> tuple[str, str, dict, bool]:
        return bad(f"checksum {checksum[:12]}", files=[{**delivery["files"][0], "checksum": checksum}])

    return [*good, ("md5 checksum", DELIVERY, delivery, True), ("upper-case checksum", DELIVERY, upper, True),
            bad("missing type", type=None), bad("empty files", files=[]), bad("extra field", extra=1),
            bad("bad run_id", run_id="../x"),
            bad_checksum("sha256:00"), bad_checksum("crc:" + "0" * 8), bad_checksum("sha256:" + "g" * 64),
            bad_checksum("md5:" + "0" * 64), bad_checksum("SHA256:" + "0" * 64)]


def _pydantic_accepts(payload: dict) -> bool:
    try:
        decode(json.dumps(payload).encode())
    except MessageDecodeError:
        return False
    return True


@pytest.mark.parametrize("name, schema, payload, valid", samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_models_agree_with_the_samples(name, schema, payload, valid):
    assert _pydantic_accepts(payload) == valid


def test_ajv_compiles_every_schema_and_agrees_and_the_asyncapi_document_parses(node, repo_root, tmp_path):
    sample_file = tmp_path / "samples.json"
    sample_file.write_text(json.dumps([dict(zip(("name", "schema", "payload", "valid"), s)) for s in samples()]))
    out = subprocess.run([node, str(HERE / "check.mjs"), str(repo_root / "docs"), str(sample_file)],
                         cwd=HERE, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(MESSAGE_TYPES)
    assert f"compiled {n} of {n} schemas" in out.stdout
    assert "parsed AsyncAPI 3.0.0: 3 operations" in out.stdout

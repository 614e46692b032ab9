"""Message contracts: round trips, validation at the boundary, published schemas in step."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from shared.contracts import json_schemas, render
from shared.messages import (
    MESSAGE_TYPES,
    ABResult,
    DeliveredFile,
    DeliveryAnnounced,
    ManifestEntry,
    MessageDecodeError,
    PreImagingCompleted,
    ProductsReady,
    RawDataReady,
    RawFrame,
    ReportsReady,
    RunFailed,
    decode,
    derived_message_id,
)

NOW = datetime(2026, 11, 20, 3, 4, 5, tzinfo=UTC)
COMMON = {"run_id": "HAWKI_20261120T030405_abc123", "delivery_id": "aog-77", "instrument": "HAWKI", "test": True}


def examples():
    frame = RawFrame(name="a.fits", path="/d/a.fits", size=2880, checksum="sha256:00",
                     headers={"DPR.TECH": "IMAGE,PRE", "DET.DIT": 10.0}, classification={"DO.CATG": "OBJECT"})
    return [
        DeliveryAnnounced(**COMMON, files=(DeliveredFile(name="a.fits", path="a.fits", size=2880,
                                                         checksum="sha256:" + "0" * 64),)),
        RawDataReady(**COMMON, raw_dir="/d", frames=(frame,), delivered_at=NOW),
        ProductsReady(**COMMON, raw_dir="/d", sci_dir="/s", log_dir="/l", frames=(frame,),
                      abs=(ABResult(name="ab1", status="FAILED", reason="SIGSEGV"),), products=(), status="failed",
                      delivered_at=NOW),
        ReportsReady(**COMMON, report="/l/R", userreport="/l/U", list_mcalib="/l/M", raw_dir="/d", sci_dir="/s",
                     log_dir="/l", status="ok", n_files=1, abs_ok=1, abs_failed=0, delivered_at=NOW),
        PreImagingCompleted(**COMMON, status="ok", package_dir="/s", package_url="s3://b/p",
                            manifest=(ManifestEntry(name="x.fits", size=1, checksum="sha256:11"),)),
        RunFailed(**COMMON, failed_stage="ingest", reason="file missing"),
    ]


@pytest.mark.parametrize("message", examples(), ids=lambda m: m.type)
def test_round_trip_is_lossless(message):
    assert decode(message.to_json()) == message


def test_every_type_has_an_example():
    assert {type(m) for m in examples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", examples(), ids=lambda m: m.type)
def test_payload_validates_against_the_published_schema(message, repo_root):
    schema = json.loads((repo_root / "docs" / "schemas" / f"{message.type}.json").read_text())
    jsonschema.validate(json.loads(message.to_json()), schema)


def test_messages_are_frozen():
    msg = examples()[0]
    with pytest.raises(ValidationError):
        msg.run_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"type": "preimg.delivery_announced.v2"}', "unknown message type"),
        (json.dumps({"type": "preimg.delivery_announced.v1", **COMMON, "instrument": "hawki", "files": []}).encode(),
         "instrument"),
        (json.dumps({"type": "preimg.delivery_announced.v1", **COMMON, "files": [], "extra": 1}).encode(), "extra"),
        (json.dumps({"type": "preimg.delivery_announced.v1", **COMMON, "run_id": "../x", "files": []}).encode(),
         "run_id"),
        (json.dumps({"type": "preimg.delivery_announced.v1", **COMMON,
                     "files": [{"name": "a", "path": "a", "size": -1, "checksum": "crc:1"}]}).encode(), "files.0.size"),
    ],
)
def test_bad_payloads_fail_at_the_boundary_with_a_reason(body, expected):
    with pytest.raises(MessageDecodeError) as err:
        decode(body)
    assert expected in err.value.reason


def test_checksum_digits_in_either_case_are_stored_lower_case():
    digest = "0123456789ABCDEF" * 4
    f = DeliveredFile(name="a.fits", path="a.fits", size=1, checksum=f"sha256:{digest}")
    assert f.checksum == f"sha256:{digest.lower()}"
    assert DeliveredFile(name="a", path="a", size=1, checksum="md5:" + "AB" * 16).checksum == "md5:" + "ab" * 16


@pytest.mark.parametrize("checksum", ["sha256:00", "md5:" + "0" * 64, "sha256:" + "g" * 64, "SHA256:" + "0" * 64,
                                      "crc:1234", "sha256" + "0" * 64])
def test_checksum_needs_a_known_algorithm_and_a_digest_of_its_length(checksum):
    with pytest.raises(ValidationError, match="checksum"):
        DeliveredFile(name="a", path="a", size=1, checksum=checksum)


def test_a_delivery_lists_at_least_one_file():
    body = json.dumps({"type": "preimg.delivery_announced.v1", **COMMON, "files": []}).encode()
    with pytest.raises(MessageDecodeError, match="files: Tuple should have at least 1 item"):
        decode(body)


@pytest.mark.parametrize("name, schema", json_schemas().items())
def test_every_schema_names_its_dialect_and_id_and_requires_type(name, schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(name)
    assert schema["required"][0] == "type"
    with pytest.raises(jsonschema.ValidationError, match="'type' is a required property"):
        payload = json.loads(next(m for m in examples() if m.type == name).to_json())
        del payload["type"]
        jsonschema.validate(payload, schema)


def test_routing_keys_name_stage_and_instrument():
    assert [m.routing_key for m in examples()] == [
        "delivery.HAWKI", "raw_ready.HAWKI", "products_ready.HAWKI", "reports_ready.HAWKI",
        "completed.HAWKI", "run_failed.HAWKI",
    ]


def test_derived_ids_are_stable_and_distinct():
    assert derived_message_id("r1", "raw_ready") == derived_message_id("r1", "raw_ready")
    assert derived_message_id("r1", "raw_ready") != derived_message_id("r2", "raw_ready")


def test_published_documents_match_the_models(repo_root: Path):
    stale = [str(p.relative_to(repo_root)) for p, text in render(repo_root / "docs").items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"regenerate with `python -m shared.contracts docs`: {stale}"

"""One read per file: the publisher trusts a known SHA-256, hashes the others while uploading,
uploads large files in parts, and lets botocore retry each request.

Reads are counted with an audit hook (every ``open`` of a package file by this
process, s3transfer's threads included) around the handler call.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from services.publisher.handlers import handle_reports_ready
from services.publisher.qc_local import SHA256_XATTR, LocalQcServer
from services.publisher.qc_s3 import S3QcServer
from shared.errors import OperatorActionRequired, RetryableError
from shared.files import deferred_syncs
from shared.messages import ReportsReady
from shared.settings import Settings
from tests.publisher.conftest import ports_for, reports_ready, s3_settings

BASE = "PREIMG/HAWKI"
MIB = 1024 * 1024


def with_checksums(msg: ReportsReady, checksums: dict[str, str]) -> ReportsReady:
    """The message as the reporter sends it: the processor's ``Product.checksum`` of each product."""
    return msg.model_copy(update={"checksums": checksums})


# ---------------------------------------------------------------------------
# counting opens
# ---------------------------------------------------------------------------

_watch: dict[str, collections.Counter] = {}
_watch_lock = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _watch or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    with _watch_lock:
        for counter in _watch.values():
            if path in counter:
                counter[path] += 1


sys.addaudithook(_audit)  # cannot be removed; inert while nothing is watched


@contextlib.contextmanager
def counting_opens(*paths: str | Path):
    """Yields a Counter: how often each of ``paths`` was opened inside the block."""
    counter = collections.Counter({os.path.realpath(p): 0 for p in paths})
    token = str(id(counter))
    with _watch_lock:
        _watch[token] = counter
    try:
        yield counter
    finally:
        with _watch_lock:
            del _watch[token]


def _product(msg: ReportsReady) -> Path:
    [product] = [Path(p) for p in msg.files if p.endswith(".fits")]
    return product


def _full_size_product(msg: ReportsReady, size: int) -> tuple[Path, bytes, str]:
    """Replace the sample product by ``size`` random bytes; return path, bytes, sha256 hex."""
    product = _product(msg)
    data = os.urandom(size)
    product.write_bytes(data)
    return product, data, hashlib.sha256(data).hexdigest()


def _package_files(msg: ReportsReady) -> list[str]:
    return [msg.report, msg.userreport, msg.list_mcalib, *msg.files]


# ---------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------


def test_s3_known_checksum_is_trusted_and_a_replay_reads_nothing(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    msg = reports_ready(tmp_path)
    product, _data, digest = _full_size_product(msg, 3 * MIB)
    msg = with_checksums(msg, {str(product): f"sha256:{digest.upper()}"})

    with counting_opens(*_package_files(msg)) as opens:
        [event] = handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == 1, "read once, for the upload; not hashed"
    assert all(n <= 2 for n in opens.values()), opens  # REPORT: note appended, then uploaded
    [entry] = [e for e in event.manifest if e.name == f"products/{product.name}"]
    assert (entry.checksum, entry.size) == (f"sha256:{digest}", 3 * MIB)
    key = f"qc/{BASE}/runs/run-0001/products/{product.name}"
    head = s3_server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == digest
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digest)).decode()

    with counting_opens(product) as opens:
        [again] = handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == 0, "already there with this SHA-256 and size: not read at all"
    assert again.manifest == event.manifest


def test_s3_a_first_publish_lists_the_package_once_instead_of_a_head_per_file(tmp_path, s3_server, bucket):
    """Round trips to the QC server: one LIST, no HEAD, the first time; a replay HEADs what is there."""
    settings = s3_settings(tmp_path, s3_server, bucket)
    msg = reports_ready(tmp_path)
    product, _data, digest = _full_size_product(msg, 1 * MIB)
    msg = with_checksums(msg, {**msg.checksums, str(product): f"sha256:{digest}"})
    ports = ports_for(settings)
    requests = collections.Counter()
    # The adapter's own client, as the handler uses it; the requests reach the moto server process.
    ports.qc._s3().meta.events.register("before-call.s3.*", lambda model, **_: requests.update([model.name]))
    package = f"qc/{BASE}/runs/run-0001/"

    handle_reports_ready(msg, ports)
    assert requests["HeadObject"] == 0, requests
    assert requests["ListObjectsV2"] >= 1
    stored = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=package)["KeyCount"]
    known = sum(1 for name in msg.checksums if name != msg.report)

    requests.clear()
    with counting_opens(product) as opens:
        handle_reports_ready(msg, ports)
    assert opens[str(product)] == 0, "a replay still proves the product is there without reading it"
    assert requests["HeadObject"] == known < stored, (requests, known, stored)


def test_s3_unknown_checksum_is_computed_from_the_bytes_uploaded(tmp_path, s3_server, bucket):
    settings = s3_settings(tmp_path, s3_server, bucket)
    msg = reports_ready(tmp_path)
    product, _data, digest = _full_size_product(msg, 3 * MIB)

    with counting_opens(*_package_files(msg)) as opens:
        [event] = handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == 1
    [entry] = [e for e in event.manifest if e.name == f"products/{product.name}"]
    assert entry.checksum == f"sha256:{digest}"
    key = f"qc/{BASE}/runs/run-0001/products/{product.name}"
    assert s3_server.client().head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == digest


@pytest.mark.parametrize("known", [True, False], ids=["known-sha256", "hashed-on-upload"])
def test_s3_file_above_the_multipart_threshold_goes_up_in_parts(tmp_path, s3_server, bucket, known):
    settings = s3_settings(tmp_path, s3_server, bucket, s3_multipart_threshold_mb=5,
                           s3_multipart_chunk_mb=5, s3_max_concurrency=2)
    msg = reports_ready(tmp_path)
    product, data, digest = _full_size_product(msg, 12 * MIB + 12345)
    if known:
        msg = with_checksums(msg, {str(product): f"sha256:{digest}"})

    with counting_opens(product) as opens:
        [event] = handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == 1, "one open, read in order; parts are sent from memory"

    [entry] = [e for e in event.manifest if e.name == f"products/{product.name}"]
    assert (entry.checksum, entry.size) == (f"sha256:{digest}", len(data))
    client = s3_server.client()
    key = f"qc/{BASE}/runs/run-0001/products/{product.name}"
    head = client.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].endswith('-3"'), f"three parts of 5 MiB: {head['ETag']}"
    assert head["ContentType"] == "application/fits"
    # Each part carried its SHA-256, which the server keeps as a checksum of the part checksums.
    attributes = client.get_object_attributes(Bucket=bucket, Key=key,
                                              ObjectAttributes=["Checksum", "ObjectSize"])
    parts = [hashlib.sha256(data[i:i + 5 * MIB]).digest() for i in range(0, len(data), 5 * MIB)]
    composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
    assert attributes["Checksum"]["ChecksumSHA256"].split("-")[0] == composite
    assert attributes["ObjectSize"] == len(data)
    # The whole-file SHA-256 travels as metadata when it is known before the upload starts.
    assert head["Metadata"].get("sha256") == (digest if known else None)
    assert hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest() \
        == digest

    with counting_opens(product) as opens:
        handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == (0 if known else 1), "a replay skips what it can prove is there"


def test_s3_upload_whose_size_the_server_does_not_confirm_is_retried_later(tmp_path, s3_server,
                                                                           bucket):
    class ShortServer(S3QcServer):
        def head(self, key):
            info = super().head(key)
            return info and info.__class__(info.size - 1, info.sha256, info.etag)

    path = tmp_path / "big.fits"
    path.write_bytes(os.urandom(6 * MIB))
    qc = ShortServer(endpoint_url=s3_server.url, bucket=bucket, access_key_id="testing",
                     secret_access_key="testing", multipart_threshold=5 * MIB,
                     multipart_chunksize=5 * MIB)
    with pytest.raises(RetryableError, match="not verified"):
        qc.put("k/big.fits", path, content_type="application/fits", sha256="0" * 64)


# ---------------------------------------------------------------------------
# local directory
# ---------------------------------------------------------------------------


def _xattrs_supported(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()


def test_local_known_checksum_is_linked_with_its_digest_and_head_reads_nothing(tmp_path):
    if not _xattrs_supported(tmp_path):
        pytest.skip("no user extended attributes on this file system")
    settings = Settings(data_root=tmp_path)
    msg = reports_ready(tmp_path)
    product, _data, digest = _full_size_product(msg, 3 * MIB)
    msg = with_checksums(msg, {str(product): f"sha256:{digest}"})
    qc_dir = settings.qc_local_dir()
    copy = qc_dir / BASE / "runs" / "run-0001" / "products" / product.name

    with counting_opens(*_package_files(msg)) as opens:
        [event] = handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == 0, "hard-linked into the QC directory: neither read nor hashed"
    assert copy.stat().st_ino == product.stat().st_ino
    assert os.getxattr(copy, SHA256_XATTR).decode() == digest
    # Every object carries its digest, the ones hashed while copied included.
    for entry in event.manifest:
        stored = qc_dir / BASE / "runs" / "run-0001" / entry.name
        assert "sha256:" + os.getxattr(stored, SHA256_XATTR).decode() == entry.checksum

    with counting_opens(product, copy) as opens:
        handle_reports_ready(msg, ports_for(settings))
    assert opens[str(product)] == 0, "the copy is there with this SHA-256: nothing read"
    assert opens[str(copy)] == 1, "head() opens the copy for its size and attribute, reads nothing"


def test_local_package_directory_names_are_synced_with_the_package(tmp_path):
    # The package's new directories (runs/<run>/, products/) must survive a crash once the
    # completion is out: under the runner their parents are synced in the record's round.
    settings = Settings(data_root=tmp_path)
    msg = reports_ready(tmp_path)
    qc_dir = settings.qc_local_dir()
    with deferred_syncs() as pending:
        handle_reports_ready(msg, ports_for(settings))
    package = qc_dir / BASE / "runs" / "run-0001"
    assert {package.parent, package} <= set(pending)


def test_local_head_without_a_recorded_checksum_reports_none(tmp_path):
    qc = LocalQcServer(tmp_path / "qc")
    target = tmp_path / "qc" / "PREIMG" / "x.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"copied in by hand")
    info = qc.head("PREIMG/x.txt")
    assert info is not None and (info.size, info.sha256) == (17, "")
    assert qc.put("PREIMG/x.txt", b"new", content_type="text/plain") == hashlib.sha256(b"new").hexdigest()
    assert qc.head("PREIMG/x.txt").size == 3


# ---------------------------------------------------------------------------
# botocore's retries
# ---------------------------------------------------------------------------


class _FlakyS3(BaseHTTPRequestHandler):
    """Answers 500 InternalError to the first ``failures`` requests, then accepts PUTs."""

    protocol_version = "HTTP/1.1"
    failures: ClassVar[int] = 0
    seen: ClassVar[list[str]] = []

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(self.path)
        if len(self.seen) <= self.failures:
            body = b"<Error><Code>InternalError</Code><Message>Try again.</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("ETag", '"0"')
        self.send_header("x-amz-checksum-sha256", self.headers["x-amz-checksum-sha256"])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def flaky_s3(failures: int):
    handler = type("Flaky", (_FlakyS3,), {"failures": failures, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


def _flaky_adapter(url: str, retries: list[str]) -> S3QcServer:
    return S3QcServer(endpoint_url=url, bucket="qc-flaky", access_key_id="testing",
                      secret_access_key="testing", attempts=3, timeout_s=2, on_retry=retries.append)


def test_botocore_retries_a_request_and_each_retry_is_counted():
    retries: list[str] = []
    with flaky_s3(failures=2) as (url, seen):
        digest = _flaky_adapter(url, retries).put("a/b.txt", b"data", content_type="text/plain")
    assert digest == hashlib.sha256(b"data").hexdigest()
    assert len(seen) == 3 and retries == ["PutObject", "PutObject"]


def test_a_request_failing_every_attempt_is_retryable_for_the_runner():
    retries: list[str] = []
    with flaky_s3(failures=100) as (url, seen), pytest.raises(RetryableError,
                                                               match="up to 3 attempts"):
        _flaky_adapter(url, retries).put("a/b.txt", b"data", content_type="text/plain")
    assert len(seen) == 3 and len(retries) == 2


def test_transient_and_permanent_s3_errors_are_told_apart():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    assert S3QcServer._is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert S3QcServer._is_transient(client_error(503, "SlowDown"))
    assert S3QcServer._is_transient(client_error(500, "InternalError"))
    assert not S3QcServer._is_transient(client_error(403, "AccessDenied"))
    assert not S3QcServer._is_transient(client_error(404, "NoSuchBucket"))

    def failing(error: Exception):
        def request():
            raise error
        return request

    server = S3QcServer(endpoint_url="http://x", bucket="b")
    with pytest.raises(RetryableError, match="not the one sent with them"):
        server._call("put k", failing(client_error(400, "BadDigest")))
    with pytest.raises(OperatorActionRequired, match="write access to the bucket"):
        server._call("put k", failing(client_error(403, "AccessDenied")))
    with pytest.raises(OperatorActionRequired, match="create the bucket or correct PREIMG_S3_BUCKET"):
        server._call("put k", failing(client_error(404, "NoSuchBucket")))


def test_transfer_threads_see_the_run_of_the_caller():
    """Part uploads run in s3transfer's threads; their retries are counted for the right run."""
    from services.publisher.qc_s3 import _ContextThreadPool
    from shared.logs import current_context, log_context

    with _ContextThreadPool(max_workers=2) as pool, log_context(run_id="r-1", instrument="HAWKI"):
        seen = pool.submit(current_context).result()
    assert seen == {"run_id": "r-1", "instrument": "HAWKI"}

"""The QC server as an S3-compatible bucket (AWS, MinIO, moto) through boto3 (``PREIMG_QC_MODE=s3``)."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from services.publisher.qcserver import MIB, ObjectInfo, safe_key
from shared.errors import OperatorActionRequired, RetryableError

_log = logging.getLogger(__name__)


#: S3 error codes that mean "try again", whatever the HTTP status says.
RETRYABLE_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "503", "500", "502", "504",
}
#: Refusals only an operator can mend, with what to check.
OPERATOR_CODES = {
    "NoSuchBucket": "create the bucket or correct PREIMG_S3_BUCKET",
    "AccessDenied": "grant the publisher's identity write access to the bucket and prefix (PREIMG_S3_PREFIX)",
    "AllAccessDisabled": "the bucket's access is disabled; an S3 administrator must enable it",
    "InvalidAccessKeyId": "correct PREIMG_S3_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "correct PREIMG_S3_SECRET_ACCESS_KEY",
    "InvalidBucketName": "correct PREIMG_S3_BUCKET",
    "AccountProblem": "the S3 account has a problem; an S3 administrator must look at it",
}
#: The server computed another SHA-256 than the one sent with the bytes.
CHECKSUM_MISMATCH_CODES = {"BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest"}


def _b64(sha256: str) -> str:
    """Hex digest -> the base64 form S3's ``ChecksumSHA256`` uses."""
    return base64.b64encode(bytes.fromhex(sha256)).decode()


class _ForwardReader:
    """A file as a stream: read once, in order, optionally hashed on the way.

    It has no ``seek``, so s3transfer reads it part by part into memory and
    uploads the parts from there: botocore's checksum of each part (and, over
    plain http, its payload signature) is computed from those buffers, never by
    reading the file again, whatever the transport.
    """

    def __init__(self, stream: IO[bytes], hashing: bool):
        self._stream = stream
        self._digest = hashlib.sha256() if hashing else None
        self.size = 0

    def read(self, amount: int = -1) -> bytes:
        data = self._stream.read(amount)
        if self._digest is not None:
            self._digest.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        assert self._digest is not None
        return self._digest.hexdigest()


class _ContextThreadPool(ThreadPoolExecutor):
    """s3transfer's worker threads run in the caller's context (run_id, instrument for logs and metrics)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


class S3QcServer:
    """An S3-compatible bucket (AWS, MinIO, moto) reached through boto3.

    Each request is tried ``attempts`` times by botocore (standard retry mode:
    connection errors, timeouts, 5xx, throttling; exponential back-off with
    jitter), each part of a multipart upload on its own; every retry is logged
    and reported to ``on_retry``. Then :class:`RetryableError` sends the
    message back to the broker for a later try. The boto3 client is made on
    first use, so constructing the adapter does no I/O.

    Files smaller than ``multipart_threshold`` are read once into memory and
    sent with one PutObject carrying ``ChecksumSHA256``: the server checks the
    bytes against the whole-file SHA-256 and stores it. Larger files go through
    boto3's managed transfer (parts of ``multipart_chunksize``, up to
    ``max_concurrency`` at once), each part with its SHA-256 checked by the
    server; the whole-file SHA-256 is stored as user metadata and the object's
    size is checked with a HEAD afterwards.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None,
        bucket: str,
        prefix: str = "",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        attempts: int = 5,
        timeout_s: float = 10.0,
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 16 * MIB,
        max_concurrency: int = 4,
        public_url: str = "",
        on_retry: Callable[[str], None] | None = None,
    ):
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.public_url = public_url
        self.on_retry = on_retry
        self._client: Any = None

    # -- plumbing -------------------------------------------------------------

    def _s3(self) -> Any:
        if self._client is None:
            import boto3  # only when the first request is made
            from botocore.config import Config

            # A session per adapter: boto3's default session is not thread-safe,
            # and two publishers in one process must not share it.
            session = boto3.session.Session()
            client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                region_name=self.region,
                config=Config(
                    # total_max_attempts counts the first try; botocore's max_attempts would not.
                    retries={"mode": "standard", "total_max_attempts": self.attempts},
                    connect_timeout=self.timeout_s,
                    read_timeout=self.timeout_s,
                    max_pool_connections=max(10, self.max_concurrency),
                    s3={"addressing_style": "path"},
                ),
            )
            client.meta.events.register("needs-retry.s3", self._note_failure)
            client.meta.events.register("request-created.s3", self._count_retry)
            self._client = client
        return self._client

    @staticmethod
    def _note_failure(request_dict: dict[str, Any], response: Any = None,
                      caught_exception: Exception | None = None, **_: Any) -> None:
        """Remember why an attempt failed, for the log line of the retry (decides nothing)."""
        if caught_exception is not None:
            reason = str(caught_exception)
        elif response is not None:
            status = response[1].get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            reason = f"HTTP {status} {response[1].get('Error', {}).get('Code', '')}".strip()
        else:
            return
        request_dict["context"]["preimg_failure"] = reason

    def _count_retry(self, request: Any, operation_name: str = "", **_: Any) -> None:
        """Every attempt after the first is a retry: log it and count it."""
        context = getattr(request, "context", {}) or {}
        attempt = context.get("retries", {}).get("attempt", 1)
        if attempt > 1:
            _log.warning("S3 %s at %s bucket %s: attempt %d/%d after: %s", operation_name,
                         self.endpoint_url or "AWS", self.bucket, attempt, self.attempts,
                         context.get("preimg_failure", "?"))
            if self.on_retry is not None:
                self.on_retry(operation_name)

    def _key(self, key: str) -> str:
        return self.prefix + safe_key(key)

    @staticmethod
    def _is_transient(error: Exception) -> bool:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        if isinstance(error, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
                              ReadTimeoutError, ConnectionError)):
            return True
        if isinstance(error, ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = str(error.response.get("Error", {}).get("Code", ""))
            return status >= 500 or code in RETRYABLE_CODES
        # urllib3 errors that botocore does not wrap (e.g. a reset mid-body).
        return type(error).__module__.startswith(("urllib3", "botocore.exceptions")) and \
            "Connection" in type(error).__name__

    def _call(self, what: str, request: Callable[[], Any]) -> Any:
        """One request (botocore retries it); its failure as the runner understands it."""
        try:
            return request()
        except Exception as e:
            if self._is_transient(e):
                raise RetryableError(
                    f"S3 {what} at {self.endpoint_url or 'AWS'} bucket {self.bucket} failed "
                    f"(up to {self.attempts} attempts), last: {e}"
                ) from e
            refused = self._refused(what, e)
            if refused is e:
                raise
            raise refused from e

    def _refused(self, what: str, error: Exception) -> Exception:
        """An S3 answer that is not transient, as the runner must treat it.

        A refusal only configuration can mend (no such bucket, access denied,
        bad credentials) is :class:`OperatorActionRequired`: dead-lettered at
        once with the reason, replayed once mended. A checksum the server
        disputes is worth another try (damaged in transit). botocore already
        retried what is transient inside this attempt.
        """
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.endpoint_url or 'AWS'} (bucket {self.bucket})"
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in CHECKSUM_MISMATCH_CODES:
                return RetryableError(
                    f"S3 {what}: the server received bytes whose SHA-256 is not the one sent with "
                    f"them ({code}): damaged in transit, or the file changed after it was hashed"
                )
            if code in OPERATOR_CODES:
                return OperatorActionRequired(
                    f"S3 {what} refused by {where}: {code}: {error}; {OPERATOR_CODES[code]}"
                )
            return RetryableError(f"S3 {what} refused by {where}: {code}: {error}")
        if isinstance(error, NoCredentialsError):
            return OperatorActionRequired(
                f"S3 {what} at {where}: no credentials; set PREIMG_S3_ACCESS_KEY_ID and "
                "PREIMG_S3_SECRET_ACCESS_KEY (or the pod's credentials)")
        if isinstance(error, BotoCoreError):
            return RetryableError(f"S3 {what} failed: {error}")
        return error

    @staticmethod
    def _is_missing(error: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return False
        code = str(error.response.get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    # -- port -----------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        def request() -> bytes | None:
            try:
                answer = self._s3().get_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as e:
                if self._is_missing(e):
                    return None
                raise
            return answer["Body"].read()

        return self._call(f"get {key}", request)

    def head(self, key: str) -> ObjectInfo | None:
        def request() -> ObjectInfo | None:
            try:
                answer = self._s3().head_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as e:
                if self._is_missing(e):
                    return None
                raise
            return ObjectInfo(
                size=answer["ContentLength"],
                sha256=answer.get("Metadata", {}).get("sha256", ""),
                etag=answer.get("ETag", ""),
            )

        return self._call(f"head {key}", request)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to defer: an object is durable when its PUT returns."""
        return contextlib.nullcontext()

    def put(self, key: str, body: bytes | Path, *, content_type: str,
            sha256: str | None = None, durable: bool = True) -> str:
        # S3 has no cheaper, less durable PUT: ``durable`` changes nothing here.
        if isinstance(body, bytes):
            return self._put_object(key, body, content_type, sha256)
        size = body.stat().st_size
        if size < self.multipart_threshold:
            # One read; the digest, when not given, is computed from these bytes, and a
            # retried request resends them without reading the file again.
            return self._put_object(key, body.read_bytes(), content_type, sha256)
        return self._upload(key, body, size, content_type, sha256)

    def _put_object(self, key: str, data: bytes, content_type: str, sha256: str | None) -> str:
        digest = sha256 or hashlib.sha256(data).hexdigest()
        checksum = _b64(digest)
        # ChecksumSHA256 makes the server verify the bytes it stored against the digest
        # (AWS, MinIO; moto only records it); the metadata copy is what head() reads back.
        answer = self._call(f"put {key}", lambda: self._s3().put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum, Metadata={"sha256": digest},
        ))
        stored = answer.get("ChecksumSHA256")
        if stored is None:  # a server that ignores checksums: at least the size must be right
            self._verify(key, len(data), digest)
        elif stored != checksum:
            raise RetryableError(f"S3 put {key}: the server recorded SHA-256 {stored}, "
                                 f"{checksum} was sent; will upload again")
        return digest

    def _upload(self, key: str, path: Path, size: int, content_type: str,
                sha256: str | None) -> str:
        """A large file through boto3's managed transfer (multipart, parts in parallel)."""
        extra: dict[str, Any] = {"ContentType": content_type, "ChecksumAlgorithm": "SHA256"}
        if sha256 is not None:
            extra["Metadata"] = {"sha256": sha256}
        # Without a digest, the file is hashed as it streams by. The object then cannot
        # carry the digest as metadata (it is known only at the end), so head() reports
        # none and a replay uploads it again; the manifest and SHA256SUMS have it.
        with path.open("rb") as stream:
            reader = _ForwardReader(stream, hashing=sha256 is None)
            self._call(f"upload {key}", lambda: self._transfer(key, reader, extra))
        if reader.size != size:
            raise RetryableError(f"{path} changed while it was uploaded ({size} bytes, "
                                 f"{reader.size} read); will upload it again")
        self._verify(key, size, sha256)
        return sha256 or reader.hexdigest()

    def _transfer(self, key: str, source: _ForwardReader, extra: dict[str, Any]) -> None:
        from boto3.s3.transfer import TransferConfig
        from s3transfer.manager import TransferManager

        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
        )
        # The stream is read into part-sized buffers: those being sent and one read ahead.
        config.max_in_memory_upload_chunks = self.max_concurrency + 1
        with TransferManager(self._s3(), config, executor_cls=_ContextThreadPool) as manager:
            manager.upload(source, self.bucket, self._key(key), extra_args=extra).result()

    def _verify(self, key: str, size: int, sha256: str | None) -> None:
        """The object the server holds now has the size (and recorded SHA-256) just sent."""
        info = self.head(key)
        if info is None or info.size != size or (sha256 is not None and info.sha256 != sha256):
            held = "nothing" if info is None else f"{info.size} bytes, sha256 {info.sha256 or 'none'}"
            sent = f"{size} bytes" + (f", sha256 {sha256}" if sha256 else "")
            raise RetryableError(f"S3 upload of {key} not verified: the server holds {held}, "
                                 f"{sent} were sent; will upload again")

    def list(self, prefix: str, limit: int | None = None) -> dict[str, str]:
        def request() -> dict[str, str]:
            found: dict[str, str] = {}
            paginator = self._s3().get_paginator("list_objects_v2")
            pages = {"PageSize": min(limit, 1000), "MaxItems": limit} if limit is not None else {}
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix,
                                           PaginationConfig=pages):
                for item in page.get("Contents", ()):
                    found[item["Key"][len(self.prefix):]] = item["ETag"]
            return found

        return self._call(f"list {prefix}", request)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}",
                   lambda: self._s3().delete_object(Bucket=self.bucket, Key=self._key(key)))

    def url(self, key: str) -> str:
        if self.public_url:
            return f"{self.public_url.rstrip('/')}/{key}"
        return f"s3://{self.bucket}/{self.prefix}{key}"

"""The QC server port and its two adapters: an S3 bucket, or a local directory.

processPreImg copied the REPORT and the monitor page to ``qc@stargate1`` with
scp. Here the QC server is an S3-compatible bucket in the distributed set-up
(:class:`S3QcServer`, boto3) and a directory with the same key layout in the
embedded default (:class:`LocalQcServer`). Both store objects under logical keys
such as ``PREIMG/HAWKI/preimgMonitor.html``; the S3 adapter puts its configured
prefix in front.

Every object carries its SHA-256 (S3 user metadata ``sha256``; computed from
the file for the local directory), so a replay can skip what is already there
and a reader can verify what it fetched.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.errors import RetryableError
from shared.files import sha256_of, write_atomic

_log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str
    etag: str


class QcServer(Protocol):
    """Where packages, reports and the monitor page are published."""

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def head(self, key: str) -> ObjectInfo | None:
        """Size, SHA-256 and ETag of the object, or None when it does not exist."""

    def put(self, key: str, body: bytes | Path, *, sha256: str, content_type: str) -> None:
        """Store ``body`` (bytes, or a file to stream) under ``key``, replacing any object."""

    def list(self, prefix: str) -> dict[str, str]:
        """Every key under ``prefix`` with its ETag (changes whenever the object changes)."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def url(self, key: str) -> str:
        """Where a person or AOG finds the object."""


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise ValueError(f"invalid QC server key {key!r}")
    return key


# ---------------------------------------------------------------------------
# local directory
# ---------------------------------------------------------------------------


class LocalQcServer:
    """A directory laid out like the bucket: ``<root>/<key>``.

    Writes go through a temp file, fsync and rename, so a reader (or a second
    publisher) sees the old or the new object, never half of one.
    """

    def __init__(self, root: Path, public_url: str = ""):
        self.root = root
        self.public_url = public_url

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RetryableError(f"cannot read {key} from the QC directory {self.root}: {e}") from e

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = path.stat()
            return ObjectInfo(stat.st_size, sha256_of(path), self._etag(stat))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RetryableError(f"cannot stat {key} in the QC directory {self.root}: {e}") from e

    @staticmethod
    def _etag(stat: os.stat_result) -> str:
        # Every write is a rename of a new file: a new inode, so the tag changes.
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"

    def put(self, key: str, body: bytes | Path, *, sha256: str, content_type: str) -> None:
        try:
            write_atomic(self._path(key), body)
        except OSError as e:
            raise RetryableError(f"cannot write {key} into the QC directory {self.root}: {e}") from e

    def list(self, prefix: str) -> dict[str, str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        found: dict[str, str] = {}
        if not base.is_dir():
            return found
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # another writer's file in flight
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    found[key] = self._etag(path.stat())
                except FileNotFoundError:
                    continue  # deleted while we walked
        return found

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise RetryableError(f"cannot delete {key} from the QC directory {self.root}: {e}") from e
        # A bucket has no directories: drop the ones the delete left empty.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def url(self, key: str) -> str:
        if self.public_url:
            return f"{self.public_url.rstrip('/')}/{key}"
        return (self.root / key).resolve().as_uri() if key else self.root.resolve().as_uri() + "/"


# ---------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------

#: S3 error codes that mean "try again", whatever the HTTP status says.
RETRYABLE_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "503", "500", "502", "504",
}


class S3QcServer:
    """An S3-compatible bucket (AWS, MinIO, moto) reached through boto3.

    Each request is tried ``attempts`` times with exponential back-off on
    connection errors and 5xx answers; then :class:`RetryableError` sends the
    message back to the broker for a later try. The boto3 client is made on
    first use, so constructing the adapter does no I/O.
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
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        timeout_s: float = 10.0,
        public_url: str = "",
        on_retry: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.region = region
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.public_url = public_url
        self.on_retry = on_retry
        self.sleep = sleep
        self._client: Any = None

    # -- plumbing -------------------------------------------------------------

    def _s3(self) -> Any:
        if self._client is None:
            import boto3  # only when the first request is made
            from botocore.config import Config

            # A session per adapter: boto3's default session is not thread-safe,
            # and two publishers in one process must not share it.
            session = boto3.session.Session()
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                region_name=self.region,
                config=Config(
                    # Our own loop retries (with the metric and the RetryableError); botocore's
                    # silent retries would multiply the waits.
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=self.timeout_s,
                    read_timeout=self.timeout_s,
                    s3={"addressing_style": "path"},
                ),
            )
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + _safe_key(key)

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
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return request()
            except Exception as e:
                if not self._is_transient(e):
                    refused = self._refused(what, e)
                    if refused is e:
                        raise
                    raise refused from e
                if attempt == self.attempts:
                    raise RetryableError(
                        f"S3 {what} at {self.endpoint_url or 'AWS'} bucket {self.bucket} failed "
                        f"{self.attempts} times, last: {e}"
                    ) from e
                _log.warning("S3 %s failed (attempt %d/%d), retrying in %.1f s: %s",
                             what, attempt, self.attempts, delay, e)
                if self.on_retry is not None:
                    self.on_retry(what)
                self.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
        raise AssertionError("unreachable")

    def _refused(self, what: str, error: Exception) -> Exception:
        """An S3 answer that is not transient: a configuration problem an operator must fix.

        It stays retryable (the runner retries, then dead-letters it with this
        reason), so the delivery can be replayed once the bucket or credentials are right.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            return RetryableError(
                f"S3 {what} refused by {self.endpoint_url or 'AWS'} (bucket {self.bucket}): {code}: "
                f"{error}; check PREIMG_S3_BUCKET, PREIMG_S3_PREFIX and the credentials"
            )
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

    def put(self, key: str, body: bytes | Path, *, sha256: str, content_type: str) -> None:
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()

        def request() -> None:
            # A file is reopened on every attempt: a failed try may have consumed it.
            if isinstance(body, Path):
                with body.open("rb") as stream:
                    self._put(key, stream, sha256, checksum, content_type)
            else:
                self._put(key, body, sha256, checksum, content_type)

        self._call(f"put {key}", request)

    def _put(self, key: str, body: Any, sha256: str, checksum: str, content_type: str) -> None:
        # ChecksumSHA256 makes the server verify the bytes it stored against our
        # digest; the metadata copy is what head() reads back.
        self._s3().put_object(
            Bucket=self.bucket, Key=self._key(key), Body=body, ContentType=content_type,
            ChecksumSHA256=checksum, Metadata={"sha256": sha256},
        )

    def list(self, prefix: str) -> dict[str, str]:
        def request() -> dict[str, str]:
            found: dict[str, str] = {}
            paginator = self._s3().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
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

"""The QC server port and its two adapters: an S3 bucket, or a local directory.

processPreImg copied the REPORT and the monitor page to ``qc@stargate1`` with
scp. Here the QC server is an S3-compatible bucket in the distributed set-up
(:class:`S3QcServer`, boto3) and a directory with the same key layout in the
embedded default (:class:`LocalQcServer`). Both store objects under logical keys
such as ``PREIMG/HAWKI/preimgMonitor.html``; the S3 adapter puts its configured
prefix in front.

Every object carries its SHA-256, recorded when it is written and never
recomputed by reading the object back: S3 user metadata ``sha256`` (S3 itself
checks the bytes against ``ChecksumSHA256``), the extended attribute
``user.preimg.sha256`` of a file in the local directory. The digest is the
caller's when it has one (the processor computed it while moving a product);
otherwise it is computed from the bytes read for the upload. Either way a
file is read once, so a replay can skip what is already there without
reading anything.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import errno
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from shared.errors import OperatorActionRequired, RetryableError
from shared.files import CHUNK, TEMP_NAME, sync_all, temp_file_beside

_log = logging.getLogger(__name__)

MIB = 1024 * 1024
_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    #: Hex SHA-256 recorded when the object was written; "" when none was recorded.
    sha256: str
    etag: str


class QcServer(Protocol):
    """Where packages, reports and the monitor page are published."""

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def head(self, key: str) -> ObjectInfo | None:
        """Size, recorded SHA-256 and ETag of the object (nothing is read), or None."""

    def put(self, key: str, body: bytes | Path, *, content_type: str,
            sha256: str | None = None, durable: bool = True) -> str:
        """Store ``body`` (bytes, or a file to stream) under ``key``, replacing any object.

        ``sha256`` is the body's hex digest when the caller knows it: it is
        trusted (the file is not read to hash it) and stored with the object.
        None: it is computed from the bytes read for the upload. Returns the
        hex SHA-256 recorded with the object. ``durable=False`` for an object
        rebuilt whenever it is missing (the monitor page): a store that must
        sync to be durable may skip that; readers still never see half of it.
        """

    def list(self, prefix: str) -> dict[str, str]:
        """Every key under ``prefix`` with its ETag (changes whenever the object changes)."""

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Puts inside the block may defer their durability to its end (one sync for a package)."""

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


#: Extended attribute holding an object's hex SHA-256 in the local QC directory.
SHA256_XATTR = "user.preimg.sha256"


@dataclass(frozen=True)
class _StagedObject:
    """An object written beside its key, waiting to be renamed into place."""

    tmp: Path
    target: Path
    #: The temporary file's bytes still need a sync (False for a hard link of a durable file).
    sync: bool


def _stage_object(target: Path, body: bytes | Path, sha256: str | None) -> tuple[_StagedObject, str]:
    """Write ``body`` into a temporary file beside ``target`` with its SHA-256 attached; nothing synced.

    A file is read once: hashed while copied when ``sha256`` is None. A file
    whose digest is known is hard-linked instead when it lies on the same
    file system (the processor made it durable): nothing is read or copied.
    The digest is set on the temporary file, so after the rename the object
    and its SHA-256 appear together.
    """
    if isinstance(body, Path) and sha256 is not None:
        linked = _link_temp(body, target, sha256)
        if linked is not None:
            return _StagedObject(linked, target, sync=False), sha256
    fd, name = temp_file_beside(target)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(body, Path):
                digest = hashlib.sha256() if sha256 is None else None
                with body.open("rb") as source:
                    size = os.fstat(source.fileno()).st_size
                    copied = 0
                    for chunk in iter(lambda: source.read(CHUNK), b""):
                        out.write(chunk)
                        copied += len(chunk)
                        if digest is not None:
                            digest.update(chunk)
                if copied != size:
                    raise RetryableError(f"{body} changed while it was copied ({size} bytes, "
                                         f"{copied} read); will copy it again")
                sha256 = sha256 or digest.hexdigest()  # type: ignore[union-attr]
            else:
                out.write(body)
                sha256 = sha256 or hashlib.sha256(body).hexdigest()
            out.flush()
            _set_sha256(out.fileno(), sha256)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the QC web server reads these
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _StagedObject(tmp, target, sync=True), sha256


def _link_temp(source: Path, target: Path, sha256: str) -> Path | None:
    """Hard-link ``source`` beside ``target`` under a temporary name, its SHA-256 attached.

    None when the two lie on different file systems or links are not
    allowed there: the caller copies instead.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = TEMP_NAME
    tmp = target.parent / f"{prefix}{target.name}.{secrets.token_hex(6)}{suffix}"
    try:
        os.link(source, tmp)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return None
        raise
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            _set_sha256(fd, sha256)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(staged: list[_StagedObject], durable: bool = True) -> None:
    """Rename staged objects into place: their bytes synced together first, their directories after.

    Objects appear only once their bytes are durable, so a replay that finds
    an object with the right SHA-256 and size can trust it.
    """
    try:
        if durable:
            sync_all([s.tmp for s in staged if s.sync])
        for s in staged:
            os.replace(s.tmp, s.target)
    except BaseException:
        _discard(staged)
        raise
    if durable:
        sync_all({s.target.parent for s in staged})


def _discard(staged: list[_StagedObject]) -> None:
    for s in staged:
        s.tmp.unlink(missing_ok=True)


def _set_sha256(fd: int, sha256: str) -> None:
    setxattr = getattr(os, "setxattr", None)  # Linux only
    if setxattr is None:
        return
    try:
        setxattr(fd, SHA256_XATTR, sha256.encode("ascii"))
    except OSError as e:
        # A file system without user attributes: the object is fine, its digest is
        # unknown to head(), so a replay copies the file again.
        _log.debug("cannot set %s (%s): replays will copy again", SHA256_XATTR, e)


def _get_sha256(fd: int) -> str:
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return ""
    try:
        value = getxattr(fd, SHA256_XATTR).decode("ascii", "replace")
    except OSError:
        return ""  # not recorded (an older object, or no user attributes here)
    return value if _HEX_SHA256.match(value) else ""


class LocalQcServer:
    """A directory laid out like the bucket: ``<root>/<key>``.

    Writes go through a temp file, fsync and rename, so a reader (or a second
    publisher) sees the old or the new object, never half of one. Each file
    carries its SHA-256 in the extended attribute ``user.preimg.sha256``, set
    before the rename, which :meth:`head` reads instead of hashing the file.
    """

    def __init__(self, root: Path, public_url: str = ""):
        self.root = root
        self.public_url = public_url
        self._resolved_root = root.resolve()
        self._batch_depth = 0
        self._staged: list[_StagedObject] = []

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Puts inside the block are staged, and appear together when it ends: their bytes synced
        in one round, renamed into place, their directories synced in one more round (a package of
        18 files: two rounds of concurrent syncs instead of 36 syncs one after another). An error
        inside the block discards them."""
        self._batch_depth += 1
        try:
            yield
        except BaseException:
            self._batch_depth -= 1
            if not self._batch_depth:
                staged, self._staged = self._staged, []
                _discard(staged)
            raise
        self._batch_depth -= 1
        if not self._batch_depth:
            staged, self._staged = self._staged, []
            try:
                _commit(staged)
            except OSError as e:
                raise RetryableError(f"cannot write into the QC directory {self.root}: {e}") from e
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
        try:
            # One descriptor for the size and the attribute: both describe the same file
            # even if a writer renames a new one over it meanwhile. Nothing is read.
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RetryableError(f"cannot stat {key} in the QC directory {self.root}: {e}") from e
        try:
            stat = os.fstat(fd)
            return ObjectInfo(stat.st_size, _get_sha256(fd), self._etag(stat))
        finally:
            os.close(fd)

    @staticmethod
    def _etag(stat: os.stat_result) -> str:
        # Every write is a rename of a new file: a new inode, so the tag changes.
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"

    def put(self, key: str, body: bytes | Path, *, content_type: str,
            sha256: str | None = None, durable: bool = True) -> str:
        target = self._path(key)
        try:
            staged, digest = _stage_object(target, body, sha256)
            if self._batch_depth:
                self._staged.append(staged)
            else:
                _commit([staged], durable=durable)
        except OSError as e:
            raise RetryableError(f"cannot write {key} into the QC directory {self.root}: {e}") from e
        return digest

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
        return (self._resolved_root / _safe_key(key)).as_uri() if key else self._resolved_root.as_uri() + "/"


# ---------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------

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

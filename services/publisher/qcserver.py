"""The QC server port and its two adapters: an S3 bucket, or a local directory.

processPreImg copied the REPORT and the monitor page to ``qc@stargate1`` with
scp. Here the QC server is an S3-compatible bucket in the distributed set-up
(``services.publisher.qc_s3.S3QcServer``, boto3) and a directory with the same
key layout in the embedded default (``services.publisher.qc_local.LocalQcServer``). Both store objects under logical keys
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

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MIB = 1024 * 1024
#: A hex SHA-256 as the adapters record it.
HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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

    def list(self, prefix: str, limit: int | None = None) -> dict[str, str]:
        """Keys under ``prefix`` with their ETags (an ETag changes whenever the object changes).

        With ``limit``, only the first ``limit`` keys in key order (S3's order:
        by UTF-8 bytes), which a store can answer without walking the rest.
        """

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Puts inside the block may defer their durability to its end (one sync for a package)."""

    def url(self, key: str) -> str:
        """Where a person or AOG finds the object."""


def safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise ValueError(f"invalid QC server key {key!r}")
    return key

"""File primitives every stage relies on: atomic writes and checksums.

A stage's output must be durable before its message is acked, and a reader
(another stage, the QC web server, AOG) must never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def write_atomic(path: Path, data: bytes | str | Path, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, text, or the content of another file) to ``path`` atomically.

    Temporary file in the same directory, fsync, rename over ``path``, fsync
    of the directory: readers see the old file or the new one, and after a
    crash the new one is either complete or absent.
    """
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, Path):
                with data.open("rb") as source:
                    for chunk in iter(lambda: source.read(CHUNK), b""):
                        out.write(chunk)
            else:
                out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; other stages and the QC web server read these
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _temp_beside(path: Path) -> tuple[int, str]:
    # A concurrent clean-up may remove the directory just made empty; make it again.
    for attempt in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except FileNotFoundError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(body: bytes | Path) -> str:
    """Hex SHA-256 of bytes or of a file."""
    return file_digest(body) if isinstance(body, Path) else hashlib.sha256(body).hexdigest()

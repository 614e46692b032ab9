"""The QC server as a local directory: the embedded default (``PREIMG_QC_MODE=local``).

The directory has the bucket's key layout, ``<root>/<key>``. Objects appear by
rename, each with its SHA-256 in the extended attribute ``user.preimg.sha256``;
a batch stages a package's objects and shows them together, durable when it
ends (see ``_commit`` for which bytes are synced before the renames).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

from services.publisher.qcserver import HEX_SHA256, ObjectInfo, safe_key
from shared.errors import RetryableError
from shared.files import (
    CHUNK,
    TEMP_NAME,
    is_temp_name,
    make_dirs,
    sync_all,
    sync_later,
    temp_file_beside,
)

_log = logging.getLogger(__name__)


#: Extended attribute holding an object's hex SHA-256 in the local QC directory.
SHA256_XATTR = "user.preimg.sha256"


@dataclass(frozen=True)
class _StagedObject:
    """An object written beside its key, waiting to be renamed into place."""

    tmp: Path
    target: Path
    #: The temporary file's bytes still need a sync (False for a hard link of a durable file).
    sync: bool
    #: They may be synced after the rename, with the directories: the object was written from
    #: bytes whose digest the caller did not give, so nobody can trust it on a replay (see _commit).
    sync_after: bool = False


def _stage_object(target: Path, body: bytes | Path, sha256: str | None) -> tuple[_StagedObject, str]:
    """Write ``body`` into a temporary file beside ``target`` with its SHA-256 attached; nothing synced.

    A file is read once: hashed while copied when ``sha256`` is None. A file
    whose digest is known is hard-linked instead when it lies on the same
    file system (the processor made it durable): nothing is read or copied.
    The digest is set on the temporary file, so after the rename the object
    and its SHA-256 appear together.
    """
    given = sha256
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
    return _StagedObject(tmp, target, sync=True, sync_after=given is None), sha256


def _link_temp(source: Path, target: Path, sha256: str) -> Path | None:
    """Hard-link ``source`` beside ``target`` under a temporary name, its SHA-256 attached.

    None when the two lie on different file systems or links are not
    allowed there: the caller copies instead.
    """
    prefix, suffix = TEMP_NAME
    tmp = target.parent / f"{prefix}{target.name}.{secrets.token_hex(6)}{suffix}"
    try:
        try:
            os.link(source, tmp)
        except FileNotFoundError:
            if target.parent.is_dir():
                raise  # the source is gone
            make_dirs(target.parent)  # made (and its name synced) when missing only: one syscall less per file
            os.link(source, tmp)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return None
        raise
    try:
        _set_sha256(tmp, sha256)  # by path: the link is ours, and no descriptor to open and close
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(staged: list[_StagedObject], durable: bool = True) -> None:
    """Rename staged objects into place, durably: bytes, renames, directories.

    An object put with the caller's SHA-256 appears only once its bytes are
    durable, so a replay that finds it with that SHA-256 and size can trust it
    and skip it. An object whose digest was computed here from the bytes (the
    caller gave none) cannot be skipped that way: a replay puts it again. Its
    bytes are synced after the rename, with the directories (``sync_later``:
    under a message runner, in the round of the stage's state record, before
    anything is emitted), which saves a round of syncs per batch.
    """
    try:
        before = [s.tmp for s in staged if s.sync and not s.sync_after]
        if durable and before:
            sync_all(before)
        for s in staged:
            os.replace(s.tmp, s.target)
    except BaseException:
        _discard(staged)
        raise
    if durable:
        sync_later([*(s.target for s in staged if s.sync and s.sync_after),
                    *dict.fromkeys(s.target.parent for s in staged)])


def _discard(staged: list[_StagedObject]) -> None:
    for s in staged:
        s.tmp.unlink(missing_ok=True)


def _set_sha256(file: int | Path, sha256: str) -> None:
    """Attach ``sha256`` to an open file (descriptor) or a path (not a symlink)."""
    setxattr = getattr(os, "setxattr", None)  # Linux only
    if setxattr is None:
        return
    try:
        setxattr(file, SHA256_XATTR, sha256.encode("ascii"))
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
    return value if HEX_SHA256.match(value) else ""


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
        #: ``file://`` URI of the root; a key's URL is this plus the quoted key (as ``Path.as_uri`` quotes).
        self._root_uri = self._resolved_root.as_uri()
        self._key_uri_prefix = self._root_uri if self._root_uri.endswith("/") else self._root_uri + "/"
        self._batch_depth = 0
        self._staged: list[_StagedObject] = []

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Puts inside the block are staged, and appear together when it ends: their bytes synced
        in one round, renamed into place, their directories synced in one more round (a package of
        18 files: two rounds of syncs, ``shared.files.sync_all``, instead of 36 syncs each waiting
        for its own). An error inside the block discards them."""
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
        return self.root / safe_key(key)

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

    def list(self, prefix: str, limit: int | None = None) -> dict[str, str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        found: dict[str, str] = {}
        if not base.is_dir():
            return found
        if limit is not None and prefix.endswith("/"):
            return self._list_first(base, prefix, limit)
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if is_temp_name(name):
                    continue  # another writer's file in flight
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    found[key] = self._etag(path.stat())
                except FileNotFoundError:
                    continue  # deleted while we walked
        if limit is not None:
            return {k: found[k] for k in sorted(found, key=lambda k: k.encode())[:limit]}
        return found

    def _list_first(self, base: Path, prefix: str, limit: int) -> dict[str, str]:
        """The first ``limit`` files directly in ``base`` by name: the names are listed, only those stat'ed
        (relative to the open directory: the monitor lists its index twice per run)."""
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return {}
        try:
            names = sorted((n for n in os.listdir(fd) if not is_temp_name(n)), key=str.encode)
            found: dict[str, str] = {}
            for name in names:
                if len(found) == limit:
                    break
                try:
                    info = os.stat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # deleted since the listing
                if stat.S_ISREG(info.st_mode):
                    found[prefix + name] = self._etag(info)
            return found
        finally:
            os.close(fd)

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
        if not key:
            return self._root_uri + "/"
        # What ``(root / key).as_uri()`` gives, without a Path per call (a package names ~20 objects).
        return self._key_uri_prefix + quote_from_bytes(os.fsencode(safe_key(key).rstrip("/")))

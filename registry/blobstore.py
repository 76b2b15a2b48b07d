"""Content-addressed bytes on any fsspec filesystem (a local folder by default, S3 at scale).

An object is named by the sha256 of its exact bytes and lives at ``<root>/sha256/<d[:2]>/<d>``.
Every read re-hashes the bytes, so a corrupt or truncated object is reported, never returned.
A local write goes to a temporary name and is renamed into place, so no reader ever sees a
half-written object under a real digest; on object stores a PUT is atomic already.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config import redact
from .directio import Buffer, read_whole
from .errors import IntegrityError, StoreError, first_line

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(data: bytes | memoryview, digest: str) -> None:
    actual = sha256_hex(data)
    if actual != digest:
        raise IntegrityError(
            f"blob {digest[:12]} is corrupt: its {len(data)} bytes hash to {actual[:12]}; `dsreg verify --full` names what it breaks, "
            "`dsreg verify --repair FILE` writes it again from the original file"
        )


def read_verified(path: str | os.PathLike, digest: str, buffer_for: Callable[[int], Buffer]) -> memoryview:
    """The bytes of the file at ``path``, read into ``buffer_for(n)``, once they hash to ``digest``."""
    view = read_whole(path, buffer_for)
    check_digest(view, digest)
    return view


@dataclass(frozen=True)
class StoredBlob:
    digest: str
    size: int
    modified: datetime | None


class BlobStore:
    def __init__(self, url: str, create: bool = True, **storage_options):
        """The store at ``url``; with ``create``, a local store's folder is made if it is missing
        (a reader's is never made: a store that is not there has no objects to list)."""
        self.url = url
        if url.startswith(("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://")):
            # Several processes write one store: a cached listing would hide their objects.
            storage_options.setdefault("use_listings_cache", False)
            # A client of its own, made from the endpoint and credentials in force now: fsspec's
            # shared instance would keep those of the first open in this process (a reader's key,
            # or an endpoint that has changed since).
            storage_options.setdefault("skip_instance_cache", True)
        try:
            self.fs, root = fsspec.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open object store {redact(url)}: {exc}") from None
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local and create:
            try:
                os.makedirs(self._tmp_dir(), exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the object store's folder {self.root}: {exc.strerror or exc}") from None
        elif self.local and not os.path.isdir(self.root):
            raise StoreError(f"no object store at {self.root}: the folder does not exist (a write such as `dsreg base add` creates one)")

    def __repr__(self) -> str:
        return f"BlobStore({redact(self.url)!r})"

    def path(self, digest: str) -> str:
        if not _DIGEST.fullmatch(digest):
            raise IntegrityError(f"malformed blob digest {digest!r}")
        return f"{self.root}/sha256/{digest[:2]}/{digest}"

    def _tmp_dir(self) -> str:
        return f"{self.root}/tmp"

    def exists(self, digest: str) -> bool:
        return self._call(self.fs.exists, self.path(digest))

    def put(self, data: bytes, digest: str | None = None) -> tuple[str, bool]:
        """Store ``data``; returns (digest, whether it was written). An object already stored under
        the digest is read back and kept if it hashes to it; a damaged one is written again, so
        that a write never makes a reference to bytes that verify would call corrupt."""
        digest = digest or sha256_hex(data)
        path = self.path(digest)
        if self.exists(digest):
            if self.intact(digest):
                return digest, False
            log.warning("blob %s was damaged in the store; writing it again", digest[:12])
            check_digest(data, digest)
        self._write(path, data, digest)
        log.debug("stored blob %s (%d bytes)", digest[:12], len(data))
        return digest, True

    def replace(self, data: bytes, digest: str) -> None:
        """Write ``data`` over whatever is stored under ``digest`` (a missing, truncated or corrupt
        object, found by verify): only bytes that hash to the digest are ever written."""
        check_digest(data, digest)
        self._write(self.path(digest), data, digest)
        log.info("repaired blob %s (%d bytes)", digest[:12], len(data))

    def _write(self, path: str, data: bytes, digest: str) -> None:
        if self.local:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.makedirs(self._tmp_dir(), exist_ok=True)
                tmp = f"{self._tmp_dir()}/{digest}.{uuid.uuid4().hex}"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except PermissionError as exc:
                raise StoreError(f"object store {redact(self.url)}: {exc.strerror} writing {exc.filename}; these credentials may only read") from None
        else:
            self._call(self.fs.pipe_file, path, data, action="s3:PutObject")

    def intact(self, digest: str) -> bool:
        """Whether an object is stored under ``digest`` and its bytes hash to it."""
        try:
            self.get(digest)
        except IntegrityError:
            return False
        return True

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = self._call(self.fs.cat_file, path)
        except FileNotFoundError:
            raise _missing(digest) from None
        check_digest(data, digest)
        return data

    def read_into(self, digest: str, buffer_for: Callable[[int], Buffer]) -> memoryview:
        """Like :meth:`get`, but a local object is read into ``buffer_for(size)``, a buffer the
        caller reuses: a checkout reads the whole base, and a fresh buffer for each tensor cost
        page faults on every byte of it."""
        if not self.local:
            return memoryview(self.get(digest))
        try:
            return read_verified(self.path(digest), digest, buffer_for)
        except FileNotFoundError:
            raise _missing(digest) from None

    def delete(self, digest: str) -> None:
        try:
            self._call(self.fs.rm_file, self.path(digest), action="s3:DeleteObject")
        except FileNotFoundError:
            pass

    def delete_many(self, digests: list[str]) -> None:
        if not digests:
            return
        if self.local:
            for digest in digests:
                self.delete(digest)
            return
        # Object stores delete up to 1000 keys per request.
        self._call(self.fs.rm, [self.path(d) for d in digests], action="s3:DeleteObject")

    def partial_uploads(self, older_than: datetime) -> list[StoredBlob]:
        """Temporary files of local writes that never finished (a crashed push), older than ``older_than``."""
        if not self.local or not os.path.isdir(self._tmp_dir()):
            return []  # object stores never show a partial PUT
        found = []
        for entry in os.scandir(self._tmp_dir()):
            st = entry.stat()
            modified = datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)
            if modified <= older_than:
                found.append(StoredBlob(entry.name, st.st_size, modified))
        return found

    def remove_partial(self, name: str) -> None:
        try:
            os.remove(os.path.join(self._tmp_dir(), os.path.basename(name)))
        except FileNotFoundError:
            pass

    def list(self) -> Iterator[StoredBlob]:
        """Every object under the store's root, with its size and modification time."""
        base = f"{self.root}/sha256"
        try:
            found = self._call(self.fs.find, base, detail=True)
        except FileNotFoundError:
            return
        for path, info in found.items():
            name = path.rsplit("/", 1)[-1]
            if _DIGEST.fullmatch(name):
                yield StoredBlob(name, int(info.get("size") or 0), _modified(info))

    def _call(self, fn, *args, action: str | None = None, **kwargs):
        """``fn(*args, **kwargs)`` with the store's failures as one-line StoreErrors; ``action``
        names the permission a denial is about (a reader's key may not PutObject)."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, IntegrityError):
            raise
        except PermissionError as exc:
            needs = f" ({action} denied: these credentials may not make this change)" if action else ""
            raise StoreError(f"object store {redact(self.url)}: {redact(first_line(exc))}{needs}") from None
        except _STORE_ERRORS as exc:
            raise StoreError(f"object store {redact(self.url)}: {redact(first_line(exc))}") from None


def _missing(digest: str) -> IntegrityError:
    return IntegrityError(
        f"blob {digest[:12]} is missing from the store; `dsreg verify` names what it breaks, "
        "`dsreg verify --repair FILE` writes it again from the original file"
    )


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store's client raises when the store fails: OSError, and botocore's own errors (an
    endpoint that refuses connections is not an OSError there) when s3fs is installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


_STORE_ERRORS = _store_errors()


def _modified(info: dict) -> datetime | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=timezone.utc)
    return None

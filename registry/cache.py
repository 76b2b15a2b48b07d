"""Bounded caches: blobs of a remote store on the local disk, and subjects' decoded factors in memory.

``BlobCache``: base tensors are the bulk of every checkout and are shared by all subjects of a
base, so a worker that keeps them locally downloads only a subject's own factors from the second
checkout on. Entries are files named by digest; a read re-hashes them (a corrupt copy is dropped
and fetched again), and the least recently used are evicted past the size limit.

``FactorCache``: a service that switches a live model among a working set of subjects
(``Registry.apply``) keeps their decoded factors in memory, so a switch reads no store.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable

from .blobstore import BlobStore, check_digest, read_verified
from .directio import Buffer
from .errors import IntegrityError

log = logging.getLogger(__name__)


class BlobCache:
    def __init__(self, store: BlobStore, directory: Path, max_bytes: int):
        self.store = store
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        self.store.path(digest)  # validates the digest before it becomes a file name
        return self.directory / digest[:2] / digest

    def get(self, digest: str) -> bytes:
        return self._read(digest, lambda path: _read_checked(path, digest))

    def read_into(self, digest: str, buffer_for: Callable[[int], Buffer]) -> memoryview:
        """Like :meth:`BlobStore.read_into`: a good cached copy is read into ``buffer_for(size)``."""
        return memoryview(self._read(digest, lambda path: read_verified(path, digest, buffer_for)))

    def _read(self, digest: str, read: Callable[[Path], bytes | memoryview]) -> bytes | memoryview:
        """``read(path)``: the cached copy's bytes, checked against the digest. A missing copy is
        fetched from the store and kept; a corrupt one is dropped and fetched again."""
        path = self._path(digest)
        try:
            data = read(path)
        except FileNotFoundError:
            pass
        except IntegrityError:
            log.warning("cached copy of blob %s is corrupt; fetching it again", digest[:12])
            path.unlink(missing_ok=True)
        else:
            self._touch(path)
            return data
        data = self.store.get(digest)
        self._put(path, data)
        return data

    def _touch(self, path: Path) -> None:
        try:
            os.utime(path)  # mtime is the LRU clock
        except FileNotFoundError:  # evicted by another thread since the read: the bytes are good
            pass

    def _put(self, path: Path, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        """Finished entries only: a ``.``-prefixed temporary file belongs to a write in progress."""
        entries = []
        for f in self.directory.glob("??/*"):
            if f.name.startswith("."):
                continue
            try:
                st = f.stat()
            except FileNotFoundError:  # evicted by another thread or process meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, f))
        return entries

    def evict(self) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size

    def size(self) -> int:
        return sum(size for _, size, _ in self._entries())


def _read_checked(path: Path, digest: str) -> bytes:
    data = path.read_bytes()
    check_digest(data, digest)
    return data


class FactorCache:
    """Decoded blobs (dicts of tensors) in memory, by key; the least recently used are dropped past
    ``max_bytes``. A value larger than the limit is returned but not kept. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[dict, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, load: Callable[[], dict]) -> dict:
        """The cached value of ``key``, or ``load()``'s, kept for next time. Callers must not change it."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return item[0]
            self.misses += 1
        # Loaded outside the lock: a read from the store must not hold up other threads' hits.
        value = load()
        size = sum(t.numel() * t.element_size() for t in value.values())
        with self._lock:
            if key not in self._items and size <= self.max_bytes:
                self._items[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._bytes -= dropped
        return value

    @property
    def nbytes(self) -> int:
        return self._bytes


class Memo:
    """Small values computed once per key and kept for the process (base tensors' fingerprints,
    16 bytes each: no bound needed). Thread-safe; two threads may compute the same key once each."""

    def __init__(self):
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                return self._items[key]
        value = compute()
        with self._lock:
            return self._items.setdefault(key, value)

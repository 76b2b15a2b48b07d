"""Reading and writing large files around the page cache, where the filesystem allows.

A checkout writes a 3.4 GB checkpoint once. Through the page cache every 4 KiB page of it is
allocated, copied into and later written back, which cost more kernel CPU than the matrix products
of the rebuild took, and it evicts the base blobs that the next checkout reads. With ``O_DIRECT``
the disk reads the writer's buffers itself, at a fraction of that CPU (docs/performance.md).

Direct I/O needs block-aligned offsets, lengths and buffer addresses, and a file's pieces (tensors)
start anywhere. So a writer hands over each piece in a buffer placed at the piece's offset within a
block (:meth:`DirectFile.phase`): the whole blocks inside it go straight to disk, and the partial
blocks at its two ends are assembled in memory with the neighbours' ends and written on close.
Where ``O_DIRECT`` is refused (tmpfs, some network filesystems, macOS) the same calls write
through the page cache.

Reading is the same trade: :func:`read_whole` takes a file from the page cache when all of it is
there already (a base read moments ago), and from the disk itself otherwise, which spares the
kernel the allocation of a page for every 4 KiB read (an order of magnitude less CPU for a cold
base).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from typing import Callable, Union

BLOCK = 4096

Buffer = Union[bytearray, mmap.mmap]


def aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous memory of ``size`` bytes (at least one block), starting on a page boundary."""
    return mmap.mmap(-1, max(size, BLOCK))


def _blocks(buffer_for: Callable[[int], Buffer] | None, size: int) -> memoryview:
    """The first ``size`` bytes of ``buffer_for(size)``, or of fresh page-aligned memory.

    Cut to size: a reused buffer is often far larger, and a direct read given the whole of it costs
    the kernel work over every page of it, several times the CPU of the read itself.
    """
    buffer = buffer_for(size) if buffer_for else aligned_buffer(size)
    return memoryview(buffer).cast("B")[:size]


def read_whole(path: str | os.PathLike, buffer_for: Callable[[int], Buffer]) -> memoryview:
    """The bytes of the file at ``path``, read into ``buffer_for(n)`` (n: the size rounded up to a
    block). Direct reads need a page-aligned buffer (:func:`aligned_buffer`); with any other
    buffer the file is read through the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        blocks = -(-size // BLOCK) * BLOCK
        view = _blocks(buffer_for, blocks)
        if size == 0 or _read_cached(fd, view[:size]) or _read_direct(path, view, size):
            return view[:size]
        return view[: _read_all_at(fd, view[:size], 0)]
    finally:
        os.close(fd)


class RangeReader:
    """Byte ranges of one file, read from any thread: through the page cache when all of a range
    is there, otherwise straight from the disk (where ``O_DIRECT`` is taken).

    A push reads a 3.4 GB fine-tune twice (the scan hashes it, the compressor reads each layer
    again) beside 3.2 GB of base blobs: through the page cache, the kernel's copies were a visible
    share of a push's CPU.
    """

    def __init__(self, path: str | os.PathLike):
        self._fd = os.open(path, os.O_RDONLY)
        self._direct: int | None = None
        if getattr(os, "O_DIRECT", 0):
            try:
                self._direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                pass

    def read(self, offset: int, size: int, buffer_for: Callable[[int], Buffer] | None = None) -> memoryview:
        """Exactly ``size`` bytes from ``offset`` (fewer only at the end of the file), writable: in
        fresh memory, or in ``buffer_for(n)``, a page-aligned buffer the caller reuses."""
        if self._direct is not None and size >= DIRECT_READ_MIN and not all_cached(self._fd, size, offset):
            start = offset - offset % BLOCK
            stop = -(-(offset + size) // BLOCK) * BLOCK
            view = _blocks(buffer_for, stop - start)
            try:
                got = _read_all_at(self._direct, view, start)
            except OSError:  # EINVAL: a filesystem that takes O_DIRECT at open but not at read
                got = -1
            if got >= 0:
                return view[offset - start : min(offset - start + size, got)]
        view = _blocks(buffer_for, size) if buffer_for else memoryview(bytearray(size))
        return view[: _read_all_at(self._fd, view, offset)]

    def close(self) -> None:
        for fd in (self._fd, self._direct):
            if fd is not None:
                os.close(fd)
        self._direct = None


# Below this a range is read through the page cache: a direct read of a small tensor costs a disk
# round trip of its own, where buffered reads of neighbours share the kernel's readahead.
DIRECT_READ_MIN = 1 << 20


def _read_all_at(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view) and (n := os.preadv(fd, [view[got:]], offset + got)):
        got += n
    return got


def _read_cached(fd: int, view: memoryview) -> bool:
    """Whether all of the file came from the page cache, without waiting for the disk."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    # Ask first: a read with RWF_NOWAIT that misses still starts readahead, and on a cold file that
    # would read pages into the cache for nothing, beside the direct read that follows.
    if nowait is None or not all_cached(fd, len(view)):
        return False
    try:
        return os.preadv(fd, [view], 0, nowait) == len(view)
    except OSError:  # EAGAIN: evicted meanwhile; EOPNOTSUPP: a filesystem without RWF_NOWAIT
        return False


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_CACHESTAT = 451  # Linux 6.5+; new system calls have one number on every architecture
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def all_cached(fd: int, size: int, offset: int = 0) -> bool:
    """Whether every page of ``size`` bytes of the open file from ``offset`` is in the page cache
    (``cachestat``, which reads nothing); False where the kernel cannot say (before Linux 6.5,
    other systems)."""
    if _libc is None:
        return False
    stat = _Cachestat()
    first = offset - offset % mmap.PAGESIZE
    span = offset + size - first
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(_CachestatRange(first, span)), ctypes.byref(stat), 0) != 0:
        return False  # ENOSYS
    return stat.nr_cache * mmap.PAGESIZE >= span


def _read_direct(path: str | os.PathLike, view: memoryview, size: int) -> bool:
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | direct)
    except OSError:
        return False
    try:
        return _read_all_at(fd, view, 0) == size  # a direct read stops short at the end of the file
    except OSError:  # EINVAL: a buffer or filesystem that direct I/O does not take
        return False
    finally:
        os.close(fd)


class DirectFile:
    """A new file of ``size`` bytes, written in pieces at their offsets from any thread; with
    ``direct=False``, or where the filesystem refuses ``O_DIRECT``, through the page cache."""

    def __init__(self, path: str | os.PathLike, size: int, direct: bool = True):
        self.size = size
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0) if direct else 0
        self.fd, self.direct = -1, False
        if direct:
            try:
                self.fd, self.direct = os.open(path, flags | direct, 0o644), True
            except OSError:
                pass
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self._edges: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def phase(self, offset: int) -> int:
        """Where in its buffer a piece for ``offset`` must start: its offset within a block."""
        return offset % BLOCK if self.direct else 0

    def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``. With direct I/O, ``data`` must start ``phase(offset)`` bytes
        past a block boundary in memory (a slice of :func:`aligned_buffer`)."""
        data = data.cast("B")
        end = offset + len(data)
        if not self.direct:
            _write_all(self.fd, data, offset)
            return
        lo = min(-(-offset // BLOCK) * BLOCK, end)
        hi = max(end // BLOCK * BLOCK, lo)
        self._keep_edge(offset, data[: lo - offset])
        if hi > lo:
            _write_all(self.fd, data[lo - offset : hi - offset], lo)
        self._keep_edge(hi, data[hi - offset :])

    def _keep_edge(self, offset: int, data: memoryview) -> None:
        """Bytes of a block that other pieces share: copied into the block's image, written on close."""
        if not len(data):
            return
        index, at = divmod(offset, BLOCK)
        with self._lock:
            block = self._edges.setdefault(index, bytearray(BLOCK))
            block[at : at + len(data)] = data

    def close(self) -> None:
        """Write the assembled edge blocks and cut the file to its size; the file is complete after."""
        try:
            if self._edges:
                indices = sorted(self._edges)
                buffer = aligned_buffer(BLOCK)
                try:
                    for index in indices:
                        buffer[:] = self._edges[index]
                        _write_all(self.fd, memoryview(buffer), index * BLOCK)
                finally:
                    buffer.close()
                self._edges.clear()
            os.ftruncate(self.fd, self.size)  # the last edge block was written whole
        finally:
            self.abandon()

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n

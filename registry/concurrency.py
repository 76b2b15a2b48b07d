"""Small helpers that keep I/O and compute overlapped without holding more than a few items."""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from threadpoolctl import threadpool_limits

from .directio import aligned_buffer

T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], window: int = 4, workers: int = 4) -> Iterator[R]:
    """``map(fn, items)`` run up to ``window`` items ahead in threads, yielded in order.

    On Ctrl-C the jobs still running are not waited for (one can be a long LAPACK call): the
    interrupt reaches the caller at once, and the CLI ends the process.
    """
    pool = ThreadPoolExecutor(workers)
    try:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced in a thread of its own up to ``depth`` items before the consumer takes them.

    A checkout rebuilds tensor i + 1 while it writes tensor i. The producer's exception is raised in
    the consumer; a consumer that stops early (an error while writing) stops the producer too.
    """
    box: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((exc, None))

    thread = threading.Thread(target=produce, name="dsreg-ahead", daemon=True)
    thread.start()
    try:
        while True:
            exc, item = box.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    except KeyboardInterrupt:  # the producer is a daemon thread: not waited for (see prefetch)
        stop.set()
        raise
    finally:
        if not stop.is_set():
            stop.set()
            thread.join()


class Scratch:
    """A buffer per thread, reused from item to item, for work over many large items.

    A fresh buffer per tensor costs page faults on every byte of it (and, in a VM, faults on the
    host); one per thread costs them once. Handing out the largest items first makes the first
    buffer of each thread the last it needs.
    """

    def __init__(self):
        self._local = threading.local()
        self._made: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def __call__(self, size: int) -> mmap.mmap:
        """This thread's buffer, of at least ``size`` bytes, page-aligned; what it held is gone."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            if buffer is not None and _closed(buffer):  # outgrown: its pages go back now, not at close
                with self._lock:
                    self._made.remove(buffer)
            buffer = self._local.buffer = aligned_buffer(size)
            with self._lock:
                self._made.append(buffer)
        return buffer

    def close(self) -> None:
        with self._lock:
            for buffer in self._made:
                _closed(buffer)
            self._made.clear()

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _closed(buffer: mmap.mmap) -> bool:
    try:
        buffer.close()
        return True
    except BufferError:  # still viewed (a failure's traceback): the collector frees it
        return False


# Allocations above this get mappings of their own, returned to the system when freed.
MMAP_THRESHOLD = 8 << 20
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def return_large_frees() -> None:
    """Fix glibc malloc's mmap threshold at MMAP_THRESHOLD, for the rest of the process.

    By default the threshold rises with every large free, up to 32 MB, and the freed tensors of
    layers decomposed in parallel then stay in the threads' malloc arenas, which raised a push's
    peak memory by up to a third; the price is page faults on fresh mappings, a few percent of a
    push (docs/performance.md, "Push memory"). No-op off glibc.
    """
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # not glibc
        return
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def process_alive(pid: int) -> bool:
    """Whether a process of this host has that pid: a live one of another user counts, and so does
    a pid too large to be one (nothing is removed on its account)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class MemoryGate:
    """Admits work while the bytes it holds stay within ``limit``; one item larger than the limit is
    admitted alone. Parallel compressions take their turn on the largest layers this way."""

    def __init__(self, limit: int):
        self.limit = limit
        self._used = 0
        self._changed = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._changed:
            while self._used and self._used + n > self.limit:
                self._changed.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._changed:
            self._used -= n
            self._changed.notify_all()


@contextmanager
def threads_per_lane(lanes: int) -> Iterator[None]:
    """Split torch's CPU threads, and SciPy's BLAS threads, among ``lanes`` parallel jobs, and
    restore both settings after.

    On two cores, two decompositions side by side with one thread each beat one with two: the
    eigensolver's serial parts leave the second thread idle, and a thread descheduled for I/O
    stalls a two-thread team at every barrier. SciPy's OpenBLAS (the eigensolver, registry.eigen)
    has a pool of its own, which would otherwise start a thread per core beside torch's.
    """
    before = torch.get_num_threads()
    per_lane = max(1, before // lanes)
    torch.set_num_threads(per_lane)
    try:
        with threadpool_limits(limits=per_lane, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


class Background:
    """Runs jobs in threads with at most ``limit`` in flight; ``wait`` re-raises the first failure."""

    def __init__(self, workers: int = 4, limit: int = 8):
        self._pool = ThreadPoolExecutor(workers)
        self._pending: deque[Future] = deque()
        self._limit = limit

    def submit(self, fn: Callable[..., R], *args) -> Future:
        while len(self._pending) >= self._limit:
            self._pending.popleft().result()
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self, wait: bool = True) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(wait=kind is not KeyboardInterrupt)  # on Ctrl-C, as in prefetch

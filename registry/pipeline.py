"""Small helpers that keep I/O and compute overlapped without holding more than a few items."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], window: int = 4, workers: int = 4) -> Iterator[R]:
    """``map(fn, items)`` run up to ``window`` items ahead in threads, yielded in order."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

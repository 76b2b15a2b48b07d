"""The threading helpers behind push and checkout: order, errors, early stops and memory bounds."""

import threading
import time

import pytest
import torch
from threadpoolctl import threadpool_info

from dsreg.concurrency import MemoryGate, ahead, prefetch, threads_per_lane


def test_ahead_yields_in_order_and_runs_ahead_of_the_consumer():
    made = []

    def produce():
        for i in range(10):
            made.append(i)
            yield i

    out = []
    for item in ahead(produce(), depth=2):
        time.sleep(0.01)
        out.append(item)
    assert out == list(range(10)) and made == out


def test_ahead_raises_the_producers_error_in_the_consumer():
    def produce():
        yield 1
        raise ValueError("bad tensor")

    got = []
    with pytest.raises(ValueError, match="bad tensor"):
        for item in ahead(produce()):
            got.append(item)
    assert got == [1]


def test_a_consumer_that_stops_early_stops_the_producer():
    made = []

    def produce():
        for i in range(1000):
            made.append(i)
            yield i

    before = threading.active_count()
    for item in ahead(produce(), depth=2):
        if item == 3:
            break
    assert len(made) < 10  # it stopped within the queue's depth
    assert threading.active_count() == before


def test_memory_gate_bounds_what_is_held_and_admits_one_oversized_item():
    gate = MemoryGate(100)
    held, seen = [], []
    lock = threading.Lock()

    def work(n):
        gate.acquire(n)
        with lock:
            held.append(n)
            seen.append(list(held))
        time.sleep(0.02)
        with lock:
            held.remove(n)
        gate.release(n)
        return n

    sizes = [60, 30, 50, 250, 20, 40, 70]
    assert list(prefetch(work, sizes, window=4, workers=4)) == sizes
    assert all(state == [250] or (250 not in state and sum(state) <= 100) for state in seen), seen


def test_threads_per_lane_splits_and_restores_torch_threads():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with threads_per_lane(2):
            assert torch.get_num_threads() == max(1, before // 2)
            raise RuntimeError("push failed")
    assert torch.get_num_threads() == before


def test_threads_per_lane_also_limits_the_eigensolvers_blas():
    """SciPy's OpenBLAS (dsreg.eigen) is loaded with the library (imported above), so the limit
    reaches it: lanes that each start a BLAS thread per core would oversubscribe the cores they share."""

    def eigensolver_threads() -> list[int]:
        # SciPy's wheels bundle their OpenBLAS in scipy.libs (NumPy's, also a scipy_openblas, in numpy.libs).
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas" and "scipy.libs" in p["filepath"]]

    assert eigensolver_threads(), "SciPy's BLAS is not loaded by importing dsreg"
    before = eigensolver_threads()
    with threads_per_lane(2):
        assert set(eigensolver_threads()) == {max(1, torch.get_num_threads())}
    assert eigensolver_threads() == before

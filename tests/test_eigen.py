"""The CPU eigensolver behind Delta-SVD's fast path: LAPACK's tridiagonal routines, GIL released."""

import threading
import time

import pytest
import torch
from threadpoolctl import threadpool_limits

from registry import deltasvd
from registry.eigen import Tridiagonal


def _gram(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return x @ x.T


@pytest.mark.parametrize("share", [0.5, 0.04])  # divide and conquer; MRRR where t < n / 10
@pytest.mark.parametrize("n,rank", [(1, 1), (2, 1), (7, 7), (64, 20), (300, 300), (300, 240)])
def test_values_and_top_vectors_match_a_full_eigh(n, rank, share):
    gram = _gram(n, rank, seed=n + rank)
    values, vectors = torch.linalg.eigh(gram)
    tri = Tridiagonal(torch.tril(gram).contiguous())  # only the lower triangle is read
    assert torch.allclose(tri.values, values.flip(0), rtol=0, atol=1e-12 * float(values.abs().max()))
    t = max(1, int(rank * share))
    top = tri.top(t)
    assert top.shape == (n, t)
    assert torch.allclose(top.T @ top, torch.eye(t, dtype=torch.float64), atol=1e-10)
    # G v = λ v for each kept vector, with λ the matching value.
    assert torch.allclose(gram @ top, top * tri.values[:t], atol=1e-9 * float(values.abs().max()))


def test_asking_for_more_vectors_reuses_the_reduction_and_stays_consistent():
    gram = _gram(120, 80, seed=1)
    tri = Tridiagonal(gram.clone())
    few, more = tri.top(10).clone(), tri.top(40)
    # Eigenvectors are defined up to sign: the same directions, whichever call formed them.
    assert torch.allclose((few * more[:, :10]).sum(0).abs(), torch.ones(10, dtype=torch.float64), atol=1e-9)
    assert tri.top(0).shape == (120, 0)
    with pytest.raises(ValueError):
        tri.top(121)


def test_rejects_what_lapack_cannot_read():
    with pytest.raises(ValueError):
        Tridiagonal(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        Tridiagonal(torch.zeros(3, 3))  # fp32


def test_the_gil_is_released_while_lapack_works():
    """The point of calling LAPACK through ctypes: decomposition lanes in threads overlap. A Python
    thread counting beside it gets about as far as beside a sleep of the same length (beside
    ``scipy.linalg.lapack.dsytrd``, which holds the GIL, it gets about a fifth as far)."""
    gram = _gram(800, 800, seed=2)
    count = [0]
    done = threading.Event()

    def counter():
        while not done.is_set():
            count[0] += 1

    def counted(work) -> tuple[int, float]:
        before, start = count[0], time.perf_counter()
        work()
        return count[0] - before, time.perf_counter() - start

    thread = threading.Thread(target=counter)
    thread.start()
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            beside_lapack, seconds = counted(lambda: [Tridiagonal(gram.clone()).top(800) for _ in range(3)])
        beside_sleep, _ = counted(lambda: time.sleep(seconds))
    finally:
        done.set()
        thread.join()
    assert beside_lapack > 0.6 * beside_sleep


def test_spectrum_on_the_cpu_uses_it_and_matches_the_exact_svd():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(90, 30, generator=g) @ torch.randn(30, 200, generator=g)
    spectrum = deltasvd.Spectrum(delta)
    assert spectrum._eigen._tridiagonal is not None
    s = torch.linalg.svdvals(delta.double())
    assert torch.allclose(spectrum.s[:30], s[:30], rtol=1e-9)
    assert float(spectrum.s[30:].max()) < 1e-5 * float(s[0])
    a, b = spectrum.factors(30)
    assert torch.allclose(a @ b, delta, atol=1e-4 * float(delta.abs().max()))

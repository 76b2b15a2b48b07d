"""The CPU eigensolver behind Delta-SVD's fast path: LAPACK's tridiagonal routines, GIL released."""

import sys
import threading
import time

import numpy as np
import pytest
import scipy.linalg.lapack
import torch
from threadpoolctl import threadpool_limits

from dsreg import deltasvd, eigen
from dsreg.eigen import Tridiagonal


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
    assert top.shape == (n, t) and top.dtype == torch.float32  # the values decide ranks; the vectors only feed fp16 factors
    assert torch.allclose(top.T @ top, torch.eye(t), atol=1e-4)  # MRRR in fp32: ~n·eps32 between close eigenvalues
    # G v = λ v for each kept vector, with λ the matching value, to fp32 rounding of v.
    top = top.double()
    assert torch.allclose(gram @ top, top * tri.values[:t], atol=2e-6 * float(values.abs().max()))


def test_asking_for_more_vectors_reuses_the_reduction_and_stays_consistent():
    gram = _gram(120, 80, seed=1)
    tri = Tridiagonal(gram.clone())
    few, more = tri.top(10).clone(), tri.top(40)
    # Eigenvectors are defined up to sign: the same directions, whichever call formed them.
    assert torch.allclose((few * more[:, :10]).sum(0).abs(), torch.ones(10), atol=1e-5)
    assert tri.top(0).shape == (120, 0)
    with pytest.raises(ValueError):
        tri.top(121)


def test_rejects_what_lapack_cannot_read():
    with pytest.raises(ValueError):
        Tridiagonal(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        Tridiagonal(torch.zeros(3, 3))  # fp32


def _turns_inside(work, inside: threading.Event) -> int:
    """How often the main thread ran while another thread, running ``work``, had ``inside`` set.

    With a switch interval longer than the test, a thread hands the GIL over only where it blocks or
    C code releases it: the count is 0 for calls that hold the GIL throughout, whatever the
    machine's load. The main thread sleeps between looks, which lets the worker run.
    """
    finished = threading.Event()

    def run():
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                work()
        finally:
            finished.set()

    turns = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        worker = threading.Thread(target=run)
        worker.start()
        while not finished.is_set():
            time.sleep(0.0005)
            turns += inside.is_set()
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    return turns


def test_the_gil_is_released_while_lapack_works(monkeypatch):
    """The point of calling LAPACK through ctypes: decomposition lanes in threads overlap, where
    ``scipy.linalg.lapack``'s wrappers hold the GIL for the whole call."""
    gram = _gram(800, 800, seed=2)
    inside = threading.Event()

    def flagged(call):
        def run(*args, **kwargs):  # only the LAPACK calls themselves, not the Python around them
            inside.set()
            try:
                return call(*args, **kwargs)
            finally:
                inside.clear()
        return run

    fortran = np.asfortranarray(np.tril(gram.numpy()))  # passed as it is: no copy that could release the GIL
    held = flagged(scipy.linalg.lapack.dsytrd)
    assert _turns_inside(lambda: held(fortran, lower=1, overwrite_a=1), inside) == 0

    monkeypatch.setattr(eigen, "_call", flagged(eigen._call))
    assert _turns_inside(lambda: Tridiagonal(gram.clone()).top(800), inside) > 0


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

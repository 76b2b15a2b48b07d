"""All eigenvalues and the top eigenvectors of a symmetric fp64 matrix, on the CPU, without the GIL.

Delta-SVD needs every singular value of a layer's delta (the energy sums them all) but only the
top t singular vectors, and the paper's thresholds keep from 1% (τ 0.06) to 60% (τ 0.8) of them.
A full ``eigh`` forms all n eigenvectors; this reduces the Gram matrix to tridiagonal form once
(LAPACK ``dsytrd``), takes all eigenvalues from it (``dsterf``), and back-transforms only the top
t eigenvectors of the tridiagonal matrix (``dormtr``): about 0.18 s against ``numpy.linalg.eigh``'s
0.26 s and torch's 0.37 s for a 1280 × 1280 Gram on one core.

The tridiagonal eigenvectors come from MRRR (``dstemr``) when few are kept, and otherwise from
divide and conquer (``dstedc``), which forms all n of them yet costs less: on the SD1.5 bench's
1280 × 1280 Grams it takes 0.04-0.07 s for all, where MRRR takes 0.11-0.14 s for the 320 that τ 0.5
keeps (0.2-0.26 s for 640). MRRR's cost grows with t, and the two meet near t = n/10.

The routines are SciPy's LAPACK, called through the function pointers that
``scipy.linalg.cython_lapack`` publishes for compiled callers: ``scipy.linalg.lapack``'s Python
wrappers hold the GIL for the whole call, and push decomposes two layers side by side in threads.
"""

from __future__ import annotations

import ctypes

import numpy as np
import scipy.linalg.cython_lapack
import torch

_INT = ctypes.POINTER(ctypes.c_int)
_DOUBLE = ctypes.POINTER(ctypes.c_double)
_CHAR = ctypes.c_char_p
# The C prototypes of scipy.linalg.cython_lapack (Fortran calling convention: everything by pointer);
# each routine's trailing int* is its ``info``.
_SIGNATURES = {
    "dsytrd": [_CHAR, _INT, _DOUBLE, _INT, _DOUBLE, _DOUBLE, _DOUBLE, _DOUBLE, _INT, _INT],
    "dsterf": [_INT, _DOUBLE, _DOUBLE, _INT],
    "dstedc": [_CHAR, _INT, _DOUBLE, _DOUBLE, _DOUBLE, _INT, _DOUBLE, _INT, _INT, _INT],
    "dstemr": [_CHAR, _CHAR, _INT, _DOUBLE, _DOUBLE, _DOUBLE, _DOUBLE, _INT, _INT, _INT, _DOUBLE, _DOUBLE, _INT, _INT, _INT, _INT, _DOUBLE, _INT, _INT, _INT, _INT],
    "dormtr": [_CHAR, _CHAR, _CHAR, _INT, _INT, _DOUBLE, _INT, _DOUBLE, _DOUBLE, _INT, _DOUBLE, _INT, _INT],
}
# Divide and conquer forms all n vectors of T where t * this >= n; MRRR forms only the t below that.
DIVIDE_AND_CONQUER_FROM = 10

_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))


def _bind(name: str):
    capsule = scipy.linalg.cython_lapack.__pyx_capi__[name]
    # CFUNCTYPE, not PYFUNCTYPE: ctypes releases the GIL for the call.
    return ctypes.CFUNCTYPE(None, *_SIGNATURES[name])(_capsule_pointer(capsule, _capsule_name(capsule)))


_LAPACK = {name: _bind(name) for name in _SIGNATURES}


def _call(name: str, *args) -> None:
    """``args`` are numpy arrays (passed by address), bytes (a LAPACK option), ints and floats
    (passed by reference); ``info`` is appended and checked."""
    info = ctypes.c_int()
    refs = []
    for a in args:
        if isinstance(a, np.ndarray):
            refs.append(a.ctypes.data_as(_INT if a.dtype == np.intc else _DOUBLE))
        elif isinstance(a, bytes):
            refs.append(a)
        elif isinstance(a, int):
            refs.append(ctypes.byref(ctypes.c_int(a)))
        else:
            refs.append(ctypes.byref(ctypes.c_double(a)))
    _LAPACK[name](*refs, ctypes.byref(info))
    if info.value != 0:
        raise ArithmeticError(f"LAPACK {name} failed (info={info.value})")


class Tridiagonal:
    """A symmetric matrix G reduced to T = QᵀGQ: ``values`` (all eigenvalues, descending) at once,
    ``top(t)`` the top t eigenvectors on demand; a later call for more reuses the reduction."""

    def __init__(self, matrix: torch.Tensor):
        """``matrix``: n × n fp64 on the CPU, row-major, its lower triangle filled; it is overwritten."""
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.numel() == 0 or matrix.dtype != torch.float64 or not matrix.is_contiguous():
            raise ValueError("Tridiagonal needs a contiguous square fp64 matrix")
        n = self.n = matrix.shape[0]
        # Row-major with the lower triangle filled is column-major with the upper one: LAPACK reads
        # it in place with uplo "U", and leaves its Householder vectors above the superdiagonal.
        self._a = matrix.numpy()
        self._diagonal = np.empty(n)
        self._off = np.zeros(n)  # n - 1 entries; dstemr wants one more as workspace
        self._tau = np.zeros(max(1, n - 1))
        work = np.empty(64 * n)
        _call("dsytrd", b"U", n, self._a, n, self._diagonal, self._off, self._tau, work, work.size)
        values = self._diagonal.copy()
        _call("dsterf", n, values, self._off.copy())
        self.values = torch.from_numpy(values[::-1].copy())
        self._vectors = torch.zeros(n, 0, dtype=torch.float64)

    def top(self, t: int) -> torch.Tensor:
        """The top t eigenvectors (n × t, fp64), in the order of ``values``."""
        n = self.n
        if not 0 <= t <= n:
            raise ValueError(f"asked for {t} eigenvectors of a {n} × {n} matrix")
        if t > self._vectors.shape[1]:
            z = self._tridiagonal_vectors(t)
            work = np.empty(64 * t)
            _call("dormtr", b"L", b"U", b"N", n, t, self._a, n, self._tau, z, n, work, work.size)  # z ← Q z
            self._vectors = torch.from_numpy(z.T[:, ::-1].copy())  # ascending from LAPACK
        return self._vectors[:, :t]

    def _tridiagonal_vectors(self, t: int) -> np.ndarray:
        """The top t eigenvectors of T, ascending, as a t × n C array (column-major n × t)."""
        n = self.n
        if t * DIVIDE_AND_CONQUER_FROM >= n:
            z = np.zeros((n, n))
            work, iwork = np.empty(1 + 4 * n + n * n), np.empty(3 + 5 * n, dtype=np.intc)
            _call("dstedc", b"I", n, self._diagonal.copy(), self._off.copy(), z, n, work, work.size, iwork, iwork.size)
            return np.ascontiguousarray(z[n - t :])
        z = np.zeros((t, n))
        found = np.zeros(1, dtype=np.intc)
        support = np.zeros(2 * t, dtype=np.intc)
        work, iwork = np.empty(18 * n), np.empty(10 * n, dtype=np.intc)
        # jobz "V", range "I": eigenpairs n - t + 1 … n of T (vl, vu unused); tryrac 1.
        _call("dstemr", b"V", b"I", n, self._diagonal.copy(), self._off.copy(), 0.0, 0.0, n - t + 1, n,
              found, np.empty(n), z, n, t, support, np.ones(1, dtype=np.intc), work, work.size, iwork, iwork.size)
        if found[0] != t:
            raise ArithmeticError(f"LAPACK dstemr found {found[0]} of the top {t} eigenvectors")
        return z

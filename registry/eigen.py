"""All eigenvalues (fp64) and the top eigenvectors (fp32) of a symmetric fp64 matrix, on the CPU, without the GIL.

Delta-SVD needs every singular value of a layer's delta (the energy sums them all) but only the
top t singular vectors, and the paper's thresholds keep from 1% (τ 0.06) to 60% (τ 0.8) of them.
A full ``eigh`` forms all n eigenvectors; this reduces the Gram matrix to tridiagonal form once
(LAPACK ``dsytrd``), takes all eigenvalues from it (``dsterf``), and back-transforms only the top
t eigenvectors of the tridiagonal matrix (``sormtr``; the vectors are fp32, see ``Tridiagonal.top``).

The tridiagonal eigenvectors come from MRRR (``sstemr``) when few are kept, and otherwise from
divide and conquer (``sstedc``), which forms all n of them yet costs less where more than a tenth
are kept (on the SD1.5 bench's 1280 × 1280 Grams, all n by divide and conquer took about half the
time of MRRR's 320 that τ 0.5 keeps). MRRR's cost grows with t.

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
_FLOAT = ctypes.POINTER(ctypes.c_float)
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
# The vectors are formed in fp32 (see Tridiagonal.top): the same routines' single-precision twins.
_SIGNATURES.update({
    "s" + name[1:]: [_FLOAT if arg is _DOUBLE else arg for arg in _SIGNATURES[name]]
    for name in ("dstedc", "dstemr", "dormtr")
})
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
    (passed by reference, floats in the routine's precision); ``info`` is appended and checked."""
    info = ctypes.c_int()
    real = ctypes.c_float if name.startswith("s") else ctypes.c_double
    refs = []
    for a in args:
        if isinstance(a, np.ndarray):
            refs.append(a.ctypes.data_as(_INT if a.dtype == np.intc else ctypes.POINTER(real)))
        elif isinstance(a, bytes):
            refs.append(a)
        elif isinstance(a, int):
            refs.append(ctypes.byref(ctypes.c_int(a)))
        else:
            refs.append(ctypes.byref(real(a)))
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
        self._vectors = torch.zeros(n, 0, dtype=torch.float32)
        self._single: tuple[np.ndarray, ...] | None = None

    def single(self) -> tuple[np.ndarray, ...]:
        """What ``top`` needs of the reduction, in fp32: reflectors (n × n), their scales, T's
        diagonal and off-diagonal. With ``values``, :meth:`resume` takes it up again."""
        if self._single is None:
            self._single = tuple(x.astype(np.float32) for x in (self._a, self._tau, self._diagonal, self._off))
        return self._single

    @classmethod
    def resume(cls, values: torch.Tensor, single: tuple[np.ndarray, ...]) -> "Tridiagonal":
        """A reduction made before (``single()`` and ``values``), without the fp64 matrix: ``top`` works as it did."""
        self = cls.__new__(cls)
        self.n = values.numel()
        self.values = values
        self._single = tuple(np.ascontiguousarray(x, dtype=np.float32) for x in single)
        self._vectors = torch.zeros(self.n, 0, dtype=torch.float32)
        return self

    def top(self, t: int) -> torch.Tensor:
        """The top t eigenvectors (n × t, fp32), in the order of ``values``.

        Only the eigenvalues need fp64 (they decide the rank); the vectors become fp32 factors that
        are stored in fp16 or coarser. So T's eigenvectors and the back-transformation run in single
        precision, on fp32 copies of T and of the fp64 reduction's reflectors: about half the time
        of fp64, with the same projection residual to 1e-7.
        """
        n = self.n
        if not 0 <= t <= n:
            raise ValueError(f"asked for {t} eigenvectors of a {n} × {n} matrix")
        if t > self._vectors.shape[1]:
            reflectors, tau, diagonal, off = self.single()
            z = self._tridiagonal_vectors(t, diagonal, off)
            work = np.empty(64 * t, dtype=np.float32)
            _call("sormtr", b"L", b"U", b"N", n, t, reflectors, n, tau, z, n, work, work.size)  # z ← Q z
            self._vectors = torch.from_numpy(z.T[:, ::-1].copy())  # ascending from LAPACK
        return self._vectors[:, :t]

    def _tridiagonal_vectors(self, t: int, diagonal: np.ndarray, off: np.ndarray) -> np.ndarray:
        """The top t eigenvectors of T (fp32 ``diagonal`` and ``off``), ascending, as a t × n fp32 C
        array (column-major n × t)."""
        n = self.n
        f32 = np.float32
        if t * DIVIDE_AND_CONQUER_FROM >= n:
            z = np.zeros((n, n), dtype=f32)
            work, iwork = np.empty(1 + 4 * n + n * n, dtype=f32), np.empty(3 + 5 * n, dtype=np.intc)
            _call("sstedc", b"I", n, diagonal.copy(), off.copy(), z, n, work, work.size, iwork, iwork.size)
            return np.ascontiguousarray(z[n - t :])
        z = np.zeros((t, n), dtype=f32)
        found = np.zeros(1, dtype=np.intc)
        support = np.zeros(2 * t, dtype=np.intc)
        work, iwork = np.empty(18 * n, dtype=f32), np.empty(10 * n, dtype=np.intc)
        # jobz "V", range "I": eigenpairs n - t + 1 … n of T (vl, vu unused); tryrac 1.
        _call("sstemr", b"V", b"I", n, diagonal.copy(), off.copy(), 0.0, 0.0, n - t + 1, n,
              found, np.empty(n, dtype=f32), z, n, t, support, np.ones(1, dtype=np.intc), work, work.size, iwork, iwork.size)
        if found[0] != t:
            raise ArithmeticError(f"LAPACK sstemr found {found[0]} of the top {t} eigenvectors")
        return z

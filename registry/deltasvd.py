"""Delta-SVD (Zhang et al. 2025, arXiv 2508.16863): the maths, as pure functions over tensors.

For a weight delta ΔW (a conv kernel reshaped to out x in*kh*kw) with singular values σ₁ ≥ σ₂ ≥ ...,
keep the smallest rank t with E(t) = (σ₁+…+σ_t)/(σ₁+…+σ_n) ≥ τ and store A = U_tΣ_t, B = V_tᵀ.

The energy is the sum of singular values, not of their squares, as in the paper: the nuclear-norm
share spreads ranks further into the tail than the Frobenius share would, which is what keeps a
fine-tune's identity at small τ.

Two ways to get there:
- ``"svd"``: the paper's Algorithm 1 as written, a full ``torch.linalg.svd`` in fp32.
- ``"gram"`` (default): the eigendecomposition of the smaller Gram matrix in fp64 gives the same
  singular values at a fraction of the cost; the kept vectors of the other side are recovered by
  projecting ΔW onto them, so A·B is exactly the projection of ΔW onto the top-t subspace.

On the CPU the eigenvalues and the top eigenvectors come from :mod:`registry.eigen` (LAPACK's
tridiagonal solvers: all values in fp64, only the t vectors kept, in fp32); on a GPU,
``torch.linalg.eigh`` runs on the device.

The Gram matrix is the push's largest cost. It is formed in fp64 because fp32 rounding turns each
zero singular value into about sqrt(eps32)·σ₁, and a merged LoRA or a low-rank fine-tune has
hundreds of those: their spurious sum moves the energy threshold by a rank or more. Only its lower
triangle is computed, in row blocks, which saves nearly half the flops of the full product (BLAS's
own ``syrk`` would too, but torch does not expose it, and a second BLAS's thread pool beside
torch's cost more than it saved). The projection onto the kept vectors runs in fp32, where the factors' own fp16
storage is the coarser rounding by far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Imported eagerly, not at first use: threads_per_lane can only limit the threads of a BLAS that
# is already loaded, and SciPy's OpenBLAS comes with this import.
from .eigen import Tridiagonal

METHODS = ("gram", "svd")

GRAM_BLOCKS = 8
GRAM_CHUNK = 1 << 22  # elements of ΔW converted to fp64 at a time
ERROR_CHUNK = 1 << 22  # elements of the residual ΔW − A·B formed at a time
# Spectrum.stored_error answers from the spectrum only where it is within this share of the measured error.
STORED_ERROR_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LowRank:
    """ΔW ≈ a @ b, with a: (out, rank) and b: (rank, in*kh*kw), stored in the factor dtype."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    full_rank: int
    rel_error: float

    @property
    def params(self) -> int:
        return self.a.numel() + self.b.numel()


def as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """Linear weights stay as they are; conv kernels become out x (in*kh*kw)."""
    return delta.reshape(delta.shape[0], -1)


def energy_rank(singular_values: torch.Tensor, tau: float) -> int:
    """The smallest t with (σ₁+…+σ_t) / Σσ ≥ τ; 0 for an all-zero spectrum."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {tau}")
    s = singular_values.double().clamp_min(0)
    cumulative = torch.cumsum(s, 0)
    total = cumulative[-1]
    if total <= 0:
        return 0
    energy = cumulative / total
    # The last entry is exactly 1.0 (total / total), so tau = 1.0 always finds an index.
    return int(torch.searchsorted(energy, torch.tensor([tau], dtype=energy.dtype), side="left")[0]) + 1


def singular_values(matrix: torch.Tensor, method: str = "gram") -> torch.Tensor:
    """All singular values of ``matrix``, descending."""
    if method == "svd":
        try:
            return torch.linalg.svdvals(matrix.float())
        except torch.linalg.LinAlgError:  # as in svd()
            return torch.linalg.svdvals(matrix.double()).float()
    return _GramEigen(_gram(matrix), vectors=False).s


@dataclass(frozen=True)
class Reduction:
    """What a Gram-path decomposition keeps after its eigenvalues: enough to cut factors at any rank
    later, from the delta alone, without forming the Gram matrix or reducing it again. A budget
    push keeps one per layer on disk between planning and compressing (push._compress_to_budget)."""

    values: torch.Tensor  # the Gram's eigenvalues, descending, fp64
    single: tuple  # eigen.Tridiagonal.single(): the fp32 reflectors and tridiagonal form
    rounding: float  # see _gram_rounding

    def save(self, path) -> None:
        reflectors, tau, diagonal, off = self.single
        np.savez(path, values=self.values.numpy(), reflectors=reflectors, tau=tau, diagonal=diagonal, off=off, rounding=np.float64(self.rounding))

    @classmethod
    def load(cls, path) -> "Reduction":
        with np.load(path) as f:
            return cls(torch.from_numpy(f["values"]), (f["reflectors"], f["tau"], f["diagonal"], f["off"]), float(f["rounding"]))


class Spectrum:
    """All singular values of one delta matrix, and the top singular vectors to cut factors at any rank.

    Holding the decomposition lets a caller try rank t, measure the stored error, and try t + 1
    without decomposing again (max-error mode needs that once quantization adds its share).
    """

    basis = None  # a delta given whole has no compact basis for its factors (see FactoredSpectrum)

    def __init__(self, delta: torch.Tensor, method: str = "gram", reduction: Reduction | None = None):
        """``reduction``: this delta's, as :meth:`reduction` gave it before (the Gram path only)."""
        if delta.dim() < 2:
            raise ValueError("Delta-SVD needs a tensor of 2 or more dims; store 1-D deltas dense")
        if method not in METHODS:
            raise ValueError(f"unknown decomposition method {method!r}; use one of {', '.join(METHODS)}")
        self.matrix = as_matrix(delta).float()
        self.method = method
        d, k = self.matrix.shape
        self.full_rank = min(d, k)
        # Each singular value lies in [s_low, s_high]: the Gram path cannot tell apart singular
        # values whose squares are below its rounding next to the largest (see ``_gram_rounding``).
        if method == "svd":
            self._u, s, self._vh = svd(self.matrix)
            self.s = self.s_low = self.s_high = s.double()
        else:
            if reduction is not None:
                rounding, self._eigen = reduction.rounding, _GramEigen.resume(reduction)
            else:
                gram = _gram(self.matrix)
                rounding = _gram_rounding(self.matrix, gram)
                self._eigen = _GramEigen(gram)
            self._rounding = rounding
            self.s = self._eigen.s
            squares = self.s**2
            self.s_low, self.s_high = (squares - rounding).clamp_min(0).sqrt(), (squares + rounding).sqrt()

    def reduction(self) -> Reduction | None:
        """What :class:`Reduction` keeps of this decomposition; None off the CPU Gram path."""
        if self.method != "gram" or self._eigen._tridiagonal is None:  # an fp64 SVD took over, or a GPU's eigh
            return None
        tridiagonal = self._eigen._tridiagonal
        return Reduction(tridiagonal.values, tridiagonal.single(), self._rounding)

    def rank(self, mode: str, value: float) -> int:
        """The rank that ``mode`` (``"energy"``: τ, ``"max-error"``: the relative Frobenius bound)
        picks from the exact spectrum.

        Where the Gram path's rounding leaves the choice open (τ 1 on a delta whose smallest
        singular values are below what an fp64 Gram resolves, or a threshold that falls within
        that rounding), the layer is decomposed again by an fp64 SVD, which resolves them.
        """
        choose = {"energy": energy_rank, "max-error": error_rank}[mode]
        t = choose(self.s, value)
        if not _rank_is_certain(mode, value, t, self.s_low, self.s_high):
            self._exact()
            t = choose(self.s, value)
        return t

    def _exact(self) -> None:
        u, s, vh = torch.linalg.svd(self.matrix.double(), full_matrices=False)
        # What an fp64 SVD cannot tell from zero is zero (numpy's matrix_rank tolerance): an exactly
        # rank-deficient delta keeps its rank at τ 1 instead of its rounding noise.
        s = torch.where(s > max(self.matrix.shape) * torch.finfo(torch.float64).eps * s[:1], s, 0.0)
        self.method = "svd"
        self._u, self._vh = u.float(), vh.float()
        self.s = self.s_low = self.s_high = s

    def factors(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in fp32 with A·B the best rank-t approximation: A = U_tΣ_t, B = V_tᵀ."""
        if self.method == "svd":
            return self._u[:, :t] * self._s32[:t], self._vh[:t]
        d, k = self.matrix.shape
        top = self._eigen.top(t)
        if d <= k:
            # top = U_t; UᵀΔW = Σ_t V_tᵀ, whose row norms are the singular values.
            projected = top.T @ self.matrix
            sigma = torch.linalg.vector_norm(projected, dim=1, dtype=torch.float64).float()
            return top * sigma, projected / torch.where(sigma > 0, sigma, 1.0)[:, None]
        # top = V_t; ΔW V_t = U_t Σ_t.
        return self.matrix @ top, top.T.contiguous()

    def stored_error(self, a: torch.Tensor, b: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor) -> float:
        """‖ΔW − Qa·Qb‖_F / ‖ΔW‖_F for the factors (a, b) = ``factors(t)`` stored as (qa, qb), from the
        spectrum where that is certain to STORED_ERROR_TOLERANCE, else from the residual itself.

        A·B is the projection of ΔW onto its top-t singular subspaces, so the residual R = ΔW − A·B
        is orthogonal to (Qa − A)·B and to A·(Qb − B), and ‖ΔW − Qa·Qb‖² = Σ_{i>t} σᵢ² + q − 2⟨R, Ea·Eb⟩
        with q = ‖Ea·Qb + A·Eb‖² (Ea = Qa − A, Eb = Qb − B). q is taken direction by direction; what
        that leaves out, and the last term, are bounded by ``slack``. Where the truncation dominates,
        as it does under a rank rule at τ < 1, this saves a pass of d·k·t multiply-adds per layer.
        """
        sigma = self.s.double().clamp_min(0)
        squares = sigma**2
        total = squares.sum()
        if total <= 0:
            return 0.0
        t = a.shape[1]
        tail = squares[t:].sum()
        ea, eb = _squares(qa - a, 0), _squares(qb - b, 1)
        q_a, q_b = (ea * _squares(qb, 1)).sum(), (_squares(a, 0) * eb).sum()
        # What the estimate q_a + q_b of q leaves out, bounded: the cross term 2⟨Ea·Qb, A·Eb⟩ by
        # Cauchy-Schwarz; the off-diagonal parts of Qb·Qbᵀ (‖Qb·Qbᵀ − I‖₂ <= 2‖Eb‖ + ‖Eb‖² beside
        # BBᵀ = I) and of AᵀA (= Σ², both to the fp32 vectors' orthogonality, taken as 1e-3); and
        # |⟨R, Ea·Eb⟩| <= ‖R‖₂·‖Ea‖_F·‖Eb‖_F with ‖R‖₂ = σ_{t+1}.
        fa2, fb2 = ea.sum(), eb.sum()
        fa, fb = fa2.sqrt(), fb2.sqrt()
        slack = (
            2 * (q_a * q_b).sqrt()
            + 2 * fa2 * (2 * fb + fb2 + 1e-3)
            + 2e-3 * sigma[0] ** 2 * fb2
            + 2 * (sigma[t] if t < sigma.numel() else 0.0) * fa * fb
        )
        q = q_a + q_b
        if slack > 2 * STORED_ERROR_TOLERANCE * tail:
            return relative_error(self.matrix, qa, qb)
        return float(((tail + q) / total).clamp(0, 1).sqrt())

    @property
    def _s32(self) -> torch.Tensor:
        return self.s.float()

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def error_of(self, qa: torch.Tensor, qb: torch.Tensor) -> float:
        """‖ΔW − Qa·Qb‖_F / ‖ΔW‖_F, measured on the residual."""
        return relative_error(self.matrix, qa, qb)


class FactoredSpectrum:
    """The exact spectrum of a delta given as a product, ΔW = up · down (an adapter's LoRA), formed
    from the factors alone: with up = Q₁R₁ and downᵀ = Q₂R₂, ΔW = Q₁(R₁R₂ᵀ)Q₂ᵀ, so the SVD of the
    r x r core gives every nonzero singular value and the singular vectors, and ΔW is never formed.

    It answers what a :class:`Spectrum` answers (ranks, factors at rank t, the stored error), over
    at most r singular values: no rank rule can keep more than the adapter's own rank.
    """

    basis: dict[str, torch.Tensor] | None = None

    def __init__(self, up: torch.Tensor, down: torch.Tensor, basis: dict[str, torch.Tensor] | None = None):
        """``basis``: ``down`` in a compact form (a Tucker conv's ``b.mid`` and ``b.down``, see
        :mod:`encodings`), so that factors can be stored as coefficients over it."""
        self.basis = basis
        up, down = up.double(), down.double()
        self.full_rank = up.shape[1]  # the product's rank is at most the factors' inner dimension
        q1, r1 = torch.linalg.qr(up)
        q2, r2 = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r1 @ r2.T)
        # What fp64 cannot tell from zero is zero (as Spectrum._exact): a LoRA whose rank is below
        # its declared r keeps only its true rank at τ 1.
        s = torch.where(s > max(up.shape[0], down.shape[1]) * torch.finfo(torch.float64).eps * s[:1], s, 0.0)
        self.s = self.s_low = self.s_high = s
        self._u, self._v = q1 @ u, q2 @ vh.T  # (out, r) and (in, r), orthonormal columns, fp64
        self._vh, self._r2 = vh, r2
        self.method = "factored"

    @property
    def device(self) -> torch.device:
        return self._u.device

    def rank(self, mode: str, value: float) -> int:
        return {"energy": energy_rank, "max-error": error_rank}[mode](self.s, value)

    def factors(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._u[:, :t] * self.s[:t]).float(), self._v[:, :t].T.float().contiguous()

    def coefficients(self, t: int) -> torch.Tensor:
        """C (t x r) with C · down = B of ``factors(t)``: Vᵀ = vhᵀ-rows · Q₂ᵀ and down = R₂ᵀQ₂ᵀ, so
        C = vh[:t] · (R₂ᵀ)⁺; the pseudo-inverse, because a kept direction (σ > 0) lies in R₂'s range
        even where down has a lower rank than r."""
        return (self._vh[:t] @ torch.linalg.pinv(self._r2.T)).float()

    def stored_error(self, a: torch.Tensor, b: torch.Tensor, qa: torch.Tensor, qb: torch.Tensor) -> float:
        return self.error_of(qa, qb)

    def error_of(self, qa: torch.Tensor, qb: torch.Tensor) -> float:
        """‖ΔW − Qa·Qb‖_F / ‖ΔW‖_F without forming either: ΔW − Qa·Qb = X·Y with X = [UΣ, −Qa] and
        Y = [Vᵀ; Qb], whose squared norm is the trace of (XᵀX)(YYᵀ), two small Gram matrices."""
        total = float((self.s**2).sum())
        if total <= 0:
            return 0.0
        x = torch.cat([self._u * self.s, -qa.double()], dim=1)
        y = torch.cat([self._v.T, qb.double()], dim=0)
        squares = float(((x.T @ x) * (y @ y.T)).sum())
        return max(0.0, squares / total) ** 0.5


class _GramEigen:
    """A Gram matrix's eigenvalues as singular values, descending, and its top eigenvectors on demand:
    LAPACK's tridiagonal solvers on the CPU, ``torch.linalg.eigh`` on a GPU (``eigvalsh`` where
    ``vectors`` is false)."""

    def __init__(self, gram: torch.Tensor, *, vectors: bool = True):
        self._tridiagonal: Tridiagonal | None = None
        if gram.device.type == "cpu":
            self._tridiagonal = Tridiagonal(gram)
            eigenvalues = self._tridiagonal.values
        elif vectors:
            eigenvalues, eigenvectors = torch.linalg.eigh(gram, UPLO="L")
            eigenvalues, self._eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        else:
            eigenvalues = torch.linalg.eigvalsh(gram, UPLO="L").flip(0)
        # fp64: small singular values are square roots of small eigenvalues, and the energy sums them all.
        self.s = eigenvalues.clamp_min(0).sqrt()

    @classmethod
    def resume(cls, reduction: Reduction) -> "_GramEigen":
        self = cls.__new__(cls)
        self._tridiagonal = Tridiagonal.resume(reduction.values, reduction.single)
        self.s = reduction.values.clamp_min(0).sqrt()
        return self

    def top(self, t: int) -> torch.Tensor:
        """The top t eigenvectors, descending, in fp32: they become factors stored in fp16 or coarser."""
        if self._tridiagonal is not None:
            return self._tridiagonal.top(t)
        return self._eigenvectors[:, :t].float()


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd`` in fp32, retried in fp64 where LAPACK's fp32 divide-and-conquer fails
    to converge (it does on deltas whose trailing singular values are all zero)."""
    try:
        return torch.linalg.svd(matrix.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.float(), s.float(), vh.float()


def truncation_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """Entry t is the relative Frobenius error of keeping the top t: sqrt(Σ_{i>t} σᵢ² / Σ σᵢ²)."""
    sq = singular_values.double().clamp_min(0) ** 2
    total = sq.sum()
    if total <= 0:
        return torch.zeros(sq.numel() + 1, dtype=torch.float64)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,)), sq.new_zeros(1)])
    return (tail / total).clamp_min(0).sqrt()


def error_rank(singular_values: torch.Tensor, max_error: float) -> int:
    """The smallest t whose truncation leaves a relative Frobenius error of at most ``max_error``."""
    if not 0.0 <= max_error < 1.0:
        raise ValueError(f"max error must be in [0, 1), got {max_error}")
    errors = truncation_errors(singular_values)
    return int(torch.nonzero(errors <= max_error)[0])


def decompose(
    delta: torch.Tensor,
    tau: float,
    *,
    method: str = "gram",
    factor_dtype: torch.dtype = torch.float16,
) -> LowRank:
    """The paper's rule in one call: Delta-SVD of one tensor, factors cast to ``factor_dtype``."""
    spectrum = Spectrum(delta, method)
    a, b = spectrum.factors(spectrum.rank("energy", tau))
    a = a.to(factor_dtype).contiguous()
    b = b.to(factor_dtype).contiguous()
    return LowRank(a=a, b=b, rank=a.shape[1], full_rank=spectrum.full_rank, rel_error=relative_error(spectrum.matrix, a, b))


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A·B in fp32, whatever the factors' storage dtype: fp16 accumulation would lose the delta."""
    return a.float() @ b.float()


def relative_error(matrix: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """‖ΔW − A·B‖_F / ‖ΔW‖_F in fp32, a block of rows at a time: the whole residual of the largest
    SD1.5 layer would be another 118 MB beside the delta and the factors."""
    matrix = matrix.float()
    norm = torch.linalg.matrix_norm(matrix)
    if norm == 0:
        return 0.0
    if not a.shape[1]:
        return 1.0
    a, b = a.float(), b.float()
    rows = max(1, ERROR_CHUNK // max(1, matrix.shape[1]))
    residual = matrix.new_empty(min(rows, matrix.shape[0]), matrix.shape[1])  # reused: no fresh pages per block
    squares = torch.zeros((), dtype=torch.float64, device=matrix.device)
    for lo in range(0, matrix.shape[0], rows):
        block = matrix[lo : lo + rows]
        out = residual[: block.shape[0]]
        torch.addmm(block, a[lo : lo + rows], b, alpha=-1, out=out)
        squares += torch.linalg.vector_norm(out).double() ** 2
    return float(squares.sqrt() / norm)


def _gram_rounding(matrix: torch.Tensor, gram: torch.Tensor) -> float:
    """A bound on how far each eigenvalue of the fp64 Gram of ``matrix`` (d x k, n = min(d, k))
    can be from the exact σᵢ²: forming it errs by at most k·u·‖ΔW‖²_F (each entry is a k-term dot
    product), and the symmetric eigensolver adds about n·u·‖G‖₂ (u = fp64's unit roundoff).

    A σᵢ whose square is below this is not resolved: σ_min of a 64 x 64 delta was 6.3e-11 beside
    σ_max 0.33, and the Gram reported 0.
    """
    n, k = min(matrix.shape), max(matrix.shape)
    unit = torch.finfo(torch.float64).eps / 2
    trace = float(torch.diagonal(gram).sum())  # ‖ΔW‖²_F ≥ ‖G‖₂
    return 2 * (k + n) * unit * trace


def _rank_is_certain(mode: str, value: float, t: int, low: torch.Tensor, high: torch.Tensor) -> bool:
    """Whether rank t is ``mode``'s choice for every spectrum between ``low`` and ``high``: rank t
    meets the rule at its least favourable values, and rank t − 1 fails it at its most favourable."""
    if torch.equal(low, high):
        return True
    if mode == "energy":
        # E(t) = head / (head + tail): least when the head is low and the tail high.
        def share(head_low: bool, r: int) -> float:
            head, tail = (low if head_low else high)[:r].sum(), (high if head_low else low)[r:].sum()
            return float(head / (head + tail)) if head + tail > 0 else 1.0

        return share(True, t) >= value and (t == 0 or share(False, t - 1) < value)
    # max-error: err(t)² = tail / (head + tail) of the squares.
    def error(tail_high: bool, r: int) -> float:
        head, tail = ((low if tail_high else high)[:r] ** 2).sum(), ((high if tail_high else low)[r:] ** 2).sum()
        return float(tail / (head + tail)) if head + tail > 0 else 0.0

    return error(True, t) <= value**2 and (t == 0 or error(False, t - 1) > value**2)


def _squares(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared norms along ``dim`` (0: of each column, 1: of each row), summed in fp64."""
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64) ** 2


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """The smaller of ΔWΔWᵀ and ΔWᵀΔW in fp64; only the lower triangle is filled (read it with ``UPLO="L"``)."""
    m = matrix.detach()
    if m.shape[0] > m.shape[1]:
        m = m.T  # a view: the products below read it transposed
    n, k = m.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=m.device)
    # Row block i needs columns up to its own end only: (b+1)/2b of the full product's flops, while
    # the blocks stay large enough (>= 128 rows) to run at the matmul's full speed.
    blocks = max(1, min(GRAM_BLOCKS, n // 128))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    # fp64 a slice of columns at a time: a whole fp64 copy of the largest SD1.5 layer is 236 MB.
    step = max(1, GRAM_CHUNK // max(n, 1))
    chunk = torch.empty(n, min(step, k), dtype=torch.float64, device=m.device)  # reused: no fresh pages per slice
    for c in range(0, k, step):
        part = chunk[:, : min(step, k - c)]
        part.copy_(m[:, c : c + step])
        for lo, hi in zip(edges, edges[1:]):
            gram[lo:hi, :hi].addmm_(part[lo:hi], part[:hi].T)
    return gram

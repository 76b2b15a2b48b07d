"""Which rank each layer keeps: the paper's energy rule, a per-tensor error bound, or a byte budget.

Budget mode's criterion: keep the set of singular directions, over all layers together, that
maximizes the retained squared Frobenius norm of the deltas, Σ_layers Σ_kept σᵢ² — equivalently,
minimizes the total squared error Σ‖ΔW − A·B‖²_F — subject to the stored bytes fitting the budget.
Each direction costs the bytes of its column of A and row of B under the chosen encoding, so the
allocation is a knapsack; it is filled greedily by gain per byte (σᵢ² / bytes), taking each layer's
directions in order. Every cost is an upper bound on what the blob will take (zstd's worst-case
bound on the uncompressed safetensors, header included), so the stored total can never exceed the
budget, only fall short of it by what zstd saves.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from . import deltasvd, encodings
from .config import DEFAULT_ENERGY, parse_size
from .errors import UsageError

MODES = ("energy", "max-error", "budget", "exact")

# Safetensors header bound per tensor in a blob: {"name":{"dtype":"XX","shape":[a,b],"data_offsets":[x,y]}}
# is under 100 bytes for our names and any realistic shape; plus the 8-byte length and padding.
_HEADER_PER_TENSOR = 128
_HEADER_FIXED = 16


@dataclass(frozen=True)
class RankRule:
    """How a push chooses ranks. ``value`` is tau, the error bound, or the budget in bytes."""

    mode: str
    value: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"unknown rank mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.mode == "energy" and not 0.0 < self.value <= 1.0:
            raise UsageError(f"--energy must be in (0, 1], got {self.value:g}")
        if self.mode == "max-error" and not 0.0 <= self.value < 1.0:
            raise UsageError(f"--max-error must be in [0, 1), got {self.value:g}")
        if self.mode == "budget" and self.value <= 0:
            raise UsageError(f"--budget must be positive, got {self.value:g}")

    @property
    def lossless(self) -> bool:
        return self.mode == "exact"

    def __str__(self) -> str:
        if self.mode == "exact":
            return "exact"
        if self.mode == "budget":
            return f"budget={int(self.value)}"
        return f"{self.mode}={self.value:g}"

    @classmethod
    def from_options(
        cls, energy: float | None = None, max_error: float | None = None, budget: int | str | None = None, exact: bool = False
    ) -> "RankRule":
        """The one rule that a push's options name; the paper's energy rule at tau 0.5 when none is given."""
        given = [name for name, v in (("--energy", energy), ("--max-error", max_error), ("--budget", budget)) if v is not None]
        if exact:
            given.append("--exact")
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} each choose the ranks; give only one of them")
        if exact:
            return cls("exact")
        if max_error is not None:
            return cls("max-error", float(max_error))
        if budget is not None:
            return cls("budget", float(parse_size(budget)))
        return cls("energy", DEFAULT_ENERGY if energy is None else float(energy))

    @classmethod
    def parse(cls, text: str) -> "RankRule":
        """``energy=0.5``, ``max-error=0.05``, ``budget=20MB`` (or ``budget=20000000``), ``exact``."""
        mode, _, value = text.partition("=")
        if mode == "exact":
            return cls("exact")
        if mode == "budget":
            return cls("budget", float(parse_size(value)))
        try:
            return cls(mode, float(value))
        except ValueError:
            raise UsageError(f"cannot read rank rule {text!r}; write energy=0.5, max-error=0.05, budget=20MB or exact") from None


def rank_for(rule: RankRule, singular_values: torch.Tensor) -> int:
    """Rank under a per-tensor rule (energy or max-error); budget ranks come from :func:`allocate`."""
    if rule.mode == "energy":
        return deltasvd.energy_rank(singular_values, rule.value)
    if rule.mode == "max-error":
        return deltasvd.error_rank(singular_values, rule.value)
    raise ValueError(f"rank_for does not apply to {rule.mode} mode")


def blob_bound(payload: float, n_tensors: int) -> int:
    """Largest size a blob of this payload can take: safetensors header, then zstd's compress bound."""
    raw = payload + _HEADER_FIXED + _HEADER_PER_TENSOR * n_tensors
    # ZSTD_COMPRESSBOUND(s) = s + s/256 + (s < 128 KiB ? (128 KiB - s) / 2048 : 0)
    return math.ceil(raw + raw / 256 + 64) + 8


def factor_blob_bound(out: int, inner: int, singular_values: torch.Tensor, rank: int, encoding: str) -> int:
    """Upper bound on the stored bytes of rank-``rank`` factors of an out × inner delta."""
    wide = encodings.leading_directions(singular_values, rank, encoding)
    payload = wide * encodings.direction_bytes(out, inner, encoding, True)
    payload += (rank - wide) * encodings.direction_bytes(out, inner, encoding, False)
    n_tensors = 2 if encoding in encodings.FLOAT_ENCODINGS else (4 if wide == rank else 8)
    return blob_bound(payload, n_tensors)


@dataclass(frozen=True)
class LayerSpectrum:
    """What budget allocation needs of one 2-D delta: its shape and singular values."""

    key: str
    out: int
    inner: int
    singular_values: torch.Tensor


def allocate(layers: list[LayerSpectrum], budget: int, encoding: str) -> dict[str, int]:
    """Ranks that maximize Σ kept σᵢ² with Σ factor_blob_bound ≤ ``budget`` (greedy by gain per byte)."""
    ranks = {layer.key: 0 for layer in layers}
    spent = 0
    heap: list[tuple[float, int, int]] = []

    def push_next(i: int) -> None:
        layer = layers[i]
        t = ranks[layer.key]
        if t >= layer.singular_values.numel():
            return
        sigma = float(layer.singular_values[t])
        if sigma <= 0:
            return
        cost = factor_blob_bound(layer.out, layer.inner, layer.singular_values, t + 1, encoding) - (
            factor_blob_bound(layer.out, layer.inner, layer.singular_values, t, encoding) if t else 0
        )
        heapq.heappush(heap, (-(sigma * sigma) / cost, i, cost))

    for i in range(len(layers)):
        push_next(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer's next direction does not fit; cheaper ones of other layers may
        spent += cost
        ranks[layers[i].key] += 1
        push_next(i)
    return ranks


@dataclass(frozen=True)
class FixedTensor:
    """A changed tensor that takes no rank (a 1-D delta, an integer tensor): stored whole."""

    key: str
    numel: int
    itemsize: int | None  # None for float tensors, whose dense delta takes the encoding's dtype


def estimate(layers: list[LayerSpectrum], fixed: list[FixedTensor], rule: RankRule, encoding: str) -> tuple[int, int, float, float]:
    """What a push under ``rule`` and ``encoding`` would keep, from the spectra alone.

    Returns (kept params, stored bytes at most, relative Frobenius error of all 2-D deltas
    together, largest per-tensor error). Errors are the truncation's; quantization adds a little.
    """
    if rule.mode == "exact":
        raise UsageError("exact pushes cannot be estimated from spectra; push with --exact to see their size")
    dense_itemsize = encodings.dense_dtype(encoding).itemsize
    fixed_bytes = sum(blob_bound(f.numel * (f.itemsize or dense_itemsize), 1) for f in fixed)
    params = sum(f.numel for f in fixed)
    if rule.mode == "budget":
        ranks = allocate(layers, max(0, int(rule.value) - fixed_bytes), encoding)
    else:
        ranks = {layer.key: rank_for(rule, layer.singular_values) for layer in layers}
    total = 0
    squared_error = squared_norm = 0.0
    worst = 0.0
    for layer in layers:
        t = ranks[layer.key]
        errors = deltasvd.truncation_errors(layer.singular_values)
        norm2 = float((layer.singular_values.double() ** 2).sum())
        lowrank = factor_blob_bound(layer.out, layer.inner, layer.singular_values, t, encoding) if t else 0
        dense = blob_bound(layer.out * layer.inner * dense_itemsize, 1)
        if dense < lowrank:  # as a push would: the whole delta is cheaper than its factors
            total, error, params = total + dense, 0.0, params + layer.out * layer.inner
        else:
            total, error, params = total + lowrank, float(errors[t]), params + t * (layer.out + layer.inner)
        squared_error += error**2 * norm2
        squared_norm += norm2
        worst = max(worst, error)
    overall = (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0
    return params, total + fixed_bytes, overall, worst

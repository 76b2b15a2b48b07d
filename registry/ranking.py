"""Which rank each layer keeps: the paper's energy rule, a per-tensor error bound, or a byte budget.

Budget mode's criterion: keep the set of singular directions, over all layers together, that
maximizes the retained squared Frobenius norm of the deltas, Σ_layers Σ_kept σᵢ² (less the
rounding noise of the chosen encoding) — equivalently, minimizes the total squared error
Σ‖ΔW − ΔŴ‖²_F — subject to the stored bytes fitting the budget. Each step costs the bytes of one
direction's column of A and row of B; with ``mixed`` a direction can be taken at 4 bits and later
widened to 8 (the leading directions are the wide ones). The knapsack is filled greedily by gain per
byte, each layer's steps in order. Every cost is an upper bound on what the blob will take (the
exact safetensors layout, then zstd's worst case for incompressible input: raw blocks), so the
stored total never exceeds the budget; it falls short by what zstd saves.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from . import codec, deltasvd, encodings, safetensors_format
from .config import DEFAULT_ENERGY, parse_size
from .errors import UsageError


MODES = ("energy", "max-error", "budget", "exact")
# How budget mode values one singular direction σᵢ of a layer's delta ΔW, per byte it costs:
#   frobenius  σᵢ², the same for every layer: the total squared error of all deltas
#   relative   σᵢ² / ‖ΔW‖²_F: the sum of each layer's own relative squared error
#   nuclear    σᵢ / Σσ: each layer's share of its own singular values, as the paper's rule counts
#   tau        no greedy step: the paper's rule at the largest τ that fits, the same τ for every layer
CRITERIA = ("frobenius", "relative", "nuclear", "tau")
BUDGET_CRITERION = "frobenius"

_ZSTD_BLOCK = 128 * 1024
_ZSTD_FRAME = 22  # magic, frame header descriptor, window, dictionary id, content size, checksum


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


def zstd_bound(raw: int) -> int:
    """zstd never stores a block bigger than as raw bytes with a 3-byte header; plus the frame's."""
    return raw + 3 * max(1, -(-raw // _ZSTD_BLOCK)) + _ZSTD_FRAME


def safetensors_size(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    """At least the bytes of a safetensors file holding these tensors."""
    return safetensors_format.size_bound([(name, codec.dtype_name(dtype), shape) for name, dtype, shape in tensors])


def blob_bound_of(tensors: dict[str, torch.Tensor]) -> int:
    return zstd_bound(safetensors_size([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]))


def dense_bound(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return zstd_bound(safetensors_size([("delta", dtype, shape)]))


def factor_blob_bound(out: int, inner: int, rank: int, wide: int, encoding: str) -> int:
    """Upper bound on the stored bytes of rank-``rank`` factors of an out × inner delta, ``wide`` of
    them at 8 bits (``int8``/``mixed``; the rest at 4)."""
    if rank == 0:
        return 0
    if encoding in encodings.FLOAT_ENCODINGS:
        dt = encodings.FLOAT_ENCODINGS[encoding]
        return zstd_bound(safetensors_size([("a", dt, (out, rank)), ("b", dt, (rank, inner))]))
    narrow = rank - wide
    layout = [("a.q8", torch.int8, (out, wide)), ("a.s8", torch.float32, (wide,)), ("b.q8", torch.int8, (wide, inner)), ("b.s8", torch.float32, (wide,))]
    if narrow:
        layout += [
            ("a.q4", torch.uint8, (out, -(-narrow // 2))), ("a.s4", torch.float32, (narrow,)),
            ("b.q4", torch.uint8, (narrow, -(-inner // 2))), ("b.s4", torch.float32, (narrow,)),
        ]
    return zstd_bound(safetensors_size(layout))


@dataclass(frozen=True)
class LayerSpectrum:
    """What budget allocation needs of one 2-D delta: its shape and singular values."""

    key: str
    out: int
    inner: int
    singular_values: torch.Tensor


@dataclass(frozen=True)
class Allocation:
    rank: int
    wide: int  # leading directions at the encoding's wide format (8 bits for int8 / mixed)


def allocate(
    layers: list[LayerSpectrum],
    budget: int,
    encoding: str,
    start: dict[str, Allocation] | None = None,
    paid: dict[str, int] | None = None,
    criterion: str | None = None,
) -> dict[str, Allocation]:
    """Ranks (and, for ``mixed``, 8-bit counts) that maximize the kept energy within ``budget`` bytes.

    Greedy by gain per byte over each layer's next steps: add direction t (at 4 bits for ``mixed``,
    else at the encoding's width), or, for ``mixed``, widen direction ``wide`` from 4 to 8 bits.
    To top up an allocation already stored, pass it as ``start`` with the bytes each layer's blob
    really took as ``paid``; ``budget`` is then the extra room, and a layer's first step costs its
    new bound less what it paid (re-compressing it gives up what zstd saved on it).
    """
    criterion = criterion or BUDGET_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"unknown budget criterion {criterion!r}")
    start = start or {}
    paid = paid or {}
    origin = {layer.key: start.get(layer.key, Allocation(0, 0)) for layer in layers}
    if criterion == "tau":
        return _uniform_tau(layers, budget, encoding, origin, paid)
    # What one direction of a layer is worth, by criterion (see CRITERIA).
    weight = {}
    for layer in layers:
        s = layer.singular_values.double()
        total = float((s if criterion == "nuclear" else s**2).sum())
        weight[layer.key] = 1.0 if criterion == "frobenius" else (1.0 / total if total > 0 else 0.0)

    def worth(layer: LayerSpectrum, i: int) -> float:
        sigma = float(layer.singular_values[i])
        return (sigma if criterion == "nuclear" else sigma**2) * weight[layer.key]

    state = {key: [a.rank, a.wide] for key, a in origin.items()}  # rank, wide
    spent = 0
    heap: list[tuple[float, int, int, str, tuple[int, int]]] = []
    narrow_bits = 4 if encoding == "mixed" else 8
    keep_add = 1.0 - (encodings.NOISE[narrow_bits] if encoding in ("int8", "mixed") else 0.0)
    keep_widen = encodings.NOISE[4] - encodings.NOISE[8]

    def cost(layer: LayerSpectrum, rank: int, wide: int) -> int:
        return factor_blob_bound(layer.out, layer.inner, rank, wide, encoding)

    def offer(i: int) -> None:
        layer = layers[i]
        rank, wide = state[layer.key]
        s = layer.singular_values
        at_origin = Allocation(rank, wide) == origin[layer.key] and layer.key in paid
        now = paid[layer.key] if at_origin else cost(layer, rank, wide)
        if rank < s.numel() and s[rank] > 0:
            new_wide = wide if encoding == "mixed" else rank + 1
            c = cost(layer, rank + 1, new_wide) - now
            heapq.heappush(heap, (-worth(layer, rank) * keep_add / max(c, 1), i, c, "add", (rank, wide)))
        if encoding == "mixed" and wide < rank:
            # Can cost less than nothing: widening the last 4-bit direction drops the 4-bit tensors' headers.
            c = cost(layer, rank, wide + 1) - now
            heapq.heappush(heap, (-worth(layer, wide) * keep_widen / max(c, 1), i, c, "widen", (rank, wide)))

    for i in range(len(layers)):
        offer(i)
    while heap:
        _, i, c, step, at = heapq.heappop(heap)
        rank, wide = state[layers[i].key]
        if at != (rank, wide):
            continue  # offered before the layer changed (its costs with it); a fresh offer is in the heap
        if spent + c > budget:
            continue  # this step does not fit; cheaper steps of other layers may
        spent += c
        if step == "add":
            state[layers[i].key] = [rank + 1, wide if encoding == "mixed" else rank + 1]
        else:
            state[layers[i].key] = [rank, wide + 1]
        # Both of this layer's offers are stale now (costs shift with the shape): make new ones.
        offer(i)
    return {key: Allocation(rank, wide) for key, (rank, wide) in state.items()}


def _uniform_tau(
    layers: list[LayerSpectrum], budget: int, encoding: str, origin: dict[str, Allocation], paid: dict[str, int]
) -> dict[str, Allocation]:
    """The paper's rule at the largest τ whose bytes fit: bisection on τ, every layer's rank by its
    own energy share, and for ``mixed`` its 8-bit count as a rule would choose it. A layer never
    falls below ``origin``; one that stays there costs what it ``paid``, a grown one its new bound
    less that."""

    def plan(tau: float) -> dict[str, Allocation]:
        out = {}
        for layer in layers:
            t = deltasvd.energy_rank(layer.singular_values, tau) if tau > 0 else 0
            a = Allocation(t, encodings.leading_directions(layer.singular_values, t, encoding))
            at = origin[layer.key]
            out[layer.key] = a if (a.rank, a.wide) > (at.rank, at.wide) else at
        return out

    def extra(p: dict[str, Allocation]) -> int:
        spent = 0
        for layer in layers:
            a = p[layer.key]
            if a == origin[layer.key] and layer.key in paid:
                continue
            spent += factor_blob_bound(layer.out, layer.inner, a.rank, a.wide, encoding) - paid.get(layer.key, 0)
        return spent

    lo, hi = 0.0, 1.0
    if extra(plan(hi)) <= budget:
        return plan(hi)
    for _ in range(40):  # τ to within 1e-12: finer than any layer's next singular value moves it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if extra(plan(mid)) <= budget else (lo, mid)
    return plan(lo)


@dataclass(frozen=True)
class FixedTensor:
    """A changed tensor that takes no rank (a 1-D delta, an integer tensor): stored whole."""

    key: str
    numel: int
    itemsize: int | None  # None for float tensors, whose dense delta takes the encoding's dtype


def estimate(layers: list[LayerSpectrum], fixed: list[FixedTensor], rule: RankRule, encoding: str) -> tuple[int, int, float, float]:
    """What a push under ``rule`` and ``encoding`` would keep, from the spectra alone.

    Returns (kept params, stored bytes at most, relative Frobenius error of all 2-D deltas
    together, largest per-tensor error). Errors count the truncation and the encoding's expected
    rounding noise (:data:`encodings.NOISE`).
    """
    if rule.mode == "exact":
        raise UsageError("exact pushes cannot be estimated from spectra; push with --exact to see their size")
    dense_dtype = encodings.dense_dtype(encoding)
    fixed_bytes = sum(dense_bound((f.numel,), dense_dtype if f.itemsize is None else codec.INT_OF_SIZE[f.itemsize]) for f in fixed)
    params = sum(f.numel for f in fixed)
    if rule.mode == "budget":
        plan = allocate(layers, max(0, int(rule.value) - fixed_bytes), encoding)
    else:
        plan = {}
        for layer in layers:
            t = rank_for(rule, layer.singular_values)
            plan[layer.key] = Allocation(t, encodings.leading_directions(layer.singular_values, t, encoding))
    total = 0
    squared_error = squared_norm = 0.0
    worst = 0.0
    for layer in layers:
        t, wide = plan[layer.key].rank, plan[layer.key].wide
        sq = layer.singular_values.double() ** 2
        norm2 = float(sq.sum())
        lowrank = factor_blob_bound(layer.out, layer.inner, t, wide, encoding)
        dense = dense_bound((layer.out, layer.inner), dense_dtype)
        if dense < lowrank:  # as a push would: the whole delta is cheaper than its factors
            total, lost, params = total + dense, 0.0, params + layer.out * layer.inner
        else:
            noise = 0.0
            if encoding in ("int8", "mixed"):
                noise = encodings.NOISE[8] * float(sq[:wide].sum()) + encodings.NOISE[4] * float(sq[wide:t].sum())
            total, lost, params = total + lowrank, float(sq[t:].sum()) + noise, params + t * (layer.out + layer.inner)
        squared_error += lost
        squared_norm += norm2
        worst = max(worst, (lost / norm2) ** 0.5 if norm2 else 0.0)
    overall = (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0
    return params, total + fixed_bytes, overall, worst


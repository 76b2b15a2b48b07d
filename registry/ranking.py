"""Which rank each layer keeps: the paper's energy rule, a per-tensor error bound, or a byte budget.

Budget mode (criterion ``tau+frobenius``, the default) plans in two parts. First the floor: the
paper's rule at the largest τ, the same for every layer, whose expected bytes fit; so a budget
push keeps at least what any ``--energy`` rule that fits the budget in the same encoding keeps.
Then the rest of the budget goes, greedily by gain per byte, to the singular directions that add
most to the retained squared Frobenius norm of all deltas, Σ_layers Σ_kept σᵢ² (less the rounding
noise of the encoding). Each step costs the bytes of one direction's column of A and row of B;
with ``mixed`` a direction can be taken at 4 bits and later widened to 8. Why this pair, of the
criteria in :data:`CRITERIA`: docs/rank-rules.md, "Budget criteria on real fine-tunes".

A plan counts each layer's blob at what it is expected to take: its tensor bytes times the share
zstd is expected to leave of them (:data:`EXPECTED_RATIO`, or the layer's own share once it has
been compressed), its safetensors header at :data:`HEADER_RATIO`. The push measures what the blobs
take and corrects in rounds (:func:`registry.push._compress_to_budget`), with a plan by upper
bounds (the exact safetensors layout, then zstd's worst case, raw blocks) as the last resort, so
the stored total never exceeds the budget.
"""

from __future__ import annotations

import heapq
import itertools
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
#   tau+X      that floor first, then the rest of the budget greedily by X
CRITERIA = ("frobenius", "relative", "nuclear", "tau", "tau+frobenius", "tau+relative", "tau+nuclear")
BUDGET_CRITERION = "tau+frobenius"

# The share of a factor blob's tensor bytes that zstd is expected to leave, per encoding (fp16
# mantissas and int8 codes barely compress), and of its safetensors header and framing (JSON
# names and shapes: most of a small layer's blob). A plan made with them is corrected once the
# blobs are measured, so they need not be bounds; a little high, they rarely overshoot.
# Fitted to the blobs of the real fine-tunes (bench/real_models.py) and the test model, rounded up.
EXPECTED_RATIO = {"fp32": 0.94, "fp16": 0.94, "bf16": 0.94, "int8": 0.93, "mixed": 0.96}
HEADER_RATIO = {"fp32": 1.0, "fp16": 1.0, "bf16": 1.0, "int8": 0.75, "mixed": 0.42}

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
            raise UsageError(f"energy (--energy) must be in (0, 1], got {self.value:g}")
        if self.mode == "max-error" and not 0.0 <= self.value < 1.0:
            raise UsageError(f"max_error (--max-error) must be in [0, 1), got {self.value:g}")
        if self.mode == "budget" and self.value <= 0:
            raise UsageError(f"budget (--budget) must be positive, got {self.value:g}")

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
    return 0 if rank == 0 else zstd_bound(safetensors_size(_factor_layout(out, inner, rank, wide, encoding)))


def factor_payload(out: int, inner: int, rank: int, wide: int, encoding: str) -> int:
    """The tensor bytes of such a blob, without the safetensors header and zstd's framing."""
    total = 0
    for _, dtype, shape in _factor_layout(out, inner, rank, wide, encoding) if rank else ():
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= d
        total += n
    return total


def expected_blob(out: int, inner: int, rank: int, wide: int, encoding: str, ratio: float) -> float:
    """What such a blob is expected to take: its header and framing at HEADER_RATIO, its tensor
    bytes at ``ratio``."""
    bound, payload = factor_blob_bound(out, inner, rank, wide, encoding), factor_payload(out, inner, rank, wide, encoding)
    return (bound - payload) * HEADER_RATIO[encoding] + payload * ratio


def measured_ratio(layer: "LayerSpectrum", a: "Allocation", stored: int, encoding: str) -> float | None:
    """What zstd left of the tensor bytes of ``layer``'s factors at ``a``, given the ``stored`` size
    of their blob (its header counted at HEADER_RATIO); None where there are none."""
    payload = factor_payload(layer.out, layer.inner, a.rank, a.wide, encoding)
    if not payload:
        return None
    header = factor_blob_bound(layer.out, layer.inner, a.rank, a.wide, encoding) - payload
    # Below 1: a ratio of 1 means "by bounds" to a plan. Above 0.2: a tiny blob's share is mostly noise.
    return min(0.99, max(0.2, (stored - header * HEADER_RATIO[encoding]) / payload))


def _factor_layout(out: int, inner: int, rank: int, wide: int, encoding: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    if encoding in encodings.FLOAT_ENCODINGS:
        dt = encodings.FLOAT_ENCODINGS[encoding]
        return [("a", dt, (out, rank)), ("b", dt, (rank, inner))]
    narrow = rank - wide
    layout = [("a.q8", torch.int8, (out, wide)), ("a.s8", torch.float32, (wide,)), ("b.q8", torch.int8, (wide, inner)), ("b.s8", torch.float32, (wide,))]
    if narrow:
        layout += [
            ("a.q4", torch.uint8, (out, -(-narrow // 2))), ("a.s4", torch.float32, (narrow,)),
            ("b.q4", torch.uint8, (narrow, -(-inner // 2))), ("b.s4", torch.float32, (narrow,)),
        ]
    return layout


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
    ratio: dict[str, float] | float | None = None,
) -> dict[str, Allocation]:
    """Ranks (and, for ``mixed``, 8-bit counts) for ``budget`` bytes under ``criterion`` (see CRITERIA).

    Greedy by gain per byte over each layer's next steps: add direction t (at 4 bits for ``mixed``,
    else at the encoding's width), or, for ``mixed``, widen direction ``wide`` from 4 to 8 bits.
    A layer's blob is counted as :func:`expected_blob` with ``ratio`` (per layer, or one for all;
    default EXPECTED_RATIO); a ratio of 1.0 plans by upper bounds, which no blob exceeds. To top up
    an allocation already stored, pass it as ``start`` with the bytes each layer's blob really took
    as ``paid``; ``budget`` is then the extra room, and a layer's steps cost what they add to its
    expected size.
    """
    criterion = criterion or BUDGET_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"unknown budget criterion {criterion!r}")
    floor, by = _parts(criterion)
    plan = _Plan(layers, encoding, start or {}, paid or {}, ratio)
    if floor:
        plan.floor(budget)
    if by:
        plan.greedy(budget, by)
    return plan.result()


def greedy_part(criterion: str | None = None) -> str:
    """What of ``criterion`` spends room without a floor (``tau+X``: X; ``tau`` has only its floor)."""
    criterion = criterion or BUDGET_CRITERION
    return _parts(criterion)[1] or criterion


def _parts(criterion: str) -> tuple[bool, str]:
    """Whether ``criterion`` starts with the floor, and the greedy criterion after it ("" for none)."""
    floor = criterion.startswith("tau")
    return floor, criterion.partition("+")[2] if floor else criterion


class _Plan:
    """An allocation being made: each layer's (rank, wide), and what it is expected to cost."""

    def __init__(self, layers, encoding: str, start: dict[str, Allocation], paid: dict[str, int], ratio):
        self.layers, self.encoding, self.paid = layers, encoding, paid
        self.start = {layer.key: start.get(layer.key, Allocation(0, 0)) for layer in layers}
        self.state = dict(self.start)
        if ratio is None:
            ratio = EXPECTED_RATIO.get(encoding, 1.0)
        self.ratio = ratio if isinstance(ratio, dict) else {layer.key: ratio for layer in layers}

    def cost(self, layer: LayerSpectrum, a: Allocation) -> float:
        """Expected bytes of ``layer`` at ``a``. Where it has paid for its start, that stands, and only
        what the layer gains or loses from there is expected."""
        ratio = self.ratio.get(layer.key, 1.0)

        def size(x: Allocation) -> float:  # a ratio of 1 plans by bounds: what no blob exceeds
            if ratio >= 1.0:
                return factor_blob_bound(layer.out, layer.inner, x.rank, x.wide, self.encoding)
            return expected_blob(layer.out, layer.inner, x.rank, x.wide, self.encoding, ratio)

        if layer.key not in self.paid:
            return size(a)
        return self.paid[layer.key] + size(a) - size(self.start[layer.key])

    def spent(self) -> float:
        """Bytes beyond what the start paid."""
        return sum(self.cost(layer, self.state[layer.key]) - self.paid.get(layer.key, 0) for layer in self.layers)

    def floor(self, budget: float) -> None:
        """The paper's rule at the largest τ whose plan fits: bisection on τ, every layer's rank by its
        own energy share and, for ``mixed``, its 8-bit count as the rule would choose it, or all of
        them at 8 bits where that costs no more: a short 4-bit tail's four tensor headers can cost
        more than widening it, and without this a higher τ could cost less than a lower one, and
        the bisection miss a τ that fits. A layer never falls below where it stood."""
        before = dict(self.state)

        def at(tau: float) -> dict[str, Allocation]:
            out = {}
            for layer in self.layers:
                t = deltasvd.energy_rank(layer.singular_values, tau) if tau > 0 else 0
                a = Allocation(t, encodings.leading_directions(layer.singular_values, t, self.encoding))
                if a.wide < t and self.cost(layer, Allocation(t, t)) <= self.cost(layer, a):
                    a = Allocation(t, t)
                now = before[layer.key]
                out[layer.key] = a if (a.rank, a.wide) > (now.rank, now.wide) else now
            return out

        def fits(tau: float) -> bool:
            self.state = at(tau)
            return self.spent() <= budget

        lo, hi = 0.0, 1.0
        if not fits(hi):
            for _ in range(40):  # τ to within 1e-12: finer than any layer's next singular value moves it
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            self.state = at(lo)

    def greedy(self, budget: float, by: str) -> None:
        weight = {}
        for layer in self.layers:
            s = layer.singular_values.double()
            total = float((s if by == "nuclear" else s**2).sum())
            weight[layer.key] = 1.0 if by == "frobenius" else (1.0 / total if total > 0 else 0.0)

        def worth(layer: LayerSpectrum, i: int) -> float:
            sigma = float(layer.singular_values[i])
            return (sigma if by == "nuclear" else sigma**2) * weight[layer.key]

        encoding = self.encoding
        spent = self.spent()
        heap: list[tuple[float, int, int, float, str, Allocation]] = []
        offers = itertools.count()
        narrow_bits = 4 if encoding == "mixed" else 8
        keep_add = 1.0 - (encodings.NOISE[narrow_bits] if encoding in ("int8", "mixed") else 0.0)
        keep_widen = encodings.NOISE[4] - encodings.NOISE[8]

        def offer(i: int) -> None:
            layer = self.layers[i]
            a = self.state[layer.key]
            s = layer.singular_values
            now = self.cost(layer, a)
            if a.rank < s.numel() and s[a.rank] > 0:
                c = self.cost(layer, Allocation(a.rank + 1, a.wide if encoding == "mixed" else a.rank + 1)) - now
                heapq.heappush(heap, (-worth(layer, a.rank) * keep_add / max(c, 1), i, next(offers), c, "add", a))
            if encoding == "mixed" and a.wide < a.rank:
                # Can cost less than nothing: widening the last 4-bit direction drops the 4-bit tensors' headers.
                c = self.cost(layer, Allocation(a.rank, a.wide + 1)) - now
                heapq.heappush(heap, (-worth(layer, a.wide) * keep_widen / max(c, 1), i, next(offers), c, "widen", a))

        for i in range(len(self.layers)):
            offer(i)
        while heap:
            _, i, _, c, step, at = heapq.heappop(heap)
            key = self.layers[i].key
            if at != self.state[key]:
                continue  # offered before the layer changed (its costs with it); a fresh offer is in the heap
            if spent + c > budget:
                continue  # this step does not fit; cheaper steps of other layers may
            spent += c
            if step == "add":
                self.state[key] = Allocation(at.rank + 1, at.wide if encoding == "mixed" else at.rank + 1)
            else:
                self.state[key] = Allocation(at.rank, at.wide + 1)
            # Both of this layer's offers are stale now (costs shift with the shape): make new ones.
            offer(i)

    def result(self) -> dict[str, Allocation]:
        return dict(self.state)


def trim(
    layers: list[LayerSpectrum], plan: dict[str, Allocation], paid: dict[str, int], excess: int, encoding: str, ratio: dict[str, float]
) -> dict[str, Allocation]:
    """``plan``, stored at ``paid`` bytes per layer, less its last directions until the expected
    savings (what they take off each layer's expected size at its ``ratio``) cover ``excess``.

    The direction dropped next is the last one of the layer whose energy share before it is the
    highest: the one that a floor being raised would have taken last. What stays is again the
    paper's rule at one τ for (nearly) every layer, as a floor is.
    """
    state = _Plan(layers, encoding, plan, paid, ratio)
    heap: list[tuple[float, int, int, float, Allocation]] = []
    offers = itertools.count()
    # levels[key][t]: the energy share of a layer's first t directions
    levels = {}
    for layer in layers:
        s = layer.singular_values.double().clamp_min(0)
        total = float(s.sum())
        levels[layer.key] = torch.cat([s.new_zeros(1), torch.cumsum(s, 0) / total]) if total > 0 else s.new_zeros(s.numel() + 1)

    def offer(i: int) -> None:
        layer = layers[i]
        a = state.state[layer.key]
        if a.rank == 0:
            return
        level = float(levels[layer.key][a.rank - 1])
        less = Allocation(a.rank - 1, min(a.wide, a.rank - 1))
        saved = state.cost(layer, a) - state.cost(layer, less)
        heapq.heappush(heap, (-level, i, next(offers), saved, less))

    for i in range(len(layers)):
        offer(i)
    saved_total = 0.0
    while heap and saved_total < excess:
        _, i, _, saved, less = heapq.heappop(heap)
        key = layers[i].key
        if less.rank != state.state[key].rank - 1:
            continue
        saved_total += saved
        state.state[key] = less
        offer(i)
    return state.result()


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
    rounding noise (:data:`encodings.NOISE`). A budget plan's bytes are as it expects them (a push
    measures and corrects), never more than the budget.
    """
    if rule.mode == "exact":
        raise UsageError("exact pushes cannot be estimated from spectra; push with exact=True (--exact) to see their size")
    dense_dtype = encodings.dense_dtype(encoding)
    fixed_bytes = sum(dense_bound((f.numel,), dense_dtype if f.itemsize is None else codec.INT_OF_SIZE[f.itemsize]) for f in fixed)
    params = sum(f.numel for f in fixed)
    budget = rule.mode == "budget"
    if budget:
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
        if budget:
            lowrank = int(expected_blob(layer.out, layer.inner, t, wide, encoding, EXPECTED_RATIO.get(encoding, 1.0)))
        else:
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


"""How one tensor's change is stored, and rebuilt: the representations and the choice among them.

Kinds (``entries.kind``):

- ``base``: unchanged, bit for bit (possibly in another float dtype): a reference, no blob.
- ``full``: the tensor itself (integer and boolean tensors).
- ``lowrank``: Delta-SVD factors, in one of :mod:`encodings`.
- ``dense``: the whole delta in a float dtype (1-D tensors, and layers where factors would cost more).
- ``sparse``: the changed rows, bit for bit (an embedding table where a few tokens were trained).
- ``exact``: the fine-tune's bits XOR the base's, split into byte planes, for lossless pushes.
- ``dropped``: a change that budget mode chose not to keep (rebuilds as the base tensor).
- ``spectral``: an SVDiff subject's shifts of the base weight's singular values (:mod:`spectral`).

A tensor that gained rows over the base's (new tokens appended to an embedding) is stored as the
change of the base's rows in any of these kinds, with the appended rows whole in the same blob
(``appended``): they are a new token's identity, and no rank rule may approximate them.

Among the representations that meet the requested fidelity, the one with the smallest blob bound
wins; ``base``, ``full``, ``sparse`` and ``exact`` rebuild the pushed tensor exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch

from . import codec, deltasvd, encodings, spectral
from .ranking import Allocation, RankRule, blob_bound_of, dense_bound

# Elements of fp32 that deltas are added in at a time where a tensor is not fp32 (see apply).
APPLY_BLOCK = 8 << 20

LOSSLESS_KINDS = frozenset({"base", "full", "sparse", "exact"})
KINDS = LOSSLESS_KINDS | {"lowrank", "dense", "dropped", "spectral"}
# Columns of each row compared first when looking for a sparse-row delta.
SPARSE_PROBE_COLUMNS = 16

@dataclass(frozen=True)
class Stored:
    """One tensor, ready to record: its kind, and the blob (encoded) when it needs one."""

    kind: str
    data: bytes | None = None
    raw_size: int = 0
    rank: int | None = None
    full_rank: int | None = None
    rel_error: float = 0.0
    encoding: str | None = None

    @property
    def digest(self) -> str | None:
        return None if self.data is None else hashlib.sha256(self.data).hexdigest()


class Update(Protocol):
    """A tensor's change in closed form (see :mod:`adapters`)."""

    factored: bool  # given as up · down: ``spectrum`` decomposes it without forming it

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor: ...

    def spectrum(self, device) -> deltasvd.FactoredSpectrum: ...

    def stored(self) -> dict[str, torch.Tensor] | None:
        """The tensors the update is stored as, as it is (SVDiff's shifts), or None where a rank rule decides."""

    def given(self, encoding: str) -> tuple[dict[str, torch.Tensor], int] | None:
        """(factor blob, rank) as the file gave the factors, where a rule that keeps every
        direction would store more by decomposing them; else None."""


@dataclass(frozen=True)
class _Candidate:
    kind: str
    tensors: dict[str, torch.Tensor]
    bound: int
    rel_error: float
    rank: int | None = None
    encoding: str | None = None


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality: ``torch.equal`` calls -0.0 and 0.0 equal, and a lossless store must not."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not x.is_floating_point():
        return torch.equal(x, y)
    return torch.equal(_as_int(x), _as_int(y))


def compress(
    ft: torch.Tensor,
    bt: torch.Tensor | None,
    rule: RankRule,
    encoding: str,
    *,
    method: str = "gram",
    device: torch.device | str = "cpu",
    allocation: Allocation | None = None,
    base_is_scratch: bool = False,
    update: Update | None = None,
    reduction: deltasvd.Reduction | None = None,
) -> Stored:
    """Store ``ft`` against base tensor ``bt`` under ``rule``; budget mode passes each tensor's ``allocation``.

    ``base_is_scratch``: the caller decoded ``bt`` for this call alone, and the delta may be formed
    in its memory (an fp32 base on the CPU) instead of in fresh pages.
    ``update``: the change in closed form, where an adapter gave it (``ft`` is then the merged
    tensor): a lossy rule decomposes it as given, not as rounded into the base's dtype, and a
    low-rank update is decomposed from its factors.
    ``reduction``: this delta's decomposition as :func:`survey` kept it (budget pushes).
    """
    if not ft.is_floating_point() or bt is None:  # integers, and what the base has no tensor for
        return _stored(_Candidate("full", {"tensor": ft}, 0, 0.0))
    if bt.shape[0] < ft.shape[0]:
        return _compress_grown(ft, bt, rule, encoding, method=method, device=device, allocation=allocation)
    bt_same = bt.to(ft.dtype)
    if same_bits(bt_same, ft):
        return Stored("base")
    sparse = _sparse_rows(ft, bt_same)
    if rule.lossless:
        return _stored(min(filter(None, [sparse, _xor(ft, bt_same)]), key=lambda c: c.bound))

    as_given = update.stored() if update is not None else None
    if as_given is not None:  # no rank rule applies: a few values per layer already
        return _stored(_Candidate("spectral", as_given, 0, 0.0))
    given = update.given(encoding) if update is not None and rule.mode == "energy" and rule.value >= 1 else None
    if given is not None:
        # A LoRA across a fused/split boundary, kept whole: stored as the file gave it. Decomposed,
        # a fused LoRA would repeat its down per split tensor, and split LoRAs on one fused tensor
        # would fill their block-diagonal up with zeros.
        blob, rank = given
        return _stored(_Candidate("lowrank", blob, 0, 0.0, rank, encoding), min(ft.shape[0], ft[0].numel()))
    bound = rule.value if rule.mode == "max-error" else None
    if update is not None:
        delta = None if update.factored else update.delta(tuple(ft.shape)).to(device)
    else:
        # Checkout adds the delta to the base cast to the fine-tune's dtype: take it against that
        # cast too. Against the base's own bits, an fp8 fine-tune of a bf16 base would be mostly
        # the cast's rounding, full rank and large.
        base = (bt if bt.dtype == ft.dtype else bt_same).to(device=device)
        ft32 = ft.to(device=device, dtype=torch.float32)
        if ft32 is not ft:  # a copy of the fine-tune's: the delta is formed in it, the base read as it is
            delta = ft32.sub_(base if base.element_size() > 1 else base.float())  # torch promotes no fp8
        elif base.dtype == torch.float32 and base is bt and base_is_scratch and bound is None:  # max-error mode may still need the base bits
            delta = torch.sub(ft32, bt, out=bt)
        else:
            delta = ft32 - base.float()
    full_rank = None
    if ft.dim() < 2:
        chosen = _dense(delta, encoding)
    else:
        if delta is None:
            spectrum = update.spectrum(device)
        else:
            spectrum = deltasvd.Spectrum(delta, method, reduction)
        full_rank = spectrum.full_rank
        t = allocation.rank if allocation is not None else spectrum.rank(rule.mode, rule.value)
        measured = bound is not None
        chosen = _lowrank(spectrum, t, encoding, None if allocation is None else allocation.wide, measured=measured)
        # Quantization adds its own error: raise the rank until the stored factors meet the bound.
        while bound is not None and chosen.rel_error > bound and chosen.rank < full_rank:
            chosen = _lowrank(spectrum, min(full_rank, chosen.rank + max(1, chosen.rank // 8)), encoding, measured=measured)
        if t == 0 and allocation is not None:
            chosen = _Candidate("dropped", {}, 0, 1.0, 0)
        whole = dense_bound(tuple(ft.shape), encodings.dense_dtype(encoding))
        if whole < chosen.bound or (bound is not None and chosen.rel_error > bound):
            dense = _dense(update.delta(tuple(ft.shape)).to(device) if delta is None else delta, encoding)
            if dense.rel_error <= chosen.rel_error or dense.bound < chosen.bound:
                chosen = dense
    if sparse is not None and sparse.bound <= chosen.bound:
        chosen = sparse
    if bound is not None and chosen.rel_error > bound:
        chosen = _xor(ft, bt_same)  # a bound below what float storage can meet: lossless meets any bound
    stored = _stored(chosen, full_rank)
    if ft.element_size() == 1 and chosen.kind != "exact":
        # An fp8 tensor moves by whole rounding steps, mostly not at all: its exact change, zero
        # bits but where an element crossed a step, often compresses below the factors.
        exact = _stored(_xor(ft, bt_same))
        if len(exact.data) <= len(stored.data or b""):
            return exact
    return stored


def _compress_grown(ft: torch.Tensor, bt: torch.Tensor, rule: RankRule, encoding: str, **options) -> Stored:
    """A tensor with rows appended to the base's: the base's rows under ``rule``, the new rows whole."""
    n = bt.shape[0]
    head = compress(ft[:n].contiguous(), bt, rule, encoding, **options)
    appended = ft[n:].contiguous()
    if head.kind in ("base", "dropped", "sparse"):  # changed rows, exactly: the appended rows are more of them
        rows, values = torch.arange(n, ft.shape[0], dtype=torch.int64), appended.reshape(appended.shape[0], -1)
        if head.kind == "sparse":
            kept = codec.decode(head.data, head.raw_size, "sparse rows")
            rows, values = torch.cat([kept["rows"], rows]), torch.cat([kept["values"], values])
        return _stored(_Candidate("sparse", {"rows": rows, "values": values}, 0, 0.0, rows.numel()))
    tensors = codec.decode(head.data, head.raw_size, "the base rows' delta")
    tensors["appended"] = appended
    data, raw = codec.encode(tensors)
    return Stored(head.kind, data, raw, head.rank, head.full_rank, head.rel_error, head.encoding)


def rebuild(kind: str, dtype: torch.dtype, bt: torch.Tensor | None, stored: dict | None, device) -> torch.Tensor:
    """The tensor an entry stands for, on the CPU, in ``dtype``; ``bt``, the base tensor, may be changed in place."""
    if kind == "full":
        return stored["tensor"]
    out = bt.to(dtype)
    apply(kind, out, stored, device)
    return out


def apply(kind: str, out: torch.Tensor, stored: dict | None, device) -> None:
    """Turn ``out``, a contiguous CPU tensor holding the base tensor in the entry's dtype, into the
    entry's tensor in place. W + ΔW is formed in fp32 on ``device``."""
    if kind in ("base", "dropped"):
        return
    if stored is not None and "appended" in stored:  # rows beyond the base's (see _compress_grown)
        rows = stored["appended"].shape[0]
        apply(kind, out[: out.shape[0] - rows], {k: v for k, v in stored.items() if k != "appended"}, device)
        out[out.shape[0] - rows :] = stored["appended"].to(out.dtype)
        return
    if kind == "full":
        out.copy_(stored["tensor"])
    elif kind == "sparse":
        out.view(out.shape[0], -1)[stored["rows"]] = stored["values"].reshape(stored["rows"].numel(), -1).to(out.dtype)
    elif kind == "exact":
        bits = _as_int(out).view(-1)
        planes = stored["xor"]  # (itemsize, n) bytes, little-endian order
        bits ^= planes.T.contiguous().view(bits.dtype).reshape(-1)
    elif kind == "spectral":  # ``stored`` carries the base SVD (spectral.with_svd)
        w = out.to(device=device, dtype=torch.float32)
        w += spectral.change(tuple(w.shape), {k: stored[k].to(device) for k in ("u", "s", "vh")}, stored["shift"])
        out.copy_(w)
    elif kind in ("dense", "lowrank"):
        # fp32 on the device: fp16 accumulation of W + A·B would lose most of a small delta.
        in_place = out.dtype == torch.float32 and torch.device(device).type == "cpu"
        rows = out.view(out.shape[0], -1) if out.dim() else out.view(1, 1)
        if kind == "dense":
            delta = stored["delta"].reshape(rows.shape)
        else:
            a, b = encodings.decode_factors(stored)
            a, b = a.to(device), b.to(device)
        # A bf16 or fp8 tensor is formed in fp32 a block of rows at a time: one fp32 copy of a
        # 21504 x 3072 Flux layer per checkout lane would cost more memory than the layer itself.
        step = rows.shape[0] if in_place else max(1, APPLY_BLOCK // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step]
            w = part if in_place else part.to(device=device, dtype=torch.float32)
            if kind == "dense":
                w += delta[start:start + step].to(device=device, dtype=torch.float32)
            else:
                w.addmm_(a[start:start + step], b)
            if not in_place:
                part.copy_(w)
    else:
        raise ValueError(f"unknown entry kind {kind!r}")


def survey(
    ft: torch.Tensor, bt: torch.Tensor | None, method: str = "gram", update: Update | None = None, *, keep: bool = False
) -> torch.Tensor | tuple[torch.Tensor, deltasvd.Reduction | None] | None:
    """Singular values of a changed ≥2-D float delta (what budget allocation needs), else None.

    ``keep``: return (values, reduction) instead, the reduction being what :func:`compress` can
    cut this delta's factors from later without decomposing it again (None where there is none).
    """
    if update is not None and update.stored() is not None:
        return None  # stored at a fixed cost
    reduction = None
    if update is not None and ft.dim() >= 2:
        if update.factored:
            s = update.spectrum(ft.device).s
        else:
            s = deltasvd.singular_values(deltasvd.as_matrix(update.delta(tuple(ft.shape))), method).double()
    elif bt is None or not ft.is_floating_point() or ft.dim() < 2 or bt.shape != ft.shape or same_bits(bt.to(ft.dtype), ft):
        return None  # a tensor that gained rows is stored at a fixed cost (see _compress_grown)
    else:
        delta = ft.float() - bt.to(ft.dtype).float()  # against the base as checkout casts it (see compress)
        if keep and method == "gram" and ft.device.type == "cpu":
            spectrum = deltasvd.Spectrum(delta, method)
            s, reduction = spectrum.s, spectrum.reduction()
        else:
            s = deltasvd.singular_values(deltasvd.as_matrix(delta), method).double()
    return (s, reduction) if keep else s


# ---------------------------------------------------------------- candidates


def _lowrank(spectrum: deltasvd.Spectrum | deltasvd.FactoredSpectrum, t: int, encoding: str, wide: int | None = None, *, measured: bool = False) -> _Candidate:
    """``measured``: the stored error from the residual itself, where a bound rests on it; else from the spectrum."""
    a, b = spectrum.factors(t)
    tensors = encodings.encode_factors(a, b, spectrum.s, encoding, wide)
    if spectrum.basis is not None:  # coefficients over a compact basis, where that takes fewer bytes
        dtype = encodings.dense_dtype(encoding)
        over = {
            **encodings.encode_factors(a, spectrum.coefficients(t), spectrum.s, encoding, wide),
            **{k: v.to(dtype).contiguous() for k, v in spectrum.basis.items()},
        }
        if blob_bound_of(over) < blob_bound_of(tensors):
            tensors = over
    if measured:
        del a, b  # in fp32, as large as the decoded factors below: not both at once
    qa, qb = (x.to(spectrum.device) for x in encodings.decode_factors(tensors))
    error = spectrum.error_of(qa, qb) if measured else spectrum.stored_error(a, b, qa, qb)
    return _Candidate("lowrank", tensors, blob_bound_of(tensors), error, t, encoding)


def _dense(delta: torch.Tensor, encoding: str) -> _Candidate:
    stored = delta.to(encodings.dense_dtype(encoding))
    norm = torch.linalg.vector_norm(delta)
    error = float(torch.linalg.vector_norm(delta - stored.float()) / norm) if norm > 0 else 0.0
    name = next(k for k, v in encodings.FLOAT_ENCODINGS.items() if v == stored.dtype)
    return _Candidate("dense", {"delta": stored}, blob_bound_of({"delta": stored}), error, None, name)


def _sparse_rows(ft: torch.Tensor, bt_same: torch.Tensor) -> _Candidate | None:
    """The changed rows of a ≥2-D tensor, when at most half of them changed."""
    if ft.dim() < 2:
        return None
    rows = ft.shape[0]
    ft_rows, bt_rows = _as_int(ft).reshape(rows, -1), _as_int(bt_same).reshape(rows, -1)
    # A fine-tune changes nearly every row, and mostly in its first elements already: a row changed
    # there is changed, so a probe of a few columns rules most tensors out without comparing them whole.
    probe = min(SPARSE_PROBE_COLUMNS, ft_rows.shape[1])
    if int((ft_rows[:, :probe] != bt_rows[:, :probe]).any(1).sum()) > rows // 2:
        return None
    changed = (ft_rows != bt_rows).any(1)
    count = int(changed.sum())
    if count == 0 or count > rows // 2:
        return None
    index = torch.nonzero(changed).reshape(-1).to(torch.int64)
    tensors = {"rows": index, "values": ft.reshape(rows, -1)[index].contiguous()}
    return _Candidate("sparse", tensors, blob_bound_of(tensors), 0.0, count)


def _xor(ft: torch.Tensor, bt_same: torch.Tensor) -> _Candidate:
    xor = _as_int(ft).reshape(-1) ^ _as_int(bt_same).reshape(-1)
    # Byte planes: the high bytes of a small change are mostly zero, and zstd finds long zero runs.
    planes = xor.view(torch.uint8).reshape(-1, ft.element_size()).T.contiguous()
    return _Candidate("exact", {"xor": planes}, blob_bound_of({"xor": planes}), 0.0)


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(codec.INT_OF_SIZE[t.element_size()])


def _stored(c: _Candidate, full_rank: int | None = None) -> Stored:
    if not c.tensors:
        return Stored(c.kind, None, 0, c.rank, full_rank, c.rel_error, c.encoding)
    data, raw = codec.encode({k: v.detach().cpu() for k, v in c.tensors.items()})
    return Stored(c.kind, data, raw, c.rank, full_rank if c.kind in ("lowrank", "dropped") else None, c.rel_error, c.encoding)

"""How Delta-SVD factors become stored tensors: float casts, int8, and mixed int8/int4.

A blob says its own encoding through its tensor names, so a reader needs nothing else:

- float (``fp32``, ``fp16``, ``bf16``): ``a`` (out × t) and ``b`` (t × in) in that dtype.
- ``int8``: ``a.q8`` / ``b.q8`` (int8) with ``a.s8`` / ``b.s8`` (fp32, one scale per singular
  direction: per column of A, per row of B). Symmetric rounding, x ≈ q · s.
- ``mixed``: the leading directions as in ``int8``; the tail in 4 bits, ``a.q4`` / ``b.q4`` (two
  values per byte, low nibble first, each value + 8 in 1..15) with scales ``a.s4`` / ``b.s4``.

Any of these may carry a Tucker basis (a LyCORIS conv LoRA's ``lora_mid`` and ``lora_down``):
``b.mid`` (r × r × kh × kw) and ``b.down`` (r × in) in a float dtype. The stored B is then a t × r
coefficient matrix C, and the factor is C · fold(mid, down), fold(mid, down)[i, q·kh·kw + k·kw + l]
= Σⱼ mid[i, j, k, l] · down[j, q]: for a 3×3 conv that is about a ninth of B's bytes.

Quantizing per direction matches the factors' structure: A = U_tΣ_t has columns of very different
size (the singular values), while each row of B = V_tᵀ has unit norm.
"""

from __future__ import annotations

import torch

from .config import ENCODINGS  # noqa: F401 (the names, for callers of this module)
from .errors import IntegrityError

FLOAT_ENCODINGS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Relative rounding noise that one direction's energy picks up when both its factor vectors are
# rounded with a per-vector absmax scale (Gaussian-like entries: peak ≈ 3.8 rms at 1,000 entries,
# noise = step²/12 per entry, twice): about 5% at 4 bits and 0.015% at 8 bits.
NOISE = {8: 1.5e-4, 4: 0.05}
# ``mixed`` under a rank rule: the tail goes to 4 bits while its added noise stays below this share
# of the energy the truncation already drops (so the error grows by under 2.5%).
MIXED_NOISE_SHARE = 0.05
_LEVELS = {8: 127, 4: 7}


def check(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    return encoding


def dense_dtype(encoding: str) -> torch.dtype:
    """The dtype that a dense delta (a bias, a norm, a layer stored whole) takes under ``encoding``."""
    return FLOAT_ENCODINGS.get(encoding, torch.float16)


def leading_directions(singular_values: torch.Tensor, rank: int, encoding: str) -> int:
    """How many of the kept directions get 8 bits under a rank rule (all but ``mixed``'s 4-bit tail).

    The tail is the longest run of trailing kept directions whose 4-bit noise, NOISE[4]·Σσᵢ², stays
    under MIXED_NOISE_SHARE of what the truncation drops, Σ_{j>rank} σⱼ². Budget mode chooses the
    split itself (:func:`registry.ranking.allocate`).
    """
    if encoding != "mixed" or rank == 0:
        return rank
    sq = singular_values.double().clamp_min(0) ** 2
    allowed = MIXED_NOISE_SHARE * float(sq[rank:].sum()) / NOISE[4]
    tail = torch.cumsum(torch.flip(sq[:rank], (0,)), 0)  # energy of the last 1, 2, ... kept directions
    return rank - int((tail <= allowed).sum())


def encode_factors(
    a: torch.Tensor, b: torch.Tensor, singular_values: torch.Tensor, encoding: str, wide: int | None = None
) -> dict[str, torch.Tensor]:
    """The tensors to store for ΔW ≈ a·b (fp32 factors, directions in descending order).

    ``wide``: for ``mixed``, how many leading directions keep 8 bits (default: the rank rule's split).
    """
    check(encoding)
    if encoding in FLOAT_ENCODINGS:
        dtype = FLOAT_ENCODINGS[encoding]
        return {"a": a.to(dtype).contiguous(), "b": b.to(dtype).contiguous()}
    n8 = a.shape[1] if encoding == "int8" else wide if wide is not None else leading_directions(singular_values, a.shape[1], encoding)
    out = {}
    out["a.q8"], out["a.s8"] = _quantize(a[:, :n8], 8, dim=0)
    out["b.q8"], out["b.s8"] = _quantize(b[:n8], 8, dim=1)
    if n8 < a.shape[1]:
        qa, out["a.s4"] = _quantize(a[:, n8:], 4, dim=0)
        qb, out["b.s4"] = _quantize(b[n8:], 4, dim=1)
        out["a.q4"], out["b.q4"] = _pack4(qa), _pack4(qb)
    return out


def decode_factors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_factors` (and of a Tucker basis beside it): fp32 (a, b). Raises
    ValueError on a blob of no known layout."""
    a, b = _decode(tensors)
    if "b.mid" in tensors:
        b = b @ fold_tucker(tensors["b.mid"], tensors["b.down"])
    return a, b


def encode_shared(up: torch.Tensor, down: torch.Tensor, rows: tuple[tuple[str, int, int], ...], encoding: str) -> dict[str, torch.Tensor]:
    """One LoRA's factors over several tensors (a fused q/k/v LoRA against split q, k and v): its
    whole up (scale folded in) and down, once, with the rows of up that each tensor's entry takes."""
    dtype = FLOAT_ENCODINGS[encoding]
    keys = "\n".join(k for k, _, _ in rows).encode()
    return {
        "a": up.to(dtype).contiguous(), "b": down.to(dtype).contiguous(),
        "rows.keys": torch.tensor(list(keys), dtype=torch.uint8),
        "rows.span": torch.tensor([[start, stop] for _, start, stop in rows], dtype=torch.int64),
    }


def encode_blocks(blocks, rows: int, encoding: str) -> dict[str, torch.Tensor]:
    """Several LoRAs on row blocks of one tensor (split q, k, v LoRAs against a fused qkv), each
    as given: ``blocks`` is (first row, past the last, up with scale folded in, down) per LoRA."""
    dtype = FLOAT_ENCODINGS[encoding]
    out = {"blocks.span": torch.tensor([[start, stop] for start, stop, _, _ in blocks], dtype=torch.int64), "blocks.rows": torch.tensor([rows])}
    for i, (_, _, up, down) in enumerate(blocks):
        # Copies: blocks may share one down, and safetensors stores no tensor twice.
        out[f"blocks.{i}.a"], out[f"blocks.{i}.b"] = up.to(dtype).clone(), down.to(dtype).clone()
    return out


def block_diagonal(rows: int, blocks) -> torch.Tensor:
    """The up of several LoRAs on row blocks of one tensor: ``rows`` x their ranks together, each
    block's up (``(first row, past the last, up)``) at its rows and after the earlier blocks'
    columns, zero elsewhere."""
    a = torch.zeros(rows, sum(up.shape[1] for _, _, up in blocks))
    column = 0
    for start, stop, up in blocks:
        a[start:stop, column:column + up.shape[1]] = up
        column += up.shape[1]
    return a


def _decode_blocks(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of :func:`encode_blocks`: a is block-diagonal, its blocks at their rows; b the downs stacked."""
    spans = tensors["blocks.span"].tolist()
    ups = [(start, stop, tensors[f"blocks.{i}.a"].float()) for i, (start, stop) in enumerate(spans)]
    return block_diagonal(int(tensors["blocks.rows"]), ups), torch.cat([tensors[f"blocks.{i}.b"].float() for i in range(len(spans))])


def shared_part(tensors: dict[str, torch.Tensor], key: str, rows: int) -> dict[str, torch.Tensor]:
    """Entry ``key``'s factors from a shared blob (:func:`encode_shared`): its rows of a, and b.
    A blob that gives the entry no rows, or not ``rows`` of them, is refused: never rebuilt from."""
    if "rows.keys" not in tensors:
        return tensors
    keys = bytes(tensors["rows.keys"].tolist()).decode().split("\n")
    span = tensors["rows.span"][keys.index(key)].tolist() if key in keys else None
    if span is None or span[1] - span[0] != rows:
        raise IntegrityError(f"the shared factor blob of {key!r} does not hold its {rows} rows")
    return {"a": tensors["a"][span[0]:span[1]], "b": tensors["b"]}


def fold_tucker(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker conv's lora_mid (r × r × kh × kw) and lora_down (r × in) as one r × in·kh·kw factor."""
    rank = mid.shape[0]
    return torch.einsum("ijkl,jq->iqkl", mid.float(), down.float().reshape(down.shape[0], -1)).reshape(rank, -1)


def _decode(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if "blocks.span" in tensors:
        return _decode_blocks(tensors)
    if "a" in tensors and "b" in tensors:
        return tensors["a"].float(), tensors["b"].float()
    if "a.q8" not in tensors:
        raise ValueError(f"factor blob holds {sorted(tensors)}, which is no known encoding")
    a = tensors["a.q8"].float() * tensors["a.s8"][None, :]
    b = tensors["b.q8"].float() * tensors["b.s8"][:, None]
    if "a.q4" in tensors:
        m = tensors["a.s4"].numel()
        a4 = _unpack4(tensors["a.q4"], m).float() * tensors["a.s4"][None, :]
        b4 = _unpack4(tensors["b.q4"], tensors["b.q8"].shape[1]).float() * tensors["b.s4"][:, None]
        a, b = torch.cat([a, a4], 1), torch.cat([b, b4], 0)
    return a, b


def _quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric rounding with one fp32 scale per slice along ``dim`` (0: per column, 1: per row)."""
    levels = _LEVELS[bits]
    x = x.float()
    peak = x.abs().amax(dim=dim) if x.numel() else x.new_zeros(x.shape[1 - dim])
    scale = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
    q = torch.round(x / (scale[None, :] if dim == 0 else scale[:, None])).clamp_(-levels, levels).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Rows of values in -7..7 as bytes, two per byte: (r, c) -> (r, ceil(c/2)) uint8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, torch.full((u.shape[0], 1), 8, dtype=torch.uint8)], 1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _unpack4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    both = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)
    return both[:, :columns]

"""SVDiff subjects: shifts of a base weight's singular values, and the base SVD they apply to.

SVDiff (Han et al., ICCV 2023) trains, for each weight W₀ = UΣVᵀ (a conv kernel as out x in·kh·kw,
a 1-D weight as 1 x n), only a shift δ of its singular values: W = U·diag(ReLU(σ + δ))·Vᵀ. dsreg
stores δ itself (entry kind ``spectral``: the kilobytes are the point) and the SVD once per base
tensor, as a derived blob (catalog table ``derived``, kind ``svd``) that every SVDiff subject of
that tensor shares. A revision's shifts are one blob that all its spectral entries share, as an
SVDiff file is one file: per layer, a blob of its own would cost more in headers than the shifts
take (docs/format.md). It names each layer's SVD blob by digest.

A checkout forms W₀ + U·diag(ReLU(σ + δ) − σ)·Vᵀ: SVDiff's product in exact arithmetic, and W₀'s
own bits wherever δ leaves σ as it is.

Reproducibility. An SVD is unique only up to the sign of each pair of singular vectors, which
cancels in U·diag·Vᵀ, and a rotation within each group of equal singular values, which does not
(δ differs across the group): two machines' LAPACKs may choose differently there, and their rebuilt
weights then differ by up to max|δ| in that subspace. The SVD is therefore computed once, in fp64,
at the first push that needs it, and stored: every checkout on every machine applies δ to the same
U, σ, V, and what is left between machines is the rounding of one fp32 product, within a few fp32
ulps of ‖W‖ (tests/test_adapters.py measures both).
"""

from __future__ import annotations

import hashlib
import itertools

import torch

from . import codec

SVD = "svd"  # the derived blob's kind


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The matrix whose singular values SVDiff shifts: out x in·kh·kw, or 1 x n for a 1-D weight."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)


def decompose(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The base weight's SVD as stored: U and Vᵀ in fp32, σ in fp64 (σ + δ − σ must not round δ away)."""
    u, s, vh = torch.linalg.svd(as_matrix(weight).double(), full_matrices=False)
    return {"u": u.float().contiguous(), "s": s.contiguous(), "vh": vh.float().contiguous()}


def encode(svd: dict[str, torch.Tensor]) -> tuple[bytes, int, str]:
    """(blob, raw size, digest) of a derived SVD."""
    data, raw = codec.encode(svd)
    return data, raw, hashlib.sha256(data).hexdigest()


def change(shape: tuple[int, ...], svd: dict[str, torch.Tensor], shift: torch.Tensor) -> torch.Tensor:
    """ΔW = U·diag(ReLU(σ + δ) − σ)·Vᵀ in fp32, in the weight's shape; a δ shorter than σ shifts the leading values."""
    s = svd["s"].double()
    delta = torch.zeros_like(s)
    delta[: shift.numel()] = shift.double().reshape(-1)
    moved = (torch.relu(s + delta) - s).float()
    return ((svd["u"].float() * moved.to(svd["u"].device)) @ svd["vh"].float()).reshape(shape)


def pack(shifts: dict[str, tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor]:
    """The tensors of a revision's one shifts blob, from {key: (δ, SVD blob digest, its raw size)}:
    ``keys`` (the entry keys, newline-separated UTF-8), ``offsets`` (where each key's δ starts in
    ``shift`` and, last, its end), ``shift`` (every δ in fp32), ``svd`` (each SVD blob's 32-byte
    sha256) and ``svd.raw`` (its raw size)."""
    keys = sorted(shifts)
    lengths = [shifts[k][0].numel() for k in keys]
    return {
        "keys": torch.frombuffer(bytearray("\n".join(keys).encode()), dtype=torch.uint8).clone(),
        "offsets": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64),
        "shift": torch.cat([shifts[k][0].float().reshape(-1) for k in keys]),
        "svd": torch.tensor([list(bytes.fromhex(shifts[k][1])) for k in keys], dtype=torch.uint8).reshape(len(keys), 32),
        "svd.raw": torch.tensor([shifts[k][2] for k in keys], dtype=torch.int64),
    }


def with_svd(reg, stored: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """Entry ``key``'s δ from a decoded shifts blob, with the SVD it names, read from the store and
    checked against its digest like every blob."""
    keys = bytes(stored["keys"].tolist()).decode().split("\n")
    i = keys.index(key)
    lo, hi = int(stored["offsets"][i]), int(stored["offsets"][i + 1])
    digest = bytes(stored["svd"][i].tolist()).hex()
    svd = codec.decode(reg.store.get(digest), int(stored["svd.raw"][i]), f"base SVD {digest[:12]} of {key!r}")
    return {"shift": stored["shift"][lo:hi], **svd}

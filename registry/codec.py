"""How tensors become stored bytes and back: safetensors inside a zstd frame, and tensor digests."""

from __future__ import annotations

import hashlib

import safetensors.torch
import torch
import zstandard

from .config import ZSTD_LEVEL
from .errors import IntegrityError

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


# The integer dtype of each item size: bit-level views of float tensors (exact deltas, bit equality).
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {name}")
    return name


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise IntegrityError(f"catalog names an unknown dtype {name!r}") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of dtype, shape and bytes: equal digests mean the same tensor, whatever file it came from."""
    h = hashlib.sha256(f"{dtype_name(tensor.dtype)}{list(tensor.shape)}".encode())
    h.update(tensor_bytes(tensor))
    return h.hexdigest()


def encode(tensors: dict[str, torch.Tensor], level: int = ZSTD_LEVEL) -> tuple[bytes, int]:
    """(zstd-compressed safetensors bytes, uncompressed size)."""
    raw = safetensors.torch.save({k: v.detach().contiguous() for k, v in tensors.items()})
    return zstandard.ZstdCompressor(level=level).compress(raw), len(raw)


def decode(data: bytes, raw_size: int, name: str = "blob") -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`; never inflates past the size recorded at write time."""
    try:
        params = zstandard.get_frame_parameters(data)
        if params.content_size not in (raw_size, zstandard.CONTENTSIZE_UNKNOWN):
            raise IntegrityError(f"{name} declares {params.content_size} bytes, the catalog recorded {raw_size}")
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_size)
        if len(raw) != raw_size:
            raise IntegrityError(f"{name} inflates to {len(raw)} bytes, the catalog recorded {raw_size}")
        return safetensors.torch.load(raw)
    except IntegrityError:
        raise
    except Exception as exc:  # zstd and safetensors raise their own types for malformed input
        raise IntegrityError(f"{name} cannot be decoded: {exc}") from None

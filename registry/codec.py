"""How tensors become stored bytes and back: safetensors inside a zstd frame, and tensor digests."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import safetensors.torch
import torch
import zstandard

from .config import ZSTD_LEVEL
from . import safetensors_format
from .errors import IntegrityError

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    # 8-bit floats as current checkpoints ship them: deltas are formed in fp32 and cast back.
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
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
    """Inverse of :func:`encode`; never inflates past the size recorded at write time.

    The frame is inflated straight into one buffer and the tensors are views of it: a checkout
    decodes the whole base, and a second copy (``safetensors.torch.load``) cost a tenth of its time.
    """
    raw = torch.empty(raw_size, dtype=torch.uint8)
    with _inflating(data, raw_size, name) as reader:
        _read_exactly(reader, memoryview(raw.numpy()), name)
        _check_end(reader, raw_size, name)
    header_size = _header_size(raw[:8].numpy().tobytes(), raw_size, name)
    entries = _entries(raw[8 : 8 + header_size].numpy().tobytes(), raw_size - 8 - header_size, name)
    return _views(raw[8 + header_size :], entries)


def decode_into(data: bytes | memoryview, raw_size: int, out: torch.Tensor, name: str = "blob") -> None:
    """Inflate a blob of one tensor (a base tensor's) straight into ``out``, which must match it.

    A checkout hands ``out`` as a view of the output file, so the weights are copied once, from
    the stored frame to their place in the checkpoint.
    """
    with _inflating(data, raw_size, name) as reader:
        prefix = bytearray(8)
        _read_exactly(reader, memoryview(prefix), name)
        header = bytearray(_header_size(bytes(prefix), raw_size, name))
        _read_exactly(reader, memoryview(header), name)
        entries = _entries(bytes(header), raw_size - 8 - len(header), name)
        nbytes = out.numel() * out.element_size()
        if len(entries) != 1 or DTYPES[entries[0].dtype] != out.dtype or entries[0].shape != tuple(out.shape):
            raise IntegrityError(f"{name} does not hold one {dtype_name(out.dtype)} tensor of shape {list(out.shape)}")
        if nbytes:
            _read_exactly(reader, memoryview(out.reshape(-1).view(torch.uint8).numpy()), name)
        _check_end(reader, raw_size, name)


@contextmanager
def _inflating(data, raw_size: int, name: str) -> Iterator:
    """A zstd stream reader over ``data``, with every decoder failure raised as IntegrityError."""
    try:
        params = zstandard.get_frame_parameters(data)
        if params.content_size not in (raw_size, zstandard.CONTENTSIZE_UNKNOWN):
            raise IntegrityError(f"{name} declares {params.content_size} bytes, the catalog recorded {raw_size}")
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            yield reader
    except IntegrityError:
        raise
    except Exception as exc:  # zstd raises its own types for malformed input
        raise IntegrityError(f"{name} cannot be decoded: {exc}") from None


def _read_exactly(reader, view: memoryview, name: str) -> None:
    got = 0
    while got < len(view):
        n = reader.readinto(view[got:])
        if not n:
            raise IntegrityError(f"{name} inflates to fewer bytes than the catalog recorded")
        got += n


def _check_end(reader, raw_size: int, name: str) -> None:
    if reader.read(1):
        raise IntegrityError(f"{name} inflates to more than the {raw_size} bytes the catalog recorded")


def _header_size(prefix: bytes, raw_size: int, name: str) -> int:
    try:
        return safetensors_format.header_length(prefix, raw_size)
    except safetensors_format.FormatError as exc:
        raise IntegrityError(f"{name} is not a safetensors blob: {exc}") from None


def _entries(header: bytes, data_size: int, name: str) -> list[safetensors_format.Entry]:
    """The tensors a blob's header lists, in data order; the header is checked, not trusted."""
    try:
        entries, _ = safetensors_format.parse_header(header, data_size)
    except safetensors_format.FormatError as exc:
        raise IntegrityError(f"{name} has a malformed header: {exc}") from None
    return entries


def _views(data: torch.Tensor, entries: list[safetensors_format.Entry]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors data section, as views of ``data``."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        chunk = data[e.start : e.stop]
        dtype = DTYPES[e.dtype]
        if chunk.storage_offset() % dtype.itemsize:
            chunk = chunk.clone()  # a view must start at a multiple of the item size
        out[e.key] = chunk.view(dtype).reshape(e.shape)
    return out

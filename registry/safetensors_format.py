"""The safetensors format, parsed and written in this one place.

A file is an 8-byte little-endian header length n, n bytes of JSON (padded with spaces to a
multiple of 8), then the data section. The JSON maps each tensor name to its dtype code, shape
and ``data_offsets`` (start and end within the data section), plus an optional ``__metadata__``
object of strings. The tensors tile the data section exactly, in any key order.

Headers are input: they are checked, never trusted. Every problem raises :class:`FormatError`
(a ValueError) with a message that says what is wrong; each caller turns it into its own error
(a checkpoint's CheckpointError, a stored blob's IntegrityError) naming the file or blob.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

# dtype name -> safetensors' code
CODES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_NAMES = {code: name for name, code in CODES.items()}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}

# The safetensors library's own limit on the header.
MAX_HEADER = 100_000_000


class FormatError(ValueError):
    """A header that does not describe a valid safetensors file."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: its dtype name (``float16``, ...), shape and span in the data section."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def header_length(prefix: bytes, size: int) -> int:
    """The header length that a file's first 8 bytes declare, checked against the file's ``size``."""
    if len(prefix) < 8 or size < 8:
        raise FormatError(f"truncated: {size} bytes, less than a header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > min(size - 8, MAX_HEADER):
        raise FormatError(f"header claims {n} bytes, the file has {size}")
    return n


def parse_header(header: bytes, data_size: int) -> tuple[list[Entry], dict[str, str] | None]:
    """The tensors of a header in data order, and its metadata; ``data_size`` is the data section's length."""
    try:
        parsed = json.loads(header)
    except RecursionError:  # nesting the JSON parser cannot follow: no real header nests
        raise FormatError("header nests too deeply") from None
    except ValueError:
        raise FormatError("header is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise FormatError("header is not a JSON object")
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError("__metadata__ is not an object of strings")
    entries = sorted((_entry(key, info) for key, info in parsed.items()), key=lambda e: (e.start, e.stop))
    end = 0
    for e in entries:
        if e.start != end or e.stop > data_size:
            raise FormatError(f"truncated or corrupt: tensor {e.key!r} spans bytes {e.start}-{e.stop}, the data section has {data_size}")
        end = e.stop
    if end != data_size:
        raise FormatError(f"the header covers {end} of {data_size} data bytes")
    return entries, metadata


def _entry(key: str, info) -> Entry:
    if not isinstance(info, dict):
        raise FormatError(f"entry {key!r} is malformed")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in _NAMES:
        raise FormatError(f"tensor {key!r} has unsupported dtype {code}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"entry {key!r} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise FormatError(f"entry {key!r} is malformed")
    dtype = _NAMES[code]
    nbytes = _ITEMSIZE[dtype]
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(f"tensor {key!r} declares {nbytes} bytes of data but spans {offsets[1] - offsets[0]}")
    return Entry(key, dtype, tuple(shape), offsets[0], offsets[1])


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The length prefix and header of a file of ``(key, dtype name, shape)`` tensors laid out in
    that order, and each one's offset in the data section."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets, offset = [], 0
    for key, dtype, shape in tensors:
        nbytes = _ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        header[key] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets.append(offset)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


def size_bound(tensors: list[tuple[str, str, tuple[int, ...]]]) -> int:
    """At least the bytes of a compact file of these tensors: offsets are counted at the widest
    one's width, so this is never short."""
    payload = 0
    for _, dtype, shape in tensors:
        nbytes = _ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        payload += nbytes
    entries = [
        f'"{key}":{{"dtype":"{CODES[dtype]}","shape":[{",".join(map(str, shape))}],"data_offsets":[{payload},{payload}]}}'
        for key, dtype, shape in tensors
    ]
    header = len("{" + ",".join(entries) + "}")
    return 8 + -(-header // 8) * 8 + payload

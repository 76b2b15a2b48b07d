"""A base's tensors as one local, uncompressed safetensors file, memory-mapped: where apply's
``keep="mapped"`` reads the base values it restores, instead of keeping copies of them in memory.

The file is made once per base and machine from the store (every tensor checked against its
digest as it is written, the file renamed into place whole), at
``$DSREG_HOME/mapped/<base digest>.safetensors``. Every process on the machine maps the same file,
so the base's bytes live once, in the page cache, however many serving processes read them.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
from pathlib import Path

import torch

from . import codec, safetensors_format
from .bases import base_tensor
from .catalog import BaseTensor
from .checkpoint import TensorSpec, fill_safetensors, write_atomically
from .errors import IntegrityError


class MappedBase:
    """Read-only views of one base's tensors in a mapped file."""

    def __init__(self, path: Path, tensors: list[BaseTensor]):
        self.path = path
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        size = len(self._map)
        n = safetensors_format.header_length(self._map[:8], size)
        entries, _ = safetensors_format.parse_header(self._map[8 : 8 + n], size - 8 - n)
        self._data = 8 + n
        self._entries = {e.key: e for e in entries}
        wanted = {(t.key, t.dtype, tuple(t.shape)) for t in tensors}
        if {(e.key, e.dtype, e.shape) for e in entries} != wanted:
            raise IntegrityError(f"{path} does not hold the tensors of its base; delete it and it is made again")

    def tensor(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        dtype = codec.dtype_of(e.dtype)
        count = (e.stop - e.start) // dtype.itemsize
        if count == 0:
            return torch.empty(e.shape, dtype=dtype)
        with warnings.catch_warnings():  # a read-only map: torch warns that it could not write it, and it never does
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data + e.start).view(e.shape)


_open: dict[tuple[str, str], MappedBase] = {}
_lock = threading.Lock()


def mapped_base(reg, base: str) -> MappedBase:
    """The mapped file of base ``base``, made from the store if this machine has none yet."""
    info = reg.catalog.base_by_name(base)
    path = reg.settings.home / "mapped" / f"{info.digest}.safetensors"
    with _lock:
        found = _open.get((str(path), info.digest))
        if found is not None:
            return found
        tensors = reg.catalog.base_tensors(base)
        if not path.exists():
            _make(reg, path, tensors)
        found = _open[(str(path), info.digest)] = MappedBase(path, tensors)
        return found


def _make(reg, path: Path, tensors: list[BaseTensor]) -> None:
    specs = [TensorSpec(t.key, t.dtype, tuple(t.shape)) for t in tensors]

    def fill(i: int, out: torch.Tensor) -> None:
        tensor = base_tensor(reg, tensors[i])
        if codec.tensor_digest(tensor) != tensors[i].tensor_digest:
            raise IntegrityError(f"base tensor {tensors[i].key!r} does not match its digest; run `dsreg verify --full`")
        out.copy_(tensor)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fill_safetensors(tmp, specs, fill))
    os.chmod(path, 0o444)

"""Reading and writing checkpoints: safetensors files, torch pickles and diffusers model folders.

Readers hand out one tensor at a time so that a 3.4 GB UNet is never held whole. Pickles are
untrusted input: they are only ever opened with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import mmap
import os
import pickle
import pickletools
import shutil
import socket
import tempfile
import threading
import uuid
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import torch

from . import directio, safetensors_format
from .codec import DTYPES, dtype_name
from .errors import CheckpointError, Conflict, OutputError, UnsafeCheckpoint, UsageError, first_line
from .concurrency import Scratch, process_alive

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "pickle", "diffusers", "pipeline")
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model", "model", "pytorch_model")
PIPELINE_INDEX = "model_index.json"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5", ".gguf"}
PIPELINE_FILE_LIMIT = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Layout:
    """What it takes to write a checkpoint back in the form it was pushed."""

    format: str
    wrapper: str | None = None  # pickles: the key the state dict sat under, e.g. "state_dict"
    metadata: dict[str, str] | None = None  # safetensors "__metadata__"
    shards: dict[str, str] | None = None  # diffusers: key -> weight file name, for sharded weights
    weights_name: str | None = None  # diffusers: the single weights file name
    files: dict[str, str] = field(default_factory=dict)  # diffusers: config.json and other small text files
    components: dict[str, dict] | None = None  # pipeline: component folder -> its diffusers layout (weights_name, shards, metadata)
    file_keys: list[str] | None = None  # pipeline: keys that are files (uint8), not weights
    modes: dict[str, int] | None = None  # permission bits of what was read, by path relative to the pushed path ("" for itself)
    extras: dict | None = None  # pickles: small entries beside the state dict (global_step, epoch), written back

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        known = {k: data[k] for k in ("format", "wrapper", "metadata", "shards", "weights_name", "files", "components", "file_keys", "modes", "extras") if k in data}
        return cls(**known)


class Checkpoint:
    """An opened checkpoint: an ordered list of tensor specs and one tensor at a time on demand."""

    # An adapter merged onto a base (adapters.MergedCheckpoint) says which base, gives its changes
    # in closed form by key, and knows the digests of the tensors it left as the base's.
    merged_onto: str | None = None
    updates: dict = {}
    known_digests: dict[str, str] = {}
    derived_new: tuple = ()  # (catalog.Derived, blob) that the merge computed from the base: SVDiff's base SVDs

    def __init__(self, path: Path, specs: list[TensorSpec], layout: Layout, getter, closer=None, streamed=None):
        self.path = path
        self.specs = specs
        self.layout = layout
        self._get = getter
        self._close = closer
        self._streamed = streamed

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._close:
            self._close()
            self._close = None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def get(self, key: str, scratch: Scratch | None = None) -> torch.Tensor:
        """One tensor. With ``scratch``, a file read without a copy may land in the calling thread's
        reused buffer: the tensor is then valid only until that thread's next read into it."""
        try:
            return self._get(key, scratch)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {exc}") from None

    def __iter__(self) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        for spec in self.specs:
            yield spec, self.get(spec.key)

    def without(self, prefix: str) -> "Checkpoint":
        """The same checkpoint less the tensors whose keys start with ``prefix``; this one still closes it."""
        kept = [s for s in self.specs if not s.key.startswith(prefix)]
        return self if len(kept) == len(self.specs) else Checkpoint(self.path, kept, self.layout, self._get)

    def file_digest(self) -> str:
        """sha256 of the source (see :func:`source_digest`), from the bytes one iteration already read
        where the format allows, else by reading the source again."""
        digest = self._streamed() if self._streamed else None
        return digest or source_digest(self.path)


def refuse_scaled_fp8(ckpt: Checkpoint) -> None:
    """ComfyUI's "scaled fp8" stores each weight as fp8 times a ``.scale_weight`` beside it: its
    tensors are not the model's weights, and a delta of them against a base means nothing."""
    scaled = [s.key for s in ckpt.specs if s.key == "scaled_fp8" or s.key.endswith((".scale_weight", ".scale_input"))]
    if scaled:
        raise CheckpointError(
            f"{ckpt.path}: a scaled fp8 checkpoint ({len(scaled)} scale tensors such as {scaled[-1]!r}); "
            "dsreg stores weights as they are: save it as plain fp8 (float8_e4m3fn) or bf16 and push that"
        )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        check_links(path)
        ckpt = _open_diffusers(path)
        ckpt.layout = replace(ckpt.layout, modes=_modes(path))
        return ckpt
    ckpt = _open_file(path)
    ckpt.layout = replace(ckpt.layout, modes={"": _mode(path)})
    return ckpt


def check_links(folder: Path) -> None:
    """Refuse a folder whose symbolic links could read what is not the folder's own.

    A link to a file inside the folder is read as that file (a diffusers snapshot may link its
    shards). A link that resolves outside the folder would store, and give to everyone who checks
    the subject out, whatever file the pusher can read (``tokenizer/merges.txt -> /etc/shadow``); a
    link to a folder could loop or do the same one level down. Both are refused, naming the link.
    """
    root = folder.resolve()
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = Path(top) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if target.is_dir():
                raise CheckpointError(f"{entry}: a link to a folder ({target}); links to folders are not followed, copy the folder in")
            if not target.is_relative_to(root):
                raise CheckpointError(
                    f"{entry}: a link to {target}, outside {folder}; refusing to read it (copy the file in if it belongs there)"
                )


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): _mode(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def restrict_modes(path: Path, layout: Layout) -> None:
    """Give each written file at most the permissions its source had: a checkout never makes a
    file readable by more users than the file that was pushed (a key or a private config)."""
    for relative, mode in (layout.modes or {}).items():
        target = path if relative == "" else path / relative
        if relative != "" and not path.is_dir():
            continue
        if target.is_file() and not target.is_symlink():
            target.chmod(_mode(target) & mode)


def _open_file(path: Path) -> Checkpoint:
    kind = _sniff(path)
    if kind == "safetensors":
        return _open_safetensors(path)
    if kind == "pickle":
        return _open_pickle(path)
    raise CheckpointError(f"{path}: not a checkpoint (expected .safetensors, a torch pickle or a diffusers folder)")


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "pickle"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in PICKLE_SUFFIXES:
        return "pickle"
    return None


def _check_dtype(path: Path, key: str, dtype: torch.dtype) -> str:
    try:
        return dtype_name(dtype)
    except ValueError:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}") from None


def _open_safetensors(path: Path) -> Checkpoint:
    """Read tensors at their header offsets (:class:`~registry.directio.RangeReader`), not through a
    memory map.

    A map of a 3.4 GB file leaves every page it touched resident in the process; reading one
    tensor at a time into its own buffer keeps a push's memory at about one layer.
    """
    n, entries, metadata = _read_header(path)
    base = 8 + n
    specs = [TensorSpec(e.key, e.dtype, e.shape) for e in entries]
    offsets = {e.key: (base + e.start, e.stop - e.start) for e in entries}
    by_key = {s.key: s for s in specs}
    reader = directio.RangeReader(path)
    lock = threading.Lock()
    # The tensors tile the data section in spec order, so reading them in order reads the whole
    # file: hash it on the way rather than in a pass of its own.
    hasher = hashlib.sha256(reader.read(0, base))
    stream = {"next": base}

    def get(key: str, scratch: Scratch | None = None) -> torch.Tensor:
        spec = by_key[key]
        offset, size = offsets[key]
        dtype = DTYPES[spec.dtype]
        if not size:
            return torch.empty(spec.shape, dtype=dtype)
        data = reader.read(offset, size, scratch)
        if len(data) != size:
            raise CheckpointError(f"{path}: truncated while reading tensor {key!r}")
        with lock:
            if offset == stream["next"]:
                hasher.update(data)
                stream["next"] = offset + size
        # Reads land on the page boundaries of the file, so a tensor may start anywhere in its buffer.
        raw = torch.frombuffer(data, dtype=torch.uint8)
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).reshape(spec.shape)

    def streamed() -> str | None:
        return hasher.hexdigest() if stream["next"] == path.stat().st_size else None

    return Checkpoint(path, specs, Layout("safetensors", metadata=metadata or None), get, reader.close, streamed)


def _read_header(path: Path) -> tuple[int, list[safetensors_format.Entry], dict[str, str] | None]:
    """(header length, tensors in data order, metadata) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = safetensors_format.header_length(fh.read(8), size)
            entries, metadata = safetensors_format.parse_header(fh.read(n), size - 8 - n)
    except safetensors_format.FormatError as exc:
        raise CheckpointError(f"{path}: safetensors file: {exc}") from None
    return n, entries, metadata


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the refusal below says it all
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            culprits = ", ".join(_foreign_globals(path)[:3]) or "objects other than tensors"
            raise UnsafeCheckpoint(
                f"{path}: refused: the pickle needs {culprits}, which could run code; "
                "re-save it as safetensors or as a plain state dict of tensors"
            ) from None
        raise CheckpointError(f"{path}: not a checkpoint ({first_line(exc)})") from None
    except Exception as exc:  # torch's unpickler raises anything (IndexError, KeyError, ...) on malformed bytes
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first_line(exc)})") from None


_SAFE_MODULES = ("torch", "collections", "_codecs", "numpy")


def _foreign_globals(path: Path) -> list[str]:
    """The globals a refused pickle imports, found by reading its opcodes: nothing is executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings = (strings + [arg])[-2:]
            elif op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                found.append(".".join(strings))
        return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_MODULES)]
    except Exception:  # a malformed pickle: the refusal stands without names
        return []


def _state_dict(path: Path, obj: object) -> tuple[dict, str | None, dict]:
    """(the tensors, the key they sat under, the small entries beside them to write back)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
    wrapper = None
    extras: dict = {}
    if isinstance(obj.get("state_dict"), dict):
        outer, obj, wrapper = obj, obj["state_dict"], "state_dict"
        dropped = []
        for key, value in outer.items():
            if key == "state_dict":
                continue
            if _small_plain(value):
                extras[str(key)] = value
            else:
                dropped.append(str(key))
        if dropped:
            log.warning(
                "%s: leaving out %d entries beside the state dict that are not small plain values (optimizer states, "
                "tensors outside it): %s; checkout writes the rest back", path, len(dropped), ", ".join(dropped[:5]),
            )
    tensors = {}
    skipped = []
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        else:
            skipped.append(str(key))
    if skipped:
        log.warning("%s: ignoring %d entries that are not tensors: %s", path, len(skipped), ", ".join(skipped[:5]))
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in the pickle")
    return tensors, wrapper, extras


# Entries beside a state dict kept in the catalog (as JSON) only up to this size.
EXTRAS_LIMIT = 64 << 10


def _small_plain(value) -> bool:
    """A value JSON keeps as it is (numbers, strings, lists and string-keyed dicts of them), and small."""
    def plain(v) -> bool:
        if v is None or isinstance(v, (bool, int, float, str)):
            return not (isinstance(v, float) and v != v)  # NaN does not round-trip through strict JSON
        if isinstance(v, list):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return False

    try:
        return plain(value) and len(json.dumps(value)) <= EXTRAS_LIMIT
    except (ValueError, RecursionError):
        return False


def _open_pickle(path: Path) -> Checkpoint:
    tensors, wrapper, extras = _state_dict(path, _torch_load(path))
    specs = [TensorSpec(k, _check_dtype(path, k, t.dtype), tuple(t.shape)) for k, t in tensors.items()]
    layout = Layout("pickle", wrapper=wrapper, extras=extras or None)
    return Checkpoint(path, specs, layout, lambda key, scratch=None: tensors[key].contiguous())


def _open_diffusers(path: Path) -> Checkpoint:
    if (path / PIPELINE_INDEX).is_file():
        return _open_pipeline(path)
    # The folder's small JSON and text files (config.json) are uint8 tensors keyed by name, after the
    # weights, as a pipeline's are: stored and verified as blobs, never as text in the catalog.
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".json", ".txt") and p.stat().st_size < 1_000_000 and not p.name.endswith(".index.json")]
    found = _model_weights(path)
    if found is None:
        raise CheckpointError(f"{path}: a folder, but no diffusers weights in it (diffusion_pytorch_model.safetensors or .bin)")
    inner, _ = found
    weights = {s.key for s in inner.specs}
    files = [f for f in files if f.name not in weights]
    specs = inner.specs + [TensorSpec(f.name, "uint8", (f.stat().st_size,)) for f in files]
    by_name = {f.name: f for f in files}

    def get(key: str, scratch: Scratch | None = None) -> torch.Tensor:
        return _file_tensor(by_name[key]) if key in by_name else inner.get(key, scratch)

    layout = replace(inner.layout, file_keys=[f.name for f in files] or None)
    return Checkpoint(path, specs, layout, get, inner.close)


def _model_weights(path: Path) -> tuple[Checkpoint, set[str]] | None:
    """A diffusers model folder's weights (single file or shards, safetensors before .bin), and the
    names of the files they came from; None if the folder holds none."""
    for stem in DIFFUSERS_WEIGHTS:
        for suffix in (".safetensors", ".bin"):
            index = path / f"{stem}{suffix}.index.json"
            single = path / f"{stem}{suffix}"
            if index.exists():
                ckpt = _open_sharded(path, index)
                return ckpt, {index.name, *ckpt.layout.shards.values()}
            if single.exists():
                inner = _open_file(single)
                layout = Layout("diffusers", weights_name=single.name, metadata=inner.layout.metadata)
                return Checkpoint(path, inner.specs, layout, inner.get, inner.close), {single.name}
    return None


def _open_pipeline(path: Path) -> Checkpoint:
    """A diffusers pipeline folder (``model_index.json``): one checkpoint of every component.

    Weights are keyed ``component/key`` (``unet/conv_in.weight``). Every other file (model_index,
    configs, tokenizer, scheduler) is a uint8 tensor keyed by its relative path, so it is stored,
    deduplicated and verified like any tensor: a tokenizer the fine-tune did not change costs nothing.
    Alternative copies of weights (``.bin`` beside ``.safetensors``, fp16 variants) are left out.
    """
    components: dict[str, dict] = {}
    parts: list[Checkpoint] = []
    specs: list[TensorSpec] = []
    getters: dict[str, Callable[[Scratch | None], torch.Tensor]] = {}
    used: set[Path] = set()
    for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _model_weights(folder)
        if found is None:
            continue
        ckpt, names = found
        parts.append(ckpt)
        used.update(folder / n for n in names)
        components[folder.name] = {k: v for k, v in ckpt.layout.to_json().items() if k != "format"}
        for spec in ckpt.specs:
            key = f"{folder.name}/{spec.key}"
            specs.append(TensorSpec(key, spec.dtype, spec.shape))
            getters[key] = lambda scratch, get=ckpt.get, inner=spec.key: get(inner, scratch)
    file_keys: list[str] = []
    skipped: list[str] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p not in used):
        key = file.relative_to(path).as_posix()
        if file.suffix in WEIGHT_SUFFIXES:
            skipped.append(key)
            continue
        size = file.stat().st_size
        if size > PIPELINE_FILE_LIMIT:
            raise CheckpointError(f"{file}: {size} bytes, too large for a pipeline's config or tokenizer file")
        if key in getters:
            raise CheckpointError(f"{path}: file {key!r} has the same name as a tensor")
        file_keys.append(key)
        specs.append(TensorSpec(key, "uint8", (size,)))
        getters[key] = lambda scratch, file=file: _file_tensor(file)
    if not components:
        raise CheckpointError(f"{path}: a diffusers pipeline (model_index.json), but no component folder holds weights")
    if skipped:
        log.warning("%s: leaving out %d other weight files (alternative formats or variants): %s", path, len(skipped), ", ".join(skipped[:5]))

    def close() -> None:
        for ckpt in parts:
            ckpt.close()

    layout = Layout("pipeline", components=components, file_keys=file_keys)
    read = sorted(used) + [path / k for k in file_keys]
    # The digest covers what was read, not the weight variants left out (they can be many GB).
    return Checkpoint(path, specs, layout, lambda key, scratch=None: getters[key](scratch), close, lambda: source_digest(path, read))


def _file_tensor(file: Path) -> torch.Tensor:
    data = file.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _open_sharded(path: Path, index: Path) -> Checkpoint:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid shard index (no weight_map)") from None
    shards: dict[str, Checkpoint] = {}
    specs: list[TensorSpec] = []
    owner: dict[str, str] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard_path = path / shard_name
        if Path(shard_name).name != shard_name or not shard_path.is_file():
            raise CheckpointError(f"{index}: shard {shard_name!r} is missing")
        shard = _open_file(shard_path)
        shards[shard_name] = shard
        for spec in shard.specs:
            specs.append(spec)
            owner[spec.key] = shard_name
    missing = set(weight_map) - set(owner)
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors listed but not in any shard, e.g. {sorted(missing)[0]!r}")

    def close():
        for shard in shards.values():
            shard.close()

    layout = Layout("diffusers", shards=owner, weights_name=index.name.removesuffix(".index.json"))
    return Checkpoint(path, specs, layout, lambda key, scratch=None: shards[owner[key]].get(key, scratch), close)


def source_digest(path: str | os.PathLike, files: Iterable[Path] | None = None) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, in name order): all of them, or ``files``."""
    path = Path(path)
    h = hashlib.sha256()
    if files is not None:
        files = sorted(files)
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- writing


def write_safetensors(path: Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor], metadata: dict | None = None) -> None:
    """Stream tensors into a safetensors file: the header is known up front, so nothing is held whole."""
    header, _ = _safetensors_header(specs, metadata)
    with open(path, "wb") as fh:
        fh.write(header)
        count = 0
        for spec, tensor in zip(specs, tensors):
            _check_tensor(spec, tensor)
            fh.write(_bytes_of(tensor))
            count += 1
        if count != len(specs):
            raise ValueError(f"expected {len(specs)} tensors, got {count}")


def fill_safetensors(
    path: Path,
    specs: list[TensorSpec],
    fill: Callable[[int, torch.Tensor], None],
    metadata: dict | None = None,
    workers: int = 2,
    done: Callable[[int], None] | None = None,
    order: list[int] | None = None,
) -> None:
    """Write a safetensors file whose tensors are formed in any order: ``fill(i, out)`` writes
    tensor i into ``out`` (of its spec's dtype and shape) on one of ``workers`` threads, in
    ``order`` (default: largest tensors first), and each is written at its offset as soon as it is
    formed. ``done(count)`` is called on this thread as tensors finish.

    Each thread forms its tensors in one buffer of its own, reused, so no tensor costs fresh
    memory; the file is written with direct I/O where the filesystem allows (registry.directio).
    """
    header, offsets = _safetensors_header(specs, metadata)
    with Scratch() as scratch, directio.DirectFile(path, len(header) + sum(spec.nbytes for spec in specs)) as out_file:
        first = scratch(len(header))
        first[: len(header)] = header
        out_file.write(0, memoryview(first)[: len(header)])

        def place(i: int) -> None:
            spec, dtype = specs[i], DTYPES[specs[i].dtype]
            start = len(header) + offsets[i]
            phase = out_file.phase(start)
            data = memoryview(scratch(phase + spec.nbytes))[phase : phase + spec.nbytes]
            if spec.nbytes and phase % dtype.itemsize == 0:
                fill(i, torch.frombuffer(data, dtype=dtype).view(spec.shape))
            else:  # a view must start at a multiple of the item size
                out = torch.empty(spec.shape, dtype=dtype)
                fill(i, out)
                data[:] = _bytes_of(out)
            out_file.write(start, data)

        if order is None:
            order = sorted(range(len(specs)), key=lambda i: -specs[i].nbytes)
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(place, i) for i in order]
            try:
                for count, future in enumerate(as_completed(futures), 1):
                    future.result()
                    if done is not None:
                        done(count)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _safetensors_header(specs: list[TensorSpec], metadata: dict | None) -> tuple[bytes, list[int]]:
    """The length prefix and JSON header of a safetensors file of ``specs``, and each tensor's data offset."""
    return safetensors_format.build_header([(s.key, s.dtype, s.shape) for s in specs], metadata)


def _check_tensor(spec: TensorSpec, tensor: torch.Tensor) -> None:
    if dtype_name(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(f"tensor {spec.key}: got {tensor.dtype} {tuple(tensor.shape)}, expected {spec.dtype} {spec.shape}")


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_pickle(
    path: Path, specs: list[TensorSpec], tensors: Iterable[torch.Tensor], wrapper: str | None = None, extras: dict | None = None
) -> None:
    """torch.save needs a whole state dict; stage the tensors in a file and map it, so they stay on disk."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".stage-", suffix=".safetensors") as stage:
        write_safetensors(Path(stage.name), specs, tensors)
        # ACCESS_COPY: torch wants writable buffers; private pages stay backed by the file until written.
        with open(stage.name, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            base = 8 + safetensors_format.header_length(mapped[:8], len(mapped))
            state: dict[str, torch.Tensor] = {}
            offset = 0
            for spec in specs:
                dtype = DTYPES[spec.dtype]
                if spec.numel:
                    t = torch.frombuffer(mapped, dtype=dtype, count=spec.numel, offset=base + offset)
                else:
                    t = torch.empty(0, dtype=dtype)
                state[spec.key] = t.reshape(spec.shape)
                offset += spec.nbytes
            torch.save({**(extras or {}), wrapper: state} if wrapper else state, path)
            del state


def write_checkpoint(path: Path, layout: Layout, specs: list[TensorSpec], tensors: Iterable[torch.Tensor]) -> None:
    """Write ``tensors`` (in ``specs`` order) at ``path`` in ``layout``'s format."""
    if layout.format == "safetensors":
        write_safetensors(path, specs, tensors, layout.metadata)
    elif layout.format == "pickle":
        write_pickle(path, specs, tensors, layout.wrapper, layout.extras)
    elif layout.format == "diffusers":
        _write_diffusers(path, layout, specs, tensors)
    elif layout.format == "pipeline":
        _write_pipeline(path, layout, specs, tensors)
    else:
        raise ValueError(f"unknown format {layout.format!r}")


def _write_diffusers(path: Path, layout: Layout, specs: list[TensorSpec], tensors: Iterable[torch.Tensor]) -> None:
    """The weights, then the files (``file_keys``, which the reader puts after the weights)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in layout.files.items():  # revisions pushed before files became blobs
        (path / Path(name).name).write_text(text)
    file_keys = set(layout.file_keys or ())
    files = [s for s in specs if s.key in file_keys]
    specs = [s for s in specs if s.key not in file_keys]
    stream = iter(tensors)
    _write_model_weights(path, layout, specs, stream)
    for spec in files:
        _write_file(path, spec.key, next(stream))


def _write_model_weights(path: Path, layout: Layout, specs: list[TensorSpec], stream: Iterator[torch.Tensor]) -> None:
    weights_name = layout.weights_name or "diffusion_pytorch_model.safetensors"
    if not layout.shards:
        _write_weights(path / weights_name, specs, stream, layout.metadata)
        return
    groups: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        groups.setdefault(layout.shards[spec.key], []).append(spec)
    for shard_name, shard_specs in groups.items():
        _write_weights(path / Path(shard_name).name, shard_specs, (next(stream) for _ in shard_specs), None)
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": {s.key: layout.shards[s.key] for s in specs}}
    (path / f"{weights_name}.index.json").write_text(json.dumps(index, indent=2))


def _write_pipeline(path: Path, layout: Layout, specs: list[TensorSpec], tensors: Iterable[torch.Tensor]) -> None:
    """Each component's weights into its folder, each file to its relative path, in one pass over ``tensors``."""
    files = set(layout.file_keys or ())
    components = layout.components or {}
    stream = iter(tensors)
    path.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    for owner, run in groupby(specs, key=lambda s: None if s.key in files else s.key.split("/", 1)[0]):
        run = list(run)
        if owner is None:
            for spec in run:
                _write_file(path, spec.key, next(stream))
            continue
        if owner in written or owner not in components:
            raise ValueError(f"pipeline component {owner!r} is unknown or its tensors are not contiguous")
        written.add(owner)
        inner = [TensorSpec(s.key.split("/", 1)[1], s.dtype, s.shape) for s in run]
        _write_diffusers(_inside(path, owner), Layout("diffusers", **components[owner]), inner, (next(stream) for _ in run))


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing names that would climb out of ``root`` (the catalog is input too)."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts) or "\\" in relative:
        raise ValueError(f"refusing to write {relative!r}: not a plain relative path")
    return root.joinpath(*rel.parts)


def _write_file(root: Path, key: str, tensor: torch.Tensor) -> None:
    target = _inside(root, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_bytes_of(tensor))


def _write_weights(path: Path, specs, tensors, metadata) -> None:
    if path.suffix == ".safetensors":
        write_safetensors(path, specs, tensors, metadata)
    else:
        write_pickle(path, specs, tensors)


# ---------------------------------------------------------------- whole or nothing


def write_atomically(
    output: Path, write: Callable[[Path], None], layout: Layout | None = None, *, overwrite: bool = True, journal: Path | None = None
) -> None:
    """Write under a temporary name beside ``output`` and rename: a reader sees all of it or nothing.
    With ``layout``, no file gets wider permissions than its source had (``restrict_modes``); without
    ``overwrite``, an existing file is refused. A write the system refuses (a full disk, no
    permission) is an OutputError naming the path, and leaves nothing behind. With ``journal`` (a
    folder), the temporary is noted there while it exists, so that :func:`remove_dead_writes` can
    find it if this process is killed."""
    output = output.absolute()
    if output.is_dir() and any(output.iterdir()):
        raise UsageError(f"{output} is a folder that is not empty; choose a new output path")
    if not overwrite and output.exists() and not output.is_dir():
        raise Conflict(f"{output} exists; choose another output path, or replace it (--force)")
    tmp = output.parent / f".{output.name}.dsreg-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    note = _note_write(journal, tmp) if journal is not None else None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output)
        write(tmp)
        if layout is not None:
            restrict_modes(tmp, layout)
        if output.is_dir():
            output.rmdir()
        os.replace(tmp, output)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(f"cannot write {output}: {exc.strerror or first_line(exc)}; nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if note is not None:
            note.unlink(missing_ok=True)


def _note_write(journal: Path, tmp: Path) -> Path:
    journal.mkdir(parents=True, exist_ok=True)
    note = journal / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    note.write_text(json.dumps({"temporary": str(tmp)}))
    return note


def remove_dead_writes(journal: Path) -> list[Path]:
    """Remove the temporaries that writes noted in ``journal`` left behind when their process, on
    this host, was killed (a checkout interrupted by kill -9); returns the paths removed."""
    removed = []
    prefix = f"{socket.gethostname()}-"
    for note in sorted(journal.glob(f"{glob.escape(prefix)}*.json")) if journal.is_dir() else []:
        pid = note.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            tmp = Path(json.loads(note.read_text())["temporary"])
        except (OSError, ValueError, KeyError, TypeError):
            tmp = None
        if tmp is not None and tmp.name.startswith(".") and ".dsreg-" in tmp.name and (tmp.exists() or tmp.is_symlink()):
            _remove(tmp)
            removed.append(tmp)
        note.unlink(missing_ok=True)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temporaries(output: Path) -> None:
    """Temporaries of earlier writes to ``output`` whose process died without cleaning up (kill -9).

    Only those written on this host by a process that no longer exists: a live writer's are its own.
    """
    prefix = f".{output.name}.dsreg-{socket.gethostname()}-"
    for tmp in output.parent.glob(f".{glob.escape(output.name)}.dsreg-*"):
        pid = tmp.name[len(prefix):].split("-", 1)[0] if tmp.name.startswith(prefix) else ""
        if pid.isdigit() and not process_alive(int(pid)):
            _remove(tmp)

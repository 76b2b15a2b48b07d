"""Checkout: rebuild a revision's full checkpoint, W_base + ΔW per tensor, written whole or not at all."""

from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import torch

from . import codec, deltas, encodings, families, spectral
from .bases import base_map, base_tensor, with_ema_mirrors
from .catalog import BaseTensor, StoredEntry
from .checkpoint import FORMATS, PICKLE_SUFFIXES, Layout, TensorSpec, fill_safetensors, write_atomically, write_checkpoint
from .concurrency import Scratch, ahead, prefetch, return_large_frees, threads_per_lane
from .config import resolve_device
from .errors import IntegrityError, UsageError
from .families import ModelLayout, Piece, Rule
from .names import Ref, as_ref
from .records import CheckoutResult, Progress, quiet

# Tensors a safetensors checkout forms side by side. Each lane reads a base blob straight from the
# disk, hashes it, inflates it into its output buffer and adds A·B there; a third lane keeps two
# cores busy while one waits for the disk, at the cost of a reusable buffer for the largest blob
# and tensor per lane (docs/performance.md).
CHECKOUT_LANES = 3
# ... as many as fit in CHECKOUT_MEMORY, a lane taken to hold LANE_COPIES times the largest
# tensor (its output buffer, the base blob, the factors, a block of fp32 rows): two lanes for a
# Flux layer of 21504 x 3072 in bf16, three for an SD1.5 UNet's largest in fp32.
CHECKOUT_MEMORY = 1100 << 20
LANE_COPIES = 3


def lanes_for(specs) -> int:
    largest = max((s.nbytes for s in specs), default=0)
    return max(1, min(CHECKOUT_LANES, CHECKOUT_MEMORY // max(1, LANE_COPIES * largest)))

_FORMAT_ALIASES = {"safetensors": "safetensors", "ckpt": "pickle", "pickle": "pickle", "pt": "pickle", "diffusers": "diffusers"}


def checkout(
    reg,
    ref: str | Ref,
    output: str | os.PathLike | None = None,
    *,
    format: str | None = None,
    layout: str | None = None,
    device: str = "auto",
    verify: bool = False,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> CheckoutResult:
    """Registry.checkout: see its docstring."""
    ref = as_ref(ref)
    dev = resolve_device(device)
    progress = progress or quiet
    return_large_frees()
    info = reg.catalog.revision(ref)
    recorded = reg.catalog.revision_layout(Ref(info.subject, info.number))
    pushed = Layout.from_json(recorded)
    entries = reg.catalog.entries(Ref(info.subject, info.number))
    base = with_ema_mirrors(base_map(reg.catalog, info.base, recorded.get("base_component")), [e.key for e in entries])
    stored, wanted = model_layouts(info.ref, recorded, [e.key for e in entries], layout)
    output = Path(output) if output is not None else Path(f"{info.subject}-{info.number}{_default_suffix(pushed)}")
    out_layout = _output_layout(pushed, output, format, wanted)
    if out_layout.format in ("safetensors", "pickle") and pushed.file_keys:  # a model folder's config.json is no weight
        files = set(pushed.file_keys)
        entries = [e for e in entries if e.key not in files]
    steps = converted([TensorSpec(e.key, e.dtype, e.shape) for e in entries], stored, wanted)
    specs = [spec for spec, _ in steps]
    by_key = {e.key: e for e in entries}
    checked = DigestCheck(info.ref, entries) if verify else None
    if out_layout.format == "safetensors":
        lanes = lanes_for(specs)
        with Scratch() as blobs, threads_per_lane(lanes):
            def direct(key: str, out: torch.Tensor) -> None:
                _rebuild_into(reg, by_key[key], base, out, dev, blobs)
                if checked is not None:
                    checked.check(by_key[key], out)

            cut = Cut(steps, lambda key: _made(by_key[key], direct))
            write_atomically(output, lambda tmp: fill_safetensors(
                tmp, specs, lambda i, out: cut.fill(steps[i][1], out, direct), out_layout.metadata, workers=lanes,
                done=lambda n: progress("checkout", n, len(specs)), order=cut.order(),
            ), out_layout, overwrite=overwrite, journal=reg.settings.journal)
    else:
        # The rebuild runs a tensor ahead of the writer: matrix products and file writes overlap.
        tensors = ahead(_rebuild(reg, entries, base, dev, progress))
        if checked is not None:
            tensors = checked.wrap(tensors)
        if stored != wanted:
            tensors = _cut_stream(steps, entries, tensors)
        write_atomically(output, lambda tmp: write_checkpoint(tmp, out_layout, specs, tensors), out_layout, overwrite=overwrite, journal=reg.settings.journal)
    return CheckoutResult(
        info.ref, output, out_layout.format, len(specs), sum(s.nbytes for s in specs), str(dev),
        verified=checked.verified if checked else 0, lossy=checked.lossy if checked else 0,
    )


def model_layouts(ref: str, recorded: dict, keys: list[str], layout: str | None) -> tuple[ModelLayout | None, ModelLayout | None]:
    """(the layout a revision's tensors are stored in, the layout to give them back in): the one
    they were pushed in, or ``layout`` (original or diffusers) of the same family."""
    families.check_layout(layout)
    stored = ModelLayout.from_json(recorded.get("stored_model"))
    pushed = ModelLayout.from_json(recorded.get("model"))
    if stored is None:  # pushed before layouts were recorded: stored as pushed
        stored = pushed = families.detect(keys)
    if layout is None or (pushed is not None and layout == pushed.layout):
        return stored, pushed
    if recorded.get("format") == "pipeline":
        raise UsageError(f"{ref} is a whole pipeline; --layout converts one model (a UNet or transformer file or folder)")
    if stored is None:
        raise UsageError(f"{ref} is a model of no family dsreg knows the layouts of; check it out without --layout")
    if stored.layout == layout:
        return stored, stored
    prefix = families.FAMILIES[stored.family].original_prefix if layout == "original" else ""
    return stored, ModelLayout(stored.family, layout, prefix)


def converted(specs: list[TensorSpec], stored: ModelLayout | None, wanted: ModelLayout | None) -> list[tuple[TensorSpec, Rule]]:
    """Each output tensor's spec and the rule that cuts it from stored tensors (one whole tensor
    each when the layouts are the same)."""
    if stored is None or wanted is None or stored == wanted:
        return [(spec, Rule(spec.key, (Piece(spec.key),))) for spec in specs]
    return families.plan(specs, stored, wanted)


def _made(entry: StoredEntry, direct) -> torch.Tensor:
    out = torch.empty(entry.shape, dtype=codec.dtype_of(entry.dtype))
    direct(entry.key, out)
    return out


class Cut:
    """Forms output tensors by their rules: one that is a stored tensor renamed is rebuilt straight
    into its output (``direct``); the others are cut from stored tensors that ``make`` rebuilds,
    each once, held only while an output still needs it. :meth:`order` puts the outputs that share
    a stored tensor next to each other, so that few are held at a time."""

    def __init__(self, steps: list[tuple[TensorSpec, Rule]], make):
        self.steps, self.make = steps, make
        self.uses = Counter(p.key for _, rule in steps if rule.renamed is None for p in rule.pieces)
        self.held: dict[str, Future] = {}
        self.lock = threading.Lock()

    def order(self) -> list[int]:
        size = {}
        for spec, rule in self.steps:
            first = rule.pieces[0].key
            size[first] = size.get(first, 0) + spec.nbytes
        return sorted(range(len(self.steps)), key=lambda i: (-size[self.steps[i][1].pieces[0].key], self.steps[i][1].pieces[0].key, i))

    def fill(self, rule: Rule, out: torch.Tensor, direct) -> None:
        if rule.renamed is not None:
            direct(rule.renamed, out)
            return
        try:
            torch.cat([self._source(p.key)[p.start:p.stop] for p in rule.pieces], out=out)
        finally:
            for p in rule.pieces:
                self._done(p.key)

    def _source(self, key: str) -> torch.Tensor:
        with self.lock:
            future = self.held.get(key)
            mine = future is None
            if mine:
                future = self.held[key] = Future()
        if mine:
            try:
                future.set_result(self.make(key))
            except BaseException as exc:
                future.set_exception(exc)
                raise
        return future.result()

    def _done(self, key: str) -> None:
        with self.lock:
            self.uses[key] -= 1
            if self.uses[key] <= 0:
                self.held.pop(key, None)


def _cut_stream(steps: list[tuple[TensorSpec, Rule]], entries: list[StoredEntry], tensors: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Output tensors in ``steps`` order from stored tensors that come in ``entries`` order."""
    stream = zip((e.key for e in entries), tensors)
    ready: dict[str, torch.Tensor] = {}

    def make(key: str) -> torch.Tensor:
        while key not in ready:
            got, tensor = next(stream)
            ready[got] = tensor
        return ready.pop(key)

    cut = Cut(steps, make)
    for spec, rule in steps:
        out = torch.empty(spec.shape, dtype=codec.dtype_of(spec.dtype))
        cut.fill(rule, out, lambda key, out: out.copy_(make(key)))
        yield out


def _rebuild_into(reg, entry: StoredEntry, base: dict[str, BaseTensor], out: torch.Tensor, device: torch.device, blobs: Scratch) -> None:
    """Form an entry's tensor in ``out``: the base inflated into it, then the delta added.

    The base blob is read into this thread's ``blobs`` buffer and inflated straight into
    ``out``, so the weights are copied once on their way into the checkpoint.
    """
    try:
        stored = entry_blob(reg, entry)
        if entry.kind != "full":
            t = base[entry.key]
            if t.dtype == entry.dtype and t.shape == entry.shape:
                data = reg.base_blobs.read_into(t.blob, blobs)
                try:
                    codec.decode_into(data, t.raw_size, out, f"base tensor {t.key!r}")
                finally:
                    data.release()
            else:
                out.copy_(base_tensor(reg, t, blobs, entry.shape))
    except IntegrityError as exc:  # which tensor the damaged object belongs to, and nothing is written
        raise IntegrityError(f"cannot rebuild tensor {entry.key!r}: {exc}") from None
    deltas.apply(entry.kind, out, stored, device)


def entry_blob(reg, entry: StoredEntry) -> dict[str, torch.Tensor] | None:
    """An entry's own blob (factors, delta, rows, ...), decoded, with the base SVD a spectral entry
    names; None for an entry without one."""
    if not entry.blob:
        return None
    stored = codec.decode(reg.store.get(entry.blob), entry.raw_size, f"blob of {entry.key!r}")
    if entry.kind == "lowrank":  # one LoRA's factors shared by several tensors: this entry's rows
        return encodings.shared_part(stored, entry.key, entry.shape[0])
    return spectral.with_svd(reg, stored, entry.key) if entry.kind == "spectral" else stored


def _rebuild(reg, entries: list[StoredEntry], base: dict[str, BaseTensor], device: torch.device, progress: Progress) -> Iterator[torch.Tensor]:
    def load(entry: StoredEntry):
        try:
            stored = entry_blob(reg, entry)
            bt = base_tensor(reg, base[entry.key], shape=entry.shape) if entry.kind != "full" else None
        except IntegrityError as exc:  # which tensor the damaged object belongs to, and nothing is written
            raise IntegrityError(f"cannot rebuild tensor {entry.key!r}: {exc}") from None
        return entry, bt, stored

    for i, (entry, bt, stored) in enumerate(prefetch(load, entries, window=4, workers=4)):
        yield deltas.rebuild(entry.kind, codec.dtype_of(entry.dtype), bt, stored, device)
        progress("checkout", i + 1, len(entries))


class DigestCheck:
    """Hashes each rebuilt tensor that was stored losslessly and compares it with the push's digest."""

    def __init__(self, ref: str, entries: list[StoredEntry]):
        self.ref, self.entries = ref, entries
        self.lossy = sum(entry.kind not in deltas.LOSSLESS_KINDS for entry in entries)
        self.verified = len(entries) - self.lossy  # once every check has passed

    def check(self, entry: StoredEntry, tensor: torch.Tensor) -> None:
        if entry.kind in deltas.LOSSLESS_KINDS and codec.tensor_digest(tensor) != entry.tensor_digest:
            raise IntegrityError(
                f"{self.ref}: tensor {entry.key!r} does not rebuild to the digest recorded at push; nothing was written"
            )

    def wrap(self, tensors: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for entry, tensor in zip(self.entries, tensors):
            self.check(entry, tensor)
            yield tensor


def _default_suffix(layout: Layout) -> str:
    return {"safetensors": ".safetensors", "pickle": ".ckpt", "diffusers": "", "pipeline": ""}[layout.format]


def _output_layout(pushed: Layout, output: Path, fmt: str | None, model: ModelLayout | None = None) -> Layout:
    layout = _format_layout(pushed, output, fmt)
    if model is not None and model.layout == "original" and layout.format == "diffusers":
        raise UsageError("the original layout is a single file: give the output (-o) a .safetensors or .ckpt name")
    return layout


def _format_layout(pushed: Layout, output: Path, fmt: str | None) -> Layout:
    if pushed.format == "pipeline":
        if fmt not in (None, "diffusers") or output.suffix.lower() == ".safetensors" or output.suffix.lower() in PICKLE_SUFFIXES:
            raise UsageError("a diffusers pipeline checks out as a folder: give the output (-o) a folder name, and no format (--format) safetensors or ckpt")
        return pushed
    if fmt is not None:
        if fmt not in _FORMAT_ALIASES:
            raise UsageError(f"unknown format {fmt!r}; use safetensors, ckpt or diffusers")
        fmt = _FORMAT_ALIASES[fmt]
    elif output.suffix.lower() == ".safetensors":
        fmt = "safetensors"
    elif output.suffix.lower() in PICKLE_SUFFIXES:
        fmt = "pickle"
    elif output.is_dir() or (output.suffix == "" and pushed.format == "diffusers"):
        fmt = "diffusers"
    else:
        fmt = pushed.format
    assert fmt in FORMATS
    if fmt == pushed.format:
        return pushed
    # A single file's permissions carry over to a single file of another format.
    single = {"": pushed.modes[""]} if pushed.modes and "" in pushed.modes else None
    if fmt == "safetensors":
        return Layout("safetensors", metadata=pushed.metadata, modes=single)
    if fmt == "pickle":
        return Layout("pickle", wrapper=pushed.wrapper, modes=single)
    return Layout("diffusers", files=pushed.files, weights_name="diffusion_pytorch_model.safetensors")

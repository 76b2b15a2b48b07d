"""Using a subject without a file: its state dict in memory (``load``), or its weights written into a
live model in place (``apply``), switched from subject to subject and restored to the base's bits.

The paper's deployment: a service keeps one base model resident and adds a subject's deltas to its
layers, W_base + A·B per touched tensor, formed in fp32 on the module's device and cast to the
module's dtype. What restore needs, the base values of the touched tensors, is copied from the
module before its first write (on the module's device, or in host memory); restore writes those
copies back, so the base comes back bit for bit, never by subtracting a delta in low precision.

An apply runs in two phases. The first writes nothing: it matches the module's keys and shapes to
the subject's, checks that the touched tensors hold the base's values (a sample by digest, or all),
and fetches and decodes every blob the subject needs (through the registry's factor cache). Only
then are tensors written, by arithmetic in memory; if that fails too, the tensors written so far
are put back to what the module held before the call.

Thread safety: each module has a lock, held through an apply or a restore, so applies to different
modules run in parallel and applies to one module run one after another. Running a module's forward
pass while another thread switches it gives a mix of two subjects: serve each module from one thread
at a time (or one module per thread).
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import codec, deltas, encodings, families
from .bases import base_map, base_tensor, can_grow, with_ema_mirrors
from .catalog import BaseTensor, StoredEntry
from .checkout import Cut, lanes_for, _rebuild_into, converted, entry_blob, model_layouts
from .checkpoint import TensorSpec
from .families import Rule
from .concurrency import Scratch, prefetch, return_large_frees, threads_per_lane
from .config import resolve_device
from .errors import BaseMismatch, IntegrityError, UsageError, check_choice
from .names import Ref, as_ref
from .records import Progress, quiet

KEEP = ("device", "host", "mapped")
# fingerprint: every touched tensor's fingerprint, on its device, against the base's (the default);
# all: every touched tensor's sha256 against the base's digest, on the host. "sample" was the old
# default's name (8 digests), now the fingerprint check.
CHECKS = ("fingerprint", "all", "sample")
# A fingerprint reads a tensor's bits as rows of this many integers (sums by row and by column).
FINGERPRINT_WIDTH = 4096
_UNCHANGED = ("base", "dropped")


@dataclass(frozen=True)
class _Revision:
    ref: str
    base: str
    entries: tuple[StoredEntry, ...]  # weights only: a folder's files are no tensors of a model
    base_tensors: dict[str, BaseTensor]  # by entry key
    component: str | None  # the pipeline component a single model was pushed against
    pipeline: bool  # keys are component/key
    recorded: dict  # the revision's layout record


def _revision(reg, ref: str | Ref) -> _Revision:
    info = reg.catalog.revision(as_ref(ref))
    exact = Ref(info.subject, info.number)
    recorded = reg.catalog.revision_layout(exact)
    entries = reg.catalog.entries(exact)
    files = set(recorded.get("file_keys") or ())
    base = with_ema_mirrors(base_map(reg.catalog, info.base, recorded.get("base_component")), [e.key for e in entries])
    return _Revision(
        info.ref, info.base, tuple(e for e in entries if e.key not in files), base,
        recorded.get("base_component"), recorded.get("format") == "pipeline", recorded,
    )


def _float_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {**encodings.FLOAT_ENCODINGS, "half": torch.float16, "float": torch.float32}
    try:
        return names[dtype] if dtype in names else codec.DTYPES[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use fp16, bf16, fp32 or a torch.dtype") from None


def cached_blob(reg, entry: StoredEntry, device: torch.device | None = None) -> dict[str, torch.Tensor] | None:
    """An entry's decoded blob through the registry's factor cache, on ``device`` (the CPU by default)."""
    if not entry.blob:
        return None
    device = torch.device(device or "cpu")

    def fetch() -> dict[str, torch.Tensor]:
        try:
            stored = entry_blob(reg, entry)
        except IntegrityError as exc:
            raise IntegrityError(f"cannot rebuild tensor {entry.key!r}: {exc}") from None
        return stored if device.type == "cpu" else {k: v.to(device) for k, v in stored.items()}

    # Spectral entries, and a fused LoRA's entries, share one blob, each its own part of it.
    key = (entry.blob, entry.key, str(device)) if entry.kind in ("spectral", "lowrank") else (entry.blob, str(device))
    return reg.factors.get(key, fetch)


# ---------------------------------------------------------------- load


def load(reg, ref: str | Ref, *, device: str = "auto", dtype=None, layout: str | None = None, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Registry.load: see its docstring."""
    dev, cast = resolve_device(device), _float_dtype(dtype)
    rev = _revision(reg, ref)
    entries = list(rev.entries)
    stored, wanted = model_layouts(rev.ref, rev.recorded, [e.key for e in entries], layout)
    progress = progress or quiet
    out = {e.key: torch.empty(e.shape, dtype=codec.dtype_of(e.dtype)) for e in entries}
    # As checkout forms a safetensors file, in lanes, largest first: each base blob is inflated
    # straight into its result tensor and the delta added there.
    order = sorted(range(len(entries)), key=lambda i: -out[entries[i].key].nbytes)
    lanes = lanes_for(TensorSpec(e.key, e.dtype, e.shape) for e in entries)
    with Scratch() as blobs, threads_per_lane(lanes), ThreadPoolExecutor(lanes) as pool:
        fill = lambda i: _rebuild_into(reg, entries[i], rev.base_tensors, out[entries[i].key], dev, blobs)  # noqa: E731
        for count, _ in enumerate(pool.map(fill, order), 1):
            progress("load", count, len(entries))
    if stored != wanted:
        steps = converted([TensorSpec(e.key, e.dtype, e.shape) for e in entries], stored, wanted)
        cut = Cut(steps, out.pop)
        result = {}
        for spec, rule in steps:
            if rule.renamed is not None:
                result[spec.key] = out.pop(rule.renamed)
            else:
                result[spec.key] = torch.empty(spec.shape, dtype=codec.dtype_of(spec.dtype))
                cut.fill(rule, result[spec.key], None)
        out = result
    if cast is not None or dev.type != "cpu":
        for key, tensor in out.items():  # one tensor at a time: memory holds one result, plus one tensor
            out[key] = tensor.to(device=dev, dtype=cast if cast is not None and tensor.is_floating_point() else tensor.dtype)
    return out


# ---------------------------------------------------------------- apply


@dataclass
class _Slot:
    """What dsreg knows of one live module: the subject it holds, the base values under it, and the
    ``with`` blocks open on it."""

    module: weakref.ref
    lock: threading.RLock = field(default_factory=threading.RLock)
    current: "Applied | None" = None
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # module key -> base value, for restore
    # module key -> (data_ptr, version) of a tensor last seen holding the base: checked or written
    # by dsreg since. An in-place change by anyone bumps the version counter, which state_dict's
    # detached tensors share with the parameters, so a match means nothing changed it since.
    known_base: dict[str, tuple[int, int]] = field(default_factory=dict)
    # module key -> the base value in the machine's mapped copy of the base (keep="mapped")
    mapped: dict[str, torch.Tensor] = field(default_factory=dict)
    changes: dict[str, "_Change"] = field(default_factory=dict)  # module key -> what the current subject wrote
    frames: list["_Frame"] = field(default_factory=list)  # open with blocks, outermost first


@dataclass(frozen=True)
class _Held:
    """What a module held: a subject's changes over the base (none: the base), and its handle."""

    changes: dict[str, "_Change"]
    handle: "weakref.ref | None" = None  # weak: a serving loop's old handles must not pile up

    @classmethod
    def of(cls, slot: "_Slot") -> "_Held":
        return cls(slot.changes, weakref.ref(slot.current) if slot.current is not None else None)


@dataclass(frozen=True)
class _Frame:
    """A with block open on a module: its handle, and what the module held when it was entered."""

    handle: "Applied"
    before: _Held


@dataclass(frozen=True)
class _Change:
    """One touched tensor of a subject, fetched and ready to write (phase two needs no store)."""

    entry: StoredEntry
    stored: dict[str, torch.Tensor] | None
    base: torch.Tensor | None = None  # the store's base, where the module's own copy cannot stand in for it


_slots: "weakref.WeakKeyDictionary[torch.nn.Module, _Slot]" = weakref.WeakKeyDictionary()
_slots_lock = threading.Lock()


def _slot(module: torch.nn.Module) -> _Slot:
    with _slots_lock:
        slot = _slots.get(module)
        if slot is None:
            slot = _slots[module] = _Slot(weakref.ref(module))
        return slot


class Applied:
    """A subject written into live modules (see docs/python-api.md, "What a with block promises").

    Leaving a ``with`` block, or ``restore()`` on its handle, returns the modules to exactly what
    they held when the block was entered (the base, or an outer block's subject), closing any
    block opened inside it. ``restore()`` on a handle applied without ``with`` returns the modules
    to what the innermost open block holds (else the base). A handle whose subject a later plain
    apply replaced raises rather than restore something that is no longer there."""

    def __init__(self, ref: str, base: str, slots: dict[str, _Slot], changes: dict[str, dict[str, "_Change"]], keep: str):
        self.ref = ref
        self.base = base
        self._slots = slots  # component ("" for a bare module) -> slot, every one the apply switched
        self._changes = changes  # component -> what the subject writes there (nothing: the base)
        self._keep = keep
        self._before: dict[str, _Held] = {}  # component -> what its module held before this apply
        self._closed: set[str] = set()  # components this handle no longer answers for

    @property
    def active(self) -> bool:
        """Whether some module still holds this subject through this handle."""
        return any(slot.current is self for slot in self._slots.values())

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components this handle wrote (``("",)`` for a bare module)."""
        return tuple(c for c in self._slots if self._changes[c])

    def restore(self) -> None:
        slots = {c: s for c, s in self._slots.items() if c not in self._closed}
        locks = _ordered(slots.values())
        for slot in locks:
            slot.lock.acquire()
        try:
            plans = {}
            for component, slot in slots.items():
                opened = next((i for i, f in enumerate(slot.frames) if f.handle is self), None)
                if opened is not None:
                    plans[component] = (opened, slot.frames[opened].before)
                elif slot.current is self:
                    top = slot.frames[-1].handle if slot.frames else None
                    plans[component] = (None, _Held(top._changes[component], weakref.ref(top)) if top else _Held({}))
                else:
                    holder = slot.current.ref if slot.current is not None else "the base"
                    raise UsageError(
                        f"cannot restore {self.ref}: {type(slot.module()).__name__} holds {holder} now, applied after it without "
                        "`with`; restore that handle, or apply the subject in a `with` block to have it unwound"
                    )
            for component, (opened, before) in plans.items():
                slot = slots[component]
                if opened is not None:
                    for frame in slot.frames[opened:]:  # blocks opened inside this one close with it
                        frame.handle._closed.add(component)
                    del slot.frames[opened:]
                if slot.current is not None:
                    slot.current._closed.add(component)
                module = slot.module()
                if module is not None:
                    _switch(slot, module.state_dict(), before.changes, self._keep)
                slot.current = before.handle() if before.handle is not None else None
                self._closed.add(component)
        finally:
            for slot in reversed(locks):
                slot.lock.release()

    def __enter__(self) -> "Applied":
        for component, slot in _ordered_items(self._slots):
            with slot.lock:
                if component not in self._closed:
                    slot.frames.append(_Frame(self, self._before[component]))
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"<Applied {self.ref} on {', '.join(c or 'module' for c in self._slots)}{'' if self.active else ' (restored)'}>"


def _ordered(slots) -> list[_Slot]:
    return sorted(slots, key=id)  # one lock order for every caller: no two applies wait on each other


def _ordered_items(slots: dict[str, _Slot]) -> list[tuple[str, _Slot]]:
    return sorted(slots.items(), key=lambda item: id(item[1]))


def apply(reg, target: Any, ref: str | Ref, *, keep: str = "device", check: str = "fingerprint") -> Applied:
    """Registry.apply: see its docstring."""
    check_choice("keep", keep, KEEP)
    check_choice("check", check, CHECKS)
    rev = _revision(reg, ref)
    parts = _targets(target, rev)  # component -> (module, {module key: entry})
    slots = {component: _slot(module) for component, (module, _) in parts.items()}
    locks = _ordered(slots.values())
    for slot in locks:
        slot.lock.acquire()
    try:
        # Phase one: nothing is written until every module fits and every blob is in memory.
        plans = {}
        for component, (module, entries) in parts.items():
            state = module.state_dict()
            where = f"{type(module).__name__}" + (f" ({component})" if component else "")
            _check_fit(rev, where, state, entries)
            touched = {k: e for k, e in entries.items() if e.kind not in _UNCHANGED}
            _check_values(reg, rev, where, state, slots[component], touched, check)
            if keep == "mapped":
                _map_base(reg, rev, slots[component], touched)
            plans[component] = (module, state, _fetch(reg, rev, state, touched))
        handle = Applied(rev.ref, rev.base, {c: slots[c] for c in plans}, {c: changes for c, (_, _, changes) in plans.items()}, keep)
        # Phase two: arithmetic in memory, undone on failure.
        done: list[tuple[torch.nn.Module, _Slot, dict]] = []
        try:
            for component, (module, state, changes) in plans.items():
                slot = slots[component]
                previous = (slot.current, dict(slot.saved), dict(slot.changes))
                done.append((module, slot, previous))
                handle._before[component] = _Held.of(slot)
                _switch(slot, state, changes, keep)
                slot.current = handle
        except BaseException:
            for module, slot, (current, saved, changes) in reversed(done):
                _undo(module, slot, current, saved, changes)
            raise
        return handle
    finally:
        for slot in reversed(locks):
            slot.lock.release()


def _targets(target: Any, rev: _Revision) -> dict[str, tuple[torch.nn.Module, dict[str, StoredEntry]]]:
    """The modules an apply writes, by component ("" for a bare module), with the subject's entries
    by the module's own keys."""
    if isinstance(target, torch.nn.Module):
        target = _unwrapped(target)
        component, entries = _component_for(target, rev)
        return {component: (target, _in_layout_of(target, rev, entries))}
    modules = getattr(target, "components", None)
    if not isinstance(modules, dict):
        raise UsageError(f"cannot apply a subject to a {type(target).__name__}: give a torch.nn.Module or a diffusers pipeline")
    modules = {c: _unwrapped(m) if isinstance(m, torch.nn.Module) else m for c, m in modules.items()}
    if not rev.pipeline:
        component = rev.component
        if component is None:  # a single model: the pipeline's module whose keys it has, in its layout
            fits = [
                c for c, m in modules.items()
                if isinstance(m, torch.nn.Module) and _in_layout_of(m, rev, _by_component(rev, None)).keys() <= m.state_dict().keys()
            ]
            if not fits:
                raise BaseMismatch(f"no module of the pipeline has the keys of {rev.ref}; apply it to the module it was trained from")
            component = fits[0]
        module = modules.get(component)
        if not isinstance(module, torch.nn.Module):
            raise BaseMismatch(f"the pipeline has no module {component!r}, which {rev.ref} changes")
        return {component: (module, _in_layout_of(module, rev, _by_component(rev, None)))}
    parts = {}
    for component in sorted({e.key.split("/", 1)[0] for e in rev.entries if "/" in e.key}):
        entries = _by_component(rev, component)
        module = modules.get(component)
        held = isinstance(module, torch.nn.Module) and _holds(module)
        if not any(e.kind not in _UNCHANGED for e in entries.values()) and not held:
            continue  # neither this subject nor the one there now changes it
        if not isinstance(module, torch.nn.Module):
            raise BaseMismatch(f"the pipeline has no module {component!r}, which {rev.ref} changes")
        parts[component] = (module, entries)
    return parts


@dataclass(frozen=True)
class _CutEntry:
    """A module tensor that the subject's stored tensors make in another layout (a diffusers
    ``to_q`` cut from a stored fused ``qkv``): its rule, and the stored entries it is cut from.
    ``lowrank``: the rows of one low-rank delta (A's rows, all of B); ``full``: the rebuilt value."""

    key: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    rule: Rule
    sources: tuple[StoredEntry, ...]


def _in_layout_of(module: torch.nn.Module, rev: _Revision, entries: dict[str, StoredEntry]) -> dict:
    """``entries`` by the module's own keys: as they are, or, for a module of the subject's family
    in the other layout, through the family's conversion (renamed tensors keep their entry; cut or
    joined ones become :class:`_CutEntry`)."""
    keys = module.state_dict().keys()
    if entries.keys() <= keys:
        return entries
    stored, _ = model_layouts(rev.ref, rev.recorded, [e.key for e in rev.entries], None)
    theirs = families.detect(keys)
    if stored is None or theirs is None or theirs.family != stored.family:
        return entries
    steps = converted([TensorSpec(k, e.dtype, e.shape) for k, e in entries.items()], stored, theirs)
    out: dict = {}
    for spec, rule in steps:
        if rule.renamed is not None:
            out[spec.key] = entries[rule.renamed]
            continue
        sources = tuple(entries[p.key] for p in rule.pieces)
        if all(e.kind in _UNCHANGED for e in sources):
            kind = "base"
        elif len(sources) == 1 and sources[0].kind == "lowrank":
            kind = "lowrank"
        else:
            kind = "full"
        out[spec.key] = _CutEntry(spec.key, kind, spec.dtype, spec.shape, rule, sources)
    return out


def _cut_base(reg, rev: _Revision, entry: _CutEntry) -> torch.Tensor:
    base = {e.key: base_tensor(reg, rev.base_tensors[e.key], shape=e.shape) for e in entry.sources}
    return families.assemble(entry.rule, base.__getitem__)


def _cut_change(reg, rev: _Revision, entry: _CutEntry, device: torch.device) -> dict[str, torch.Tensor]:
    if entry.kind == "lowrank":  # rows of A·B are A's rows times B: the slice stays low-rank
        piece = entry.rule.pieces[0]
        a, b = encodings.decode_factors(cached_blob(reg, entry.sources[0], device))
        return {"a": a[piece.start:piece.stop].contiguous(), "b": b}
    values = {}
    for source in entry.sources:
        if source.key not in values:
            bt = base_tensor(reg, rev.base_tensors[source.key], shape=source.shape) if source.kind != "full" else None
            values[source.key] = deltas.rebuild(source.kind, codec.dtype_of(source.dtype), bt, cached_blob(reg, source), device)
    return {"tensor": families.assemble(entry.rule, values.__getitem__)}


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself under torch.compile's wrapper, which shares its parameters: writing them
    in place is what a compiled graph reads next, with no recompile."""
    return getattr(module, "_orig_mod", module)


def _holds(module: torch.nn.Module) -> bool:
    with _slots_lock:
        slot = _slots.get(module)
    return slot is not None and bool(slot.changes)


def _by_component(rev: _Revision, component: str | None) -> dict[str, StoredEntry]:
    if component is None:
        return {e.key: e for e in rev.entries}
    prefix = component + "/"
    return {e.key[len(prefix):]: e for e in rev.entries if e.key.startswith(prefix)}


def _component_for(module: torch.nn.Module, rev: _Revision) -> tuple[str, dict[str, StoredEntry]]:
    """A bare module: the whole subject, or the component of a pipeline subject whose keys it has."""
    if not rev.pipeline:
        return "", _by_component(rev, None)
    keys = module.state_dict().keys()
    parts = {c: _by_component(rev, c) for c in sorted({e.key.split("/", 1)[0] for e in rev.entries if "/" in e.key})}
    best = max(parts, key=lambda c: len(parts[c].keys() & keys), default=None)
    if best is None or not parts[best].keys() & keys:
        raise BaseMismatch(f"{type(module).__name__} has none of the keys of {rev.ref} ({', '.join(parts)}); apply it to one of these modules, or to the pipeline")
    return best, parts[best]


def _check_fit(rev: _Revision, where: str, state: dict[str, torch.Tensor], entries: dict[str, StoredEntry]) -> None:
    injected = [k for k in state if ".base_layer." in k]
    if injected:
        # peft's LoRA layers wrap the module's own (x.weight is now x.base_layer.weight) and add
        # their product on top: a subject written under them would not be what renders.
        raise BaseMismatch(
            f"{where} has LoRA layers injected by peft/diffusers ({len(injected)} tensors such as {injected[0]!r}): call "
            "pipe.unload_lora_weights() (after fuse_lora, pipe.unfuse_lora() first), then apply the subject to the bare module"
        )
    for key, entry in entries.items():
        tensor = state.get(key)
        if tensor is None:
            raise BaseMismatch(f"{where} does not fit {rev.ref} (base {rev.base!r}): it has no tensor {key!r}")
        if tuple(tensor.shape) != tuple(entry.shape):
            hint = ""
            base = rev.base_tensors.get(entry.key)
            if base is not None and tuple(base.shape) == tuple(tensor.shape) and can_grow(tuple(entry.shape), base.shape):
                hint = f"; the subject added rows (new tokens): resize the module to {list(entry.shape)} first"
            raise BaseMismatch(
                f"{where} does not fit {rev.ref} (base {rev.base!r}): {key!r} has shape {list(tensor.shape)} in the module, "
                f"{list(entry.shape)} in the subject{hint}"
            )
        if tensor.is_floating_point() != codec.dtype_of(entry.dtype).is_floating_point:
            raise BaseMismatch(f"{where} does not fit {rev.ref}: {key!r} is {codec.dtype_name(tensor.dtype)} in the module, {entry.dtype} in the subject")


def _check_values(reg, rev: _Revision, where: str, state: dict, slot: _Slot, touched: dict[str, StoredEntry], check: str) -> None:
    """The tensors the module would give up as its base hold the base's values: every one of the
    keys another subject does not hold now (for those, the slot keeps the base values it saved).
    A tensor dsreg saw holding the base, unchanged since (its version counter), is not read again."""
    keys = [k for k in touched if k not in slot.saved and (touched[k].key in rev.base_tensors or isinstance(touched[k], _CutEntry))]
    if check != "all":
        keys = [k for k in keys if _stamp(state[k]) is None or slot.known_base.get(k) != _stamp(state[k])]
    for key in keys:
        value = state[key]
        if isinstance(touched[key], _CutEntry):
            same = deltas.same_bits(_cut_base(reg, rev, touched[key]).to(value.dtype), value.detach().cpu())
        elif check == "all":
            t = rev.base_tensors[touched[key].key]
            if codec.dtype_name(value.dtype) == t.dtype:
                same = codec.tensor_digest(value.detach().cpu()) == t.tensor_digest
            else:  # a module cast to another dtype: compare with the base cast the same way
                same = deltas.same_bits(base_tensor(reg, t).to(value.dtype), value.detach().cpu())
        else:
            t = rev.base_tensors[touched[key].key]
            same = torch.equal(fingerprint(value), _base_fingerprint(reg, t, value.dtype).to(value.device))
        if same:
            slot.known_base[key] = _stamp(value)
        else:
            raise BaseMismatch(
                f"{where} does not hold base {rev.base!r}: tensor {key!r} differs from it; apply {rev.ref} only to a module "
                "loaded from its base (a module changed by other means, e.g. a fused LoRA, is refused)"
            )


def _map_base(reg, rev: _Revision, slot: _Slot, touched: dict[str, StoredEntry]) -> None:
    """Where the touched tensors' base values are in this machine's mapped copy of the base (made
    from the store the first time): restore and switches read them from there. A tensor that grew
    rows has no base value of its shape there and is copied as with keep="device"."""
    from .mapped import mapped_base

    base = mapped_base(reg, rev.base)
    for key, entry in touched.items():
        t = rev.base_tensors.get(entry.key)
        if key not in slot.saved and t is not None and tuple(t.shape) == tuple(entry.shape):
            slot.mapped[key] = base.tensor(t.key)


def _stamp(tensor: torch.Tensor) -> tuple[int, int] | None:
    """Where a tensor is and how often it was changed in place; None for an inference tensor,
    which keeps no version counter (it is then checked on every apply)."""
    return None if tensor.is_inference() else (tensor.data_ptr(), tensor._version)


@torch.no_grad()
def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three int64 sums over a tensor's bits, on its own device (nothing is copied to the host):
    the bits are read as integers laid out in rows of FINGERPRINT_WIDTH, and summed whole, row by
    row weighted by the row's number, and column by column weighted by the column's, so that a
    changed value shows and so does one moved to another place. Integer sums do not depend on the
    order of the additions: equal bits give equal fingerprints on any device."""
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view(codec.INT_OF_SIZE[flat.element_size()])
    n = flat.numel() - flat.numel() % FINGERPRINT_WIDTH
    grid = flat[:n].view(-1, FINGERPRINT_WIDTH)
    rows = grid.sum(dim=1, dtype=torch.int64)
    cols = grid.sum(dim=0, dtype=torch.int64)
    tail = flat[n:].to(torch.int64)  # the last, short row
    rows = torch.cat([rows, tail.sum().reshape(1)])
    cols[: tail.numel()] += tail
    weight = lambda k: torch.arange(1, k + 1, dtype=torch.int64, device=flat.device)  # noqa: E731
    return torch.stack([rows.sum(), (rows * weight(rows.numel())).sum(), (cols * weight(cols.numel())).sum()])


def _base_fingerprint(reg, t: BaseTensor, dtype: torch.dtype) -> torch.Tensor:
    """The fingerprint of base tensor ``t`` cast to ``dtype``, read from the store once per process."""
    def compute() -> torch.Tensor:
        # A first apply reads every touched base tensor once: freed tensors go back to the system,
        # not into malloc's arenas, where they raised a serving process's peak by the base's size.
        return_large_frees()
        return fingerprint(base_tensor(reg, t).to(dtype))

    return reg.fingerprints.get((t.tensor_digest, str(dtype)), compute)


def _fetch(reg, rev: _Revision, state: dict, touched: dict[str, StoredEntry]) -> dict[str, _Change]:
    def fetch(key: str) -> _Change:
        entry = touched[key]
        if isinstance(entry, _CutEntry):
            return _Change(entry, _cut_change(reg, rev, entry, state[key].device))
        base = None
        if entry.kind == "exact" and codec.dtype_name(state[key].dtype) != entry.dtype:
            # Bit-level deltas need the base's own bits, which a module of another dtype lacks.
            base = base_tensor(reg, rev.base_tensors[entry.key], shape=entry.shape)
        return _Change(entry, cached_blob(reg, entry, state[key].device), base)

    # Reads and decompression overlap in threads (zstd and the store release the GIL).
    return dict(zip(touched, prefetch(fetch, list(touched), window=8, workers=4)))


def _writing(state: dict):
    """no_grad; inference_mode for a module built under ``torch.inference_mode()``, whose tensors
    may be written in place only there."""
    return torch.inference_mode() if any(t.is_inference() for t in state.values()) else torch.no_grad()


def _switch(slot: _Slot, state: dict, changes: dict[str, _Change], keep: str) -> None:
    with _writing(state):
        _switch_to(slot, state, changes, keep)


def _switch_to(slot: _Slot, state: dict, changes: dict[str, _Change], keep: str) -> None:
    """Make the module hold ``changes`` over its base: the keys only the old subject touched get
    their base back, the new subject's keys get base + delta."""
    old = slot.changes
    _write_base_state(state, slot, [k for k in old if k not in changes])
    for key in [k for k in old if k not in changes]:
        del slot.saved[key]
        slot.known_base[key] = _stamp(state[key])
    slot.changes = {}
    for key, change in changes.items():
        tensor = state[key]
        if key not in slot.saved:
            slot.saved[key] = slot.mapped[key] if keep == "mapped" and key in slot.mapped else _copy(tensor, keep)
        _write(tensor, slot.saved[key], change)
        slot.changes[key] = change


def _write(tensor: torch.Tensor, base: torch.Tensor, change: _Change) -> None:
    entry = change.entry
    dtype = codec.dtype_of(entry.dtype)
    source = change.base if change.base is not None else base
    if change.base is None and source.dtype != tensor.dtype:
        # A mapped base value in the base's dtype: the module's own base is its cast, and the
        # change is formed on that, as with a copy of the module's value.
        source = source.to(tensor.dtype)
    if tensor.dtype == dtype and tensor.is_contiguous():
        # In the module's own memory: a fresh tensor per layer would cost page faults on every byte.
        if entry.kind == "lowrank" and dtype == torch.float32 and "appended" not in change.stored and source.device == tensor.device:
            # One product onto the kept base: W = W_base + A·B in one pass, not a copy and then an add.
            a, b = encodings.decode_factors(change.stored)
            rows = tensor.shape[0]
            torch.addmm(source.reshape(rows, -1), a.to(tensor.device), b.to(tensor.device), out=tensor.view(rows, -1))
            return
        tensor.copy_(source)
        deltas.apply(entry.kind, tensor, change.stored, tensor.device)
        return
    out = source.to(device=tensor.device, dtype=dtype, copy=True)
    deltas.apply(entry.kind, out, change.stored, tensor.device)
    tensor.copy_(out)


def _copy(tensor: torch.Tensor, keep: str) -> torch.Tensor:
    if keep in ("device", "mapped") or tensor.device.type == "cpu":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(tensor)
    return host


def _write_base_state(state: dict, slot: _Slot, keys) -> None:
    for key in keys:
        state[key].copy_(slot.saved[key])


def _undo(module: torch.nn.Module, slot: _Slot, current, saved: dict, changes: dict) -> None:
    """Put a module back as it was before a failed switch: the base where the switch wrote, then the
    old subject's tensors over it again."""
    state = module.state_dict()
    with _writing(state):
        for key in set(slot.saved) | set(saved):  # every key the switch may have written has its base here
            state[key].copy_(saved.get(key, slot.saved.get(key)))
        for key, change in changes.items():
            _write(state[key], saved[key], change)
    slot.current, slot.saved, slot.changes = current, saved, changes

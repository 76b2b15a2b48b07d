"""Push: compress a fine-tune against its base and record it as a revision; sweep: what each rule
would store, without storing anything. Both find the base a checkpoint fits here.

Ordering (docs/format.md, "Write ordering"): every blob is claimed by the push's lease before it
is checked for or uploaded, all blobs are uploaded before the one catalog transaction that records
the revision, and nothing is uploaded until the scan has passed the whole checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import adapters, deltas, deltasvd, families, ranking
from .bases import EMA_PREFIX, base_model_layout, base_tensor, can_grow, component_tensors, is_file_key, scan_all, with_ema_mirrors, writer_lease
from .catalog import BaseTensor, BlobRecord, Catalog, Lease, NewEntry, NewRevision
from .checkpoint import Checkpoint, TensorSpec, refuse_scaled_fp8
from .concurrency import Background, MemoryGate, Scratch, prefetch, return_large_frees, threads_per_lane
from .config import BUDGET_ENCODING, DEFAULT_ENCODING, resolve_device
from .encodings import ENCODINGS
from .families import ModelLayout
from .errors import AmbiguousBase, BaseMismatch, UsageError, check_choice
from .layers import key_layout
from .names import validate_name
from .ranking import (
    EXPECTED_RATIO, Allocation, FixedTensor, LayerSpectrum, RankRule, allocate, estimate, measured_ratio, trim,
)
from .records import Progress, RevisionInfo, SweepRow, numel, quiet
from .scan import HeldUploads, Scan, Scanned

log = logging.getLogger(__name__)

# A budget push plans with expected blob sizes, then measures: up to CORRECTION_ROUNDS more
# rounds trim a plan that overshot or, in the first TOPUP_ROUNDS of them, spend what is left while
# more than TOPUP_MIN of the budget is; each round re-compresses only the layers it changes.
CORRECTION_ROUNDS = 4
TOPUP_ROUNDS = 2
TOPUP_MIN = 0.01
# A top-up that would re-compress more than this share of the stored bytes spends its room
# greedily instead: on a large model a higher floor touches nearly every layer.
RECOMPRESS_SHARE = 0.25

# Layers decomposed side by side on the CPU, how many more may start past the oldest one still
# running, and the bytes of tensors they may hold together, as the gate estimates them (high: a
# waiting layer holds two fp32 copies, not five). With fewer (3 ahead, 800 MB) one lane often
# stood idle behind a large layer (docs/performance.md has the pushes side by side).
COMPRESS_LANES = 2
COMPRESS_AHEAD = 8
COMPRESS_MEMORY = 1200 << 20

# An adapter pushed without a rank rule keeps every direction it has: its rank is already its
# trainer's choice, and factors of that rank take no more bytes than the file.
ADAPTER_ENERGY = 1.0

# A clear winner when detecting a base: its delta must be this much smaller than the runner-up's.
DETECT_MARGIN = 0.5


@dataclass(frozen=True)
class PushOptions:
    """How a push compresses: the rank rule, the factors' encoding, the decomposition and the device."""

    rule: RankRule
    encoding: str
    method: str
    device: torch.device


def push(
    reg,
    path: str | os.PathLike,
    subject: str | None = None,
    *,
    base: str | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    budget: int | str | None = None,
    exact: bool = False,
    encoding: str | None = None,
    method: str = "gram",
    device: str = "auto",
    ema: bool = True,
    only: tuple[str, ...] | None = None,
    progress: Progress | None = None,
) -> RevisionInfo:
    """Registry.push: see its docstring."""
    if encoding is None:
        encoding = BUDGET_ENCODING if budget is not None else DEFAULT_ENCODING
    if subject is not None:
        validate_name(subject)
    check_choice("encoding", encoding, ENCODINGS)
    check_choice("method", method, deltasvd.METHODS)
    rule = RankRule.from_options(energy=energy, max_error=max_error, budget=budget, exact=exact)
    chosen = any(v is not None for v in (energy, max_error, budget)) or exact
    progress = progress or quiet
    with adapters.open_input(reg, path, base, only) as whole:
        own = whole if ema else whole.without(EMA_PREFIX)
        ckpt, pushed_model, stored_model = to_base_layout(reg.catalog, own, base)
        with Scan(ckpt, progress) as scan:
            if whole.merged_onto and not chosen:
                rule = RankRule("energy", ADAPTER_ENERGY)
            opts = PushOptions(rule, encoding, method, resolve_device(device))
            base_name = whole.merged_onto or base or detect_base(reg, ckpt, scan)
            base_tensors, component = fitting_base(reg.catalog, base_name, scan)
            layout = {**ckpt.layout.to_json(), "source_name": Path(path).name}
            if component is not None:
                layout["base_component"] = component
            if whole.merged_onto:
                layout["adapter"] = whole.describe()
            if pushed_model is not None:
                layout["model"] = pushed_model.to_json()
                layout["stored_model"] = stored_model.to_json()
            with writer_lease(reg, f"push {subject or 'new subject'}") as lease:
                # What the push reads is claimed like what it writes: gc keeps it, and `base rm` waits.
                lease.claim(sorted({t.blob for t in base_tensors.values()}))
                entries = _compress(reg, ckpt, scan, base_tensors, lease, opts, progress)
                for derived, data in whole.derived_new:  # base SVDs an SVDiff push computed
                    lease.claim([derived.blob.digest])
                    reg.store.put(data, derived.blob.digest)
                scanned = scan.result()
                new = NewRevision(
                    subject=subject, base_id=reg.catalog.base_id(base_name), energy=rule.value if rule.mode == "energy" else None,
                    rank_rule=str(rule), encoding=encoding, original_bytes=scanned.nbytes, source_digest=scanned.source_digest,
                    source_format=ckpt.layout.format, layout=layout,
                    entries=tuple(entries), derived=tuple(d for d, _ in whole.derived_new),
                )
                return reg.catalog.commit_revision(new, lease.id)


def sweep(
    reg,
    path: str | os.PathLike,
    rules: list[RankRule | str],
    encodings: list[str] = (DEFAULT_ENCODING,),
    *,
    base: str | None = None,
    method: str = "gram",
    progress: Progress | None = None,
) -> list[SweepRow]:
    """Registry.sweep: see its docstring."""
    rules = [RankRule.parse(r) if isinstance(r, str) else r for r in rules]
    for encoding in encodings:
        check_choice("encoding", encoding, ENCODINGS)
    check_choice("method", method, deltasvd.METHODS)
    progress = progress or quiet
    return_large_frees()
    with adapters.open_input(reg, path, base) as whole:
        ckpt, _, _ = to_base_layout(reg.catalog, whole, base)
        scanned = scan_all(ckpt, progress)
        base_tensors, _ = fitting_base(reg.catalog, ckpt.merged_onto or base or detect_base(reg, ckpt, scanned), scanned)
        changed = _changed(scanned, base_tensors)
        layers, fixed = [], []

        def load(spec: TensorSpec):
            return spec, ckpt.get(spec.key), base_tensor(reg, base_tensors[spec.key]) if spec.key in base_tensors else None

        for i, (spec, ft, bt) in enumerate(prefetch(load, changed, window=2, workers=2)):
            s = deltas.survey(ft, bt, method, ckpt.updates.get(spec.key))
            if s is not None:
                layers.append(LayerSpectrum(spec.key, spec.shape[0], numel(spec.shape) // spec.shape[0], s))
            elif bt is None or not deltas.same_bits(bt.to(ft.dtype), ft):
                fixed.append(FixedTensor(spec.key, ft.numel(), None if ft.is_floating_point() else ft.element_size()))
            progress("survey", i + 1, len(changed))
    rows = []
    for rule in rules:
        for encoding in encodings:
            params, nbytes, error, worst = estimate(layers, fixed, rule, encoding)
            rows.append(SweepRow(str(rule), encoding, params, nbytes, scanned.nbytes, error, worst))
    return rows


def to_base_layout(catalog: Catalog, ckpt: Checkpoint, base: str | None) -> tuple[Checkpoint, ModelLayout | None, ModelLayout | None]:
    """(the checkpoint as the base stores its family's tensors, the layout it came in, the layout
    it is stored in). A model of a known family whose base (``base``, or else the registered bases
    of its family) is in the other layout is read through the conversion, so that the delta is
    taken tensor by tensor against the base's own; its revision records both layouts, and checkout
    gives it back in the layout it came in."""
    refuse_scaled_fp8(ckpt)
    own = families.detect(s.key for s in ckpt.specs)
    if own is None or ckpt.merged_onto:
        return ckpt, own, own
    names = [base] if base is not None else [b.name for b in catalog.bases()]
    theirs = [m for m in (base_model_layout(catalog, n) for n in names) if m is not None and m.family == own.family]
    if not theirs or any(m.layout == own.layout and m.prefix == own.prefix for m in theirs):
        return ckpt, own, own
    target = theirs[0]
    log.info("reading %s as %s, the layout of its base", own, target)
    return families.convert_checkpoint(ckpt, own, target), own, target


def fitting_base(catalog: Catalog, name: str, scanned: Scanned | Scan) -> tuple[dict[str, BaseTensor], str | None]:
    tensors, component, problem = _fit(catalog, name, scanned)
    if problem:
        raise BaseMismatch(f"checkpoint does not fit base {name!r}: {problem}")
    return tensors, component


def _fit(catalog: Catalog, name: str, scanned: Scanned | Scan) -> tuple[dict[str, BaseTensor] | None, str | None, str | None]:
    """(tensors, component, None) for the part of base ``name`` that the checkpoint fits: the whole
    base, or one component of a pipeline base (a UNet folder pushed against a whole pipeline);
    else (None, None, why not)."""
    tensors = catalog.base_tensors(name)
    whole = with_ema_mirrors({t.key: t for t in tensors}, [s.key for s in scanned.specs])
    problem = _mismatch(scanned, whole)
    if problem is None:
        return whole, None, None
    layout = catalog.base_layout(name)
    for component in layout.get("components") or {}:
        part = component_tensors(tensors, component)
        if part and _mismatch(scanned, part) is None:
            return part, component, None
    return None, None, problem


def detect_base(reg, ckpt: Checkpoint, scanned: Scanned | Scan) -> str:
    bases = reg.catalog.bases()
    if not bases:
        raise BaseMismatch("no base is registered; add one first with `dsreg base add FILE --name NAME`")
    fitting: dict[str, dict[str, BaseTensor]] = {}
    reasons = []
    for b in bases:
        tensors, _, problem = _fit(reg.catalog, b.name, scanned)
        if problem:
            reasons.append(f"{b.name} ({problem})")
        else:
            fitting[b.name] = tensors
    if not fitting:
        raise BaseMismatch("no registered base fits this checkpoint: " + "; ".join(reasons[:5]))
    if len(fitting) == 1:
        return next(iter(fitting))
    digests = (scanned.result() if isinstance(scanned, Scan) else scanned).digests
    identical = {n: sum(digests.get(k) == t.tensor_digest for k, t in ts.items()) for n, ts in fitting.items()}
    ranked = sorted(fitting, key=lambda n: identical[n], reverse=True)
    if identical[ranked[0]] > identical[ranked[1]]:
        return ranked[0]
    distance = {n: _delta_norm(reg, ckpt, fitting[n]) for n in ranked}
    ranked.sort(key=distance.get)
    if distance[ranked[0]] < DETECT_MARGIN * distance[ranked[1]]:
        return ranked[0]
    listed = ", ".join(f"{n} (relative delta {distance[n]:.3g})" for n in ranked)
    raise AmbiguousBase(f"cannot tell which base this fine-tune came from: {listed}; name one with --base")


def _delta_norm(reg, ckpt: Checkpoint, base: dict[str, BaseTensor], sample: int = 8) -> float:
    """Relative size of the delta over a few of the largest floating tensors."""
    specs = sorted((s for s in ckpt.specs if s.dtype in ("float32", "float16", "bfloat16", "float64")), key=lambda s: -s.nbytes)
    num = den = 0.0
    for spec in specs[:sample]:
        ft = ckpt.get(spec.key).float()
        bt = base_tensor(reg, base[spec.key], shape=spec.shape).float()
        num += float(torch.linalg.vector_norm(ft - bt)) ** 2
        den += float(torch.linalg.vector_norm(ft)) ** 2
    return (num / den) ** 0.5 if den else 0.0


def _compress(
    reg, ckpt: Checkpoint, scan: Scan, base: dict[str, BaseTensor], lease: Lease, opts: PushOptions, progress: Progress
) -> list[NewEntry]:
    rule, encoding, method, device = opts.rule, opts.encoding, opts.method, opts.device
    return_large_frees()
    specs = scan.specs

    def unchanged(spec: TensorSpec) -> bool:  # the scan's digest says so, without reading the base
        return spec.key in base and scan.digest(spec.key) == base[spec.key].tensor_digest

    def load(spec: TensorSpec, blobs: Scratch | None = None):
        return spec, ckpt.get(spec.key), base_tensor(reg, base[spec.key], blobs) if spec.key in base else None

    done: dict[str, deltas.Stored] = {}
    if rule.mode == "budget":  # the plan needs every changed layer's spectrum first
        changed = _changed(scan.result(), base)
        done = {s.key: deltas.Stored("base") for s in specs if s not in changed}
        done.update(_compress_to_budget(load, changed, opts, progress, ckpt.updates))
    entries: dict[str, NewEntry] = {}
    lanes = COMPRESS_LANES if device.type == "cpu" else 1

    def compress_one(spec: TensorSpec, ft: torch.Tensor | None, bt: torch.Tensor | None) -> tuple[TensorSpec, deltas.Stored]:
        if ft is None:
            return spec, deltas.Stored("base")
        return spec, deltas.compress(
            ft, bt, rule, encoding, method=method, device=device, base_is_scratch=True, update=ckpt.updates.get(spec.key)
        )

    with Scratch() as blobs, Background(workers=4, limit=4) as background, threads_per_lane(lanes):
        uploads = HeldUploads(scan, background)
        for key, stored in done.items():
            entries[key] = _record(reg, scan.specs_by_key[key], stored, scan.digest(key), lease, uploads)
        todo = [s for s in specs if s.key not in done]
        for i, (spec, stored) in enumerate(_side_by_side(lambda spec: load(spec, blobs), compress_one, todo, lanes, skip=unchanged)):
            entries[spec.key] = _record(reg, spec, stored, scan.digest(spec.key), lease, uploads)
            progress("compress", i + 1, len(todo))
        uploads.release()
        background.wait()
    result = [entries[s.key] for s in specs]
    if rule.mode == "budget":
        total = sum({e.blob.digest: e.blob.size for e in result if e.blob}.values())
        assert total <= rule.value, f"the budget's last plan is by upper bounds, yet {total} > {rule.value}"
        dropped = [e.key for e in result if e.kind == "dropped"]
        if dropped:
            changed = sum(e.kind != "base" for e in result)
            log.warning(
                "the budget of %d bytes leaves %d of %d changed tensors with nothing stored (error 1.0: they check out as the base), "
                "e.g. %r; a larger budget keeps them", int(rule.value), len(dropped), changed, dropped[0],
            )
    return result


def _side_by_side(load, job, specs: list[TensorSpec], lanes: int, skip=None) -> Iterator:
    """``job(spec, ft, bt)`` for each layer, results in order. On the CPU, ``lanes`` layers are
    decomposed side by side (the caller splits the threads: see threads_per_lane), and one reader
    loads them up to COMPRESS_AHEAD past the oldest one still running, so that a lane that finishes
    a small layer takes the next one rather than waiting for a large one to be taken in order; the
    memory gate, not the window, keeps what they hold to COMPRESS_MEMORY (the 1.5 GB target).
    A layer that ``skip`` names is not read: its job gets None for both tensors."""
    gate = MemoryGate(COMPRESS_MEMORY)

    def gated_load(spec: TensorSpec):
        if skip is not None and skip(spec):
            return spec, None, None, 0
        # Fine-tune, base, delta and residual in fp32, and the factors being formed: at τ 0.8 they
        # and their projection hold as much again as one of those.
        weight = 5 * numel(spec.shape) * 4
        gate.acquire(weight)
        try:
            return (*load(spec), weight)
        except BaseException:
            gate.release(weight)
            raise

    def one(item):
        spec, ft, bt, weight = item
        try:
            return job(spec, ft, bt)
        finally:
            gate.release(weight)

    loaded = prefetch(gated_load, specs, window=1, workers=1)
    yield from prefetch(one, loaded, window=lanes + COMPRESS_AHEAD, workers=lanes)


def _compress_to_budget(
    load, changed: list[TensorSpec], opts: PushOptions, progress: Progress, updates: dict
) -> dict[str, deltas.Stored]:
    """A budget push, before anything is uploaded (what it keeps in memory is budget-sized).

    Pass one stores what has no rank (1-D deltas, integer tensors) and takes every 2-D delta's
    spectrum. The rest of the budget is planned with expected blob sizes and the layers are
    compressed once. Then, up to CORRECTION_ROUNDS times, the blobs are measured: a plan that
    overshot loses the directions its floor took last, one that left room is topped up (in the
    first TOPUP_ROUNDS) under the same criterion, each layer now priced at what zstd left of its
    own tensor bytes, and only the layers whose allocation changed are compressed again. Should
    the rounds still end over budget, the plan is made again by upper bounds alone, which cannot
    overshoot.
    Both passes decompose COMPRESS_LANES layers side by side, as an energy push does.
    """
    rule, encoding, method, device = opts.rule, opts.encoding, opts.method, opts.device
    lanes = COMPRESS_LANES if device.type == "cpu" else 1
    stored: dict[str, deltas.Stored] = {}
    spectra: dict[str, torch.Tensor] = {}
    # Each layer's decomposition waits on disk between the survey and its compression (the fp32
    # reflectors: half the bytes of the Grams), so that no layer's Gram is formed and reduced twice.
    reductions = tempfile.TemporaryDirectory(prefix="dsreg-budget-")
    kept: dict[str, Path] = {}
    names = itertools.count()

    def survey(spec: TensorSpec, ft: torch.Tensor, bt: torch.Tensor | None) -> None:
        found = deltas.survey(ft.to(device), None if bt is None else bt.to(device), method, updates.get(spec.key), keep=True)
        if found is not None:
            spectra[spec.key] = found[0].cpu()
            if found[1] is not None:
                path = Path(reductions.name) / f"{next(names)}.npz"
                found[1].save(path)
                kept[spec.key] = path
        else:
            # A tensor that gained rows has no spectrum to plan with: stored losslessly, at a fixed cost.
            fixed_rule = RankRule("exact") if bt is not None and bt.shape != ft.shape else rule
            stored[spec.key] = deltas.compress(ft, bt, fixed_rule, encoding, method=method, device=device, update=updates.get(spec.key))

    def side_by_side(job, specs: list[TensorSpec], stage: str) -> None:
        with threads_per_lane(lanes):
            for i, _ in enumerate(_side_by_side(load, job, specs, lanes)):
                progress(stage, i + 1, len(specs))

    def run(plan: dict[str, Allocation], keys: set[str], stage: str) -> None:
        def one(spec: TensorSpec, ft: torch.Tensor, bt: torch.Tensor | None) -> None:
            reduction = deltasvd.Reduction.load(kept[spec.key]) if spec.key in kept else None
            stored[spec.key] = deltas.compress(
                ft, bt, rule, encoding, method=method, device=device, allocation=plan[spec.key], update=updates.get(spec.key),
                reduction=reduction,
            )

        side_by_side(one, [s for s in changed if s.key in keys], stage)

    try:
        side_by_side(survey, changed, "survey")
        return _plan_and_compress(changed, rule, encoding, stored, spectra, run)
    finally:
        reductions.cleanup()


def _plan_and_compress(changed: list[TensorSpec], rule: RankRule, encoding: str, stored: dict, spectra: dict, run) -> dict[str, deltas.Stored]:
    """Budget mode's plan and its correction rounds (see _compress_to_budget); ``run(plan, keys,
    stage)`` compresses the layers ``keys`` into ``stored``."""
    layers = [
        LayerSpectrum(s.key, s.shape[0], numel(s.shape) // s.shape[0], spectra[s.key]) for s in changed if s.key in spectra
    ]
    fixed = sum({st.digest: len(st.data) for st in stored.values() if st.data is not None}.values())
    if fixed > rule.value:
        raise UsageError(
            f"--budget {int(rule.value)} bytes is below the {fixed} bytes that the tensors without a rank "
            "(1-D deltas, integer tensors) take on their own; raise the budget"
        )
    room = int(rule.value) - fixed

    def paid() -> dict[str, int]:
        return {layer.key: len(stored[layer.key].data or b"") for layer in layers}

    plan = allocate(layers, room, encoding)
    run(plan, {layer.key for layer in layers}, "compress")
    for round_ in range(CORRECTION_ROUNDS):
        now = paid()
        left = room - sum(now.values())
        # Each layer stored as factors is priced from here on at what zstd left of its own bytes.
        expected = EXPECTED_RATIO.get(encoding, 1.0)
        ratio = {}
        for layer in layers:
            measured = measured_ratio(layer, plan[layer.key], now[layer.key], encoding) if stored[layer.key].kind == "lowrank" else None
            ratio[layer.key] = expected if measured is None else measured
        if left < 0:
            new = trim(layers, plan, now, -left, encoding, ratio)
        elif left >= TOPUP_MIN * rule.value and round_ < TOPUP_ROUNDS:
            new = allocate(layers, left, encoding, start=plan, paid=now, ratio=ratio)
            if sum(now[k] for k in new if new[k] != plan[k]) > RECOMPRESS_SHARE * sum(now.values()):
                # Raising the floor would compress most of the model again: spend the room greedily.
                new = allocate(layers, left, encoding, start=plan, paid=now, ratio=ratio, criterion=ranking.greedy_part())
        else:
            break
        todo = {key for key in new if new[key] != plan[key]}
        if not todo:
            break
        run(new, todo, "correct")
        plan = new
    if sum(paid().values()) > room:
        plan = allocate(layers, room, encoding, ratio=1.0)
        run(plan, {layer.key for layer in layers}, "compress")
    return stored


def _record(reg, spec: TensorSpec, stored: deltas.Stored, tdigest: str, lease: Lease, uploads: HeldUploads) -> NewEntry:
    blob = None
    if stored.data is not None:
        blob = BlobRecord(stored.digest, len(stored.data), stored.raw_size)
        lease.claim([blob.digest])  # before the upload checks whether the blob exists
        uploads.submit(reg.store.put, stored.data, blob.digest)
    return NewEntry(
        spec.key, stored.kind, spec.dtype, spec.shape, stored.rank, stored.full_rank, stored.rel_error, tdigest, blob, stored.encoding
    )


def _changed(scanned: Scanned, base: dict[str, BaseTensor]) -> list[TensorSpec]:
    return [s for s in scanned.specs if s.key not in base or scanned.digests[s.key] != base[s.key].tensor_digest]


def _mismatch(scanned: Scanned | Scan, base: dict[str, BaseTensor]) -> str | None:
    """Why a checkpoint does not fit a base, or None. A pipeline's files need not match: they are stored whole."""
    keys = {s.key for s in scanned.specs}
    # A pipeline may leave out whole components of its base (a fine-tune saved without the safety checker).
    present = {k.split("/", 1)[0] for k in keys if "/" in k} if any("/" in k for k in scanned.file_keys) else None
    missing = sorted(
        k for k in set(base) - keys
        if not is_file_key(k, base[k]) and not (present is not None and "/" in k and k.split("/", 1)[0] not in present)
    )
    # An EMA copy's bookkeeping (model_ema.decay, num_updates) mirrors nothing of the base: stored whole.
    extra = sorted(k for k in keys - set(base) - scanned.file_keys if not k.startswith(EMA_PREFIX))
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"{len(extra)} keys not in the base, e.g. {extra[0]!r}")
        if missing:
            parts.append(f"{len(missing)} base keys missing, e.g. {missing[0]!r}")
        theirs, ours = key_layout(keys), key_layout(base)
        if theirs != ours:
            parts.append(f"the checkpoint is {theirs}, the base {ours}")
        return ", ".join(parts)
    for s in scanned.specs:
        if s.key in scanned.file_keys or s.key not in base:
            continue
        if s.shape != base[s.key].shape and not can_grow(s.shape, base[s.key].shape):
            return f"tensor {s.key!r} has shape {list(s.shape)}, the base has {list(base[s.key].shape)}"
    return None

"""The registry facade: everything a user can do, tying catalog, blob store, checkpoints and maths together."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import safetensors.torch
import torch

from . import codec, deltas, deltasvd, encodings, gc, lora
from .blobstore import BlobStore
from .cache import BlobCache
from .catalog import BaseTensor, BlobRecord, Catalog, Lease, NewEntry, NewRevision, StoredEntry
from .checkpoint import (
    FORMATS, PICKLE_SUFFIXES, Checkpoint, Layout, TensorSpec, fill_safetensors, open_checkpoint, restrict_modes, write_checkpoint,
)
from .config import BASE_ZSTD_LEVEL, DEFAULT_ENCODING, Settings
from .encodings import ENCODINGS
from .errors import AmbiguousBase, BaseMismatch, Conflict, IntegrityError, UsageError
from .layers import key_layout, layer_group, layer_type, summarize
from .names import Ref, parse_ref, validate_name
from .concurrency import Background, MemoryGate, Scratch, ahead, prefetch, return_large_frees, threads_per_lane
from .scan import HeldUploads, Scan, Scanned
from .ranking import FixedTensor, LayerSpectrum, RankRule, allocate, estimate
from .records import (
    BaseInfo, CheckoutResult, GcReport, LoraExport, PolicyInfo, RevisionDetail, RevisionInfo, Stats, SubjectInfo, SweepRow, VerifyReport, numel,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; the CLI turns it into progress bars."""

# Budget pushes spend what zstd saved below the planned bounds in up to this many more rounds,
# while more than this share of the budget is left.
TOPUP_ROUNDS = 2
TOPUP_MIN = 0.01

# Layers decomposed side by side on the CPU, how many more may start past the oldest one still
# running, and the bytes of tensors they may hold together, as the gate estimates them (high: a
# waiting layer holds two fp32 copies, not five). With 3 and 800 MB, one lane often stood idle
# behind a large layer: SD1.5 pushes side by side took 41-43 s at τ 0.5 and 54 s at 0.8; with 8 and
# 1200 MB, 36-37 s and 48 s, peaking at 1.0-1.1 GB.
COMPRESS_LANES = 2
COMPRESS_AHEAD = 8
COMPRESS_MEMORY = 1200 << 20

# Tensors a safetensors checkout forms side by side. Each lane reads a base blob straight from the
# disk, hashes it, inflates it into its output buffer and adds A·B there; a third lane keeps two
# cores busy while one waits for the disk (SD1.5, cold: ~8.5 s with 3 lanes, ~10 s with 2, and
# ~120 MB more peak RSS per lane: a reusable buffer for the largest blob and tensor each).
CHECKOUT_LANES = 3

# A clear winner when detecting a base: its delta must be this much smaller than the runner-up's.
DETECT_MARGIN = 0.5


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


class Registry:
    def __init__(self, catalog: Catalog, store: BlobStore, settings: Settings):
        self.catalog = catalog
        self.store = store
        self.settings = settings
        # Base tensors from a remote store go through a local cache; a local store is its own cache.
        self.base_blobs = store if store.local else BlobCache(store, settings.cache_dir, settings.cache_size)

    @classmethod
    def open(
        cls,
        catalog: str | None = None,
        store: str | None = None,
        *,
        home: str | os.PathLike | None = None,
        storage_options: dict | None = None,
    ) -> "Registry":
        """Open (creating and migrating if new) the registry: flags, then ``DSREG_*`` variables, then ``~/.dsreg``."""
        settings = Settings.resolve(catalog=catalog, store=store, home=home, store_options=storage_options)
        blob_store = BlobStore(settings.store_url, **settings.store_options)
        return cls(Catalog.open(settings.catalog_url), blob_store, settings)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ bases

    def add_base(self, path: str | os.PathLike, name: str, progress: Progress | None = None) -> tuple[BaseInfo, bool]:
        """Store a base model; returns (base, whether it was new). Adding the same weights again is a no-op."""
        validate_name(name, "base")
        progress = progress or _quiet
        with open_checkpoint(path) as ckpt:
            scanned = self._scan(ckpt, progress)
            digest = _manifest_digest(scanned)
            existing = self.catalog.base_by_digest(digest)
            if existing is not None:
                return existing, False
            if any(b.name == name for b in self.catalog.bases()):
                raise Conflict(f"a different base is already named {name!r}; choose another --name")
            with self._lease(f"base add {name}") as lease:
                tensors, blobs = self._upload_base_tensors(ckpt, scanned, lease, progress)
                return self.catalog.add_base(name, digest, ckpt.layout.to_json(), tensors, blobs, scanned.nbytes, lease.id), True

    def _lease(self, what: str) -> Lease:
        return self.catalog.lease(f"{what} on {socket.gethostname()} pid {os.getpid()}", self.settings.lease_ttl)

    def _upload_base_tensors(self, ckpt: Checkpoint, scanned: Scanned, lease: Lease, progress: Progress):
        tensors: list[BaseTensor] = []
        blobs: dict[str, BlobRecord] = {}
        by_tensor: dict[str, BlobRecord] = {}
        shared = self.catalog.blobs_for_tensors([scanned.digests[spec.key] for spec in scanned.specs])
        lease.claim([blob.digest for blob in shared.values()])
        with Background() as uploads:
            for i, spec in enumerate(scanned.specs):
                tdigest = scanned.digests[spec.key]
                blob = by_tensor.get(tdigest)
                if blob is None:
                    blob = shared.get(tdigest)
                    if blob is not None and not self.store.exists(blob.digest):  # its base was removed and collected since the lookup
                        blob = None
                if blob is None:
                    data, raw = codec.encode({"tensor": ckpt.get(spec.key)}, level=BASE_ZSTD_LEVEL)
                    blob = BlobRecord(hashlib.sha256(data).hexdigest(), len(data), raw)
                    lease.claim([blob.digest])
                    uploads.submit(self.store.put, data, blob.digest)
                by_tensor[tdigest] = blob
                blobs[blob.digest] = blob
                tensors.append(BaseTensor(spec.key, spec.dtype, spec.shape, tdigest, blob.digest, blob.raw_size))
                progress("upload", i + 1, len(scanned.specs))
            uploads.wait()
        return tensors, list(blobs.values())

    def bases(self) -> list[BaseInfo]:
        return self.catalog.bases()

    # ------------------------------------------------------------ push

    def push(
        self,
        path: str | os.PathLike,
        subject: str | None = None,
        *,
        base: str | None = None,
        energy: float | None = None,
        max_error: float | None = None,
        budget: int | str | None = None,
        exact: bool = False,
        encoding: str = DEFAULT_ENCODING,
        method: str = "gram",
        device: str = "auto",
        progress: Progress | None = None,
    ) -> RevisionInfo:
        """Compress a fine-tuned checkpoint against its base and record it as a new revision of ``subject``.

        Ranks come from one of: ``energy`` (the paper's tau, default 0.5), ``max_error`` (per tensor,
        relative Frobenius error of the delta), ``budget`` (bytes for the whole revision, e.g. "20MB")
        or ``exact`` (lossless: checkout is bit-identical).
        """
        if subject is not None:
            validate_name(subject)
        rule = RankRule.from_options(energy=energy, max_error=max_error, budget=budget, exact=exact)
        _check_choice("encoding", encoding, ENCODINGS)
        _check_choice("method", method, deltasvd.METHODS)
        dev = resolve_device(device)
        progress = progress or _quiet
        with open_checkpoint(path) as ckpt, Scan(ckpt, progress) as scan:
            base_name = base or self._detect_base(ckpt, scan)
            base_tensors, component = self._fitting_base(base_name, scan)
            layout = {**ckpt.layout.to_json(), "source_name": Path(path).name}
            if component is not None:
                layout["base_component"] = component
            with self._lease(f"push {subject or 'new subject'}") as lease:
                entries = self._compress(ckpt, scan, base_tensors, lease, rule, encoding, method, dev, progress)
                scanned = scan.result()
                new = NewRevision(
                    subject=subject, base_id=self.catalog.base_id(base_name), energy=rule.value if rule.mode == "energy" else None,
                    rank_rule=str(rule), encoding=encoding, original_bytes=scanned.nbytes, source_digest=scanned.source_digest,
                    source_format=ckpt.layout.format, layout=layout,
                    entries=tuple(entries),
                )
                return self.catalog.commit_revision(new, lease.id)

    def _scan(self, ckpt: Checkpoint, progress: Progress) -> Scanned:
        with Scan(ckpt, progress) as scan:
            return scan.result()

    def _fitting_base(self, name: str, scanned: Scanned | Scan) -> tuple[dict[str, BaseTensor], str | None]:
        tensors, component, problem = self._fit(name, scanned)
        if problem:
            raise BaseMismatch(f"checkpoint does not fit base {name!r}: {problem}")
        return tensors, component

    def _fit(self, name: str, scanned: Scanned | Scan) -> tuple[dict[str, BaseTensor] | None, str | None, str | None]:
        """(tensors, component, None) for the part of base ``name`` that the checkpoint fits: the whole
        base, or one component of a pipeline base (a UNet folder pushed against a whole pipeline);
        else (None, None, why not)."""
        tensors = self.catalog.base_tensors(name)
        whole = {t.key: t for t in tensors}
        problem = _mismatch(scanned, whole)
        if problem is None:
            return whole, None, None
        layout = self.catalog.base_layout(name)
        for component in layout.get("components") or {}:
            part = _component_tensors(tensors, component, layout)
            if part and _mismatch(scanned, part) is None:
                return part, component, None
        return None, None, problem

    def _base_map(self, name: str, component: str | None = None) -> dict[str, BaseTensor]:
        """A base's tensors by key; of a pipeline base's ``component``, by key inside that component."""
        tensors = self.catalog.base_tensors(name)
        if component is None:
            return {t.key: t for t in tensors}
        return _component_tensors(tensors, component, self.catalog.base_layout(name))

    def _detect_base(self, ckpt: Checkpoint, scanned: Scanned | Scan) -> str:
        bases = self.catalog.bases()
        if not bases:
            raise BaseMismatch("no base is registered; add one first with `dsreg base add FILE --name NAME`")
        fitting: dict[str, dict[str, BaseTensor]] = {}
        reasons = []
        for b in bases:
            tensors, _, problem = self._fit(b.name, scanned)
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
        distance = {n: self._delta_norm(ckpt, fitting[n]) for n in ranked}
        ranked.sort(key=distance.get)
        if distance[ranked[0]] < DETECT_MARGIN * distance[ranked[1]]:
            return ranked[0]
        listed = ", ".join(f"{n} (relative delta {distance[n]:.3g})" for n in ranked)
        raise AmbiguousBase(f"cannot tell which base this fine-tune came from: {listed}; name one with --base")

    def _delta_norm(self, ckpt: Checkpoint, base: dict[str, BaseTensor], sample: int = 8) -> float:
        """Relative size of the delta over a few of the largest floating tensors."""
        specs = sorted((s for s in ckpt.specs if s.dtype in ("float32", "float16", "bfloat16", "float64")), key=lambda s: -s.nbytes)
        num = den = 0.0
        for spec in specs[:sample]:
            ft = ckpt.get(spec.key).float()
            bt = self._base_tensor(base[spec.key]).float()
            num += float(torch.linalg.vector_norm(ft - bt)) ** 2
            den += float(torch.linalg.vector_norm(ft)) ** 2
        return (num / den) ** 0.5 if den else 0.0

    def _base_tensor(self, t: BaseTensor, blobs: Scratch | None = None) -> torch.Tensor:
        """A base tensor, decoded into fresh memory; with ``blobs``, its stored frame is read into the
        thread's reused buffer (from the disk itself, for a local store) rather than a fresh one."""
        if blobs is None:
            return codec.decode(self.base_blobs.get(t.blob), t.raw_size, f"base tensor {t.key!r}")["tensor"]
        data = self.base_blobs.read_into(t.blob, blobs)
        try:
            return codec.decode(data, t.raw_size, f"base tensor {t.key!r}")["tensor"]
        finally:
            data.release()

    def _compress(self, ckpt, scan: Scan, base, lease, rule, encoding, method, device, progress) -> list[NewEntry]:
        return_large_frees()
        specs = scan.specs

        def unchanged(spec: TensorSpec) -> bool:  # the scan's digest says so, without reading the base
            return spec.key in base and scan.digest(spec.key) == base[spec.key].tensor_digest

        def load(spec: TensorSpec, blobs: Scratch | None = None):
            return spec, ckpt.get(spec.key), self._base_tensor(base[spec.key], blobs) if spec.key in base else None

        done: dict[str, deltas.Stored] = {}
        if rule.mode == "budget":  # the plan needs every changed layer's spectrum first
            changed = _changed(scan.result(), base)
            done = {s.key: deltas.Stored("base") for s in specs if s not in changed}
            done.update(self._compress_to_budget(load, changed, rule, encoding, method, device, progress))
        entries: dict[str, NewEntry] = {}
        # On the CPU, LANES layers are decomposed side by side (see threads_per_lane). Layers are read
        # up to COMPRESS_AHEAD past the oldest one still running, so that a lane that finishes a small
        # layer takes the next one rather than waiting for a large one to be recorded in order; the
        # memory gate, not the window, keeps what they hold to COMPRESS_MEMORY (the 1.5 GB target).
        lanes = COMPRESS_LANES if device.type == "cpu" else 1
        gate = MemoryGate(COMPRESS_MEMORY)

        def gated_load(spec: TensorSpec):
            if unchanged(spec):
                return spec, None, None, 0
            # Fine-tune, base, delta and residual in fp32, and the factors being formed: at τ 0.8 they
            # and their projection hold as much again as one of those.
            weight = 5 * numel(spec.shape) * 4
            gate.acquire(weight)
            try:
                return (*load(spec, blobs), weight)
            except BaseException:
                gate.release(weight)
                raise

        def compress_one(item) -> tuple[TensorSpec, deltas.Stored]:
            spec, ft, bt, weight = item
            try:
                if ft is None:
                    return spec, deltas.Stored("base")
                return spec, deltas.compress(ft, bt, rule, encoding, method=method, device=device, base_is_scratch=True)
            finally:
                gate.release(weight)

        with Scratch() as blobs, Background(workers=4, limit=4) as background, threads_per_lane(lanes):
            uploads = HeldUploads(scan, background)
            for key, stored in done.items():
                entries[key] = self._record(scan.specs_by_key[key], stored, scan.digest(key), lease, uploads)
            todo = [s for s in specs if s.key not in done]
            loaded = prefetch(gated_load, todo, window=1, workers=1)
            for i, (spec, stored) in enumerate(prefetch(compress_one, loaded, window=lanes + COMPRESS_AHEAD, workers=lanes)):
                entries[spec.key] = self._record(spec, stored, scan.digest(spec.key), lease, uploads)
                progress("compress", i + 1, len(todo))
            uploads.release()
            background.wait()
        result = [entries[s.key] for s in specs]
        if rule.mode == "budget":
            total = sum({e.blob.digest: e.blob.size for e in result if e.blob}.values())
            assert total <= rule.value, f"budget planning is an upper bound, yet {total} > {rule.value}"
        return result

    def _compress_to_budget(self, load, changed, rule, encoding, method, device, progress) -> dict[str, deltas.Stored]:
        """A budget push, before anything is uploaded (what it keeps in memory is budget-sized).

        Pass one stores what has no rank (1-D deltas, integer tensors) and takes every 2-D delta's
        spectrum; the rest of the budget is allocated by upper bounds and the layers compressed.
        zstd then usually leaves some of the budget unspent: up to TOPUP_ROUNDS more rounds give it
        to the layers that gain most, re-compressing only those, each round still within bounds.
        """
        stored: dict[str, deltas.Stored] = {}
        layers = []
        for i, (spec, ft, bt) in enumerate(prefetch(load, changed, window=2, workers=2)):
            s = deltas.survey(ft.to(device), bt.to(device), method)
            if s is None:
                stored[spec.key] = deltas.compress(ft, bt, rule, encoding, method=method, device=device)
            else:
                layers.append(LayerSpectrum(spec.key, spec.shape[0], numel(spec.shape) // spec.shape[0], s.cpu()))
            progress("survey", i + 1, len(changed))
        fixed = sum({st.digest: len(st.data) for st in stored.values() if st.data is not None}.values())
        if fixed > rule.value:
            raise UsageError(
                f"--budget {int(rule.value)} bytes is below the {fixed} bytes that the tensors without a rank "
                "(1-D deltas, integer tensors) take on their own; raise the budget"
            )
        room = int(rule.value) - fixed
        plan = allocate(layers, room, encoding)
        todo = {layer.key for layer in layers}
        for _ in range(1 + TOPUP_ROUNDS):
            specs = [s for s in changed if s.key in todo]
            for i, (spec, ft, bt) in enumerate(prefetch(load, specs, window=2, workers=2)):
                stored[spec.key] = deltas.compress(ft, bt, rule, encoding, method=method, device=device, allocation=plan[spec.key])
                progress("compress", i + 1, len(specs))
            paid = {layer.key: len(stored[layer.key].data or b"") for layer in layers}
            left = room - sum(paid.values())
            if left < TOPUP_MIN * rule.value:
                break
            topped = allocate(layers, left, encoding, start=plan, paid=paid)
            todo = {key for key in topped if topped[key] != plan[key]}
            if not todo:
                break
            plan = topped
        return stored

    def _record(self, spec: TensorSpec, stored: deltas.Stored, tdigest: str, lease: Lease, uploads: HeldUploads) -> NewEntry:
        blob = None
        if stored.data is not None:
            blob = BlobRecord(stored.digest, len(stored.data), stored.raw_size)
            lease.claim([blob.digest])  # before the upload checks whether the blob exists
            uploads.submit(self.store.put, stored.data, blob.digest)
        return NewEntry(
            spec.key, stored.kind, spec.dtype, spec.shape, stored.rank, stored.full_rank, stored.rel_error, tdigest, blob, stored.encoding
        )

    def sweep(
        self,
        path: str | os.PathLike,
        rules: list[RankRule | str],
        encodings: list[str] = (DEFAULT_ENCODING,),
        *,
        base: str | None = None,
        method: str = "gram",
        progress: Progress | None = None,
    ) -> list[SweepRow]:
        """Stored bytes and error of a checkpoint under each rule and encoding, without storing anything.

        One read and one spectrum per tensor serve every row, so a sweep costs about one push.
        """
        rules = [RankRule.parse(r) if isinstance(r, str) else r for r in rules]
        for encoding in encodings:
            _check_choice("encoding", encoding, ENCODINGS)
        _check_choice("method", method, deltasvd.METHODS)
        progress = progress or _quiet
        return_large_frees()
        with open_checkpoint(path) as ckpt:
            scanned = self._scan(ckpt, progress)
            base_tensors, _ = self._fitting_base(base or self._detect_base(ckpt, scanned), scanned)
            changed = _changed(scanned, base_tensors)
            layers, fixed = [], []

            def load(spec: TensorSpec):
                return spec, ckpt.get(spec.key), self._base_tensor(base_tensors[spec.key]) if spec.key in base_tensors else None

            for i, (spec, ft, bt) in enumerate(prefetch(load, changed, window=2, workers=2)):
                s = deltas.survey(ft, bt, method)
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

    # ------------------------------------------------------------ checkout

    def checkout(
        self,
        ref: str | Ref,
        output: str | os.PathLike | None = None,
        *,
        format: str | None = None,
        device: str = "auto",
        verify: bool = False,
        progress: Progress | None = None,
    ) -> CheckoutResult:
        """Rebuild a revision's full checkpoint at ``output`` (written whole, or not at all).

        With ``verify``, every tensor stored losslessly is hashed and compared with the digest its
        push recorded; a mismatch raises IntegrityError and writes nothing.
        """
        ref = _as_ref(ref)
        dev = resolve_device(device)
        progress = progress or _quiet
        info = self.catalog.revision(ref)
        recorded = self.catalog.revision_layout(Ref(info.subject, info.number))
        pushed = Layout.from_json(recorded)
        entries = self.catalog.entries(Ref(info.subject, info.number))
        base = self._base_map(info.base, recorded.get("base_component"))
        output = Path(output) if output is not None else Path(f"{info.subject}-{info.number}{_default_suffix(pushed)}")
        layout = _output_layout(pushed, output, format)
        specs = [TensorSpec(e.key, e.dtype, e.shape) for e in entries]
        checked = _DigestCheck(info.ref, entries) if verify else None
        if layout.format == "safetensors":
            def fill(i: int, out: torch.Tensor) -> None:
                self._rebuild_into(entries[i], base, out, dev, blobs)
                if checked is not None:
                    checked.check(entries[i], out)

            lanes = CHECKOUT_LANES
            with Scratch() as blobs, threads_per_lane(lanes):
                _write_atomically(output, lambda tmp: fill_safetensors(
                    tmp, specs, fill, layout.metadata, workers=lanes, done=lambda n: progress("checkout", n, len(specs))
                ), layout)
        else:
            # The rebuild runs a tensor ahead of the writer: matrix products and file writes overlap.
            tensors = ahead(self._rebuild(entries, base, dev, progress))
            if checked is not None:
                tensors = checked.wrap(tensors)
            _write_atomically(output, lambda tmp: write_checkpoint(tmp, layout, specs, tensors), layout)
        return CheckoutResult(
            info.ref, output, layout.format, len(specs), sum(s.nbytes for s in specs), str(dev),
            verified=checked.verified if checked else 0, lossy=checked.lossy if checked else 0,
        )

    def _rebuild_into(self, entry: StoredEntry, base: dict[str, BaseTensor], out: torch.Tensor, device: torch.device, blobs: Scratch) -> None:
        """Form an entry's tensor in ``out``: the base inflated into it, then the delta added.

        The base blob is read into this thread's ``blobs`` buffer and inflated straight into
        ``out``, so the weights are copied once on their way into the checkpoint.
        """
        try:
            stored = self._entry_blob(entry)
            if entry.kind != "full":
                t = base[entry.key]
                if t.dtype == entry.dtype:
                    data = self.base_blobs.read_into(t.blob, blobs)
                    try:
                        codec.decode_into(data, t.raw_size, out, f"base tensor {t.key!r}")
                    finally:
                        data.release()
                else:
                    out.copy_(self._base_tensor(t, blobs))
        except IntegrityError as exc:  # which tensor the damaged object belongs to, and nothing is written
            raise IntegrityError(f"cannot rebuild tensor {entry.key!r}: {exc}") from None
        deltas.apply(entry.kind, out, stored, device)

    def _entry_blob(self, entry: StoredEntry) -> dict[str, torch.Tensor] | None:
        """An entry's own blob (factors, delta, rows, ...), decoded; None for an entry without one."""
        return codec.decode(self.store.get(entry.blob), entry.raw_size, f"blob of {entry.key!r}") if entry.blob else None

    def _rebuild(self, entries: list[StoredEntry], base: dict[str, BaseTensor], device: torch.device, progress: Progress) -> Iterator[torch.Tensor]:
        def load(entry: StoredEntry):
            try:
                stored = self._entry_blob(entry)
                bt = self._base_tensor(base[entry.key]) if entry.kind != "full" else None
            except IntegrityError as exc:  # which tensor the damaged object belongs to, and nothing is written
                raise IntegrityError(f"cannot rebuild tensor {entry.key!r}: {exc}") from None
            return entry, bt, stored

        for i, (entry, bt, stored) in enumerate(prefetch(load, entries, window=4, workers=4)):
            yield deltas.rebuild(entry.kind, codec.dtype_of(entry.dtype), bt, stored, device)
            progress("checkout", i + 1, len(entries))

    # ------------------------------------------------------------ LoRA export

    def export_lora(
        self,
        ref: str | Ref,
        output: str | os.PathLike | None = None,
        *,
        format: str = "kohya",
        with_dense: bool = False,
        dtype: str = "fp16",
        progress: Progress | None = None,
    ) -> LoraExport:
        """Write a revision's stored factors as a LoRA file (no full checkpoint is rebuilt).

        Each low-rank entry becomes a LoRA module of its stored rank with scale 1. Changes that a
        LoRA cannot carry are returned in ``left_out`` and listed in the file's metadata; with
        ``with_dense`` 2-D dense and sparse deltas go in as exact full-rank modules, and in peft
        format bias deltas as ``lora_B.bias``.
        """
        ref = _as_ref(ref)
        progress = progress or _quiet
        info = self.catalog.revision(ref)
        entries = self.catalog.entries(Ref(info.subject, info.number))
        lora.check_format(format, [e.key for e in entries])
        base = self._base_map(info.base, self.catalog.revision_layout(Ref(info.subject, info.number)).get("base_component"))
        out = lora.LoraFile(format, dtype)
        targets = {e.key: t for e in entries if (t := lora.target(e.key, e.shape)) is not None}
        changed = [e for e in entries if e.kind not in ("base", "dropped")]
        left_out: list[str] = []
        biases: list[tuple[StoredEntry, lora.Target, dict]] = []

        def load(entry: StoredEntry):
            return entry, self._entry_blob(entry)

        for i, (entry, stored) in enumerate(prefetch(load, changed, window=4, workers=4)):
            t = targets.get(entry.key)
            bias = lora.bias_target(entry.key, targets) if with_dense else None
            if t is not None and entry.kind == "lowrank":
                out.add(t, *lora.factors_pair(*encodings.decode_factors(stored), entry.shape))
            elif t is not None and with_dense and entry.kind == "sparse":
                base_rows = self._base_tensor(base[entry.key]).reshape(entry.shape[0], -1)[stored["rows"]].float()
                out.add(t, *lora.rows_pair(stored["rows"], stored["values"].float() - base_rows, entry.shape))
            elif t is not None and with_dense and entry.kind in ("dense", "exact"):
                out.add(t, *lora.full_rank_pair(self._entry_delta(entry, base, stored), entry.shape))
            elif bias is not None and entry.kind in ("dense", "exact", "sparse"):
                biases.append((entry, bias, stored))  # after the weights: a bias rides on its layer's module
            else:
                left_out.append(entry.key)
            progress("export", i + 1, len(changed))
        for entry, bias, stored in biases:
            if not out.add_bias(bias, self._entry_delta(entry, base, stored)):
                left_out.append(entry.key)
        if not out.ranks:
            raise UsageError(f"{info.ref} has no change that a LoRA can carry (no low-rank layers); check it out instead")
        metadata = {
            "dsreg.subject": info.ref, "dsreg.base": info.base, "dsreg.rank_rule": info.rank_rule,
            "dsreg.left_out": json.dumps(left_out),
        }
        tensors, metadata = out.finish(metadata)
        output = Path(output) if output is not None else Path(f"{info.subject}-{info.number}-lora.safetensors")
        _write_atomically(output, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
        return LoraExport(
            info.ref, output, format, len(out.ranks), max(out.ranks.values()), sum(t.numel() for t in tensors.values()),
            output.stat().st_size, tuple(left_out),
        )

    def _entry_delta(self, entry: StoredEntry, base: dict[str, BaseTensor], stored: dict | None) -> torch.Tensor:
        """An entry's change in fp32: what checkout adds to the base tensor."""
        bt = self._base_tensor(base[entry.key])
        if entry.kind == "dense":
            return stored["delta"].float().reshape(entry.shape)
        rebuilt = deltas.rebuild(entry.kind, codec.dtype_of(entry.dtype), bt.clone(), stored, torch.device("cpu"))
        return rebuilt.float() - bt.float()

    # ------------------------------------------------------------ queries

    def subjects(
        self,
        base: str | None = None,
        name_like: str | None = None,
        tag: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
        after: str | None = None,
    ) -> list[SubjectInfo]:
        """Subjects with their latest revision, by name; ``name_like`` is a prefix, or a pattern with ``*``.

        For deep pages pass ``after=<last name of the previous page>``: it reads from the name index,
        where ``offset`` has to step over every row before it.
        """
        return self.catalog.subjects(base=base, name_like=name_like, tag=tag, since=since, limit=limit, offset=offset, after=after)

    def revisions(self, subject: str) -> list[RevisionInfo]:
        validate_name(subject)
        return self.catalog.revisions(subject)

    def revision(self, ref: str | Ref) -> RevisionInfo:
        return self.catalog.revision(_as_ref(ref))

    def show(self, ref: str | Ref) -> RevisionDetail:
        """A revision with every tensor's storage and a summary per layer group."""
        ref = _as_ref(ref)
        info = self.catalog.revision(ref)
        tensors = self.catalog.tensor_infos(Ref(info.subject, info.number))
        return RevisionDetail(
            info, tuple(tensors), tuple(summarize(tensors, lambda t: layer_group(t.key))),
            tuple(summarize(tensors, lambda t: layer_type(t.key, t.shape))),
        )

    def tag(self, ref: str | Ref, name: str) -> RevisionInfo:
        validate_name(name, "tag")
        return self.catalog.tag(_as_ref(ref), name)

    def stats(self) -> Stats:
        return self.catalog.stats()

    # ------------------------------------------------------------ removal, retention, gc, verify

    def rm(self, ref: str | Ref) -> list[RevisionInfo]:
        """Remove a revision (``SUBJECT@REV``) or a whole subject from the catalog; gc frees the bytes."""
        return self.catalog.remove(_as_ref(ref))

    def remove_base(self, name: str) -> BaseInfo:
        """Remove a base that no revision uses any more."""
        validate_name(name, "base")
        return self.catalog.remove_base(name)

    def set_policy(self, name: str, pattern: str = "*", keep_last: int | None = None, max_age: float | None = None) -> PolicyInfo:
        """Store a retention policy for gc to apply (``max_age`` in seconds)."""
        validate_name(name, "policy")
        if keep_last is None and max_age is None:
            raise UsageError("a retention policy needs --keep-last or --max-age (or both)")
        if keep_last is not None and keep_last < 1:
            raise UsageError("--keep-last must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9._*-]{1,256}", pattern):
            raise UsageError(f"invalid subject pattern {pattern!r}: use name characters and * wildcards")
        return self.catalog.set_policy(name, pattern, keep_last, None if max_age is None else int(max_age))

    def policies(self) -> list[PolicyInfo]:
        return self.catalog.policies()

    def remove_policy(self, name: str) -> None:
        self.catalog.remove_policy(name)

    def gc(self, grace: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Apply retention policies, then delete unreferenced objects older than ``grace`` seconds."""
        if grace < 0:
            raise UsageError("--grace cannot be negative")
        return gc.collect(self.catalog, self.store, grace, dry_run)

    def verify(self, full: bool = False, progress: Progress | None = None) -> VerifyReport:
        """Check that every reference resolves (and, with ``full``, that every object hashes to its name)."""
        return gc.verify(self.catalog, self.store, full, progress)


# ---------------------------------------------------------------- helpers


def _as_ref(ref: str | Ref) -> Ref:
    return parse_ref(ref) if isinstance(ref, str) else ref


def _manifest_digest(scanned: Scanned) -> str:
    h = hashlib.sha256()
    for spec in scanned.specs:
        h.update(f"{spec.key}\0{scanned.digests[spec.key]}\n".encode())
    return h.hexdigest()


def _component_tensors(tensors: list[BaseTensor], component: str, layout: dict) -> dict[str, BaseTensor]:
    """One component's weights of a pipeline base, by their key inside the component."""
    prefix = f"{component}/"
    files = set(layout.get("file_keys") or ())
    return {t.key[len(prefix):]: t for t in tensors if t.key.startswith(prefix) and t.key not in files}


def _is_file_key(key: str, t: BaseTensor) -> bool:
    """A pipeline file in a base (stored as 1-D uint8): a fine-tune may lack it."""
    return t.dtype == "uint8" and len(t.shape) == 1 and "/" in key


def _changed(scanned: Scanned, base: dict[str, BaseTensor]) -> list[TensorSpec]:
    return [s for s in scanned.specs if s.key not in base or scanned.digests[s.key] != base[s.key].tensor_digest]


def _mismatch(scanned: Scanned | Scan, base: dict[str, BaseTensor]) -> str | None:
    """Why a checkpoint does not fit a base, or None. A pipeline's files need not match: they are stored whole."""
    keys = {s.key for s in scanned.specs}
    # A pipeline may leave out whole components of its base (a fine-tune saved without the safety checker).
    present = {k.split("/", 1)[0] for k in keys if "/" in k} if scanned.file_keys else None
    missing = sorted(
        k for k in set(base) - keys
        if not _is_file_key(k, base[k]) and not (present is not None and "/" in k and k.split("/", 1)[0] not in present)
    )
    extra = sorted(keys - set(base) - scanned.file_keys)
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
        if s.shape != base[s.key].shape:
            return f"tensor {s.key!r} has shape {list(s.shape)}, the base has {list(base[s.key].shape)}"
    return None


class _DigestCheck:
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


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")


_FORMAT_ALIASES = {"safetensors": "safetensors", "ckpt": "pickle", "pickle": "pickle", "pt": "pickle", "diffusers": "diffusers"}


def _default_suffix(layout: Layout) -> str:
    return {"safetensors": ".safetensors", "pickle": ".ckpt", "diffusers": "", "pipeline": ""}[layout.format]


def _output_layout(pushed: Layout, output: Path, fmt: str | None) -> Layout:
    if pushed.format == "pipeline":
        if fmt not in (None, "diffusers") or output.suffix.lower() == ".safetensors" or output.suffix.lower() in PICKLE_SUFFIXES:
            raise UsageError("a diffusers pipeline checks out as a folder: give -o a folder name, without --format safetensors or ckpt")
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


def _write_atomically(output: Path, write: Callable[[Path], None], layout: Layout | None = None) -> None:
    """Write under a temporary name beside ``output`` and rename: a reader sees all of it or nothing.
    With ``layout``, no file gets wider permissions than its source had (``restrict_modes``)."""
    output = output.absolute()
    if output.is_dir() and any(output.iterdir()):
        raise UsageError(f"{output} is a folder that is not empty; choose a new output path")
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output)
    tmp = output.parent / f".{output.name}.dsreg-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if layout is not None:
            restrict_modes(tmp, layout)
        if output.is_dir():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        _remove(tmp)
        raise


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
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(tmp)
        except PermissionError:  # alive, another user's
            pass

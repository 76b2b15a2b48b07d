"""LoRA export: a revision's stored factors as a LoRA file that diffusers and kohya-style loaders read,
without rebuilding the full checkpoint.

A model of a known family is written in the layout its format's loaders expect, whatever layout
the base is stored in: kohya's names are the original release's (Flux's fused ``img_attn.qkv`` and
``linear1``), peft's are diffusers' (split ``to_q``, ``to_k``, ``to_v``). A tensor made of several
stored ones gets one LoRA whose up is block-diagonal and whose downs are stacked; tensors cut
from one stored tensor each get their rows of its up and its whole down.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from . import codec, deltas, encodings, families, lora
from .bases import base_map, base_tensor, with_ema_mirrors
from .catalog import BaseTensor, StoredEntry
from .checkout import entry_blob
from .checkpoint import TensorSpec, write_atomically
from .errors import UsageError
from .names import Ref, as_ref
from .records import LoraExport, Progress, quiet


@dataclass(frozen=True)
class _Change:
    """A stored tensor's change: as LoRA factors (2-D ``down``, ``up``) where it has them, else whole."""

    shape: tuple[int, ...]
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def whole(self) -> torch.Tensor:
        return self.delta if self.delta is not None else (self.up @ self.down).reshape(self.shape)


def export_lora(
    reg,
    ref: str | Ref,
    output: str | os.PathLike | None = None,
    *,
    format: str | None = None,
    factors_only: bool = False,
    dtype: str = "fp16",
    overwrite: bool = True,
    progress: Progress | None = None,
) -> LoraExport:
    """Registry.export_lora: see its docstring."""
    ref = as_ref(ref)
    progress = progress or quiet
    info = reg.catalog.revision(ref)
    entries = reg.catalog.entries(Ref(info.subject, info.number))
    layout = reg.catalog.revision_layout(Ref(info.subject, info.number))
    if format is None:  # an adapter subject goes back to its own kind of file
        format = "peft" if (layout.get("adapter") or {}).get("format") == "diffusers" else "kohya"
    lora.check_format(format, [e.key for e in entries])
    base = with_ema_mirrors(base_map(reg.catalog, info.base, layout.get("base_component")), [e.key for e in entries])
    dense = not factors_only
    # A tensor that gained rows (new tokens) has no module of the base's shape to attach a LoRA to.
    grown = {e.key for e in entries if e.key in base and base[e.key].shape != e.shape}
    changed = {e.key: e for e in entries if e.kind not in ("base", "dropped")}
    left_out: list[str] = []

    def change(entry: StoredEntry) -> _Change | None:
        stored = entry_blob(reg, entry)
        shape = tuple(entry.shape)
        if entry.kind == "lowrank" and entry.key not in grown and len(shape) >= 2:
            down, up = lora.factors_pair(*encodings.decode_factors(stored), (shape[0], -1))
            return _Change(shape, down, up)
        if entry.kind == "full" or entry.key in grown or entry.key not in base:
            return None
        if not dense:  # --factors-only: no other change is written
            return _Change(shape)
        if entry.kind == "sparse" and len(shape) >= 2:
            base_rows = base_tensor(reg, base[entry.key], shape=shape).reshape(shape[0], -1)[stored["rows"]].float()
            down, up = lora.rows_pair(stored["rows"], stored["values"].float() - base_rows, (shape[0], -1))
            return _Change(shape, down, up)
        return _Change(shape, delta=_entry_delta(reg, entry, base, stored))

    model = families.detect(e.key for e in entries)
    target = _target_layout(model, format)
    specs = [TensorSpec(e.key, e.dtype, tuple(e.shape)) for e in entries]
    steps = families.plan(specs, model, target) if target is not None else [(s, families.Rule(s.key, (families.Piece(s.key),))) for s in specs]
    uses: dict[str, int] = {}
    for _, rule in steps:
        for p in rule.pieces:
            uses[p.key] = uses.get(p.key, 0) + 1
    cache: dict[str, _Change | None] = {}

    def source(key: str) -> _Change | None:
        if key not in cache:
            cache[key] = change(changed[key])
        found = cache[key]
        uses[key] -= 1
        if uses[key] == 0:
            del cache[key]
        return found

    out = lora.LoraFile(format, dtype, family=target.family if target is not None else None)
    biases: list[tuple[str, lora.Target, torch.Tensor]] = []
    others: list[tuple[str, torch.Tensor]] = []
    by_key = {s.key: s for s in specs}
    touched = [(spec, rule) for spec, rule in steps if any(p.key in changed for p in rule.pieces)]
    for i, (spec, rule) in enumerate(touched):
        sources = {p.key: source(p.key) for p in rule.pieces if p.key in changed}
        if any(c is None for c in sources.values()):
            left_out.append(spec.key)
            progress("export", i + 1, len(touched))
            continue
        key, shape = spec.key, tuple(spec.shape)
        t = lora.target(key, shape)
        if t is not None and all(c.down is not None for c in sources.values()):
            if not out.add(t, *lora.shaped(*_joined(rule, sources, shape, by_key), shape), key):
                left_out.append(key)
        elif dense and t is not None:
            if not out.add(t, *lora.full_rank_pair(_assembled(rule, sources, by_key), shape), key):
                left_out.append(key)
        elif dense and key.endswith(".bias") and (module := lora.module_of(key)) is not None:
            biases.append((key, module, _assembled(rule, sources, by_key)))
        elif dense:
            others.append((key, _assembled(rule, sources, by_key)))
        else:
            left_out.append(key)
        progress("export", i + 1, len(touched))
    carried_biases = out.add_biases(biases, _has_bias(steps))
    left_out.extend(k for k, _, _ in biases if k not in carried_biases)
    for key, whole in others:
        if not out.add_whole(key, whole):
            left_out.append(key)
    if not out.ranks and not out.tensors:
        why = "no low-rank layers, and --factors-only leaves out the rest" if factors_only else "no changed conv or linear weights"
        raise UsageError(f"{info.ref} has no change that a LoRA can carry ({why}); check it out instead")
    metadata = {
        "dsreg.subject": info.ref, "dsreg.base": info.base, "dsreg.rank_rule": info.rank_rule,
        "dsreg.left_out": json.dumps(left_out),
    }
    tensors, metadata = out.finish(metadata)
    output = Path(output) if output is not None else Path(f"{info.subject}-{info.number}-lora.safetensors")
    write_atomically(
        output, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite, journal=reg.settings.journal
    )
    return LoraExport(
        info.ref, output, format, len(out.ranks), max(out.ranks.values(), default=0), sum(t.numel() for t in tensors.values()),
        output.stat().st_size, tuple(left_out),
    )


def _target_layout(model: families.ModelLayout | None, fmt: str) -> families.ModelLayout | None:
    """The layout a format's loaders name a family's modules in: kohya's trainers the original
    release's (the SD UNet's names are read in both layouts, and stay as stored), peft the diffusers one."""
    if model is None:
        return None
    if fmt == "kohya":
        layout = model.layout if model.family == "unet" else "original"
        return families.ModelLayout(model.family, layout, model.prefix if layout == model.layout else families.FAMILIES[model.family].original_prefix)
    return families.ModelLayout(model.family, "diffusers", "")


def _joined(rule: families.Rule, sources: dict[str, _Change], shape, by_key) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of a tensor made of rows of stored tensors: each stored tensor's down once, and
    its up's rows where the tensor takes them (block-diagonal when several are joined)."""
    order = list(sources)
    columns, at = {}, 0
    for key in order:
        columns[key] = (at, at + sources[key].down.shape[0])
        at = columns[key][1]
    up = torch.zeros(shape[0], at)
    offset = 0
    for p in rule.pieces:
        rows = (p.stop if p.stop is not None else by_key[p.key].shape[0]) - p.start
        if p.key in sources:
            lo, hi = columns[p.key]
            up[offset:offset + rows, lo:hi] = sources[p.key].up[p.start:p.start + rows]
        offset += rows
    return torch.cat([sources[k].down for k in order]), up


def _assembled(rule: families.Rule, sources: dict[str, _Change], by_key) -> torch.Tensor:
    """A tensor's whole change from its pieces' (zeros where a piece's stored tensor did not change)."""
    def get(key: str) -> torch.Tensor:
        return sources[key].whole() if key in sources else torch.zeros(by_key[key].shape)
    return families.assemble(rule, get).float()


def _has_bias(steps) -> set[str]:
    """The weights (as exported) whose layer has a bias: peft's lora_bias needs one in every layer."""
    keys = {spec.key for spec, _ in steps}
    return {k[: -len(".bias")] + ".weight" for k in keys if k.endswith(".bias")}


def _entry_delta(reg, entry: StoredEntry, base: dict[str, BaseTensor], stored: dict | None) -> torch.Tensor:
    """An entry's change in fp32: what checkout adds to the base tensor."""
    bt = base_tensor(reg, base[entry.key], shape=entry.shape)
    if entry.kind == "dense":
        return stored["delta"].float().reshape(entry.shape)
    rebuilt = deltas.rebuild(entry.kind, codec.dtype_of(entry.dtype), bt.clone(), stored, torch.device("cpu"))
    return rebuilt.float() - bt.float()

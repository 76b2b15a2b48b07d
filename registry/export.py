"""LoRA export: a revision's stored factors as a LoRA file that diffusers and kohya-style loaders read,
without rebuilding the full checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

from . import codec, deltas, encodings, lora
from .bases import base_map, base_tensor, with_ema_mirrors
from .catalog import BaseTensor, StoredEntry
from .checkout import entry_blob
from .checkpoint import write_atomically
from .concurrency import prefetch
from .errors import UsageError
from .names import Ref, as_ref
from .records import LoraExport, Progress, quiet


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
    out = lora.LoraFile(format, dtype)
    # A tensor that gained rows (new tokens) has no module of the base's shape to attach a LoRA to.
    fits = [e for e in entries if e.key not in base or base[e.key].shape == e.shape]
    targets = {e.key: t for e in fits if (t := lora.target(e.key, e.shape)) is not None}
    changed = [e for e in entries if e.kind not in ("base", "dropped")]
    left_out: list[str] = []
    biases: list[tuple[StoredEntry, lora.Target, dict]] = []

    def load(entry: StoredEntry):
        return entry, entry_blob(reg, entry)

    for i, (entry, stored) in enumerate(prefetch(load, changed, window=4, workers=4)):
        t = targets.get(entry.key)
        bias = lora.bias_target(entry.key, targets) if dense else None
        if t is not None and entry.kind == "lowrank":
            out.add(t, *lora.factors_pair(*encodings.decode_factors(stored), entry.shape))
        elif t is not None and dense and entry.kind == "sparse":
            base_rows = base_tensor(reg, base[entry.key], shape=entry.shape).reshape(entry.shape[0], -1)[stored["rows"]].float()
            out.add(t, *lora.rows_pair(stored["rows"], stored["values"].float() - base_rows, entry.shape))
        elif t is not None and dense and entry.kind in ("dense", "exact", "spectral"):
            out.add(t, *lora.full_rank_pair(_entry_delta(reg, entry, base, stored), entry.shape))
        elif bias is not None and entry.kind in ("dense", "exact", "sparse", "spectral"):
            biases.append((entry, bias, stored))  # after the weights: a bias rides on its layer's module
        else:
            left_out.append(entry.key)
        progress("export", i + 1, len(changed))
    for entry, bias, stored in biases:
        if not out.add_bias(bias, _entry_delta(reg, entry, base, stored)):
            left_out.append(entry.key)
    if not out.ranks:
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
        info.ref, output, format, len(out.ranks), max(out.ranks.values()), sum(t.numel() for t in tensors.values()),
        output.stat().st_size, tuple(left_out),
    )


def _entry_delta(reg, entry: StoredEntry, base: dict[str, BaseTensor], stored: dict | None) -> torch.Tensor:
    """An entry's change in fp32: what checkout adds to the base tensor."""
    bt = base_tensor(reg, base[entry.key], shape=entry.shape)
    if entry.kind == "dense":
        return stored["delta"].float().reshape(entry.shape)
    rebuilt = deltas.rebuild(entry.kind, codec.dtype_of(entry.dtype), bt.clone(), stored, torch.device("cpu"))
    return rebuilt.float() - bt.float()

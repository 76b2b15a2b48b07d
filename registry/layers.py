"""Grouping tensor keys for reports: by stage (conv_in, down_blocks.0, mid_block, ...) and by layer type."""

from __future__ import annotations

from typing import Callable, Iterable

from .records import GroupSummary, TensorInfo

_PREFIXES = ("model.diffusion_model.", "unet.", "base_model.model.", "text_model.encoder.", "text_model.")
# Markers of each type; the innermost part of a key that has one decides (an ``ff`` inside an
# ``attentions`` block is feed-forward), and at equal depth the first type listed wins. Markers of
# four or more letters match anywhere in a part, shorter ones the whole part or its prefix.
_TYPES = (
    ("norm", ("norm", "ln_", "ln")),
    ("embedding", ("emb", "time_emb", "embedding")),
    ("attention", ("attn", "attention", "to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "out_proj", "proj_in", "proj_out", "q", "k", "v")),
    ("feed-forward", ("ff", "mlp", "fc1", "fc2", "proj", "linear")),
    ("conv", ("conv", "downsamplers", "upsamplers", "shortcut", "skip_connection", "op")),
)


def _marks(part: str, marker: str) -> bool:
    if len(marker) >= 4:
        return marker in part
    return part == marker or part.startswith(marker + "_")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def key_layout(keys) -> str:
    """Which naming convention a checkpoint's keys follow, in words for error messages."""
    keys = list(keys)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "an LDM single-file checkpoint (model.diffusion_model.*)"
    components = sorted({k.split("/", 1)[0] for k in keys if "/" in k})
    if any(k.startswith("unet/") for k in keys):
        return f"a diffusers pipeline ({', '.join(c + '/' for c in components[:4])})"
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        return "a diffusers UNet (down_blocks.*)"
    if any(k.startswith("text_model.") for k in keys):
        return "a text encoder (text_model.*)"
    if any(k.startswith(("encoder.down_blocks.", "decoder.")) for k in keys):
        return "a diffusers VAE"
    return "in an unrecognised layout"


def layer_group(key: str) -> str:
    if "/" in key:  # a pipeline's component/key
        component, inner = key.split("/", 1)
        return f"{component}/{layer_group(inner)}"
    parts = _strip(key).split(".")
    # down_blocks.0, up_blocks.3, input_blocks.7 (LDM), layers.11: numbered stages are groups of their own.
    if len(parts) > 2 and parts[1].isdigit() and parts[0].endswith(("blocks", "layers")):
        return f"{parts[0]}.{parts[1]}"
    return parts[0] if len(parts) > 1 else key


def layer_type(key: str, shape: tuple[int, ...] = ()) -> str:
    """attention, feed-forward, conv, norm, embedding or other, from the names in the key (and its shape)."""
    key = key.split("/", 1)[-1]
    parts = [p.lower() for p in _strip(key).split(".")[:-1]]  # the last part is weight / bias
    for part in reversed(parts):
        for name, markers in _TYPES:
            if any(_marks(part, m) for m in markers):
                return name
    return "conv" if len(shape) == 4 else "other"


def summarize(tensors: Iterable[TensorInfo], grouping: Callable[[TensorInfo], str]) -> list[GroupSummary]:
    groups: dict[str, list[TensorInfo]] = {}
    for t in tensors:
        groups.setdefault(grouping(t), []).append(t)
    out = []
    for name, ts in groups.items():
        changed = [t for t in ts if t.kind != "base"]
        errors = [t.rel_error for t in changed]
        out.append(
            GroupSummary(
                group=name, n_tensors=len(ts), n_changed=len(changed),
                rank=sum(t.rank or 0 for t in changed if t.kind in ("lowrank", "dropped")),
                full_rank=sum(t.full_rank or 0 for t in changed if t.kind in ("lowrank", "dropped")),
                kept_params=sum(t.kept_params for t in ts), stored_bytes=sum(t.stored_bytes for t in ts),
                max_error=max(errors, default=0.0), mean_error=sum(errors) / len(errors) if errors else 0.0,
            )
        )
    return out

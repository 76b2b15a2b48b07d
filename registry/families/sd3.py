"""SD3 and SD3.5 (Medium, Large) MMDiT: Stability's layout and diffusers' SD3Transformer2DModel.

Stability's ``joint_blocks.N.{x_block,context_block}.attn.qkv`` fuse q, k and v (and SD3.5
Medium's ``x_block.attn2.qkv`` its second attention's); diffusers splits them. The last block's
context modulation and the final norm's are (shift, scale) in Stability's code and (scale, shift)
in diffusers'. The last context block projects nothing out (``context_pre_only``).
"""

from __future__ import annotations

import re
from typing import Mapping

from ..checkpoint import TensorSpec
from . import Family, Piece

_TOP = {
    "x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK = {
    "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear",
    "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
}
_NORMS = {
    "x_block.attn.ln_q.weight": "attn.norm_q.weight", "x_block.attn.ln_k.weight": "attn.norm_k.weight",
    "context_block.attn.ln_q.weight": "attn.norm_added_q.weight", "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
    "x_block.attn2.ln_q.weight": "attn2.norm_q.weight", "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
}
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def detect(keys: set[str]) -> str | None:
    if "joint_blocks.0.x_block.attn.qkv.weight" in keys:
        return "original"
    if "pos_embed.proj.weight" in keys and "transformer_blocks.0.attn.add_q_proj.weight" in keys:
        return "diffusers"
    return None


def table(specs: Mapping[str, TensorSpec], layout: str) -> dict[str, tuple[Piece, ...]]:
    keys = set(specs)
    if layout == "original":
        hidden = specs["x_embedder.proj.weight"].shape[0]
        blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
    else:
        hidden = specs["pos_embed.proj.weight"].shape[0]
        blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    last = blocks[-1] if blocks else -1
    out: dict[str, tuple[Piece, ...]] = {"pos_embed": (Piece("pos_embed.pos_embed"),)}

    def swapped(old: str, new: str) -> None:  # (shift, scale) -> (scale, shift)
        for kind in ("weight", "bias"):
            out[f"{old}.{kind}"] = (Piece(f"{new}.{kind}", hidden, 2 * hidden), Piece(f"{new}.{kind}", 0, hidden))

    for old, new in _TOP.items():
        for kind in ("weight", "bias"):
            out[f"{old}.{kind}"] = (Piece(f"{new}.{kind}"),)
    swapped("final_layer.adaLN_modulation.1", "norm_out.linear")
    for i in blocks:
        b, t = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in _BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"{b}{old}.{kind}"] = (Piece(f"{t}{new}.{kind}"),)
        if i == last:
            swapped(b + "context_block.adaLN_modulation.1", t + "norm1_context.linear")
        for old, new in _NORMS.items():
            out[b + old] = (Piece(t + new),)
        for old, names in _QKV.items():
            for kind in ("weight", "bias"):
                out[f"{b}{old}.{kind}"] = tuple(Piece(f"{t}{n}.{kind}", 0, hidden) for n in names)
    if layout == "original":
        return {k: v for k, v in out.items() if k in keys}
    return {k: v for k, v in out.items() if all(p.key in keys for p in v)}


FAMILY = Family("sd3", "SD3/SD3.5 MMDiT", detect, table, "SD3Transformer2DModel")

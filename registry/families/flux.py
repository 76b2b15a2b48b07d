"""Flux.1 (dev, schnell and their fine-tunes): BFL's layout and diffusers' FluxTransformer2DModel.

BFL fuses q, k and v of each double block's image and text attention (``img_attn.qkv``), and
q, k, v and the MLP input of each single block (``linear1``); diffusers splits them. The final
norm's modulation is (shift, scale) in BFL's code and (scale, shift) in diffusers'. Widths come
from the tensors themselves (diffusers' converter assumes Flux.1's 3072), so a narrow test model
converts too.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..checkpoint import TensorSpec
from . import Family, Piece

_DOUBLE = {  # BFL module in a double block -> diffusers module in transformer_blocks.N
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight", "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_SINGLE = {
    "modulation.lin": "norm.linear", "linear2": "proj_out",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1", "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1", "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1", "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out",
}


def detect(keys: set[str]) -> str | None:
    if "double_blocks.0.img_attn.qkv.weight" in keys or "single_blocks.0.linear1.weight" in keys:
        return "original"
    if "single_transformer_blocks.0.proj_mlp.weight" in keys or (
        "x_embedder.weight" in keys and "transformer_blocks.0.attn.add_q_proj.weight" in keys and "pos_embed.proj.weight" not in keys
    ):
        return "diffusers"
    return None


def _blocks(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def table(specs: Mapping[str, TensorSpec], layout: str) -> dict[str, tuple[Piece, ...]]:
    keys = set(specs)
    if layout == "original":
        hidden = specs["img_in.weight"].shape[0]
        mlp = specs["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden if "single_blocks.0.linear1.weight" in keys else 0
        doubles, singles = _blocks(keys, r"double_blocks\.(\d+)\."), _blocks(keys, r"single_blocks\.(\d+)\.")
    else:
        hidden = specs["x_embedder.weight"].shape[0]
        mlp = specs["single_transformer_blocks.0.proj_mlp.weight"].shape[0] if "single_transformer_blocks.0.proj_mlp.weight" in keys else 0
        doubles = _blocks(keys, r"transformer_blocks\.(\d+)\.")
        singles = _blocks(keys, r"single_transformer_blocks\.(\d+)\.")
    out: dict[str, tuple[Piece, ...]] = {}

    def rename(old: str, new: str) -> None:
        if old.endswith(".scale") or new.endswith(".weight"):
            out[old] = (Piece(new),)
            return
        for kind in ("weight", "bias"):
            out[f"{old}.{kind}"] = (Piece(f"{new}.{kind}"),)

    def split(old: str, new: list[tuple[str, int]]) -> None:
        for kind in ("weight", "bias"):
            out[f"{old}.{kind}"] = tuple(Piece(f"{name}.{kind}", 0, rows) for name, rows in new)

    for old, new in _TOP.items():
        rename(old, new)
    for kind in ("weight", "bias"):  # (shift, scale) here, (scale, shift) in diffusers
        out[f"final_layer.adaLN_modulation.1.{kind}"] = (
            Piece(f"norm_out.linear.{kind}", hidden, 2 * hidden), Piece(f"norm_out.linear.{kind}", 0, hidden),
        )
    for i in doubles:
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in _DOUBLE.items():
            rename(b + old, t + new)
        split(b + "img_attn.qkv", [(t + "attn.to_q", hidden), (t + "attn.to_k", hidden), (t + "attn.to_v", hidden)])
        split(b + "txt_attn.qkv", [(t + "attn.add_q_proj", hidden), (t + "attn.add_k_proj", hidden), (t + "attn.add_v_proj", hidden)])
    for i in singles:
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for old, new in _SINGLE.items():
            rename(b + old, t + new)
        split(b + "linear1", [(t + "attn.to_q", hidden), (t + "attn.to_k", hidden), (t + "attn.to_v", hidden), (t + "proj_mlp", mlp)])
    # Only what this model has: no guidance embedder in schnell, no biases where a model has none.
    present = keys if layout == "diffusers" else None
    return {
        k: v for k, v in out.items()
        if (k in keys if layout == "original" else all(p.key in present for p in v))
    }


def adapter_aliases(modules) -> dict[str, tuple[str, ...]]:
    """XLabs' Flux LoRA: a processor per block, with LoRAs on the image (1) and text (2) streams'
    fused qkv and output projections, and in single blocks on q, k, v alone (not the MLP input)
    and the output."""
    modules = set(modules)
    out = {}
    for i in _blocks(modules, r"transformer_blocks\.(\d+)\."):
        t, x = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}.processor."
        out[x + "qkv_lora1"] = (t + "to_q", t + "to_k", t + "to_v")
        out[x + "qkv_lora2"] = (t + "add_q_proj", t + "add_k_proj", t + "add_v_proj")
        out[x + "proj_lora1"], out[x + "proj_lora2"] = (t + "to_out.0",), (t + "to_add_out",)
    for i in _blocks(modules, r"single_transformer_blocks\.(\d+)\."):
        t, x = f"single_transformer_blocks.{i}.", f"single_blocks.{i}.processor."
        out[x + "qkv_lora"] = (t + "attn.to_q", t + "attn.to_k", t + "attn.to_v")
        out[x + "proj_lora"] = (t + "proj_out",)
    return {alias: members for alias, members in out.items() if all(m in modules for m in members)}


FAMILY = Family("flux", "Flux.1 transformer", detect, table, "FluxTransformer2DModel", adapter_aliases=adapter_aliases)

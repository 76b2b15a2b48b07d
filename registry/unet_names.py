"""The diffusers name of an LDM (CompVis) UNet module.

A single-file Stable Diffusion checkpoint names its UNet modules as the original code did
(``input_blocks.1.1.proj_in``); LoRA trainers name them as diffusers does
(``down_blocks.0.attentions.0.proj_in``, in kohya's files ``lora_unet_down_blocks_0_attentions_0_proj_in``),
whatever layout the base they were trained on is stored in. The two layouts number the same modules
differently, and the numbering depends on the UNet's layers per block: each down block is that many
resnet/attention pairs and a downsampler, each up block one pair more and an upsampler.
This is the renaming diffusers' ``convert_ldm_unet_checkpoint`` does on tensors, on names alone.
"""

from __future__ import annotations

import re

_FIXED = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut",
}
_BLOCK = re.compile(r"^(?P<where>input_blocks|middle_block|output_blocks)\.(?:(?P<n>\d+)\.)?(?P<m>\d+)(?:\.(?P<rest>.+))?$")


def layers_per_block(modules: list[str]) -> int:
    """From a UNet's LDM module names: the first downsampler sits at input_blocks.(layers + 1).0.op."""
    ops = [int(m.split(".")[1]) for m in modules if re.match(r"^input_blocks\.\d+\.0\.op$", m)]
    if ops:
        return min(ops) - 1
    inputs = {m.split(".")[1] for m in modules if m.startswith("input_blocks.")}
    return max(len(inputs) - 1, 1)  # one block and no downsampler: conv_in, then its layers


def diffusers_module(module: str, layers: int) -> str | None:
    """``module`` (an LDM UNet module path, without model.diffusion_model.) as diffusers names it;
    None for a name outside the UNet's block layout."""
    if module in _FIXED:
        return _FIXED[module]
    m = _BLOCK.match(module)
    if m is None or m["rest"] is None:
        return None
    rest = m["rest"]
    if m["where"] == "middle_block":  # resnet, attention, resnet
        index = int(m["m"])
        return f"mid_block.resnets.{index // 2}.{_resnet(rest)}" if index % 2 == 0 else f"mid_block.attentions.{index // 2}.{rest}"
    n, part = int(m["n"]), int(m["m"])
    if m["where"] == "input_blocks":  # input_blocks.0 is conv_in
        blocks, (block, layer) = "down_blocks", divmod(n - 1, layers + 1)
        if part == 0 and rest == "op":
            return f"down_blocks.{block}.downsamplers.0.conv"
    else:
        blocks, (block, layer) = "up_blocks", divmod(n, layers + 1)
        if part > 0 and rest == "conv":  # after the resnet, and after the attention where the block has one
            return f"up_blocks.{block}.upsamplers.0.conv"
    if part == 0:
        return f"{blocks}.{block}.resnets.{layer}.{_resnet(rest)}"
    return f"{blocks}.{block}.attentions.{layer}.{rest}"


def _resnet(rest: str, names: dict[str, str] = _RESNET) -> str:
    for old, new in names.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


_DIFFUSERS = re.compile(
    r"^(?P<blocks>down_blocks|up_blocks)\.(?P<b>\d+)\.(?P<what>resnets|attentions|downsamplers|upsamplers)\.(?P<n>\d+)(?:\.(?P<rest>.+))?$"
)
_UNFIXED = {v: k for k, v in _FIXED.items()}
_UNRESNET = {v: k for k, v in _RESNET.items()}


def ldm_module(module: str, layers: int, up_attentions: set[int]) -> str | None:
    """Inverse of :func:`diffusers_module`: ``module`` (a diffusers UNet module path) as the LDM
    code names it; ``up_attentions``, the up blocks that have attentions (their upsampler comes
    after the attention). None for a name outside the block layout."""
    if module in _UNFIXED:
        return _UNFIXED[module]
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", module)
    if m:
        index = 2 * int(m[2]) + (m[1] == "attentions")
        return f"middle_block.{index}.{_unresnet(m[3]) if m[1] == 'resnets' else m[3]}"
    m = _DIFFUSERS.match(module)
    if m is None or m["rest"] is None:
        return None
    b, n, what, rest = int(m["b"]), int(m["n"]), m["what"], m["rest"]
    if what == "downsamplers":
        return f"input_blocks.{(b + 1) * (layers + 1)}.0.op" if rest == "conv" else None
    if what == "upsamplers":
        return f"output_blocks.{b * (layers + 1) + layers}.{2 if b in up_attentions else 1}.conv" if rest == "conv" else None
    part = 0 if what == "resnets" else 1
    rest = _unresnet(rest) if what == "resnets" else rest
    if m["blocks"] == "down_blocks":
        return f"input_blocks.{b * (layers + 1) + n + 1}.{part}.{rest}"
    return f"output_blocks.{b * (layers + 1) + n}.{part}.{rest}"


def _unresnet(rest: str) -> str:
    return _resnet(rest, _UNRESNET)

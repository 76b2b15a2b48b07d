"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL): the LDM layout and diffusers' UNet2DConditionModel.

The two layouts hold the same tensors under other names (no tensor is fused in either); the
numbering follows the UNet's layers per block (:mod:`registry.unet_names`).
"""

from __future__ import annotations

import re
from typing import Mapping

from ..checkpoint import TensorSpec
from ..unet_names import diffusers_module, layers_per_block, ldm_module
from . import Family, Piece


def detect(keys: set[str]) -> str | None:
    if "input_blocks.0.0.weight" in keys and "time_embed.0.weight" in keys:
        return "original"
    if "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys and "down_blocks.0.resnets.0.conv1.weight" in keys:
        return "diffusers"
    return None


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def table(specs: Mapping[str, TensorSpec], layout: str) -> dict[str, tuple[Piece, ...]]:
    out: dict[str, tuple[Piece, ...]] = {}
    if layout == "original":
        layers = layers_per_block(sorted({_split(k)[0] for k in specs}))
        for key in specs:
            module, leaf = _split(key)
            new = diffusers_module(module, layers)
            if new is not None:
                out[key] = (Piece(f"{new}.{leaf}"),)
        return out
    layers = 1 + max((int(m[1]) for k in specs if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))), default=0)
    up_attentions = {int(m[1]) for k in specs if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    for key in specs:
        module, leaf = _split(key)
        old = ldm_module(module, layers, up_attentions)
        if old is not None:
            out[f"{old}.{leaf}"] = (Piece(key),)
    return out


FAMILY = Family("unet", "Stable Diffusion UNet", detect, table, "UNet2DConditionModel", original_prefix="model.diffusion_model.")

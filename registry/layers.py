"""Grouping tensor keys into the layer groups that reports show (conv_in, down_blocks.0, mid_block, ...)."""

from __future__ import annotations

_PREFIXES = ("model.diffusion_model.", "unet.", "base_model.model.")


def layer_group(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    parts = key.split(".")
    # down_blocks.0, up_blocks.3, input_blocks.7 (LDM), layers.11: numbered stages are groups of their own.
    if len(parts) > 2 and parts[1].isdigit() and parts[0].endswith(("blocks", "layers")):
        return f"{parts[0]}.{parts[1]}"
    return parts[0] if len(parts) > 1 else key

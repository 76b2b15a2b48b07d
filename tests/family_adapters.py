"""Adapter files for the tiny Flux and SDXL models, as each trainer names them, and what diffusers
makes of them.

Real tools write what a pip tool writes: diffusers' ``save_lora_weights`` of peft adapters trained a
few Adam steps (Flux and the SDXL UNet), and lycoris-lora's own network save with its default
``lycoris_`` prefix. kohya's Flux LoRA (fused q/k/v, ``lora_unet_double_blocks_*``) and XLabs'
have no pip writer: they are built to those names from seeded factors, and each is proven by
diffusers' own loader taking it whole before a test uses it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dsreg import families
from dsreg.checkpoint import TensorSpec
from dsreg.codec import dtype_name
from dsreg.demo import reproducible

from .family_models import build, finetune, in_layout, state

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj"]
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    return FluxPipeline if family == "flux" else StableDiffusionXLPipeline


# The double blocks' projections alone: diffusers' kohya Flux reader cuts a single block's linear1
# at Flux.1's widths, so a kohya file of the tiny model loads there only without single blocks.
FLUX_DOUBLE_TARGETS = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)|ff\.net\.0\.proj)"


def peft_lora(family: str, folder: Path, lora_bias: bool = False, targets=None) -> Path:
    """diffusers' save_lora_weights of a peft LoRA trained on the tiny model: the folder it writes."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = build(family)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=True if lora_bias else "gaussian",
        target_modules=targets or (FLUX_TARGETS if family == "flux" else SDXL_TARGETS),
        lora_bias=lora_bias,
    )
    torch.manual_seed(0)  # peft's gaussian init of lora_A
    model.add_adapter(config)
    finetune(family, model, steps=3, lr=1e-2)
    layers = get_peft_model_state_dict(model)
    if family == "flux":
        pipeline_class(family).save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict())
    else:
        pipeline_class(family).save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    return folder


def lycoris_lora(family: str, path: Path) -> Path:
    """lycoris-lora's LoRA on the tiny model, trained a few steps and saved by its own network."""
    from lycoris import create_lycoris

    model = build(family)
    torch.manual_seed(0)
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lora")
    network.apply_to()
    g = torch.Generator().manual_seed(2)
    for lora in network.loras:  # lycoris starts lora_up at zero: a few steps move it
        lora.lora_up.weight.data.normal_(0, 0.02, generator=g)
    finetune(family, model, steps=2, lr=1e-2)
    network.save_weights(str(path), torch.float32, None)
    return path


def _pair(g: torch.Generator, out: int, inner: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inner, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.05


def kohya_flux(path: Path, with_text_encoder: bool = False) -> Path:
    """A LoRA as kohya's sd-scripts (networks/lora_flux.py) names it: BFL modules, q/k/v fused."""
    original = in_layout(state(build("flux")), "original")
    g = torch.Generator().manual_seed(5)
    modules = [
        "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mod.lin", "single_blocks.0.linear1", "single_blocks.1.linear1", "single_blocks.0.linear2",
    ]
    tensors = {}
    for module in modules:
        weight = original[module + ".weight"]
        down, up = _pair(g, *weight.shape)
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
    if with_text_encoder:  # CLIP's attention, as lora_te1_: no module of a transformer-only base
        for proj in ("q_proj", "k_proj"):
            down, up = _pair(g, 16, 16)
            name = f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)})
    save_file(tensors, path)
    return path


def xlabs_flux(path: Path) -> Path:
    """A LoRA as XLabs' trainer names it: a processor per block with qkv/proj LoRAs per stream."""
    original = in_layout(state(build("flux")), "original")
    hidden = original["img_in.weight"].shape[0]
    g = torch.Generator().manual_seed(6)
    tensors = {}
    shapes = {
        "double_blocks.0.processor.qkv_lora1": (3 * hidden, hidden), "double_blocks.0.processor.qkv_lora2": (3 * hidden, hidden),
        "double_blocks.0.processor.proj_lora1": (hidden, hidden), "double_blocks.0.processor.proj_lora2": (hidden, hidden),
        "single_blocks.1.processor.qkv_lora": (3 * hidden, hidden), "single_blocks.1.processor.proj_lora": (hidden, original["single_blocks.1.linear2.weight"].shape[1]),
    }
    for name, (out, inner) in shapes.items():
        down, up = _pair(g, out, inner)
        tensors.update({f"{name}.down.weight": down, f"{name}.up.weight": up})
    save_file(tensors, path)
    return path


def kohya_sdxl(peft_folder: Path, path: Path) -> Path:
    """A LoRA as kohya's sd-scripts names SDXL's: the LDM UNet's input_blocks/output_blocks modules,
    made from a diffusers-trained one by renaming (the factors are the trained ones)."""
    from safetensors.torch import load_file

    lora = load_file(peft_folder / "pytorch_lora_weights.safetensors")
    sd = state(build("unet"))
    src = families.detect(sd)
    steps = families.plan([TensorSpec(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()], src, families.ModelLayout(src.family, "original"))
    renamed = {rule.renamed: spec.key for spec, rule in steps if rule.renamed}
    tensors = {}
    for key, value in lora.items():
        module, _, part = key[len("unet."):].partition(".lora_")
        target = renamed[module + ".weight"][: -len(".weight")]
        kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
        tensors["lora_unet_" + target.replace(".", "_") + "." + kind] = value
        tensors["lora_unet_" + target.replace(".", "_") + ".alpha"] = torch.tensor(8.0)  # the peft file's lora_alpha
    save_file(tensors, path)
    return path


def diffusers_merge(family: str, lora: Path) -> dict[str, torch.Tensor]:
    """The tiny base with ``lora`` loaded and fused by diffusers (load_lora_weights + fuse_lora)."""
    model = build(family)
    cls = pipeline_class(family)
    parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe = cls(transformer=model, **parts) if family == "flux" else cls(unet=model, **parts)
    with reproducible():
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return state(model)

"""Tiny models of each family, built from diffusers' own classes, and real fine-tunes of them.

Each family's model is saved in both layouts: diffusers' (a model folder, from save_pretrained)
and the original release's (one safetensors file, converted by our tables; the tables are checked
against diffusers' converters in test_families.py). Fine-tunes are a few Adam steps on data made
from seeds, under reproducible() so that the bits are the same on every run and thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsreg import families
from dsreg.checkpoint import TensorSpec
from dsreg.codec import dtype_name
from dsreg.demo import reproducible


def flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )


def sd3():
    from diffusers import SD3Transformer2DModel

    # SD3.5 Medium's shape of block: q/k norms and a second attention in the first block.
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=8,
    )


BUILDERS = {"flux": flux, "sd3": sd3, "unet": sdxl_unet}


def _loss(family: str, model, g: torch.Generator) -> torch.Tensor:
    if family == "flux":
        x = torch.randn(1, 16, 8, generator=g)
        out = model(
            hidden_states=x, encoder_hidden_states=torch.randn(1, 4, 16, generator=g), pooled_projections=torch.randn(1, 8, generator=g),
            timestep=torch.rand(1, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5]),
        ).sample
    elif family == "sd3":
        x = torch.randn(1, 4, 8, 8, generator=g)
        out = model(
            hidden_states=x, encoder_hidden_states=torch.randn(1, 4, 16, generator=g), pooled_projections=torch.randn(1, 8, generator=g),
            timestep=torch.randint(0, 1000, (1,), generator=g),
        ).sample
    else:
        x = torch.randn(1, 4, 8, 8, generator=g)
        out = model(
            x, torch.randint(0, 1000, (1,), generator=g), torch.randn(1, 4, 32, generator=g),
            added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)},
        ).sample
    return ((out - x) ** 2).mean()


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return BUILDERS[family]()


def finetune(family: str, model, steps: int = 3, seed: int = 1, lr: float = 2e-3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with reproducible():
        for _ in range(steps):
            loss = _loss(family, model, g)
            opt.zero_grad()
            loss.backward()
            opt.step()


def state(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().clone().contiguous() for k, v in model.state_dict().items()}


def in_layout(sd: dict[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict in ``layout`` (and under ``prefix``), from one in any layout of its family."""
    src = families.detect(sd)
    dst = families.ModelLayout(src.family, layout, prefix)
    steps = families.plan([TensorSpec(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()], src, dst)
    return {spec.key: families.assemble(rule, sd.__getitem__).contiguous() for spec, rule in steps}


@dataclass(frozen=True)
class FamilyFiles:
    family: str
    base_sd: dict  # diffusers layout
    ft_sd: dict  # diffusers layout
    base_original: Path  # safetensors, original layout
    base_diffusers: Path  # model folder
    ft_original: Path
    ft_diffusers: Path


def save(family: str, folder: Path, dtype: torch.dtype | None = None) -> FamilyFiles:
    model = build(family)
    base_sd = state(model, dtype)
    model.save_pretrained(folder / "base-diffusers")
    if dtype is not None:
        save_file(base_sd, folder / "base-diffusers" / "diffusion_pytorch_model.safetensors")
    save_file(in_layout(base_sd, "original"), folder / "base-original.safetensors")
    finetune(family, model)
    ft_sd = state(model, dtype)
    model.save_pretrained(folder / "ft-diffusers")
    if dtype is not None:
        save_file(ft_sd, folder / "ft-diffusers" / "diffusion_pytorch_model.safetensors")
    save_file(in_layout(ft_sd, "original"), folder / "ft-original.safetensors")
    return FamilyFiles(
        family, base_sd, ft_sd, folder / "base-original.safetensors", folder / "base-diffusers",
        folder / "ft-original.safetensors", folder / "ft-diffusers",
    )

"""The family tables: detection, both directions, and agreement with diffusers' own converters."""

from __future__ import annotations

import pytest
import torch

from dsreg import families
from dsreg.checkpoint import TensorSpec
from dsreg.codec import dtype_name
from dsreg.families import ModelLayout

from .family_models import build, in_layout, state

pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as converters  # noqa: E402


def _specs(sd):
    return [TensorSpec(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in sd.items()]


@pytest.mark.parametrize("family", ["flux", "sd3", "unet"])
def test_detect_and_round_trip(family):
    sd = state(build(family))
    assert families.detect(sd) == ModelLayout(family, "diffusers")
    original = in_layout(sd, "original")
    assert families.detect(original) == ModelLayout(family, "original")
    prefixed = in_layout(sd, "original", "model.diffusion_model.")
    assert families.detect(prefixed) == ModelLayout(family, "original", "model.diffusion_model.")
    assert all(k.startswith("model.diffusion_model.") for k in prefixed)
    back = in_layout(prefixed, "diffusers")
    assert list(back) != [] and back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # Every original tensor is made of whole rows of diffusers tensors: as many values either way.
    assert sum(v.numel() for v in original.values()) == sum(v.numel() for v in sd.values())


def test_unknown_models_have_no_family():
    assert families.detect({"layer.0.weight": torch.zeros(2, 2)}) is None
    assert families.detect({"down_blocks.0.weight": torch.zeros(2)}) is None


def test_sd3_matches_diffusers_converter():
    sd = state(build("sd3"))
    theirs = converters.convert_sd3_transformer_checkpoint_to_diffusers(dict(in_layout(sd, "original")))
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_sdxl_unet_matches_diffusers_converter():
    model = build("unet")
    sd = state(model)
    original = in_layout(sd, "original", "model.diffusion_model.")
    theirs = converters.convert_ldm_unet_checkpoint(dict(original), dict(model.config))
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)


def _tagged(spec: TensorSpec, index: int) -> torch.Tensor:
    """A tensor whose every row says which tensor and which row it is, with no memory of its own."""
    rows = spec.shape[0]
    tags = torch.arange(rows, dtype=torch.int32) + index * (1 << 20)
    return tags if len(spec.shape) == 1 else tags.reshape(rows, *([1] * (len(spec.shape) - 1))).expand(spec.shape)


def test_flux_matches_diffusers_converter_at_full_width():
    """diffusers' Flux converter cuts at Flux.1's width (3072) whatever the model's: compare at
    that width, one block of each kind, on tensors that carry their own row numbers."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    specs = [TensorSpec(k, "int32", tuple(v.shape)) for k, v in model.state_dict().items()]
    ours = {s.key: _tagged(s, i) for i, s in enumerate(specs)}
    assert ours["x_embedder.weight"].shape[0] == 3072 and ours["transformer_blocks.0.norm1.linear.weight"].shape[0] == 18432
    steps = families.plan(specs, ModelLayout("flux", "diffusers"), ModelLayout("flux", "original"))
    original = {spec.key: families.assemble(rule, ours.__getitem__) for spec, rule in steps}
    assert original["single_blocks.0.linear1.weight"].shape == (21504, 3072)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    theirs = converters.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert theirs.keys() == ours.keys()
    for key, tensor in ours.items():  # the first column holds every row's tag
        assert torch.equal(theirs[key].reshape(tensor.shape[0], -1)[:, 0], tensor.reshape(tensor.shape[0], -1)[:, 0]), key


def test_conversion_moves_rows_without_changing_bits():
    sd = {k: v.to(torch.bfloat16) for k, v in state(build("flux")).items()}
    original = in_layout(sd, "original")
    qkv = original["double_blocks.0.img_attn.qkv.weight"]
    hidden = sd["x_embedder.weight"].shape[0]
    assert torch.equal(qkv[hidden:2 * hidden].view(torch.int16), sd["transformer_blocks.0.attn.to_k.weight"].view(torch.int16))
    # BFL's final modulation is (shift, scale); diffusers' (scale, shift).
    mod = original["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(mod[:hidden], sd["norm_out.linear.weight"][hidden:])


def test_plan_refuses_other_families():
    with pytest.raises(ValueError):
        families.plan([], ModelLayout("flux", "original"), ModelLayout("sd3", "original"))

"""Subjects of Flux, SD3 and SDXL models across their two layouts: push in either against a base
in either, checkout and load in either, apply into diffusers' live modules, fp8 fine-tunes."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dsreg import Registry, families
from dsreg.cli.main import cli
from dsreg.errors import CheckpointError, UsageError
from dsreg.names import Ref

from .conftest import snapshot
from .family_models import FamilyFiles, build, in_layout, save

pytest.importorskip("diffusers")

FAMILIES = ["flux", "sd3", "unet"]


@pytest.fixture(scope="session")
def family_files(tmp_path_factory) -> dict[str, FamilyFiles]:
    out = {}
    for family in FAMILIES:
        out[family] = save(family, tmp_path_factory.mktemp(family))
    return out


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path)


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a)


def _files(files: FamilyFiles, layout: str):
    return (files.base_original, files.ft_original) if layout == "original" else (files.base_diffusers, files.ft_diffusers)


@pytest.fixture
def local_reg(tmp_path):
    """A registry on the embedded engines: for what the conversions do, which no engine changes.
    Flux's tests run on both engine pairs; the SDXL UNet's 400-odd tensors on S3 would cost the
    suite half a minute per test."""
    with Registry.open(home=tmp_path / "registry") as reg:
        yield reg


PAIRS = [("original", "diffusers"), ("diffusers", "original")]


@pytest.mark.parametrize("base_layout,ft_layout", PAIRS)
def test_a_flux_push_in_the_other_layout_round_trips_exactly(reg: Registry, family_files, base_layout, ft_layout, tmp_path):
    _round_trip(reg, family_files["flux"], base_layout, ft_layout, tmp_path)


@pytest.mark.parametrize("family", ["sd3", "unet"])
@pytest.mark.parametrize("base_layout,ft_layout", PAIRS)
def test_a_push_in_the_other_layout_round_trips_exactly(local_reg: Registry, family_files, family, base_layout, ft_layout, tmp_path):
    _round_trip(local_reg, family_files[family], base_layout, ft_layout, tmp_path)


@pytest.mark.parametrize("family,layout", [("flux", "original"), ("sd3", "diffusers"), ("unet", "original")])
def test_a_push_in_the_bases_layout_checks_out_in_both(local_reg: Registry, family_files, family, layout, tmp_path):
    _round_trip(local_reg, family_files[family], layout, layout, tmp_path)


def _round_trip(reg: Registry, files: FamilyFiles, base_layout: str, ft_layout: str, tmp_path) -> None:
    base, _ = _files(files, base_layout)
    _, ft = _files(files, ft_layout)
    reg.add_base(base, "base")
    rev = reg.push(ft, "s", exact=True)
    assert rev.base == "base" and rev.n_changed > 0
    out = reg.checkout("s", tmp_path / "as-pushed")
    assert _same_bits(_weights(out.path), _weights(ft))
    # Neither the file nor its base was original: the original layout comes under the prefix its
    # tools expect (the SD UNet's model.diffusion_model.), else under the stored or pushed one.
    made = families.FAMILIES[files.family].original_prefix if "original" not in (base_layout, ft_layout) else ""
    for layout in ("original", "diffusers"):
        got = reg.checkout("s", tmp_path / f"{layout}.safetensors", layout=layout)
        assert _same_bits(_weights(got.path), in_layout(files.ft_sd, layout, made if layout == "original" else "")), layout
    other = "original" if ft_layout == "diffusers" else "diffusers"
    assert _same_bits(reg.load("s", layout=other), in_layout(files.ft_sd, other, made if other == "original" else ""))


@pytest.mark.parametrize("family", FAMILIES)
def test_lossy_subject_checks_out_and_applies_in_the_other_layout(local_reg: Registry, family_files, family, tmp_path):
    reg, files = local_reg, family_files[family]
    reg.add_base(files.base_original, "base")
    reg.push(files.ft_diffusers, "s", energy=0.5)
    diffusers = _weights(reg.checkout("s", tmp_path / "d").path)
    original = _weights(reg.checkout("s", tmp_path / "o.safetensors", layout="original").path)
    assert _same_bits(original, in_layout(diffusers, "original"))
    # Close to the fine-tune, and much closer than the base is.
    key = max(files.ft_sd, key=lambda k: files.ft_sd[k].numel() if files.ft_sd[k].dim() == 2 else 0)
    change = (files.ft_sd[key] - files.base_sd[key]).norm()
    assert (diffusers[key] - files.ft_sd[key]).norm() < 0.9 * change
    # Into a live diffusers module loaded from the base: the checkout's values, bit for bit.
    live = build(family)
    live.load_state_dict(files.base_sd)
    with reg.apply(live, "s"):
        assert _same_bits({k: v for k, v in live.state_dict().items()}, diffusers)
    assert _same_bits(dict(live.state_dict()), files.base_sd)


def test_one_base_for_the_same_weights_in_two_layouts(reg: Registry, family_files):
    files = family_files["flux"]
    first, new = reg.add_base(files.base_original, "flux")
    before = snapshot(reg)
    again, new_again = reg.add_base(files.base_diffusers, "flux-diffusers")
    assert new and not new_again and again.name == "flux" and again.digest == first.digest
    assert snapshot(reg) == before  # nothing stored, no second name
    # A subject in either layout finds it by content.
    assert reg.push(files.ft_diffusers, "a", exact=True).base == "flux"
    assert reg.push(files.ft_original, "b", exact=True).base == "flux"


def test_fp8_finetune_of_a_bf16_base(reg: Registry, tmp_path):
    """Community Flux fine-tunes are shared as fp8: stored against the base cast to fp8, exact
    push bit for bit, and a lossy push never stores more than the exact change."""
    model = build("flux")
    base = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    from .family_models import finetune

    finetune("flux", model, steps=3)
    ft8 = {k: v.detach().to(torch.float8_e4m3fn).contiguous() for k, v in model.state_dict().items()}
    save_file(in_layout(base, "original"), tmp_path / "base.safetensors")
    save_file(ft8, tmp_path / "ft-fp8.safetensors")
    reg.add_base(tmp_path / "base.safetensors", "flux")
    exact = reg.push(tmp_path / "ft-fp8.safetensors", "exact", exact=True)
    lossy = reg.push(tmp_path / "ft-fp8.safetensors", "lossy", energy=0.5)
    assert _same_bits(_weights(reg.checkout("exact", tmp_path / "e.safetensors").path), ft8)
    assert exact.stored_bytes < 0.5 * os.path.getsize(tmp_path / "ft-fp8.safetensors")
    assert lossy.stored_bytes <= exact.stored_bytes
    got = _weights(reg.checkout("lossy", tmp_path / "l.safetensors").path)
    assert all(v.dtype == torch.float8_e4m3fn for v in got.values())


def test_scaled_fp8_is_refused_in_one_line(reg: Registry, family_files, tmp_path):
    files = family_files["flux"]
    reg.add_base(files.base_original, "flux")
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(files.ft_original).items()}
    sd["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(1)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, tmp_path / "scaled.safetensors")
    before = snapshot(reg)
    with pytest.raises(CheckpointError, match="scaled fp8"):
        reg.push(tmp_path / "scaled.safetensors", "s")
    assert snapshot(reg) == before


def test_layout_of_a_model_of_no_known_family_is_refused(reg_base: Registry, models, tmp_path):
    reg_base.push(models.ft, "plain", exact=True)
    assert _same_bits(_weights(reg_base.checkout("plain", tmp_path / "p.safetensors").path), load_file(models.ft))
    with pytest.raises(UsageError, match="no family"):
        reg_base.checkout("plain", tmp_path / "q.safetensors", layout="diffusers")


def test_cli_checkout_layout(family_files, tmp_path, engine):
    files = family_files["sd3"]
    home = tmp_path / "home"

    def run(*args):
        result = CliRunner().invoke(cli, ["--home", str(home), *engine.cli_args(), "-q", *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    run("base", "add", files.base_diffusers, "--name", "sd35")
    run("push", files.ft_original, "--subject", "s", "--exact")
    run("checkout", "s", "-o", tmp_path / "d.safetensors", "--layout", "diffusers")
    assert _same_bits(load_file(tmp_path / "d.safetensors"), files.ft_sd)
    run("push", files.ft_diffusers, "--subject", "folder", "--exact")
    refused = CliRunner().invoke(cli, ["--home", str(home), *engine.cli_args(), "checkout", "folder", "-o", str(tmp_path / "o"), "--layout", "original"])
    assert refused.exit_code != 0 and "single file" in refused.output


def test_repair_rewrites_a_converted_revisions_blob_from_the_pushed_file(reg: Registry, family_files, tmp_path):
    files = family_files["sd3"]
    reg.add_base(files.base_original, "base")
    reg.push(files.ft_diffusers, "s", exact=True)
    blob = next(e.blob for e in reg.catalog.entries(Ref("s", 1)) if e.blob)
    reg.store.delete(blob)
    assert reg.verify().missing
    report = reg.repair([files.ft_diffusers])
    assert not report.lost and report.fixed
    assert _same_bits(_weights(reg.checkout("s", tmp_path / "d").path), files.ft_sd)


def _sdxl_pipeline(unet, workdir):
    """A real StableDiffusionXLPipeline around the tiny SDXL UNet: both text encoders, a VAE."""
    import json

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(3)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "photo</w>": 4, "of</w>": 5, "sks</w>": 6, "dog</w>": 7}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=8)
    config = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
    )


def test_apply_into_an_sdxl_pipeline_across_layouts(local_reg: Registry, family_files, tmp_path):
    """A UNet subject stored against an LDM-layout base goes into a live SDXL pipeline's UNet;
    both text encoders and the VAE are left as they were."""
    reg, files = local_reg, family_files["unet"]
    reg.add_base(files.base_original, "sdxl")
    reg.push(files.ft_original, "s", energy=0.5)
    expected = reg.load("s", layout="diffusers")
    unet = build("unet")
    unet.load_state_dict(files.base_sd)
    pipe = _sdxl_pipeline(unet, tmp_path / "tok")
    others = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in ("text_encoder", "text_encoder_2", "vae")}
    with reg.apply(pipe, "s"):
        assert _same_bits(dict(pipe.unet.state_dict()), expected)
        for name, before in others.items():
            assert _same_bits(dict(getattr(pipe, name).state_dict()), before), name
        latents = pipe("a photo of sks dog", num_inference_steps=1, height=16, width=16, output_type="latent").images
        assert torch.isfinite(latents).all()
    assert _same_bits(dict(pipe.unet.state_dict()), files.base_sd)


@pytest.mark.parametrize("family,cls", [("sd3", "SD3Transformer2DModel"), ("unet", "UNet2DConditionModel")])
def test_an_original_layout_checkout_loads_with_diffusers_from_single_file(local_reg: Registry, family_files, family, cls, tmp_path):
    """What the original release's tools load: diffusers' own single-file loader reads it back to
    the fine-tune. (Its Flux converter cuts at Flux.1's width, which a tiny model lacks; the Flux
    table is checked against it at full width in test_families.py.)"""
    import diffusers

    files = family_files[family]
    local_reg.add_base(files.base_diffusers, "base")
    local_reg.push(files.ft_diffusers, "s", exact=True)
    out = local_reg.checkout("s", tmp_path / "original.safetensors", layout="original").path
    model = getattr(diffusers, cls).from_single_file(str(out), config=str(files.ft_diffusers), local_files_only=True)
    assert _same_bits(dict(model.state_dict()), files.ft_sd)

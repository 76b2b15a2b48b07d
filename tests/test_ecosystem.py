"""Fitting the ecosystem: LoRA export that diffusers loads, whole diffusers pipelines, LDM single files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsreg import BaseMismatch, Registry, UsageError

from dsreg import sd_tiny


@pytest.fixture
def local(tmp_path) -> Registry:
    with Registry.open(home=tmp_path / "registry") as reg:
        yield reg


def _load(path: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_exported_lora_loaded_by_diffusers_matches_the_checkout(local, pipelines, tmp_path, fmt):
    local.add_base(pipelines.base, "sd-tiny")
    rev = local.push(pipelines.ft, "dog")
    local.checkout("dog", tmp_path / "dog")
    export = local.export_lora("dog", tmp_path / "dog.safetensors", format=fmt)
    assert export.left_out == ()  # only matrices were trained: the LoRA carries every change

    expected = sd_tiny.outputs(_load(tmp_path / "dog"))
    untouched = sd_tiny.outputs(_load(pipelines.base))
    pipe = _load(pipelines.base)
    pipe.load_lora_weights(str(export.path))
    got = sd_tiny.outputs(pipe)
    for g, e, u in zip(got, expected, untouched):  # UNet and text encoder
        assert _rel(u, e) > 0.01  # the fine-tune moved the output ...
        assert _rel(g, e) < 2e-3  # ... and the LoRA moves it to the checkout's, within fp16 rounding
    pipe.fuse_lora()  # as users do: merged into the weights, and back out
    assert all(_rel(g, e) < 2e-3 for g, e in zip(sd_tiny.outputs(pipe), expected))
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert all(_rel(g, u) < 1e-4 for g, u in zip(sd_tiny.outputs(pipe), untouched))

    # Rank per layer as stored; conv layers as conv LoRA (down keeps the kernel, up is 1x1).
    stored = {t.key: t.rank for t in local.show(rev.ref).tensors if t.kind == "lowrank"}
    lora = load_file(export.path)
    key = "unet/down_blocks.0.resnets.0.conv1.weight"
    down, up = (
        (lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"], lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"])
        if fmt == "kohya" else
        (lora["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"], lora["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"])
    )
    assert down.shape == (stored[key], 32, 3, 3) and up.shape == (32, stored[key], 1, 1)
    assert export.n_modules == len(stored) and export.max_rank == max(stored.values())
    assert not any(k.endswith(".alpha") for k in lora)  # kohya: no alpha means alpha = rank, scale 1
    if fmt == "peft":
        with safe_open(export.path, "pt") as f:
            config = json.loads(f.metadata()["lora_adapter_metadata"])
        assert config["unet.lora_alpha"] == config["unet.r"] and config["unet.alpha_pattern"] == config["unet.rank_pattern"]


def test_a_plain_export_carries_the_dense_deltas_too(local, pipelines, tmp_path):
    """At tau 0.8 some layers are cheaper stored dense than factored: the export still carries them."""
    local.add_base(pipelines.base, "sd-tiny")
    local.push(pipelines.ft, "dog", energy=0.8)
    assert any(t.kind == "dense" and t.key.endswith(".weight") for t in local.show("dog").tensors)
    local.checkout("dog", tmp_path / "dog")
    expected, untouched = sd_tiny.outputs(_load(tmp_path / "dog")), sd_tiny.outputs(_load(pipelines.base))
    shares = {}
    for name, factors_only in (("plain", False), ("factors", True)):
        pipe = _load(pipelines.base)
        pipe.load_lora_weights(str(local.export_lora("dog", tmp_path / f"{name}.safetensors", factors_only=factors_only).path))
        # The UNet's output: how far the loaded LoRA leaves it from the checkout's, as a share of the fine-tune's effect.
        got = sd_tiny.outputs(pipe)[0]
        shares[name] = float(torch.linalg.vector_norm(got - expected[0]) / torch.linalg.vector_norm(expected[0] - untouched[0]))
    assert shares["plain"] < 0.01 < 0.05 < shares["factors"], shares


def test_full_finetune_lora_lists_what_it_cannot_carry(local, pipelines, tmp_path):
    local.add_base(pipelines.base, "sd-tiny")
    local.push(pipelines.ft_unet, "dog", energy=0.8)
    plain = local.export_lora("dog", tmp_path / "plain.safetensors", factors_only=True)
    # Norm scales and biases changed too: 1-D, no LoRA module carries them; they are listed.
    assert plain.left_out and all(k.startswith("unet/") for k in plain.left_out)
    assert any(k.endswith("norm1.weight") for k in plain.left_out) and any(k.endswith(".bias") for k in plain.left_out)
    with safe_open(plain.path, "pt") as f:
        assert json.loads(f.metadata()["dsreg.left_out"]) == list(plain.left_out)

    # kohya by default: the rest as LyCORIS names it (ComfyUI, A1111 and LyCORIS read these), the
    # whole subject; read back, it is the checkout's.
    whole = local.export_lora("dog", tmp_path / "whole.safetensors")
    assert whole.left_out == ()
    names = load_file(whole.path)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.diff_b" in names and "lora_unet_down_blocks_0_resnets_0_norm1.w_norm" in names
    assert "lora_unet_down_blocks_0_resnets_0_norm1.b_norm" in names
    local.checkout("dog", tmp_path / "dog")
    local.push(whole.path, "back", base="sd-tiny")
    local.checkout("back", tmp_path / "back")
    expected, untouched = sd_tiny.outputs(_load(tmp_path / "dog"))[0], sd_tiny.outputs(_load(pipelines.base))[0]
    assert _rel(sd_tiny.outputs(_load(tmp_path / "back"))[0], expected) < 2e-3

    # peft: one lora_bias switch for all modules, and the attention projections have no bias, so
    # the biases stay out and diffusers fuses the file (with lora_B.bias it failed on every layer
    # without one).
    dense = local.export_lora("dog", tmp_path / "dense.safetensors", format="peft")
    assert any(k.endswith(".bias") for k in dense.left_out) and not any(k.endswith("lora_B.bias") for k in load_file(dense.path))
    pipe = _load(pipelines.base)
    pipe.load_lora_weights(str(dense.path))
    pipe.fuse_lora()
    fused = sd_tiny.outputs(pipe)[0]
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert _rel(sd_tiny.outputs(pipe)[0], untouched) < 1e-4
    # Carrying all but the biases and norms brings the output most of the way to the checkout's.
    assert _rel(fused, expected) < 0.5 * _rel(untouched, expected)


def test_pipeline_folder_costs_only_the_unet_delta_and_loads_with_from_pretrained(local, pipelines, tmp_path):
    local.add_base(pipelines.base, "sd-tiny")
    rev = local.push(pipelines.ft_unet, "dog")
    tensors = local.show(rev.ref).tensors
    assert {t.key.split("/")[0] for t in tensors if t.kind != "base"} == {"unet"}  # VAE, text encoder, tokenizer: free

    # The same UNet pushed on its own, against the base's UNet folder, costs the same bytes.
    with Registry.open(home=tmp_path / "unet-only") as alone:
        alone.add_base(pipelines.base / "unet", "unet")
        unet_rev = alone.push(pipelines.ft_unet / "unet", "dog")
        alone.checkout("dog", tmp_path / "unet-alone")
    assert rev.stored_bytes == unet_rev.stored_bytes

    result = local.checkout("dog", tmp_path / "out")
    assert result.format == "pipeline"
    files = sorted(p.relative_to(pipelines.ft_unet).as_posix() for p in pipelines.ft_unet.rglob("*") if p.is_file())
    assert sorted(p.relative_to(result.path).as_posix() for p in result.path.rglob("*") if p.is_file()) == files
    for name in files:
        if not name.endswith(".safetensors") or not name.startswith("unet/"):
            assert (result.path / name).read_bytes() == (pipelines.ft_unet / name).read_bytes(), name
    got = load_file(result.path / "unet/diffusion_pytorch_model.safetensors")
    alone_unet = load_file(tmp_path / "unet-alone/diffusion_pytorch_model.safetensors")
    assert got.keys() == alone_unet.keys() and all(torch.equal(got[k], alone_unet[k]) for k in got)

    pipe = _load(result.path)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    with pytest.raises(UsageError, match="checks out as a folder"):
        local.checkout("dog", tmp_path / "flat.safetensors")


def test_trained_text_encoder_is_compressed_like_the_unet(local, pipelines):
    local.add_base(pipelines.base, "sd-tiny")
    tensors = local.show(local.push(pipelines.ft, "dog").ref).tensors
    te = [t for t in tensors if t.key.startswith("text_encoder/") and t.kind != "base"]
    assert te and any(t.kind == "lowrank" and t.rank < t.full_rank for t in te)
    assert all(t.kind == "base" for t in tensors if t.key.startswith(("vae/", "tokenizer/")))


def _ldm(unet: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{f"model.diffusion_model.{k}": v for k, v in unet.items()}, **other}


def test_ldm_single_file_unchanged_components_cost_nothing(local, models, tmp_path):
    g = torch.Generator().manual_seed(3)
    other = {
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(50, 32, generator=g),
    }
    save_file(_ldm(models.base_sd, other), tmp_path / "v1.safetensors", metadata={"modelspec.title": "tiny"})
    save_file(_ldm(models.ft_sd, other), tmp_path / "ft.safetensors", metadata={"modelspec.title": "tiny dog"})
    local.add_base(tmp_path / "v1.safetensors", "v1")
    rev = local.push(tmp_path / "ft.safetensors", "dog")
    changed = [t for t in local.show(rev.ref).tensors if t.kind != "base"]
    assert changed and all(t.key.startswith("model.diffusion_model.") for t in changed)

    out = local.checkout("dog", tmp_path / "out.safetensors").path
    with safe_open(out, "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny dog"
        assert list(f.keys()) == list(load_file(tmp_path / "ft.safetensors").keys())
        for k in other:
            assert torch.equal(f.get_tensor(k), other[k])

    # kohya keys keep the CompVis module names (A1111 and ComfyUI map them); peft needs diffusers names.
    export = local.export_lora("dog", tmp_path / "dog.safetensors")
    assert all(k.startswith("lora_unet_") for k in load_file(export.path))
    with pytest.raises(UsageError, match="LDM single-file"):
        local.export_lora("dog", tmp_path / "dog-peft.safetensors", format="peft")

    # A fine-tune in another key layout is refused with both layouts named.
    with pytest.raises(BaseMismatch, match="diffusers UNet.*LDM single-file|LDM single-file.*diffusers UNet"):
        local.push(_diffusers_unet(tmp_path / "ft-unet", models.ft_sd), "other", base="v1")


def _diffusers_unet(folder: Path, sd: dict) -> Path:
    folder.mkdir()
    save_file({f"down_blocks.0.{k}": v for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_a_unet_folder_pushes_against_a_whole_pipeline_base(local, pipelines, tmp_path):
    local.add_base(pipelines.base, "sd-tiny")
    whole = local.push(pipelines.ft_unet, "whole")
    unet = local.push(pipelines.ft_unet / "unet", "unet")  # the base is found by its unet/ component
    assert unet.base == "sd-tiny" and unet.stored_bytes == whole.stored_bytes
    out = local.checkout("unet", tmp_path / "unet").path
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    got = load_file(out / "diffusion_pytorch_model.safetensors")
    ref = load_file(local.checkout("whole", tmp_path / "whole").path / "unet/diffusion_pytorch_model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    lora = load_file(local.export_lora("unet", tmp_path / "unet-lora.safetensors").path)
    assert lora.keys() == load_file(local.export_lora("whole", tmp_path / "whole-lora.safetensors").path).keys()
    assert local.verify(full=True).ok


def test_a_pipeline_may_leave_out_whole_components_of_its_base(local, pipelines, tmp_path):
    import shutil

    local.add_base(pipelines.base, "sd-tiny")
    partial = tmp_path / "partial"
    shutil.copytree(pipelines.ft_unet, partial)
    shutil.rmtree(partial / "vae")  # saved without one of the base's components
    rev = local.push(partial, "dog")
    assert rev.stored_bytes == local.push(pipelines.ft_unet, "whole").stored_bytes
    out = local.checkout("dog", tmp_path / "out").path
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in partial.iterdir())
    # A missing part of a component is still a mismatch.
    (partial / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (pipelines.ft_unet / "text_encoder" / "model.safetensors").read_bytes())
    with pytest.raises(BaseMismatch):
        local.push(partial, "broken")


def test_lora_module_names_for_each_key_layout():
    from dsreg.lora import target

    ldm_te = target("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", (32, 32))
    assert ldm_te.kohya == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert ldm_te.peft == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert target("model.diffusion_model.input_blocks.1.1.proj_in.weight", (8, 8, 1, 1)).kohya == "lora_unet_input_blocks_1_1_proj_in"
    assert target("unet/down_blocks.0.resnets.0.conv1.weight", (8, 8, 3, 3)).peft == "unet.down_blocks.0.resnets.0.conv1"
    assert target("text_encoder/text_model.encoder.layers.0.mlp.fc1.weight", (8, 8)).kohya == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    alone = target("text_model.encoder.layers.0.mlp.fc1.weight", (8, 8))  # a CLIP text encoder on its own
    assert alone.kohya == "lora_te_text_model_encoder_layers_0_mlp_fc1" and alone.peft == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    for none in ("first_stage_model.encoder.conv_in.weight", "cond_stage_model.model.token_embedding.weight",
                 "vae/encoder.conv_in.weight", "text_encoder/text_model.embeddings.token_embedding.weight", "conv_in.bias"):
        assert target(none, (8, 8, 3, 3) if "conv" in none else (8, 8)) is None, none


def _bert_pair(d: Path) -> tuple[Path, Path]:
    """A small BERT encoder and a real fine-tune of it (Adam steps on a masked-token loss)."""
    from transformers import BertConfig, BertForMaskedLM

    from dsreg.demo import reproducible

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, max_position_embeddings=16))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "decoder" not in k}, d / "bert.safetensors")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with reproducible():
        for _ in range(3):
            ids = torch.randint(0, 40, (4, 12), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "decoder" not in k}, d / "bert-ft.safetensors")
    return d / "bert.safetensors", d / "bert-ft.safetensors"


def test_export_lora_refuses_a_model_that_no_lora_loader_names(local, tmp_path):
    base, ft = _bert_pair(tmp_path)
    local.add_base(base, "bert")
    rev = local.push(ft, "bert-ft")
    with pytest.raises(UsageError, match="in an unrecognised layout: LoRA loaders name") as info:
        local.export_lora(rev.ref, tmp_path / "bert-lora.safetensors")
    assert "\n" not in str(info.value) and not (tmp_path / "bert-lora.safetensors").exists()



def test_an_ldm_checkpoint_with_an_ema_copy_round_trips_or_leaves_it_out(local, models, tmp_path):
    """LDM trainers save model_ema.<name without dots> beside each trained weight, and the EMA's counters."""
    base = _ldm(models.base_sd, {})
    ft = _ldm(models.ft_sd, {})
    # The EMA of a short fine-tune: most of the way from the base to the fine-tuned weights.
    ema = {
        "model_ema." + key[len("model."):].replace(".", ""): (0.3 * base[key] + 0.7 * ft[key]).contiguous()
        for key in ft if key.startswith("model.diffusion_model.") and ft[key].is_floating_point()
    }
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(300, dtype=torch.int32)
    save_file(base, tmp_path / "v1.safetensors")
    torch.save({"state_dict": {**ft, **ema}, "global_step": 300}, tmp_path / "ft.ckpt")
    local.add_base(tmp_path / "v1.safetensors", "v1")

    rev = local.push(tmp_path / "ft.ckpt", "dog", exact=True)
    back = torch.load(local.checkout(rev.ref, tmp_path / "back.ckpt").path, weights_only=True)
    assert back["global_step"] == 300 and set(back["state_dict"]) == set(ft) | set(ema)
    assert all(torch.equal(back["state_dict"][k], v) for k, v in {**ft, **ema}.items())
    stored = {t.key: t for t in local.show(rev.ref).tensors}
    mirror = "model_ema.diffusion_modelconv_inweight"
    assert stored[mirror].kind == "exact" and stored["model_ema.decay"].kind == "full"
    # Against the weight it mirrors, an EMA weight costs about what the weight's own delta does.
    assert stored[mirror].stored_bytes < 1.5 * stored["model.diffusion_model.conv_in.weight"].stored_bytes + 200

    lossy = local.push(tmp_path / "ft.ckpt", "dog", energy=0.5)
    assert {t.key for t in local.show(lossy.ref).tensors} >= set(ema)
    without = local.push(tmp_path / "ft.ckpt", "dog", ema=False)
    out = torch.load(local.checkout(without.ref, tmp_path / "no-ema.ckpt").path, weights_only=True)
    assert set(out["state_dict"]) == set(ft) and without.stored_bytes < lossy.stored_bytes

"""Adapter files as subjects: LoRA from peft + diffusers, LoCon from lycoris-lora, and what they refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsreg import BaseMismatch, CheckpointError, IntegrityError, Registry, sd_tiny
from dsreg.cli.main import cli
from dsreg.deltasvd import FactoredSpectrum
from dsreg.names import Ref
from dsreg.tables import DerivedRow


@pytest.fixture
def local(tmp_path, pipelines) -> Registry:
    with Registry.open(home=tmp_path / "registry") as reg:
        reg.add_base(pipelines.base, "sd-tiny")
        yield reg


def _load(path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))


def _effect(got, expected, untouched) -> list[float]:
    """Each output's distance from the expected one, as a share of the adapter's effect on it."""
    shares = []
    for g, e, u in zip(got, expected, untouched):
        effect = float(torch.linalg.vector_norm(e - u))
        shares.append(float(torch.linalg.vector_norm(g - e)) / effect if effect else float(torch.linalg.vector_norm(g - e)))
    return shares  # an output the adapter leaves alone (a UNet-only LoCon's text encoder): its distance itself


def test_a_peft_lora_from_diffusers_is_a_subject(local, pipelines, adapter_files, tmp_path):
    size = adapter_files.peft.stat().st_size
    rev = local.push(adapter_files.peft, "dog")
    assert rev.rank_rule == "energy=1"  # an adapter keeps its own rank unless a rule is given
    assert rev.original_bytes == size and rev.stored_bytes <= size
    detail = local.show(rev.ref)
    lowrank = [t for t in detail.tensors if t.kind == "lowrank"]
    assert len(lowrank) == 60 and all(t.rank <= 4 for t in lowrank)  # every LoRA module; none above its rank
    assert {t.key.split("/")[0] for t in lowrank} == {"unet", "text_encoder"}

    local.checkout("dog", tmp_path / "dog")
    untouched = sd_tiny.outputs(_load(pipelines.base))
    checked_out = sd_tiny.outputs(_load(tmp_path / "dog"))
    for share in _effect(checked_out, adapter_files.peft_outputs, untouched):
        assert share < 2e-3  # the trained model's outputs, within the fp16 factors' rounding

    pipe = _load(pipelines.base)
    with local.apply(pipe, "dog"):
        applied = sd_tiny.outputs(pipe)
    for a, c in zip(applied, checked_out):
        assert torch.equal(a, c)

    # export-lora gives a file of the source's kind that diffusers loads, and it pushes back as the same subject.
    export = local.export_lora("dog", tmp_path / "dog-lora.safetensors")
    assert export.format == "peft" and export.left_out == ()
    pipe = _load(pipelines.base)
    pipe.load_lora_weights(str(export.path))
    for share in _effect(sd_tiny.outputs(pipe), checked_out, untouched):
        assert share < 2e-3
    again = local.push(export.path, "dog-again")
    assert again.stored_bytes <= export.nbytes
    local.checkout("dog-again", tmp_path / "again")
    for share in _effect(sd_tiny.outputs(_load(tmp_path / "again")), checked_out, untouched):
        assert share < 2e-3


def test_a_lycoris_locon_is_a_subject(local, pipelines, adapter_files, tmp_path):
    keys = load_file(adapter_files.locon).keys()
    assert any(k.endswith(".lora_mid.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    rev = local.push(adapter_files.locon, "cat")
    assert rev.stored_bytes <= adapter_files.locon.stat().st_size  # Tucker convs keep lora_mid: B would be 9x lora_down
    tucker = [t for t in local.show(rev.ref).tensors if t.kind == "lowrank" and len(t.shape) == 4 and t.shape[2] == 3]
    assert tucker and all(t.rank <= 4 for t in tucker)
    local.checkout("cat", tmp_path / "cat")
    untouched = sd_tiny.outputs(_load(pipelines.base))
    for share in _effect(sd_tiny.outputs(_load(tmp_path / "cat")), adapter_files.locon_outputs, untouched):
        assert share < 2e-3  # lycoris' own merge of its file, within fp16 rounding

    export = local.export_lora("cat", tmp_path / "cat-lora.safetensors")
    assert export.format == "kohya" and export.left_out == ()  # LyCORIS' diff_b goes back as diff_b
    assert "lora_unet_conv_out.diff_b" in load_file(export.path)
    # peft's lora_bias is one switch for all modules, and the attention projections have no bias.
    export = local.export_lora("cat", tmp_path / "cat-lora.safetensors", format="peft")
    assert export.left_out == ("unet/conv_out.bias",) and not any(k.endswith("lora_B.bias") for k in load_file(export.path))
    pipe = _load(pipelines.base)
    pipe.load_lora_weights(str(export.path))
    pipe.fuse_lora()  # as users do: diffusers refuses to fuse a lora_bias into a layer without a bias
    checked_out = sd_tiny.outputs(_load(tmp_path / "cat"))
    for share in _effect(sd_tiny.outputs(pipe), checked_out, untouched):
        assert share < 5e-2  # all but the conv_out bias's change


def test_rank_rules_and_encodings_apply_to_adapters(local, adapter_files):
    whole = local.push(adapter_files.peft, "dog")
    half = local.push(adapter_files.peft, "dog", energy=0.5, encoding="int8")
    assert half.stored_bytes < whole.stored_bytes / 2
    budget = local.push(adapter_files.peft, "dog", budget=whole.stored_bytes // 3)
    assert budget.stored_bytes <= whole.stored_bytes // 3
    exact = local.push(adapter_files.peft, "dog", exact=True)  # the merged tensors, bit for bit
    assert exact.stored_bytes > whole.stored_bytes


def _variant(adapter_files, tmp_path, change) -> str:
    tensors = load_file(adapter_files.locon)
    with safe_open(adapter_files.locon, "pt") as f:
        metadata = f.metadata()
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata=metadata)
    return str(path)


def _first(tensors, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _reshape_up(t):
    key = _first(t, "to_q.lora_up.weight")
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def _rename(t):
    key = _first(t, ".lora_up.weight")
    t[key.replace("lora_unet_", "lora_unet_no_such_")] = t.pop(key)
    t[key.replace("lora_unet_", "lora_unet_no_such_").replace("lora_up", "lora_down")] = t.pop(key.replace("lora_up", "lora_down"))


def _nan(t):
    key = _first(t, ".lora_down.weight")
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")


def _loha(t):
    t["lora_unet_conv_in.hada_w1_a"] = torch.zeros(4, 2)


def _alpha(t):
    t[_first(t, ".alpha")] = torch.ones(2)


def _one_factor(t):
    del t[_first(t, "to_k.lora_up.weight")]


@pytest.mark.parametrize("change, error, words", [
    (_reshape_up, BaseMismatch, "another base"),
    (_rename, BaseMismatch, "match no module of the base"),
    (_nan, CheckpointError, "NaN"),
    (_loha, CheckpointError, "LoHa"),
    (_alpha, CheckpointError, "alpha has 2 values"),
    (_one_factor, CheckpointError, "only one of its two LoRA factors"),
])
def test_bad_adapters_are_refused_and_store_nothing(local, adapter_files, tmp_path, change, error, words):
    path = _variant(adapter_files, tmp_path, change)
    objects = sorted(p.name for p in (tmp_path / "registry").rglob("*") if p.is_file() and "objects" in p.parts)
    with pytest.raises(error, match=words):
        local.push(path, "bad")
    assert local.subjects() == []
    assert sorted(p.name for p in (tmp_path / "registry").rglob("*") if p.is_file() and "objects" in p.parts) == objects


@pytest.mark.parametrize("change", [_loha, _one_factor])
def test_an_unreadable_adapter_file_exits_4_on_the_command_line(local, adapter_files, tmp_path, change):
    path = _variant(adapter_files, tmp_path, change)
    done = CliRunner().invoke(cli, ["--catalog", local.settings.catalog_url, "--store", local.settings.store_url, "push", str(path), "-s", "bad"])
    assert done.exit_code == 4, done.output


def test_rank_in_metadata_must_match_the_tensors(local, adapter_files, tmp_path):
    tensors = load_file(adapter_files.peft)
    with safe_open(adapter_files.peft, "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.r"] = 8
    save_file(tensors, tmp_path / "bad.safetensors", metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(CheckpointError, match="rank 4 in its tensors but r = 8"):
        local.push(tmp_path / "bad.safetensors", "bad")


def test_a_full_checkpoint_is_not_read_as_an_adapter(local, pipelines, adapter_files, tmp_path):
    """A checkpoint in a file named like a LoRA is pushed as a checkpoint; a LoRA named .ckpt as a LoRA."""
    unet = load_file(pipelines.ft_unet / "unet" / "diffusion_pytorch_model.safetensors")
    save_file(unet, tmp_path / "my-lora.safetensors")
    rev = local.push(tmp_path / "my-lora.safetensors", "unet-only")
    assert "adapter" not in local.catalog.revision_layout(Ref(rev.subject, rev.number))
    torch.save(load_file(adapter_files.locon), tmp_path / "model.ckpt")
    rev = local.push(tmp_path / "model.ckpt", "locon")
    assert local.catalog.revision_layout(Ref(rev.subject, rev.number))["adapter"]["format"] == "kohya"


def test_factored_spectrum_is_the_products_svd():
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(40, 5, generator=g), torch.randn(5, 72, generator=g)
    product = (up.double() @ down.double())
    spectrum = FactoredSpectrum(up, down)
    assert torch.allclose(spectrum.s, torch.linalg.svdvals(product)[:5], rtol=1e-10)
    a, b = spectrum.factors(5)
    assert torch.allclose(a.double() @ b.double(), product, atol=1e-4)
    a3, b3 = spectrum.factors(3)
    measured = float(torch.linalg.norm(product - a3.double() @ b3.double()) / torch.linalg.norm(product))
    assert abs(spectrum.error_of(a3, b3) - measured) < 1e-6
    assert spectrum.rank("energy", 1.0) == 5 and spectrum.rank("max-error", 0.0) == 5


def _deft_finetune(base_sd: dict, rank: int, steps: int = 30) -> dict:
    """DEFT's parametrization trained for real: each 2-D weight (conv kernels as out x in·kh·kw) is
    W = (I − PPᵀ)W₀ + P·R with P (out x rank) and R (rank x in·kh·kw) trained by Adam, the rest frozen."""
    from torch.func import functional_call

    from dsreg.demo import TinyUNet, _batch, reproducible

    torch.manual_seed(7)
    model = TinyUNet(32)
    model.load_state_dict(base_sd)
    frozen = {k: v.clone() for k, v in base_sd.items()}
    factors = {}
    for key, w in frozen.items():
        if w.dim() >= 2 and "embedding" not in key and w.shape[0] > rank:
            w0 = w.reshape(w.shape[0], -1)
            p = torch.linalg.qr(torch.randn(w0.shape[0], rank))[0].requires_grad_()
            factors[key] = (p, (p.detach().T @ w0).clone().requires_grad_())  # R = PᵀW₀: W starts at W₀

    def weights() -> dict:
        out = dict(frozen)
        for key, (p, r) in factors.items():
            w0 = frozen[key].reshape(frozen[key].shape[0], -1)
            out[key] = (w0 - p @ (p.T @ w0) + p @ r).reshape(frozen[key].shape)
        return out

    opt = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=2e-3)
    gen = torch.Generator().manual_seed(11)
    with reproducible():
        for _ in range(steps):
            x, t, toks, noise = _batch(gen, 16, subject=3)
            loss = torch.nn.functional.mse_loss(functional_call(model, weights(), (x, t, toks)), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return {k: v.detach().clone().contiguous() for k, v in weights().items()}, set(factors)


def test_a_merged_deft_finetune_is_stored_at_its_rank_without_loss(tmp_path):
    """DEFT's update P(R − PᵀW₀) has rank <= r: pushed as a full checkpoint it is stored at rank <= 2r,
    and the rebuilt model computes what the DEFT model does."""
    from dsreg.demo import functional_error, make_base, state_dict

    rank = 4
    base_sd = state_dict(make_base(32, steps=5))
    ft_sd, trained = _deft_finetune(base_sd, rank)
    save_file(base_sd, tmp_path / "base.safetensors")
    save_file(ft_sd, tmp_path / "deft.safetensors")
    with Registry.open(home=tmp_path / "registry") as reg:
        reg.add_base(tmp_path / "base.safetensors", "tiny")
        rev = reg.push(tmp_path / "deft.safetensors", "deft", max_error=1e-3, encoding="fp32")
        stored = {t.key: t for t in reg.show(rev.ref).tensors}
        reg.checkout("deft", tmp_path / "out.safetensors")
    assert {k for k, t in stored.items() if t.kind != "base"} == trained
    # Two attention projections get no gradient (one context token: a constant softmax); their
    # "delta" is the fp32 rounding of W₀ − PPᵀW₀ + PPᵀW₀, full rank at 2e-8 of the weight.
    moved = {k for k in trained if float((ft_sd[k] - base_sd[k]).norm() / base_sd[k].norm()) > 1e-6}
    assert len(moved) >= len(trained) - 2
    assert all(stored[k].kind == "lowrank" and stored[k].rank <= 2 * rank for k in moved)
    assert functional_error(base_sd, ft_sd, load_file(tmp_path / "out.safetensors")) < 1e-3


def test_an_svdiff_subject_stores_its_shifts_and_the_base_svd_once(local, pipelines, adapter_files, tmp_path):
    files = sum(p.stat().st_size for p in adapter_files.svdiff.iterdir())
    rev = local.push(adapter_files.svdiff, "sks")
    spectral = [t for t in local.show(rev.ref).tensors if t.kind == "spectral"]
    assert {t.key.split("/")[0] for t in spectral} == {"unet", "text_encoder"}
    assert rev.stored_bytes <= files  # the shifts themselves; the base's SVD is the base's, shared
    with local.catalog.session() as s:
        svds = s.execute(sa.select(DerivedRow.blob_digest)).scalars().all()
    base = {t.key: t.tensor_digest for t in local.catalog.base_tensors("sd-tiny")}
    assert len(svds) == len({base[t.key] for t in spectral})  # equal base tensors (fresh norms) share one SVD

    # What the command line says it stored: shifts, whole, not a rank rule and fp16 factors.
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "registry"), "push", str(adapter_files.svdiff), "-s", "sks"])
    assert result.exit_code == 0 and "svdiff shifts, kept whole (fp32)" in result.output, result.output

    local.checkout("sks", tmp_path / "sks")
    untouched = sd_tiny.outputs(_load(pipelines.base))
    checked_out = sd_tiny.outputs(_load(tmp_path / "sks"))
    for share in _effect(checked_out, adapter_files.svdiff_outputs, untouched):
        assert share < 1e-3  # the SVDiff-trained model's outputs
    pipe = _load(pipelines.base)
    with local.apply(pipe, "sks"):
        for a, c in zip(sd_tiny.outputs(pipe), checked_out):
            assert torch.equal(a, c)

    # A second subject of the same base reuses every SVD; gc keeps them while the base is there.
    local.push(adapter_files.svdiff, "sks-again")
    with local.catalog.session() as s:
        assert sorted(s.execute(sa.select(DerivedRow.blob_digest)).scalars().all()) == sorted(svds)
    local.rm("sks")
    local.rm("sks-again")
    local.gc(grace=0)
    report = local.verify(full=True)
    assert report.ok and all(local.store.exists(d) for d in svds)
    again = local.push(adapter_files.svdiff, "sks")
    local.checkout(again.ref, tmp_path / "again")
    assert all(torch.equal(a, c) for a, c in zip(sd_tiny.outputs(_load(tmp_path / "again")), checked_out))

    # A damaged SVD blob is found by its digest, and nothing is written.
    path = local.store.path(svds[0])
    Path(path).write_bytes(b"not an svd")
    with pytest.raises(IntegrityError):
        local.checkout("sks", tmp_path / "broken")
    assert not (tmp_path / "broken").exists()

    # The SVDs go with the last base that holds their tensors.
    local.rm("sks")
    local.remove_base("sd-tiny")
    with local.catalog.session() as s:
        assert s.execute(sa.select(DerivedRow)).all() == []


def test_svdiff_shifts_longer_than_the_layers_rank_are_refused(local, adapter_files, tmp_path):
    shifts = load_file(adapter_files.svdiff / "spectral_shifts.safetensors")
    key = sorted(shifts)[0]
    shifts[key] = torch.zeros(shifts[key].numel() + 1)
    (tmp_path / "bad").mkdir()
    save_file(shifts, tmp_path / "bad" / "spectral_shifts.safetensors")
    with pytest.raises(CheckpointError, match="singular values"):
        local.push(tmp_path / "bad", "bad")
    assert local.subjects() == []


def test_the_stored_svd_makes_rebuilds_reproducible():
    """Two valid SVDs of a weight with a repeated singular value rebuild different weights for the
    same shifts; one stored SVD rebuilds the same bits every time. Between machines, only the fp32
    product's rounding is left: within a few ulps of the weight."""
    from dsreg import spectral

    g = torch.Generator().manual_seed(5)
    q1 = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(24, 16, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([4.0, 2.0, 2.0, 2.0] + [1.0] * 12, dtype=torch.float64)  # σ = 2 three times, σ = 1 twelve times
    weight = (q1 * s) @ q2.T
    shift = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)

    one = spectral.decompose(weight.float())
    # Another SVD, as valid: U and V rotated alike within the σ = 1 group.
    rot = torch.eye(16, dtype=torch.float64)
    rot[4:, 4:] = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    other = {"u": (one["u"].double() @ rot).float(), "s": one["s"], "vh": (rot.T @ one["vh"].double()).float()}
    assert torch.allclose((other["u"].double() * other["s"]) @ other["vh"].double(), weight, atol=1e-5)

    a, b = spectral.change((16, 24), one, shift), spectral.change((16, 24), other, shift)
    assert float((a - b).abs().max()) > 0.01  # as large as the shifts within the group
    assert torch.equal(a, spectral.change((16, 24), one, shift))  # the stored one: the same bits
    # What is left between machines: the same U, σ, V multiplied in fp64 instead of fp32.
    exact = ((one["u"].double() * (torch.relu(one["s"] + shift) - one["s"])) @ one["vh"].double())
    assert float((a.double() - exact).abs().max()) < 8 * torch.finfo(torch.float32).eps * float(weight.abs().max())


_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_FIXED_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _to_ldm(key: str, layers: int, up_attentions: set[int]) -> str:
    """The tests' own diffusers -> LDM renaming of a UNet key, held to diffusers' converter below."""
    module, _, leaf = key.rpartition(".")
    if module in _FIXED_LDM:
        return f"{_FIXED_LDM[module]}.{leaf}"
    parts = module.split(".")
    if parts[0] == "mid_block":
        k, rest = int(parts[2]), ".".join(parts[3:])
        return (f"middle_block.{2 * k}.{_RESNET_LDM.get(rest, rest)}" if parts[1] == "resnets" else f"middle_block.{2 * k + 1}.{rest}") + "." + leaf
    block, kind = int(parts[1]), parts[2]
    if kind == "downsamplers":
        return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{leaf}"
    if kind == "upsamplers":
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if block in up_attentions else 1}.conv.{leaf}"
    layer, rest = int(parts[3]), ".".join(parts[4:])
    n = block * (layers + 1) + layer + (1 if parts[0] == "down_blocks" else 0)
    where = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    return (f"{where}.{n}.0.{_RESNET_LDM.get(rest, rest)}" if kind == "resnets" else f"{where}.{n}.1.{rest}") + "." + leaf


def _ldm_names(unet) -> dict[str, str]:
    up_attentions = {i for i, b in enumerate(unet.config.up_block_types) if "Attn" in b}
    return {k: _to_ldm(k, unet.config.layers_per_block, up_attentions) for k in unet.state_dict()}


@pytest.mark.parametrize("shape", ["sd-tiny", "sd15"])
def test_ldm_unet_names_map_to_diffusers_as_diffusers_converts_them(pipelines, shape):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from dsreg import unet_names

    if shape == "sd15":
        with torch.device("meta"):  # the default config is SD1.5's layout; names only, no memory
            unet = UNet2DConditionModel(cross_attention_dim=768)
    else:
        unet = _load(pipelines.base).unet
    sd = unet.state_dict()
    ldm = {name: sd[k] for k, name in _ldm_names(unet).items()}
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, dict(unet.config))
    assert {k: id(v) for k, v in converted.items()} == {k: id(v) for k, v in sd.items()}

    modules = sorted({k.rsplit(".", 1)[0] for k in ldm})
    layers = unet_names.layers_per_block(modules)
    assert layers == unet.config.layers_per_block
    by_tensor = {id(v): k for k, v in converted.items()}
    for key, value in ldm.items():
        module = key.rsplit(".", 1)[0]
        assert unet_names.diffusers_module(module, layers) == by_tensor[id(value)].rsplit(".", 1)[0], key


def test_adapters_with_diffusers_names_push_against_an_ldm_single_file_base(local, pipelines, adapter_files, tmp_path):
    """kohya's, diffusers' and SVDiff's files name an SD1.5 single file's UNet modules as diffusers
    does: they merge into the LDM base exactly as into the same base stored as a diffusers pipeline."""
    pipe = _load(pipelines.base)
    rename = {f"unet/{k}": f"model.diffusion_model.{name}" for k, name in _ldm_names(pipe.unet).items()}
    text = {k: v for k, v in pipe.text_encoder.state_dict().items()}
    rename.update({f"text_encoder/{k}": "cond_stage_model.transformer.text_model." + k.removeprefix("text_model.") for k in text})
    single = {rename[f"unet/{k}"]: v for k, v in pipe.unet.state_dict().items()}
    single.update({rename[f"text_encoder/{k}"]: v for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in single.items()}, tmp_path / "v1.safetensors")
    local.add_base(tmp_path / "v1.safetensors", "v1")

    for name, file in (("locon", adapter_files.locon), ("peft", adapter_files.peft), ("svdiff", adapter_files.svdiff)):
        on_ldm = local.push(file, f"{name}-ldm", base="v1")
        on_pipeline = local.push(file, f"{name}-pipeline", base="sd-tiny")
        assert on_ldm.stored_bytes <= on_ldm.original_bytes and on_pipeline.stored_bytes <= on_pipeline.original_bytes
        ldm = load_file(local.checkout(f"{name}-ldm", tmp_path / f"{name}-ldm.safetensors").path)
        folder = local.checkout(f"{name}-pipeline", tmp_path / f"{name}-pipeline").path
        merged = {f"unet/{k}": v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()}
        merged.update({f"text_encoder/{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()})
        assert {rename[k] for k in merged} == set(ldm)
        changed = [k for k in merged if not torch.equal(merged[k], single[rename[k]])]
        assert changed and any(k.startswith("unet/") for k in changed)
        for k, v in merged.items():
            assert torch.equal(ldm[rename[k]], v), k

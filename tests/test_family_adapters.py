"""SDXL and Flux adapter files in every common format, against a base stored in either layout:
the checkout equals diffusers' own merge of the same file, apply equals the checkout, bytes stay
within the file's, bad files are refused whole; and export-lora writes files that diffusers loads
and fuses, in the layout each format's loaders expect."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsreg import BaseMismatch, Registry, adapters
from dsreg.catalog import BaseTensor
from dsreg.checkpoint import open_checkpoint
from dsreg.cli.main import cli
from dsreg.errors import CheckpointError
from dsreg.names import Ref

from .conftest import snapshot
from .family_adapters import FLUX_DOUBLE_TARGETS, diffusers_merge, kohya_flux, kohya_sdxl, lycoris_lora, peft_lora, xlabs_flux
from .family_models import build, in_layout, state

pytest.importorskip("diffusers")

LAYOUTS = ["diffusers", "original"]


@pytest.fixture(scope="session")
def family_adapter_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("family-adapters")
    files = {}
    for family in ("flux", "unet"):
        model = build(family)
        model.save_pretrained(d / f"{family}-base-diffusers")
        save_file(in_layout(state(model), "original"), d / f"{family}-base-original.safetensors")
    files["flux-peft"] = peft_lora("flux", d / "flux-peft")  # the folder save_lora_weights writes
    files["flux-peft-bias"] = peft_lora("flux", d / "flux-peft-bias", lora_bias=True)  # a control LoRA's lora_B.bias
    files["flux-peft-double"] = peft_lora("flux", d / "flux-peft-double", targets=FLUX_DOUBLE_TARGETS)
    files["sdxl-peft"] = peft_lora("unet", d / "sdxl-peft")
    files["sdxl-kohya"] = kohya_sdxl(d / "sdxl-peft", d / "sdxl-kohya.safetensors")
    files["flux-xlabs"] = xlabs_flux(d / "flux-xlabs.safetensors")
    files["flux-kohya"] = kohya_flux(d / "flux-kohya.safetensors")
    files["flux-kohya-te"] = kohya_flux(d / "flux-kohya-te.safetensors", with_text_encoder=True)
    files["flux-lycoris"] = lycoris_lora("flux", d / "flux-lycoris.safetensors")
    files["sdxl-lycoris"] = lycoris_lora("unet", d / "sdxl-lycoris.safetensors")
    return d, files


def _family(name: str) -> str:
    return "flux" if name.startswith("flux") else "unet"


def _base(d, family: str, layout: str):
    return d / f"{family}-base-diffusers" if layout == "diffusers" else d / f"{family}-base-original.safetensors"


def _file_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _checked_out(reg: Registry, ref: str, tmp_path) -> dict[str, torch.Tensor]:
    return load_file(reg.checkout(ref, tmp_path / f"{ref}.safetensors", layout="diffusers", format="safetensors", overwrite=True).path)


def _close(got: dict, want: dict, base: dict, tol: float) -> None:
    """Every tensor within ``tol`` of ``want`` relative to the change ``want`` makes, and the same
    tensors changed."""
    assert got.keys() == want.keys()
    for key in want:
        change = (want[key].float() - base[key].float()).abs().max()
        if change == 0:
            assert torch.equal(got[key], base[key]), key
        else:
            assert (got[key].float() - want[key].float()).abs().max() <= tol * change, key


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["flux-peft", "flux-peft-bias", "flux-xlabs", "sdxl-peft", "sdxl-kohya"])
def test_a_file_checks_out_as_diffusers_merges_it(family_adapter_files, tmp_path, name, layout):
    d, files = family_adapter_files
    family = _family(name)
    want, base = diffusers_merge(family, files[name]), state(build(family))
    with Registry.open(home=tmp_path / "reg") as reg:
        reg.add_base(_base(d, family, layout), "b")
        exact = reg.push(files[name], "exact", encoding="fp32")
        _close(_checked_out(reg, "exact", tmp_path), want, base, 1e-4)
        rev = reg.push(files[name], "s")  # as users push: fp16 factors
        assert rev.stored_bytes <= 1.05 * _file_bytes(files[name])
        checkout = _checked_out(reg, "s", tmp_path)
        _close(checkout, want, base, 2e-3)
        live = build(family)  # apply into a live diffusers model: the checkout's values
        with reg.apply(live, "s"):
            assert all(torch.equal(v, checkout[k]) for k, v in live.state_dict().items())
        assert all(torch.equal(v, base[k]) for k, v in live.state_dict().items())
        assert exact.n_changed == rev.n_changed > 0


@pytest.mark.parametrize("name", ["flux-lycoris", "sdxl-lycoris"])
def test_lycoris_files_with_their_own_prefix_check_out_as_lycoris_merges_them(family_adapter_files, tmp_path, name):
    from lycoris import create_lycoris_from_weights

    d, files = family_adapter_files
    family = _family(name)
    assert all(k.startswith("lycoris_") for k in load_file(files[name]))
    model = build(family)
    network, _ = create_lycoris_from_weights(1.0, str(files[name]), model)
    network.merge_to()
    want, base = state(model), state(build(family))
    for layout in LAYOUTS:
        with Registry.open(home=tmp_path / layout) as reg:
            reg.add_base(_base(d, family, layout), "b")
            reg.push(files[name], "s", encoding="fp32")
            _close(_checked_out(reg, "s", tmp_path), want, base, 1e-4)


def _merged_fused(original: dict, lora: dict) -> dict:
    """A kohya LoRA merged by hand into the original-layout weights: W += alpha / rank · up · down."""
    out = dict(original)
    for key in lora:
        if key.endswith(".lora_down.weight") and key.startswith("lora_unet_"):
            name = key[: -len(".lora_down.weight")]
            down, up = lora[key], lora[name + ".lora_up.weight"]
            weight = next(k for k in original if "lora_unet_" + k[: -len(".weight")].replace(".", "_") == name)
            out[weight] = original[weight] + (float(lora[name + ".alpha"]) / down.shape[0]) * (up @ down)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_kohya_flux_lora_on_fused_qkv_stores_its_down_once(family_adapter_files, tmp_path, layout):
    d, files = family_adapter_files
    base = state(build("flux"))
    want = in_layout(_merged_fused(in_layout(base, "original"), load_file(files["flux-kohya"])), "diffusers")
    with Registry.open(home=tmp_path / "reg") as reg:
        reg.add_base(_base(d, "flux", layout), "b")
        before = snapshot(reg)
        with pytest.raises(BaseMismatch, match=r"text_encoder modules .*--only unet") as info:
            reg.push(files["flux-kohya-te"], "te")
        assert "\n" not in str(info.value) and snapshot(reg) == before
        with_te = reg.push(files["flux-kohya-te"], "te", only=("transformer",))
        left_out = reg.catalog.revision_layout(Ref(with_te.subject, with_te.number))["adapter"]["left_out"]
        assert left_out and all(m.startswith("lora_te1_") for m in left_out)
        rev = reg.push(files["flux-kohya"], "s", encoding="fp32")
        _close(_checked_out(reg, "s", tmp_path), want, base, 1e-4)
        # Against split q, k, v the fused LoRA's factors are one blob that each tensor's entry names.
        blobs = {t.key: t for t in reg.show(rev.ref).tensors}
        q, k = blobs.get("transformer_blocks.0.attn.to_q.weight"), blobs.get("transformer_blocks.0.attn.to_k.weight")
        if layout == "diffusers":
            assert q.blob == k.blob
        assert rev.stored_bytes <= 1.05 * _file_bytes(files["flux-kohya"])


def _records(sd: dict) -> dict[str, BaseTensor]:
    return {k: BaseTensor(k, "bf16", tuple(v.shape), "", "", 0) for k, v in sd.items()}


def test_kohya_and_xlabs_flux_names_read_as_diffusers_reads_them_at_full_width(tmp_path):
    """diffusers' kohya Flux converter cuts linear1 at Flux.1's widths (3072, 12288), so a tiny
    model cannot show it: compare the changes per diffusers module at full width, rank 2, on shapes alone."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers, _convert_xlabs_flux_lora_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    diffusers_sd = model.state_dict()
    original = {s: torch.empty(v.shape, device="meta") for s, v in in_layout({k: v for k, v in diffusers_sd.items()}, "original").items()}
    g = torch.Generator().manual_seed(3)
    kohya, xlabs = {}, {}
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_mlp.0", "single_blocks.0.linear2"):
        out, inner = original[module + ".weight"].shape
        name = "lora_unet_" + module.replace(".", "_")
        kohya.update({f"{name}.lora_down.weight": torch.randn(2, inner, generator=g), f"{name}.lora_up.weight": torch.randn(out, 2, generator=g),
                      f"{name}.alpha": torch.tensor(1.0)})
    for module, out in (("double_blocks.0.processor.qkv_lora1", 9216), ("double_blocks.0.processor.proj_lora2", 3072), ("single_blocks.0.processor.qkv_lora", 9216)):
        xlabs.update({f"{module}.down.weight": torch.randn(2, 3072, generator=g), f"{module}.up.weight": torch.randn(out, 2, generator=g)})
    for files, convert in ((kohya, _convert_kohya_flux_lora_to_diffusers), (xlabs, _convert_xlabs_flux_lora_to_diffusers)):
        theirs = convert({k: v.clone() for k, v in files.items()})
        expected = {}
        for key in theirs:
            if key.endswith(".lora_A.weight"):
                module = key[len("transformer."): -len(".lora_A.weight")]
                expected[module + ".weight"] = theirs[key.replace("lora_A", "lora_B")] @ theirs[key]
        path = tmp_path / f"{len(files)}.safetensors"
        save_file(files, path)
        with open_checkpoint(path) as ckpt:
            adapter = adapters.read(ckpt)
        ours = adapters.updates(adapter, _records(diffusers_sd))
        assert set(ours) == set(expected)
        for key, update in ours.items():
            got = update.delta(tuple(diffusers_sd[key].shape))
            assert torch.allclose(got, expected[key].reshape(got.shape), rtol=1e-4, atol=1e-4), key
        # Against the original layout each module is whole, or (XLabs' single-block qkv) the first rows of linear1.
        fused = adapters.updates(adapter, _records(original))
        assert set(fused) <= {k for k in original if k.endswith(".weight")}



def _bad(files, tmp_path, change) -> str:
    tensors = load_file(files["flux-kohya"])
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    return path


def _too_wide(t):  # rank 40 on a 16 x 16 layer
    name = "lora_unet_double_blocks_0_img_attn_proj"
    t[name + ".lora_down.weight"], t[name + ".lora_up.weight"] = torch.randn(40, 16), torch.randn(16, 40)


def _nan(t):
    t["lora_unet_single_blocks_0_linear1.lora_up.weight"][0, 0] = float("nan")


def _stray(t):
    t["lora_unet_double_blocks_0_img_attn_nothing.lora_down.weight"] = torch.zeros(4, 16)
    t["lora_unet_double_blocks_0_img_attn_nothing.lora_up.weight"] = torch.zeros(16, 4)


def _uneven(t):  # a fused qkv LoRA whose up has one row too many: it cannot split into q, k, v
    name = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    t[name] = torch.cat([t[name], t[name][:1]])


def _alpha_zero(t):
    t["lora_unet_double_blocks_0_img_attn_proj.alpha"] = torch.tensor(0.0)


def _dora(t):
    t["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, 16)


@pytest.mark.parametrize("change, error, words", [
    (_too_wide, CheckpointError, "rank 40, more than its 16 x 16 layer"),
    (_nan, CheckpointError, "NaN"),
    (_stray, BaseMismatch, "match no module of the base"),
    (_uneven, BaseMismatch, "LoRA of 49 x 16"),
    (_alpha_zero, CheckpointError, "alpha 0, which LyCORIS reads as scale 1 and diffusers"),
    (_dora, CheckpointError, "DoRA .* full-rank change"),
])
def test_bad_family_adapters_are_refused_in_one_line_and_store_nothing(family_adapter_files, tmp_path, change, error, words):
    d, files = family_adapter_files
    path = _bad(files, tmp_path, change)
    with Registry.open(home=tmp_path / "reg") as reg:
        reg.add_base(_base(d, "flux", "diffusers"), "b")
        before = snapshot(reg)
        with pytest.raises(error, match=words) as info:
            reg.push(path, "s")
        assert "\n" not in str(info.value) and snapshot(reg) == before


def test_push_from_the_command_line_reads_a_lora_folder_and_names_what_it_left_out(family_adapter_files, tmp_path):
    d, files = family_adapter_files
    home = str(tmp_path / "reg")
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", home, "base", "add", str(_base(d, "flux", "original")), "--name", "flux"]).exit_code == 0
    result = runner.invoke(cli, ["--home", home, "push", str(files["flux-peft"]), "-s", "folder"])
    assert result.exit_code == 0, result.output
    refused = runner.invoke(cli, ["--home", home, "push", str(files["flux-kohya-te"]), "-s", "te"])
    assert refused.exit_code == 5 and "--only unet" in refused.output
    result = runner.invoke(cli, ["--home", home, "push", str(files["flux-kohya-te"]), "-s", "te", "--only", "unet"])
    assert result.exit_code == 0, result.output
    assert "adapter" in runner.invoke(cli, ["push", "--help"]).output


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_writes_each_format_in_its_loaders_layout_and_diffusers_fuses_peft(family_adapter_files, tmp_path, layout):
    """kohya names are BFL's (fused qkv, linear1), peft's diffusers' (split), whatever the base's
    layout; diffusers loads, fuses and unfuses the peft file to the checkout; the kohya file, read
    back, is the same subject (diffusers' kohya Flux converter cuts linear1 at Flux.1's widths: a
    tiny subject's double blocks alone go through it, below)."""
    d, files = family_adapter_files
    base = state(build("flux"))
    with Registry.open(home=tmp_path / "reg") as reg:
        reg.add_base(_base(d, "flux", layout), "b")
        reg.push(files["flux-peft-bias"], "s")
        checkout = _checked_out(reg, "s", tmp_path)
        kohya = reg.export_lora("s", tmp_path / "kohya.safetensors", format="kohya")
        peft = reg.export_lora("s", tmp_path / "peft.safetensors", format="peft")
        assert kohya.left_out == () == peft.left_out
        names = set(load_file(kohya.path))
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in names and "lora_unet_single_blocks_0_linear1.diff_b" in names
        assert "transformer.transformer_blocks.0.attn.to_q.lora_B.bias" in load_file(peft.path)
        _close(diffusers_merge("flux", peft.path), checkout, base, 2e-3)
        unfused = _unfused("flux", peft.path)  # back to the base, to float rounding
        assert all(torch.allclose(unfused[k], base[k], rtol=0, atol=1e-6) for k in base)
        reg.push(kohya.path, "back", base="b")
        _close(_checked_out(reg, "back", tmp_path), checkout, base, 2e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_kohya_flux_export_loads_and_fuses_in_diffusers(family_adapter_files, tmp_path, layout):
    """Split q, k, v LoRAs exported in kohya's fused names (a block-diagonal up: sd-scripts'
    split_qkv form), read by diffusers' kohya Flux converter, fuse to the checkout."""
    d, files = family_adapter_files
    base = state(build("flux"))
    with Registry.open(home=tmp_path / "reg") as reg:
        reg.add_base(_base(d, "flux", layout), "b")
        reg.push(files["flux-peft-double"], "s")
        kohya = reg.export_lora("s", tmp_path / "kohya.safetensors", format="kohya")
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in load_file(kohya.path) and kohya.left_out == ()
        _close(diffusers_merge("flux", kohya.path), _checked_out(reg, "s", tmp_path), base, 2e-3)


def _unfused(family: str, lora) -> dict:
    from .family_adapters import pipeline_class

    model = build(family)
    cls = pipeline_class(family)
    pipe = cls(transformer=model, scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return state(model)


def test_an_sdxl_subject_exports_in_both_formats_from_either_layout(family_adapter_files, tmp_path):
    d, files = family_adapter_files
    base = state(build("unet"))
    for layout in LAYOUTS:
        with Registry.open(home=tmp_path / layout) as reg:
            reg.add_base(_base(d, "unet", layout), "b")
            reg.push(files["sdxl-peft"], "s")
            checkout = _checked_out(reg, "s", tmp_path)
            for fmt in ("kohya", "peft"):
                export = reg.export_lora("s", tmp_path / f"{layout}-{fmt}.safetensors", format=fmt)
                _close(diffusers_merge("unet", export.path), checkout, base, 2e-3)
            with safe_open(tmp_path / f"{layout}-peft.safetensors", "pt") as f:
                assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_bias"] is False


def test_shared_and_block_factor_blobs_rebuild_by_the_spec(family_adapter_files, tmp_path):
    """docs/format.md's shared and block lowrank blobs, read with raw SQL, zstd and safetensors."""
    import sqlite3

    from .test_format_spec import _blob

    d, files = family_adapter_files
    home = tmp_path / "reg"
    kinds = set()
    for layout, name in (("diffusers", "flux-kohya"), ("original", "flux-peft")):
        with Registry.open(home=home / layout) as reg:
            reg.add_base(_base(d, "flux", layout), "b")
            reg.push(files[name], "s")
            ours = load_file(reg.checkout("s", tmp_path / f"{layout}.safetensors").path)
        db = sqlite3.connect(home / layout / "catalog.db")
        root = home / layout / "blobs"
        base = {key: _blob(root, blob)["tensor"] for key, blob in db.execute("SELECT key, blob_digest FROM base_tensors")}
        for key, shape, blob in db.execute("SELECT key, shape, blob_digest FROM entries WHERE kind = 'lowrank'"):
            shape, stored = tuple(json.loads(shape)), _blob(root, blob)
            if "rows.keys" in stored:
                keys = bytes(stored["rows.keys"].tolist()).decode().split("\n")
                start, stop = stored["rows.span"][keys.index(key)].tolist()
                a, b = stored["a"].float()[start:stop], stored["b"].float()
                kinds.add("shared")
            elif "blocks.span" in stored:
                spans = stored["blocks.span"].tolist()
                ups = [stored[f"blocks.{i}.a"].float() for i in range(len(spans))]
                a = torch.zeros(int(stored["blocks.rows"]), sum(u.shape[1] for u in ups))
                column = 0
                for (lo, hi), up in zip(spans, ups):
                    a[lo:hi, column:column + up.shape[1]] = up
                    column += up.shape[1]
                b = torch.cat([stored[f"blocks.{i}.b"].float() for i in range(len(spans))])
                kinds.add("blocks")
            else:
                a, b = stored["a"].float(), stored["b"].float()
            w = base[key].float().reshape(shape[0], -1) + a @ b
            assert torch.allclose(w.reshape(shape), ours[key].float(), rtol=1e-5, atol=1e-6), key
    assert kinds == {"shared", "blocks"}

"""Subjects in memory: ``load`` gives checkout's tensors, ``apply`` writes a subject into a live
diffusers module or pipeline, switches it to another and restores the base bit for bit, and refuses
(or undoes) whatever would leave the module in a state nobody asked for."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from dsreg import BaseMismatch, IntegrityError, Registry
from dsreg.demo import TinyUNet
from dsreg.names import Ref

from dsreg import sd_tiny
from .test_corruption import _damage

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _unet(folder) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(folder / "unet").eval()


def _bits(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k], b[k].view(torch.uint8) if b[k].is_floating_point() else b[k]) for k in a)


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    x, t, cond = sd_tiny.unet_inputs()
    dtype = next(unet.parameters()).dtype
    return unet(x.to(dtype), t, cond.to(dtype)).sample.float()


def _two_subjects(reg: Registry, pipelines) -> Registry:
    """Two real UNet fine-tunes (Adam steps) of the tiny pipeline, pushed against its base."""
    reg.add_base(pipelines.base, "sd-tiny")
    reg.push(pipelines.ft_unet / "unet", "a")
    reg.push(pipelines.ft / "unet", "b")
    return reg


@pytest.fixture
def subjects(reg: Registry, pipelines):
    """On both engine pairs: for the tests whose outcome depends on reading the store."""
    return _two_subjects(reg, pipelines)


@pytest.fixture
def local(tmp_path) -> Registry:
    with Registry.open(home=tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def local_subjects(local: Registry, pipelines):
    """On the embedded default: for the tests of what apply does to a module once the blobs are read."""
    return _two_subjects(local, pipelines)


def test_load_equals_the_checkout(subjects, pipelines, tmp_path):
    reg = subjects
    reg.checkout("a", tmp_path / "a.safetensors")
    on_disk = load_file(tmp_path / "a.safetensors")
    loaded = reg.load("a", device="cpu")
    assert _same_bits(loaded, on_disk)
    half = reg.load("a", device="cpu", dtype="fp16")
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], on_disk[k].half()) for k in on_disk)


def test_apply_gives_the_checkouts_outputs_switches_and_restores_the_base(subjects, pipelines, tmp_path):
    reg = subjects
    unet = _unet(pipelines.base)
    base_bits, base_out = _bits(unet), _unet_out(unet)
    expected = {}
    for name in ("a", "b"):
        reg.checkout(name, tmp_path / name)  # a UNet folder, as the subject was pushed
        expected[name] = (_bits(UNet2DConditionModel.from_pretrained(tmp_path / name)), _unet_out(UNet2DConditionModel.from_pretrained(tmp_path / name).eval()))

    with reg.apply(unet, "a") as applied:
        assert applied.active and applied.ref == "a@1"
        assert _same_bits(_bits(unet), expected["a"][0])
        assert torch.equal(_unet_out(unet), expected["a"][1])
        switched = reg.apply(unet, "b")  # A -> B directly: as if restored, then B applied
        assert not applied.active and switched.active
        assert _same_bits(_bits(unet), expected["b"][0])
        assert torch.equal(_unet_out(unet), expected["b"][1])
        reg.apply(unet, "a")
        assert _same_bits(_bits(unet), expected["a"][0])
    # Leaving the block gives back what the module held when it was entered: the base.
    assert _same_bits(_bits(unet), base_bits)
    assert torch.equal(_unet_out(unet), base_out)
    reg.apply(unet, "b").restore()
    assert _same_bits(_bits(unet), base_bits)


def test_a_switch_writes_only_what_either_subject_changes(local, models, tmp_path):
    from safetensors.torch import save_file

    local.add_base(models.base, "tiny")
    local.push(models.ft, "whole")
    one_layer = dict(models.base_sd, **{"conv_in.weight": models.base_sd["conv_in.weight"] + 0.01})
    save_file(one_layer, tmp_path / "one-layer.safetensors")
    local.push(tmp_path / "one-layer.safetensors", "one-layer")
    module = _tiny(models.base_sd)
    local.apply(module, "whole")
    versions = {name: p._version for name, p in module.state_dict().items()}  # in-place writes count here
    local.apply(module, "one-layer")
    written = {name for name, p in module.state_dict().items() if p._version != versions[name]}
    touched = {t.key for t in local.show("whole").tensors if t.kind not in ("base", "dropped")}
    assert "conv_in.weight" in written and written <= touched | {"conv_in.weight"}
    untouched = set(models.base_sd) - touched - {"conv_in.weight"}
    assert untouched and not written & untouched


def _tiny(sd: dict) -> TinyUNet:
    module = TinyUNet(32)
    module.load_state_dict(sd)
    return module.eval()


@pytest.mark.parametrize("options", [dict(exact=True), dict(energy=0.5, encoding="int8"), dict(energy=0.8, encoding="mixed"),
                                     dict(max_error=0.01, encoding="bf16"), dict(budget="60kB")], ids=str)
def test_every_kind_and_encoding_applies_as_it_checks_out(local, models, tmp_path, options):
    local.add_base(models.base, "tiny")
    rev = local.push(models.ft, "dog", **options)
    kinds = {t.kind for t in local.show(rev.ref).tensors}
    assert kinds & {"lowrank", "exact", "dense", "sparse"}
    module = _tiny(models.base_sd)
    with local.apply(module, "dog"):
        local.checkout("dog", tmp_path / "dog.safetensors")
        assert _same_bits(_bits(module), load_file(tmp_path / "dog.safetensors"))
    assert _same_bits(_bits(module), models.base_sd)


def test_the_kinds_of_a_full_finetune_all_apply(local, models):
    local.add_base(models.base, "tiny")
    local.push(models.ft, "dog", energy=0.9)
    seen = {t.kind for t in local.show("dog").tensors}
    assert {"lowrank", "dense", "sparse"} <= seen, seen  # the token table's trained rows are sparse
    module = _tiny(models.base_sd)
    with local.apply(module, "dog"):
        assert _same_bits(_bits(module), local.load("dog", device="cpu"))


def test_a_module_of_another_shape_is_refused_and_untouched(local_subjects, pipelines):
    other = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sd_tiny.HIDDEN, attention_head_dim=4, norm_num_groups=8,
    )
    before = _bits(other)
    with pytest.raises(BaseMismatch, match=r"does not fit a@1 \(base 'sd-tiny'\): '.*' has shape \[32.*\] in the module, \[64.*\] in the subject$"):
        local_subjects.apply(other, "a")
    assert _same_bits(_bits(other), before)


def test_a_module_that_is_not_the_base_is_refused_and_untouched(local_subjects, pipelines):
    trained = _unet(pipelines.ft)  # the other fine-tune's weights, not the base's
    before = _bits(trained)
    with pytest.raises(BaseMismatch, match="does not hold base 'sd-tiny': tensor '.*' differs"):
        local_subjects.apply(trained, "a", check="all")
    assert _same_bits(_bits(trained), before)


def test_the_default_check_catches_any_changed_tensor_and_rechecks_only_what_changed(local_subjects, pipelines, monkeypatch):
    from dsreg import live

    reg = local_subjects
    for key in ("conv_in.weight", "conv_out.bias", "down_blocks.0.attentions.0.proj_in.weight"):
        unet = _unet(pipelines.base)
        with torch.no_grad():
            unet.state_dict()[key].view(-1)[0] += 1e-3
        before = _bits(unet)
        with pytest.raises(BaseMismatch, match=f"tensor '{key}' differs"):
            reg.apply(unet, "a")
        assert _same_bits(_bits(unet), before)
    # Two values swapped: the plain sum is the same, the position-weighted one is not.
    unet = _unet(pipelines.base)
    with torch.no_grad():
        w = unet.state_dict()["conv_in.weight"].view(-1)
        w[[0, 1]] = w[[1, 0]]
    with pytest.raises(BaseMismatch, match="conv_in.weight"):
        reg.apply(unet, "a")
    # A fresh module: every touched tensor is fingerprinted once; switches after that fingerprint
    # nothing but what someone else changed meanwhile.
    warm = _unet(pipelines.base)  # the base's fingerprints, read from the store once per process
    reg.apply(warm, "a")
    reg.apply(warm, "b")
    unet = _unet(pipelines.base)
    counted = []
    real = live.fingerprint
    monkeypatch.setattr(live, "fingerprint", lambda t: counted.append(1) or real(t))
    touched = {n: {e.key for e in reg.catalog.entries(Ref(n, 1)) if e.kind not in ("base", "dropped")} for n in ("a", "b")}
    reg.apply(unet, "a")
    assert len(counted) == len(touched["a"])
    reg.apply(unet, "b")  # only what b touches and a did not: a's keys were written by dsreg
    assert len(counted) == len(touched["a"] | touched["b"])
    for name in ("a", "b", "a", "b"):
        reg.apply(unet, name)
    reg.apply(unet, "a").restore()
    with reg.apply(unet, "b"):
        pass
    assert len(counted) == len(touched["a"] | touched["b"])
    with torch.no_grad():  # a change behind dsreg's back is found at the next apply
        unet.state_dict()["conv_in.weight"].view(-1)[0] += 1e-3
    with pytest.raises(BaseMismatch, match="conv_in.weight"):
        reg.apply(unet, "a")


def test_a_corrupt_blob_mid_switch_leaves_the_module_as_it_was(subjects, pipelines):
    reg = subjects
    unet = _unet(pipelines.base)
    reg.apply(unet, "a")
    holding_a = _bits(unet)
    entries = [e for e in reg.catalog.entries(Ref("b", 1)) if e.blob]
    _damage(reg.store.fs, reg.store.path(entries[len(entries) // 2].blob), "flip")
    with pytest.raises(IntegrityError, match="cannot rebuild tensor"):
        reg.apply(unet, "b")
    assert _same_bits(_bits(unet), holding_a)
    reg.apply(unet, "a").restore()
    assert _same_bits(_bits(unet), _bits(_unet(pipelines.base)))


def test_a_failure_while_writing_puts_back_what_the_module_held(local_subjects, pipelines, monkeypatch):
    from dsreg import live

    reg = local_subjects
    unet = _unet(pipelines.base)
    handle = reg.apply(unet, "a")
    holding_a = _bits(unet)
    calls = []
    write = live._write

    def failing(tensor, base, change):
        calls.append(change.entry.key)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        write(tensor, base, change)

    monkeypatch.setattr(live, "_write", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        reg.apply(unet, "b")
    monkeypatch.undo()
    assert _same_bits(_bits(unet), holding_a) and handle.active
    handle.restore()
    assert _same_bits(_bits(unet), _bits(_unet(pipelines.base)))


def test_an_fp16_module_gets_the_delta_formed_in_fp32_and_its_own_bits_back(local_subjects, pipelines, tmp_path):
    reg = local_subjects
    unet = _unet(pipelines.base).half()
    before = _bits(unet)
    reg.checkout("a", tmp_path / "a")
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "a").eval().half()
    with reg.apply(unet, "a", keep="host"):
        for key, value in unet.state_dict().items():
            # The fp16 base (rounded once) + the fp32 delta, rounded again, against the fp32 checkout
            # rounded once: half an fp16 step of the base, of the result and of the reference.
            want = reference.state_dict()[key].float()
            largest = torch.stack([value.float().abs(), want.abs(), before[key].float().abs()]).amax(0)
            step = torch.finfo(torch.float16).eps * largest.clamp_min(2**-14)
            assert ((value.float() - want).abs() <= 1.5 * step).all(), key
        assert torch.allclose(_unet_out(unet), _unet_out(reference), atol=2e-2, rtol=1e-2)
    assert _same_bits(_bits(unet), before)


def test_a_pipeline_subject_applies_to_the_unet_and_the_text_encoder(local, pipelines, tmp_path):
    local.add_base(pipelines.base, "sd-tiny")
    local.push(pipelines.ft, "dog")  # UNet and text encoder trained
    local.push(pipelines.ft_unet, "unet-only")
    pipe = StableDiffusionPipeline.from_pretrained(pipelines.base)
    base_bits = {c: _bits(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    local.checkout("dog", tmp_path / "dog")
    expected = sd_tiny.outputs(StableDiffusionPipeline.from_pretrained(tmp_path / "dog"))
    with local.apply(pipe, "dog") as applied:
        assert set(applied.components) == {"unet", "text_encoder"}
        for got, want in zip(sd_tiny.outputs(pipe), expected):
            assert torch.equal(got, want)
        with local.apply(pipe, "unet-only"):  # the text encoder goes back to the base: the new subject leaves it
            assert _same_bits(_bits(pipe.text_encoder), base_bits["text_encoder"])
        for got, want in zip(sd_tiny.outputs(pipe), expected):  # both modules hold dog again
            assert torch.equal(got, want)
    assert all(_same_bits(_bits(getattr(pipe, c)), base_bits[c]) for c in base_bits)
    # A bare module takes its component of a pipeline subject.
    with local.apply(pipe.text_encoder, "dog") as applied:
        assert applied.components == ("text_encoder",)
        assert torch.equal(sd_tiny.outputs(pipe)[1], expected[1])


def test_with_blocks_unwind_in_order(local_subjects, pipelines):
    """Every with block gives back what the module held when it was entered, whatever happened inside."""
    reg = local_subjects
    unet = _unet(pipelines.base)
    base = _bits(unet)
    want = {name: reg.load(name, device="cpu") for name in ("a", "b")}
    # Nested: the inner exit returns to the outer subject.
    with reg.apply(unet, "a"):
        with reg.apply(unet, "b"):
            assert _same_bits(_bits(unet), want["b"])
        assert _same_bits(_bits(unet), want["a"])
    assert _same_bits(_bits(unet), base)
    # A plain switch inside a block is undone by the block's exit; its handle is closed with it.
    with reg.apply(unet, "a"):
        inner = reg.apply(unet, "b")
    assert _same_bits(_bits(unet), base) and not inner.active
    inner.restore()  # already unwound: nothing left to do
    assert _same_bits(_bits(unet), base)
    # An exception inside a block.
    with pytest.raises(ZeroDivisionError):
        with reg.apply(unet, "a"):
            with reg.apply(unet, "b"):
                1 / 0
    assert _same_bits(_bits(unet), base)
    # restore() on the outer handle unwinds the inner block too; the exits that follow do nothing more.
    with reg.apply(unet, "a") as outer:
        with reg.apply(unet, "b"):
            outer.restore()
            assert _same_bits(_bits(unet), base)
        assert _same_bits(_bits(unet), base)
    assert _same_bits(_bits(unet), base)
    # A plain apply's restore inside a block returns to the block's subject.
    with reg.apply(unet, "a"):
        reg.apply(unet, "b").restore()
        assert _same_bits(_bits(unet), want["a"])
    assert _same_bits(_bits(unet), base)


def test_a_plain_handle_that_was_replaced_refuses_to_restore(local_subjects, pipelines):
    from dsreg import UsageError

    reg = local_subjects
    unet = _unet(pipelines.base)
    first = reg.apply(unet, "a")
    second = reg.apply(unet, "b")  # a switch: the module holds b
    with pytest.raises(UsageError, match="holds b@1 now"):
        first.restore()
    assert _same_bits(_bits(unet), reg.load("b", device="cpu"))
    second.restore()
    assert _same_bits(_bits(unet), _bits(_unet(pipelines.base)))


def test_concurrent_applies_on_two_modules(local_subjects, pipelines):
    reg = local_subjects
    modules = [_unet(pipelines.base), _unet(pipelines.base)]
    want = {name: reg.load(name, device="cpu") for name in ("a", "b")}
    errors = []

    def serve(module, order):
        try:
            for name in order * 3:
                reg.apply(module, name)
                assert _same_bits(_bits(module), want[name])
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(modules[0], ["a", "b"])), threading.Thread(target=serve, args=(modules[1], ["b", "a"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_one_module_applied_from_two_threads_holds_one_whole_subject(local_subjects, pipelines):
    reg = local_subjects
    unet = _unet(pipelines.base)
    want = {name: reg.load(name, device="cpu") for name in ("a", "b")}
    threads = [threading.Thread(target=lambda n=n: [reg.apply(unet, n) for _ in range(3)]) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(_same_bits(_bits(unet), w) for w in want.values())


def test_a_warm_switch_reads_no_store(local_subjects, pipelines, monkeypatch):
    reg = local_subjects
    unet = _unet(pipelines.base)
    reg.apply(unet, "a")
    reg.apply(unet, "b")
    expected = _bits(unet)

    def unreachable(*_):
        raise AssertionError("the store was read")

    monkeypatch.setattr(reg.store, "get", unreachable)
    reg.apply(unet, "a")
    reg.apply(unet, "b")
    assert _same_bits(_bits(unet), expected)
    assert reg.factors.nbytes <= reg.settings.factor_cache


def test_the_factor_cache_keeps_to_its_limit(tmp_path, pipelines):
    with Registry.open(home=tmp_path / "r", factor_cache="20kB") as reg:
        reg.add_base(pipelines.base, "sd-tiny")
        reg.push(pipelines.ft_unet / "unet", "a")
        unet = _unet(pipelines.base)
        with reg.apply(unet, "a"):
            pass
        assert 0 < reg.factors.nbytes <= 20_000


@pytest.mark.slow
def test_the_serving_example_runs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "serve_subjects.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("switched in") == 5 and "restored: the base renders as before" in done.stdout
    assert "switches/s, factor cache hit rate" in done.stdout

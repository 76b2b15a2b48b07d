"""Serving all day from one resident model: compiled models keep their graph, a thousand switches
leave no drift in any dtype, and modules that cannot be written as they are say what to do."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dsreg import BaseMismatch, Registry
from dsreg.demo import TinyUNet, finetune, fixed_inputs, state_dict

WIDTH = 32


@pytest.fixture
def three(tmp_path, models) -> Registry:
    """The session's base and three real fine-tunes of it (Adam steps), on the embedded default."""
    base = TinyUNet(WIDTH)
    base.load_state_dict(models.base_sd)
    with Registry.open(home=tmp_path / "registry") as reg:
        reg.add_base(models.base, "tiny")
        reg.push(models.ft, "s1", energy=0.8)
        for subject in (2, 3):
            path = tmp_path / f"ft{subject}.safetensors"
            save_file(state_dict(finetune(base, subject=subject, steps=5)), path)
            reg.push(path, f"s{subject}", energy=0.8)
        yield reg


def _module(models, dtype=torch.float32) -> TinyUNet:
    module = TinyUNet(WIDTH)
    module.load_state_dict(models.base_sd)
    return module.to(dtype).eval()


def _bits(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.uint8) if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_switching_a_compiled_model_never_recompiles(three, models):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    module = _module(models)
    params = {k: (p, p.data_ptr(), p.dtype, p.stride(), p.requires_grad) for k, p in module.named_parameters()}
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter)
    x, t, tokens = fixed_inputs(2)
    with torch.no_grad():
        base_out = compiled(x, t, tokens)
        assert counter.frame_count == 1
        outs = {}
        for i in range(10):
            name = f"s{1 + i % 3}"
            three.apply(compiled if i % 2 else module, name)  # the compiled wrapper, or the module under it
            outs.setdefault(name, compiled(x, t, tokens))
            assert torch.equal(compiled(x, t, tokens), outs[name])
        three.apply(module, "s1").restore()
        assert torch.equal(compiled(x, t, tokens), base_out)
    assert counter.frame_count == 1, "a switch made torch.compile compile again"
    for k, p in module.named_parameters():  # the same Parameter objects, in the same memory, as they were
        assert (p, p.data_ptr(), p.dtype, p.stride(), p.requires_grad) == params[k]
    assert not torch.equal(outs["s1"], base_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_thousand_switches_leave_no_drift(three, models, dtype):
    module = _module(models, dtype)
    base = _bits(module)
    first = {}
    for name in ("s1", "s2", "s3"):
        three.apply(module, name)
        first[name] = _bits(module)
    with three.apply(module, "s1"):
        for i in range(1000):
            name = ("s1", "s2", "s3", "s2")[i % 4]
            three.apply(module, name)
            if i % 97 == 0 or i >= 996:
                assert _same(_bits(module), first[name]), (i, name)
    assert _same(_bits(module), first["s3"])  # the block was entered holding s3: it gives s3 back
    three.apply(module, "s1").restore()
    assert _same(_bits(module), base)


def test_a_module_with_peft_lora_layers_injected_says_what_to_call(three, models):
    from peft import LoraConfig, inject_adapter_in_model

    module = _module(models)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_k"]), module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(BaseMismatch, match=r"LoRA layers injected by peft.*unload_lora_weights\(\)"):
        three.apply(module, "s1")
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_a_module_built_under_inference_mode_is_switched_and_restored(three, models):
    with torch.inference_mode():
        module = _module(models)
    base = _bits(module)
    with three.apply(module, "s1"):
        with three.apply(module, "s2"):
            held = _bits(module)
        assert not _same(_bits(module), held)
    assert _same(_bits(module), base)
    reference = _module(models)
    three.apply(reference, "s2")
    assert _same(held, _bits(reference))


@pytest.mark.slow
def test_switching_under_inductor_never_recompiles_and_renders_each_subject(three, models):
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler (g++) on the CPU")
    torch._dynamo.reset()
    module = _module(models)
    compiled = torch.compile(module, backend="inductor")
    eager = _module(models)
    x, t, tokens = fixed_inputs(2)
    with torch.no_grad():
        compiled(x, t, tokens)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("s1", "s2", "s3", "s1"):
                three.apply(module, name)
                three.apply(eager, name)
                assert torch.allclose(compiled(x, t, tokens), eager(x, t, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keep_mapped_restores_from_the_machines_mapped_base_with_the_same_bits(three, models, dtype, tmp_path):
    from dsreg import live

    by_copy, by_map = _module(models, dtype), _module(models, dtype)
    base = _bits(by_map)
    for name in ("s1", "s2", "s3", "s1"):
        three.apply(by_copy, name)
        three.apply(by_map, name, keep="mapped")
        assert _same(_bits(by_map), _bits(by_copy)), name
    slot = live._slots[by_map]
    assert slot.saved and all(slot.saved[k].data_ptr() == slot.mapped[k].data_ptr() for k in slot.saved)  # no copies kept
    with three.apply(by_map, "s2", keep="mapped"):
        pass
    assert _same(_bits(by_map), _bits(by_copy))
    three.apply(by_map, "s3", keep="mapped").restore()
    assert _same(_bits(by_map), base)
    (made,) = (tmp_path / "registry" / "mapped").iterdir()
    stamp = made.stat().st_mtime_ns
    with Registry.open(home=tmp_path / "registry") as other:  # another registry on the machine maps the same file
        other.apply(_module(models, dtype), "s2", keep="mapped").restore()
    assert made.stat().st_mtime_ns == stamp and len(list(made.parent.iterdir())) == 1

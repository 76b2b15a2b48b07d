"""Flux LoRA files at Flux.1's width: stored bytes against a base in each layout, beside the file.

    pip install diffusers && python -m bench.lora_formats [--double 1 --single 2 --rank 16] [--cache .bench-cache]

A user who does not use dsreg keeps the LoRA file itself; so the measure is stored bytes / file
bytes, for the two ways trainers write a Flux LoRA, each pushed against the same base stored in BFL's
layout (fused q/k/v) and in diffusers' (split):

- kohya's sd-scripts: one LoRA per fused tensor (``img_attn.qkv``, ``linear1``) and per other
  linear of each block, bf16;
- diffusers / peft: one LoRA per split projection (``to_q``, ``to_k``, ``to_v``, ``proj_mlp``, ...),
  bf16, with ``lora_adapter_metadata``.

Each is pushed as a user would (the default ``energy=1``: the whole rank, factors as given where
they cross the layouts' fused/split boundary) and, beside it, at ``energy=0.9999``, which decomposes
every tensor's update on its own: what the default would cost without storing a fused LoRA's down
once (and split LoRAs' blocks as given).

The factors are seeded Gaussians of the given rank (their bytes, not their values, are measured).
The bases are ``bench.flux``'s (the same cache file), in both layouts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .flux import flux_specs
from .sd15 import describe_machine

# Linear modules of each block that trainers put LoRAs on, in each layout.
KOHYA_DOUBLE = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin")
KOHYA_SINGLE = ("linear1", "linear2", "modulation.lin")
PEFT_DOUBLE = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
)
PEFT_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")


def bases(cache: Path, double: int, single: int) -> dict[str, Path]:
    """The bench.flux base in BFL's layout and the same weights in diffusers'."""
    from dsreg import families
    from dsreg.checkpoint import open_checkpoint, write_safetensors

    name = f"flux-{double}d{single}s"
    out = {"original": cache / f"{name}-base-bfl.safetensors", "diffusers": cache / f"{name}-base-diffusers.safetensors"}
    if all(p.exists() for p in out.values()):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    specs = flux_specs(double, single)
    g = torch.Generator().manual_seed(0)

    def tensor(spec) -> torch.Tensor:  # as bench.flux makes its base, from the same generator
        if len(spec.shape) < 2:
            return (1 + 0.1 * torch.randn(spec.shape, generator=g)).bfloat16()
        return (torch.randn(spec.shape, generator=g) * spec.shape[1] ** -0.5).bfloat16()

    write_safetensors(out["diffusers"], specs, (tensor(s) for s in specs))
    if not out["original"].exists():
        with open_checkpoint(out["diffusers"]) as ckpt:
            view = families.convert_checkpoint(ckpt, families.ModelLayout("flux", "diffusers"), families.ModelLayout("flux", "original"))
            write_safetensors(out["original"], view.specs, (view.get(s.key) for s in view.specs))
    return out


def lora_files(work: Path, double: int, single: int, rank: int) -> dict[str, Path]:
    from dsreg import families
    from dsreg.checkpoint import TensorSpec

    specs = flux_specs(double, single)
    shapes = {s.key: s.shape for s in specs}
    steps = families.plan([TensorSpec(s.key, s.dtype, s.shape) for s in specs], families.ModelLayout("flux", "diffusers"), families.ModelLayout("flux", "original"))
    shapes.update({spec.key: spec.shape for spec, _ in steps})
    g = torch.Generator().manual_seed(1)

    def pair(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, inner = shapes[key + ".weight"]
        return (torch.randn(rank, inner, generator=g) * inner ** -0.5).bfloat16(), (torch.randn(out, rank, generator=g) * 1e-3).bfloat16()

    kohya, peft = {}, {}
    blocks = (
        (double, "double_blocks", KOHYA_DOUBLE, "transformer_blocks", PEFT_DOUBLE),
        (single, "single_blocks", KOHYA_SINGLE, "single_transformer_blocks", PEFT_SINGLE),
    )
    for count, bfl, kohya_modules, diffusers, peft_modules in blocks:
        for i in range(count):
            for m in kohya_modules:
                down, up = pair(f"{bfl}.{i}.{m}")
                name = f"lora_unet_{bfl}_{i}_{m.replace('.', '_')}"
                kohya.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(float(rank))})
            for m in peft_modules:
                name = f"transformer.{diffusers}.{i}.{m}"
                peft[f"{name}.lora_A.weight"], peft[f"{name}.lora_B.weight"] = pair(f"{diffusers}.{i}.{m}")
    paths = {"kohya (fused qkv, linear1)": work / "kohya.safetensors", "peft (split q, k, v)": work / "peft.safetensors"}
    save_file(kohya, paths["kohya (fused qkv, linear1)"])
    config = {"transformer.r": rank, "transformer.lora_alpha": rank}
    save_file(peft, paths["peft (split q, k, v)"], metadata={"lora_adapter_metadata": json.dumps(config)})
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cache", default=".bench-cache")
    args = parser.parse_args()

    from dsreg import Registry

    print(describe_machine(), flush=True)
    base = bases(Path(args.cache), args.double, args.single)
    work = Path(tempfile.mkdtemp(prefix="dsreg-lora-", dir=args.cache))
    rows = []
    try:
        files = lora_files(work, args.double, args.single, args.rank)
        for layout, path in base.items():
            with Registry.open(home=work / layout) as reg:
                t = time.perf_counter()
                reg.add_base(path, "flux")
                print(f"base add ({layout} layout): {time.perf_counter() - t:.1f} s", flush=True)
                for label, lora in files.items():
                    t = time.perf_counter()
                    rev = reg.push(lora, label.split()[0])
                    rows.append((label, layout, "energy=1 (default)", rev.original_bytes, rev.stored_bytes, time.perf_counter() - t))
                    print(f"push {label} against the {layout}-layout base: {rows[-1][-1]:.1f} s", flush=True)
                    # The same file decomposed tensor by tensor, as any rule short of its whole rank does:
                    # a LoRA across the fused/split boundary then pays for its down (or zeros) per tensor.
                    t = time.perf_counter()
                    rev = reg.push(lora, label.split()[0] + "-svd", energy=0.9999)
                    rows.append((label, layout, "energy=0.9999", rev.original_bytes, rev.stored_bytes, time.perf_counter() - t))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nFlux.1 width, {args.double} double + {args.single} single blocks, rank {args.rank}, bf16 files, default push (energy=1, fp16)\n")
    print("| LoRA file | base layout | rule | file | stored | stored / file | push |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, layout, rule, original, stored, seconds in rows:
        print(f"| {label} | {layout} | {rule} | {original / 1e6:.2f} MB | {stored / 1e6:.2f} MB | {stored / original:.3f}x | {seconds:.1f} s |")


if __name__ == "__main__":
    main()

"""Flux-scale benchmark: base add, push, checkout (in both layouts) and peak memory on a pair of
full-width Flux.1 transformers, side by side with the plain full-SVD Delta-SVD and a file copy;
then fp8: stored bytes of a real fine-tune of real pretrained weights cast to fp8.

    pip install diffusers && python -m bench.flux [--double 1 --single 2] [--cache .bench-cache]

The model has Flux.1's real shapes (hidden 3072; ``single_blocks.N.linear1`` 21504 x 3072,
``double_blocks.N.img_mod.lin`` 18432 x 3072) at a chosen depth: Flux.1 has 19 double and 38
single blocks (11.9B parameters, 23.8 GB per bf16 file, ~95 GB of disk for a run); ``--double 10
--single 19`` is half depth. The base, in bf16, is stored in BFL's layout (fused q/k/v); the
fine-tune is written in diffusers' layout, so the push converts, as a user's would. Its every
matrix moves by a delta with the paper's spectrum ((i+5)^-0.6 on the top 80% of the rank, 2% of
the weight's norm; Gaussian factors rather than orthonormal ones, which a QR of each 21504-row
factor would take minutes to make). Each step runs in its own process with a cold page cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .sd15 import _peak_rss_mb, describe_machine, drop_caches, plain_svd, run_step

MODULE = "bench.flux"


def flux_specs(double: int, single: int):
    """The diffusers-layout specs of a Flux.1-dev transformer with this many blocks, in bf16."""
    from diffusers import FluxTransformer2DModel

    from dsreg.checkpoint import TensorSpec

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    return [TensorSpec(k, "bfloat16", tuple(v.shape)) for k, v in model.state_dict().items()]


def build_pair(cache: Path, double: int, single: int) -> tuple[Path, Path]:
    from dsreg import families
    from dsreg.checkpoint import write_safetensors

    name = f"flux-{double}d{single}s"
    base, ft = cache / f"{name}-base-bfl.safetensors", cache / f"{name}-ft-diffusers.safetensors"
    if base.exists() and ft.exists():
        return base, ft
    cache.mkdir(parents=True, exist_ok=True)
    specs = flux_specs(double, single)
    g = torch.Generator().manual_seed(0)

    def base_tensor(spec) -> torch.Tensor:
        if len(spec.shape) < 2:
            return (1 + 0.1 * torch.randn(spec.shape, generator=g)).bfloat16()
        return (torch.randn(spec.shape, generator=g) * spec.shape[1] ** -0.5).bfloat16()

    # The base tensors are made in diffusers order from one generator, then written in BFL's layout.
    tmp = cache / f"{name}-base-diffusers.safetensors"
    write_safetensors(tmp, specs, (base_tensor(s) for s in specs))
    from dsreg.checkpoint import open_checkpoint

    with open_checkpoint(tmp) as ckpt:
        view = families.convert_checkpoint(ckpt, families.ModelLayout("flux", "diffusers"), families.ModelLayout("flux", "original"))
        write_safetensors(base, view.specs, (view.get(s.key) for s in view.specs))
        write_safetensors(ft, specs, (finetuned(ckpt.get(s.key), i) for i, s in enumerate(specs)))
    tmp.unlink()
    return base, ft


def finetuned(w: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    w32 = w.float()
    if w.dim() < 2:
        return (w32 + 0.01 * w32.std() * torch.randn(w.shape, generator=g)).bfloat16()
    d, k = w32.shape
    r = max(1, int(0.8 * min(d, k)))
    s = (torch.arange(r, dtype=torch.float32) + 5) ** -0.6
    u = torch.randn(d, r, generator=g) / d**0.5
    v = torch.randn(r, k, generator=g) / k**0.5
    delta = (u * s) @ v
    delta *= 0.02 * torch.linalg.matrix_norm(w32) / torch.linalg.matrix_norm(delta)
    return (w32 + delta).bfloat16()


def step(args) -> dict:
    from dsreg import Registry

    t = time.perf_counter()
    if args.step == "copy":
        shutil.copyfile(args.ft, args.out)
        result = {}
    elif args.step == "base-add":
        with Registry.open(home=args.home) as r:
            r.add_base(args.base, "flux")
        result = {}
    elif args.step == "push":
        with Registry.open(home=args.home) as r:
            rev = r.push(args.ft, f"tau-{args.tau}", base="flux", energy=args.tau)
        result = {"ref": rev.ref, "stored": rev.stored_bytes, "original": rev.original_bytes, "kept": rev.kept_params}
    elif args.step == "checkout":
        with Registry.open(home=args.home) as r:
            r.checkout(args.ref, args.out, layout=args.layout or None)
        result = {}
    elif args.step == "plain":
        result = plain_converted(Path(args.base), Path(args.ft), args.tau)
    else:
        raise SystemExit(f"unknown step {args.step}")
    result.update(seconds=time.perf_counter() - t, rss_mb=_peak_rss_mb())
    return result


def plain_converted(base: Path, ft: Path, tau: float) -> dict:
    """The plain Delta-SVD (a full fp32 ``torch.linalg.svd`` per layer, as kohya's
    flux_extract_lora.py and LyCORIS extract it) on the fine-tune brought to the base's layout."""
    from dsreg import families
    from dsreg.checkpoint import open_checkpoint, write_safetensors

    with tempfile.TemporaryDirectory(dir=ft.parent) as tmp, open_checkpoint(ft) as ckpt:
        view = families.convert_checkpoint(ckpt, families.ModelLayout("flux", "diffusers"), families.ModelLayout("flux", "original"))
        converted = Path(tmp) / "ft-bfl.safetensors"
        write_safetensors(converted, view.specs, (view.get(s.key) for s in view.specs))
        return plain_svd(base, converted, tau)


def fp8_real() -> list[str]:
    """Stored bytes of an fp8 cast of a real fine-tune (all-MiniLM-L6-v2, bench.real_models) of a
    bf16 base, against the fp8 file: exact, and a lossy push."""
    from safetensors.torch import save_file

    from bench.real_models import load
    from dsreg import Registry

    pair = load("minilm")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {k: v.to(torch.bfloat16).contiguous() for k, v in pair.base.items() if v.is_floating_point()}
        ft8 = {k: pair.ft[k].to(torch.float8_e4m3fn).contiguous() for k in base}
        save_file(base, tmp / "base.safetensors")
        save_file(ft8, tmp / "ft-fp8.safetensors")
        size = (tmp / "ft-fp8.safetensors").stat().st_size
        with Registry.open(home=tmp / "registry") as r:
            r.add_base(tmp / "base.safetensors", "minilm")
            for label, options in (("--exact", {"exact": True}), ("--energy 0.5", {"energy": 0.5}), ("--energy 0.9", {"energy": 0.9})):
                rev = r.push(tmp / "ft-fp8.safetensors", **options)
                kinds = {}
                for t in r.show(rev.ref).tensors:
                    kinds[t.kind] = kinds.get(t.kind, 0) + 1
                rows.append(f"| {label} | {rev.stored_bytes / 1e6:.2f} MB | {rev.stored_bytes / size:.3f}x | {', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))} |")
        header = [f"fp8 file: {size / 1e6:.2f} MB (all-MiniLM-L6-v2 fine-tune, {len(ft8)} tensors, base in bf16)", "",
                  "| push | stored | / fp8 file | entries by kind |", "|---|---:|---:|---|"]
    return header + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step")
    parser.add_argument("--base")
    parser.add_argument("--ft")
    parser.add_argument("--home")
    parser.add_argument("--out")
    parser.add_argument("--ref")
    parser.add_argument("--layout", default="")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--double", type=int, default=1, help="double blocks (Flux.1: 19)")
    parser.add_argument("--single", type=int, default=2, help="single blocks (Flux.1: 38)")
    parser.add_argument("--cache", default=".bench-cache")
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return

    print(describe_machine(), flush=True)
    t = time.perf_counter()
    base, ft = build_pair(Path(args.cache), args.double, args.single)
    params = (ft.stat().st_size) / 2 / 1e9
    print(f"Flux-shaped pair ({args.double} double + {args.single} single blocks, ~{params:.2f}B params) ready in "
          f"{time.perf_counter() - t:.0f} s: {base.stat().st_size / 1e9:.2f} GB each", flush=True)
    print("page cache dropped before each step" if drop_caches() else "page cache NOT dropped (not root)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dsreg-flux-", dir=args.cache))
    home = work / "registry"
    run = lambda **kw: run_step(MODULE, **kw)  # noqa: E731
    try:
        copy = run(step="copy", ft=ft, out=work / "copy.safetensors")
        (work / "copy.safetensors").unlink()
        added = run(step="base-add", base=base, home=home)
        print(f"file copy {copy['seconds']:.1f} s; base add {added['seconds']:.1f} s, {added['rss_mb']:.0f} MB peak", flush=True)
        push = run(step="push", ft=ft, home=home, tau=args.tau)
        print(f"push tau {args.tau}: {push['seconds']:.1f} s, {push['rss_mb']:.0f} MB peak, {push['stored'] / 1e6:.1f} MB stored", flush=True)
        checkout = run(step="checkout", home=home, ref=push["ref"], out=work / "out.safetensors")
        (work / "out.safetensors").unlink()
        print(f"checkout (diffusers, as pushed): {checkout['seconds']:.1f} s, {checkout['rss_mb']:.0f} MB peak", flush=True)
        other = run(step="checkout", home=home, ref=push["ref"], out=work / "out-bfl.safetensors", layout="original")
        (work / "out-bfl.safetensors").unlink()
        print(f"checkout --layout original: {other['seconds']:.1f} s, {other['rss_mb']:.0f} MB peak", flush=True)
        plain = None if args.skip_plain else run(step="plain", base=base, ft=ft, tau=args.tau)
        if plain:
            print(f"plain full SVD: {plain['seconds']:.1f} s, {plain['rss_mb']:.0f} MB peak", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| measure | value | target | met |")
    print("|---|---:|---:|---|")
    if plain:
        ratio = push["seconds"] / plain["seconds"]
        print(f"| push time / plain full-SVD time (tau {args.tau}) | {push['seconds']:.1f} s / {plain['seconds']:.1f} s = {ratio:.3f}x | <= 0.15x | {'yes' if ratio <= 0.15 else 'NO'} |")
    for label, r, target in (("checkout", checkout, 1.2), ("checkout --layout original", other, None)):
        ratio = r["seconds"] / copy["seconds"]
        met = ("yes" if ratio <= target else "NO") if target else ""
        print(f"| {label} time / file copy time | {r['seconds']:.1f} s / {copy['seconds']:.1f} s = {ratio:.2f}x | {f'<= {target}x' if target else ''} | {met} |")
    for label, r in (("base add", added), ("push", push), ("checkout", checkout), ("checkout --layout original", other)):
        print(f"| {label} peak RSS | {r['rss_mb']:.0f} MB | <= 1500 MB | {'yes' if r['rss_mb'] <= 1500 else 'NO'} |")
    print(f"| stored / fine-tune file (tau {args.tau}) | {push['stored'] / 1e6:.1f} MB / {push['original'] / 1e6:.1f} MB = {push['stored'] / push['original']:.3f}x | | |")
    print()
    for line in fp8_real():
        print(line)


if __name__ == "__main__":
    main()

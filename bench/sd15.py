"""SD1.5-scale benchmark: push and checkout of an 859.52M-parameter UNet, side by side with the
plain full-SVD Delta-SVD, a file copy, and the paper's kept-parameter counts.

    pip install diffusers && python -m bench.sd15 [--taus 0.06,0.2,0.5,0.8] [--cache .bench-cache]

The base is diffusers' ``UNet2DConditionModel(cross_attention_dim=768)`` (random init, fp32,
3.44 GB); the fine-tune adds to every matrix a delta with the paper's spectrum (random orthonormal
U, V; singular values (i+5)^-0.6 on the top 80% of the rank, zero beyond; scaled to 2% of the
weight's norm) and small noise to 1-D tensors. Both are built once and cached. Every measured step
runs in a fresh subprocess, which reports its wall time and peak RSS, after the page cache is
dropped where the bench may (root), so that no step is timed on another step's cached reads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PAPER = {0.06: 8.01e6, 0.2: 41.29e6, 0.5: 190.06e6, 0.8: 518.79e6}


def build_pair(cache: Path) -> tuple[Path, Path]:
    base, ft = cache / "sd15-base.safetensors", cache / "sd15-ft.safetensors"
    if base.exists() and ft.exists():
        return base, ft
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sd = {k: v.detach().contiguous() for k, v in UNet2DConditionModel(cross_attention_dim=768).state_dict().items()}
    assert sum(v.numel() for v in sd.values()) == 859_520_964
    save_file(sd, base)
    save_file(finetune(sd, seed=1), ft)
    return base, ft


def finetune(sd: dict, seed: int) -> dict:
    """A fine-tune of ``sd`` with the paper's delta spectrum; another seed makes another subject."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in sd.items():
        if w.dim() < 2:
            out[key] = w + 0.01 * (w.std() if w.numel() > 1 else 1.0) * torch.randn(w.shape, generator=g)
            continue
        m = w.reshape(w.shape[0], -1)
        d, k = m.shape
        r = max(1, int(0.8 * min(d, k)))
        u, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
        v, _ = torch.linalg.qr(torch.randn(k, r, generator=g))
        s = (torch.arange(r, dtype=torch.float32) + 5) ** -0.6
        delta = (u * s) @ v.T
        delta *= 0.02 * torch.linalg.matrix_norm(m) / torch.linalg.matrix_norm(delta)
        out[key] = (m + delta).reshape(w.shape)
    return out


def describe_machine() -> str:
    """What a pasted table needs beside it: the day, the CPU, its cores, torch's BLAS, any GPU."""
    import datetime
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = "MKL" if torch.backends.mkl.is_available() else "OpenBLAS or other"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{datetime.date.today()}: {cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, "
        f"torch {torch.__version__} with {blas}, {gpu}"
    )


def _peak_rss_mb() -> float:
    # VmHWM is this program's own peak. Linux carries ru_maxrss across fork and exec, so a step
    # started by a parent that had just built the 7 GB pair would report the parent's peak.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(args) -> dict:
    """One measured step, run inside its own process."""
    from dsreg import Registry

    t = time.perf_counter()
    if args.step == "plain":
        result = plain_svd(Path(args.base), Path(args.ft), args.tau)
    elif args.step == "copy":
        shutil.copyfile(args.ft, args.out)
        result = {}
    elif args.step == "base-add":
        with Registry.open(home=args.home) as r:
            r.add_base(args.base, "sd15")
        result = {}
    elif args.step == "push":
        with Registry.open(home=args.home) as r:
            if args.budget:
                rev = r.push(args.ft, "budget", base="sd15", budget=args.budget, device=args.device)
            else:
                rev = r.push(args.ft, f"tau-{args.tau}", base="sd15", energy=args.tau, device=args.device)
            ranks = {t.key: t.rank for t in r.show(rev.ref).tensors if t.kind == "lowrank"}
        result = {"ref": rev.ref, "kept": rev.kept_params, "stored": rev.stored_bytes, "original": rev.original_bytes, "ranks": ranks}
    elif args.step == "checkout":
        with Registry.open(home=args.home) as r:
            r.checkout(args.ref, args.out, device=args.device)
        result = {}
    else:
        raise SystemExit(f"unknown step {args.step}")
    result.update(seconds=time.perf_counter() - t, rss_mb=_peak_rss_mb())
    return result


def plain_svd(base_path: Path, ft_path: Path, tau: float) -> dict:
    """The paper's Algorithm 1 as written: a full fp32 SVD of every layer's delta."""
    from dsreg import deltasvd
    from dsreg.checkpoint import open_checkpoint

    ranks = {}
    with open_checkpoint(base_path) as base, open_checkpoint(ft_path) as ft:
        for spec in ft.specs:
            if len(spec.shape) < 2:
                continue
            delta = deltasvd.as_matrix(ft.get(spec.key) - base.get(spec.key))
            u, s, vh = deltasvd.svd(delta)  # torch.linalg.svd, retried in fp64 where fp32 does not converge
            t = deltasvd.energy_rank(s, tau)
            a, b = (u[:, :t] * s[:t]).half(), vh[:t].half()
            ranks[spec.key] = t
            del u, s, vh, a, b
    return {"ranks": ranks}


def drop_caches() -> bool:
    """Start a timed step with a cold page cache (needs root), so that copy and checkout compare fairly."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def run_step(module: str = "bench.sd15", **kw) -> dict:
    """``python -m module --step ...`` in a fresh process, after dropping the page cache: its JSON result."""
    drop_caches()
    cmd = [sys.executable, "-m", module, "--step", kw.pop("step")]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step")
    parser.add_argument("--base")
    parser.add_argument("--ft")
    parser.add_argument("--home")
    parser.add_argument("--out")
    parser.add_argument("--ref")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--taus", default="0.06,0.2,0.5,0.8")
    parser.add_argument("--cache", default=".bench-cache")
    parser.add_argument("--skip-plain", action="store_true", help="Skip the ~4-minute plain-SVD baseline.")
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)  # a step's budget
    parser.add_argument("--skip-budget", action="store_true", help="Skip the budget push (the main tau push's bytes as its budget).")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return

    print(describe_machine(), flush=True)
    t = time.perf_counter()
    base, ft = build_pair(Path(args.cache))
    print(f"SD1.5-shaped pair ready in {time.perf_counter() - t:.0f} s: {base.stat().st_size / 1e9:.2f} GB each", flush=True)
    print("page cache dropped before each step" if drop_caches() else "page cache NOT dropped (not root): timings may favour later steps", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dsreg-sd15-", dir=args.cache))
    home = work / "registry"
    try:
        copy = run_step(step="copy", ft=ft, out=work / "copy.safetensors")
        (work / "copy.safetensors").unlink()
        added = run_step(step="base-add", base=base, home=home)
        print(f"file copy {copy['seconds']:.1f} s; base add {added['seconds']:.1f} s", flush=True)
        pushes = {}
        for tau in [float(x) for x in args.taus.split(",")]:
            pushes[tau] = run_step(step="push", ft=ft, home=home, tau=tau)
            print(f"push tau {tau}: {pushes[tau]['seconds']:.1f} s, {pushes[tau]['rss_mb']:.0f} MB peak", flush=True)
        main_tau = 0.5 if 0.5 in pushes else next(iter(pushes))
        budget = None
        if not args.skip_budget:
            budget = run_step(step="push", ft=ft, home=home, budget=pushes[main_tau]["stored"])
            print(f"push --budget {pushes[main_tau]['stored']}: {budget['seconds']:.1f} s, {budget['rss_mb']:.0f} MB peak", flush=True)
        checkout = run_step(step="checkout", home=home, ref=pushes[main_tau]["ref"], out=work / "out.safetensors")
        print(f"checkout: {checkout['seconds']:.1f} s, {checkout['rss_mb']:.0f} MB peak", flush=True)
        gpu = None
        if torch.cuda.is_available():
            gpu = {d: run_step(step="checkout", home=home, ref=pushes[main_tau]["ref"], out=work / f"out-{d}.safetensors", device=d) for d in ("cuda", "cpu")}
        plain = None if args.skip_plain else run_step(step="plain", base=base, ft=ft, tau=main_tau)
        report(copy, pushes, main_tau, checkout, plain, gpu, budget)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(copy, pushes, main_tau, checkout, plain, gpu, budget=None) -> None:
    print("\n| measure | value | target | met |")
    print("|---|---:|---:|---|")
    push = pushes[main_tau]
    if plain:
        ratio = push["seconds"] / plain["seconds"]
        print(f"| push time / plain full-SVD time (tau {main_tau}) | {push['seconds']:.1f} s / {plain['seconds']:.1f} s = {ratio:.3f}x | <= 0.15x | {'yes' if ratio <= 0.15 else 'NO'} |")
        diffs = [abs(push["ranks"][k] - plain["ranks"][k]) for k in plain["ranks"] if k in push["ranks"]]
        same = sum(d == 0 for d in diffs)
        print(f"| layers whose rank equals the exact SVD's | {same}/{len(diffs)} (max difference {max(diffs)}) | all, a tie may differ by 1 | {'yes' if max(diffs) <= 1 else 'NO'} |")
    ratio = checkout["seconds"] / copy["seconds"]
    print(f"| checkout time / file copy time | {checkout['seconds']:.1f} s / {copy['seconds']:.1f} s = {ratio:.2f}x | <= 1.5x | {'yes' if ratio <= 1.5 else 'NO'} |")
    print(f"| push peak RSS (tau {main_tau}) | {push['rss_mb']:.0f} MB | <= 1500 MB | {'yes' if push['rss_mb'] <= 1500 else 'NO'} |")
    print(f"| checkout peak RSS | {checkout['rss_mb']:.0f} MB | <= 1500 MB | {'yes' if checkout['rss_mb'] <= 1500 else 'NO'} |")
    if budget:
        ratio = budget["seconds"] / push["seconds"]
        print(f"| push --budget (tau {main_tau}'s bytes) / push --energy {main_tau} | {budget['seconds']:.1f} s / {push['seconds']:.1f} s = {ratio:.2f}x | <= 1.5x | {'yes' if ratio <= 1.5 else 'NO'} |")
        print(f"| push --budget peak RSS | {budget['rss_mb']:.0f} MB | <= 1500 MB | {'yes' if budget['rss_mb'] <= 1500 else 'NO'} |")
    if gpu:
        g, c = gpu["cuda"], gpu["cpu"]
        print(f"| checkout --device cuda / --device cpu | {g['seconds']:.1f} s / {c['seconds']:.1f} s = {g['seconds'] / c['seconds']:.2f}x | <= 1.0x | {'yes' if g['seconds'] <= c['seconds'] else 'NO'} |")
        print(f"| checkout --device cuda / file copy | {g['seconds'] / copy['seconds']:.2f}x | | |")
    print("\n| tau | kept params | paper | kept / paper | stored | ratio | push time | push peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tau, p in sorted(pushes.items()):
        paper = PAPER.get(tau)
        rel = f"{p['kept'] / paper:.3f}" if paper else "-"
        print(
            f"| {tau:g} | {p['kept'] / 1e6:.2f}M | {paper / 1e6 if paper else 0:.2f}M | {rel} | {p['stored'] / 1e6:.1f} MB | "
            f"{p['original'] / p['stored']:.1f}x | {p['seconds']:.1f} s | {p['rss_mb']:.0f} MB |"
        )


if __name__ == "__main__":
    main()

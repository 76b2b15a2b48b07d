"""Serving subjects from one resident SD1.5-shaped UNet: switching with ``Registry.apply`` against
what a service would do instead, side by side in one run.

    pip install -e '.[bench]' && python -m bench.apply [--cache .bench-cache] [--tau 0.5]

Four subjects of the SD1.5-shaped base (bench.sd15's recipe, four seeds) are pushed at ``--tau``.
Every measured step runs in a fresh process that first loads the base UNet (the resident model),
after the page cache is dropped (root) or the subject files are evicted from it:

- apply: switch the resident UNet among the subjects; cold (factors read from the store) and warm
  (factor cache hit); beside it, the same addmm calls alone on preallocated tensors, and the
  default check's cost on a module seen for the first time and on a repeat switch;
- apply-mapped: the same with ``keep="mapped"`` (no base copies kept), the page cache holding the
  machine's mapped base;
- file: ``safetensors.torch.load_file`` of the subject's checked-out file + ``load_state_dict``;
- lora: diffusers' ``load_lora_adapter`` + ``fuse_lora`` of the subject's exported low-rank factors (peft keys,
  ``--factors-only``, as the tables in docs/performance.md were measured: the LoRA part that a
  loader fuses), and ``unfuse_lora`` + ``delete_adapters`` to leave the previous one;
- load vs checkout: ``Registry.load`` against ``checkout`` + ``load_file``, with no model resident.

Each step reports its wall times and its peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .sd15 import _peak_rss_mb, build_pair, describe_machine, drop_caches, finetune

SUBJECTS = ("s1", "s2", "s3", "s4")


def _resident_unet(base: Path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    unet.load_state_dict(load_file(base), assign=True)
    return unet.eval()


def _evict(path: Path) -> None:
    """Drop one file's pages from the page cache: its next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(f"{field}:"))


def step(args) -> dict:
    from dsreg import Registry

    work = Path(args.work)
    if args.step in ("load", "checkout-load"):
        from safetensors.torch import load_file

        with Registry.open(home=work / "registry") as reg:
            t = time.perf_counter()
            if args.step == "load":
                sd = reg.load("s1", device="cpu")
            else:
                reg.checkout("s1", work / "s1-again.safetensors")
                sd = load_file(work / "s1-again.safetensors")
                (work / "s1-again.safetensors").unlink()
            seconds = time.perf_counter() - t
        return {"seconds": seconds, "tensors": len(sd), "rss_mb": _peak_rss_mb()}

    import diffusers  # noqa: F401 - imported before the baseline reading: a service imports it too

    process_mb = _rss_mb()  # the interpreter, torch, diffusers and dsreg, before any weights
    unet = _resident_unet(Path(args.base))
    model_mb = sum(p.numel() * p.element_size() for p in unet.state_dict().values()) / 1e6
    order = list(SUBJECTS) + list(SUBJECTS) * 2  # first round cold, then warm
    times = []
    with torch.no_grad():
        if args.step in ("apply", "apply-mapped"):
            from dsreg import live

            keep = "mapped" if args.step == "apply-mapped" else "device"
            with Registry.open(home=work / "registry") as reg:
                if keep == "mapped":  # the page cache holds the mapped base, as on a serving machine after its first minutes
                    from dsreg.mapped import mapped_base

                    with open(mapped_base(reg, "sd15").path, "rb") as fh:
                        while fh.read(64 << 20):
                            pass
                for name in order:
                    t = time.perf_counter()
                    handle = reg.apply(unet, name, keep=keep)
                    times.append(time.perf_counter() - t)
                slot = live._slots[unet]
                saved_mb = sum(v.numel() * v.element_size() for k, v in slot.saved.items() if k not in slot.mapped) / 1e6
                cache_mb, limit_mb = reg.factors.nbytes / 1e6, reg.settings.factor_cache / 1e6
                peak, mapped_mb = _peak_rss_mb(), _status_mb("RssFile")  # before the products' own copies below
                extra = {} if keep == "mapped" else _products_and_checks(reg, unet, slot, order[-1], times[4:])
                handle.restore()
            return {
                "first": times[0], "cold": times[1:4], "warm": times[4:], "model_mb": model_mb, "process_mb": process_mb,
                "saved_mb": saved_mb, "cache_mb": cache_mb, "cache_limit_mb": limit_mb, "rss_mb": peak, "file_mb": mapped_mb, **extra,
            }
        if args.step == "file":
            from safetensors.torch import load_file

            for name in SUBJECTS:
                _evict(work / f"{name}.safetensors")
                t = time.perf_counter()
                unet.load_state_dict(load_file(work / f"{name}.safetensors"))
                times.append(time.perf_counter() - t)
            return {"switch": times, "model_mb": model_mb, "rss_mb": _peak_rss_mb()}
        if args.step == "lora":
            previous = None
            for name in SUBJECTS:
                _evict(work / f"{name}-lora-factors.safetensors")
                t = time.perf_counter()
                if previous:
                    unet.unfuse_lora()
                    unet.delete_adapters(previous)
                unet.load_lora_adapter(str(work / f"{name}-lora-factors.safetensors"), prefix="unet", adapter_name=name)
                unet.fuse_lora()
                times.append(time.perf_counter() - t)
                previous = name
            return {"first": times[0], "switch": times[1:], "model_mb": model_mb, "rss_mb": _peak_rss_mb()}
    raise SystemExit(f"unknown step {args.step}")


def _products_and_checks(reg, unet, slot, held: str, warm: list[float]) -> dict:
    """What a warm switch is bound by, measured beside it: the same addmm calls on preallocated
    fp32 tensors (the subject's factors decoded once, outside the timing), and the default
    check on a module seen for the first time (every touched tensor fingerprinted) and again
    (version counters compared)."""
    from dsreg import encodings, live
    from dsreg.names import Ref

    state = unet.state_dict()
    entries = [e for e in reg.catalog.entries(Ref(held, reg.revision(held).number)) if e.kind == "lowrank"]
    # The switch's own call per layer: W = addmm(W_base, A, B), onto preallocated tensors.
    work = {}
    for e in entries:
        base = slot.saved[e.key].reshape(state[e.key].shape[0], -1)
        work[e.key] = (base, torch.empty_like(base), encodings.decode_factors(live.cached_blob(reg, e)))
    heavy = sum(1 for base, _, (a, _) in work.values() if a.shape[1] * sum(base.shape) >= base.numel())
    products = []
    for _ in range(3):
        t = time.perf_counter()
        for base, out, (a, b) in work.values():
            torch.addmm(base, a, b, out=out)
        products.append(time.perf_counter() - t)
    del work
    t = time.perf_counter()
    for key in slot.changes:
        live.fingerprint(state[key])
    first_check = time.perf_counter() - t
    rev = live._revision(reg, held)
    touched = {k: e for k, e in live._by_component(rev, None).items() if e.kind not in live._UNCHANGED}
    t = time.perf_counter()
    live._check_values(reg, rev, "unet", state, slot, touched, "fingerprint")
    repeat_check = time.perf_counter() - t
    return {"products": products, "first_check": first_check, "repeat_check": repeat_check, "lowrank": len(entries),
            "denser_than_dense": heavy, "warm_of_held": warm[-1]}


def run_step(name: str, **kw) -> dict:
    drop_caches()
    cmd = [sys.executable, "-m", "bench.apply", "--step", name] + [a for k, v in kw.items() for a in (f"--{k}", str(v))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(cache: Path, tau: float) -> tuple[Path, Path]:
    """The base, four subjects pushed at ``tau``, each checked out and exported as a LoRA (kept in ``cache``)."""
    from safetensors.torch import load_file, save_file

    from dsreg import Registry

    base, first = build_pair(cache)
    work = cache / f"apply-tau{tau}"
    if (work / "ready").exists():
        _export_factors(work)
        return base, work
    work.mkdir(parents=True, exist_ok=True)
    with Registry.open(home=work / "registry") as reg:
        reg.add_base(base, "sd15")
        base_sd = None
        for i, name in enumerate(SUBJECTS):
            ft = first if i == 0 else cache / f"sd15-ft{i + 1}.safetensors"
            if not ft.exists():
                base_sd = base_sd or load_file(base)
                save_file(finetune(base_sd, seed=i + 1), ft)
            t = time.perf_counter()
            rev = reg.push(ft, name, energy=tau)
            print(f"pushed {rev.ref} at tau {tau}: {rev.stored_bytes / 1e6:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
            reg.checkout(name, work / f"{name}.safetensors")
    _export_factors(work)
    (work / "ready").touch()
    return base, work


def _export_factors(work: Path) -> None:
    """Each subject's low-rank factors as a peft LoRA: the part of it that diffusers fuses as a LoRA."""
    from dsreg import Registry

    with Registry.open(home=work / "registry") as reg:
        for name in SUBJECTS:
            path = work / f"{name}-lora-factors.safetensors"
            if not path.exists():
                reg.export_lora(name, path, format="peft", dtype="fp32", factors_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step")
    parser.add_argument("--base")
    parser.add_argument("--work")
    parser.add_argument("--cache", default=".bench-cache")
    parser.add_argument("--tau", type=float, default=0.5)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return
    print(describe_machine(), flush=True)
    base, work = prepare(Path(args.cache), args.tau)
    print("page cache dropped before each step" if drop_caches() else "page cache NOT dropped (not root); subject files evicted", flush=True)
    results = {name: run_step(name, base=base, work=work) for name in ("apply", "apply-mapped", "file", "lora")}
    results.update({name: run_step(name, base=base, work=work) for name in ("load", "checkout-load")})
    report(results, args.tau)


def report(r: dict, tau: float) -> None:
    a, f, lo = r["apply"], r["file"], r["lora"]
    warm, cold, file_load, lora = (statistics.median(x) for x in (a["warm"], a["cold"], f["switch"], lo["switch"]))
    budget = a["process_mb"] + a["model_mb"] + a["saved_mb"] + a["cache_limit_mb"]
    print(f"\nSD1.5-shaped UNet ({a['model_mb']:.0f} MB fp32), four subjects at tau {tau}; medians over the switches\n")
    print("| measure | value | target | met |")
    print("|---|---:|---:|---|")
    print(f"| warm apply switch / cold file load | {warm:.2f} s / {file_load:.2f} s = {warm / file_load:.2f}x | <= 0.5x | {'yes' if warm <= 0.5 * file_load else 'NO'} |")
    print(f"| cold apply switch / cold file load | {cold:.2f} s / {file_load:.2f} s = {cold / file_load:.2f}x | | |")
    print(f"| warm apply switch / diffusers LoRA unfuse + load + fuse | {warm:.2f} s / {lora:.2f} s = {warm / lora:.2f}x | | |")
    print(f"| load / checkout + load_file | {r['load']['seconds']:.1f} s / {r['checkout-load']['seconds']:.1f} s = "
          f"{r['load']['seconds'] / r['checkout-load']['seconds']:.2f}x | <= 0.7x | {'yes' if r['load']['seconds'] <= 0.7 * r['checkout-load']['seconds'] else 'NO'} |")
    print(f"| serving peak RSS (apply) | {a['rss_mb']:.0f} MB: process {a['process_mb']:.0f} + model {a['model_mb']:.0f} + base copies {a['saved_mb']:.0f} "
          f"+ cache {a['cache_mb']:.0f} (limit {a['cache_limit_mb']:.0f}) | "
          f"<= {budget:.0f} MB | {'yes' if a['rss_mb'] <= budget else 'NO'} |")
    products = min(a["products"])
    held = a["warm_of_held"]
    print(f"| warm switch / its addmm products alone | {held:.2f} s / {products:.2f} s = {held / products:.2f}x | <= 1.15x | "
          f"{'yes' if held <= 1.15 * products else 'NO'} |")
    print(f"| default check, module seen first (every touched tensor fingerprinted) / warm switch | {a['first_check']:.3f} s / {warm:.2f} s = "
          f"{a['first_check'] / warm:.3f}x | <= 0.05x | {'yes' if a['first_check'] <= 0.05 * warm else 'NO'} |")
    print(f"| default check, repeat switch (version counters) / warm switch | {a['repeat_check'] * 1e3:.2f} ms / {warm:.2f} s = "
          f"{a['repeat_check'] / warm:.5f}x | <= 0.05x | {'yes' if a['repeat_check'] <= 0.05 * warm else 'NO'} |")
    m = r["apply-mapped"]
    mapped_warm = statistics.median(m["warm"])
    print(f"| warm switch, keep=mapped (page cache warm) / keep=device | {mapped_warm:.2f} s / {warm:.2f} s = {mapped_warm / warm:.2f}x | <= 1.3x | "
          f"{'yes' if mapped_warm <= 1.3 * warm else 'NO'} |")
    print(f"| serving peak RSS, keep=mapped / keep=device | {m['rss_mb']:.0f} MB, of which {m['file_mb']:.0f} MB file pages (the mapped base, "
          f"shared by every process) / {a['rss_mb']:.0f} MB | | |")
    print(f"\n{a['denser_than_dense']} of the held subject's {a['lowrank']} low-rank layers keep so many directions that their factors "
          "hold more values than the dense delta: their product costs more than reading a dense delta would")
    print("\n| way to switch subjects | first | switch (median) | peak RSS |\n|---|---:|---:|---:|")
    print(f"| dsreg apply, cold factor cache | {a['first']:.2f} s | {cold:.2f} s | {a['rss_mb']:.0f} MB |")
    print(f"| dsreg apply, warm factor cache | | {warm:.2f} s | |")
    print(f"| checked-out file, cold page cache: load_file + load_state_dict | | {file_load:.2f} s | {f['rss_mb']:.0f} MB |")
    print(f"| exported LoRA factors: diffusers unfuse + delete + load_lora_adapter + fuse_lora | {lo['first']:.2f} s | {lora:.2f} s | {lo['rss_mb']:.0f} MB |")
    print(f"| Registry.load (no model resident) | | {r['load']['seconds']:.1f} s | {r['load']['rss_mb']:.0f} MB |")
    print(f"| checkout + load_file (no model resident) | | {r['checkout-load']['seconds']:.1f} s | {r['checkout-load']['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()

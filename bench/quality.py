"""Quality bench: stored bytes and functional error of every rank mode and encoding, next to the
paper's fp16-factor Delta-SVD at the same tau.

    python -m bench.quality                 # the small real fine-tune (about a minute)
    python -m bench.quality --sd15          # and the SD1.5-shaped pair of bench/sd15.py (needs diffusers)
    python -m bench.quality --no-small --real minilm,voice,sd-tiny   # budget criteria and --exact vs ZipNN on real fine-tunes

Functional error: ‖f_rebuilt(x) − f_ft(x)‖ / ‖f_base(x) − f_ft(x)‖ on fixed inputs x (0 is the
fine-tune exactly, 1 is no better than the base). "paper" is dsreg's energy rule with fp16 factors
(Algorithm 1; dsreg may store a tensor whole where that is cheaper, which only lowers the
paper's bytes here). Target: the paper's functional error at <= 0.33x its bytes.

Rows: energy τ with bf16 / int8 / mixed factors (the paper's ranks in other encodings); budget =
0.33x the paper's bytes; max-error = the paper's median per-layer error, as a bound on every layer;
exact (lossless); and, on the small model, the smallest budget whose functional error is no worse
than the paper's (found by bisection).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from dsreg import Registry, ranking
from bench import real_models
from dsreg.demo import TinyUNet, finetune, fixed_inputs, make_base, state_dict

TARGET = 0.33


@dataclass
class Row:
    model: str
    tau: float
    mode: str
    encoding: str
    stored: int
    func_error: float
    paper_stored: int
    paper_error: float

    @property
    def bytes_ratio(self) -> float:
        return self.stored / self.paper_stored

    @property
    def verdict(self) -> str:
        if self.mode == "paper":
            return ""
        same = self.func_error <= self.paper_error * 1.01  # within 1%: rounding noise of the encodings
        return "met" if same and self.bytes_ratio <= TARGET else ("error no worse" if same else "worse error")


class Subject:
    """A base/fine-tune pair in a registry, and a function from rebuilt weights to model outputs."""

    def __init__(self, name: str, reg: Registry, ft: Path, base_sd: dict, ft_sd: dict, forward: Callable[[dict], torch.Tensor], work: Path):
        self.name, self.reg, self.ft, self.work = name, reg, ft, work
        self.forward = forward
        self.f_base, self.f_ft = forward(base_sd), forward(ft_sd)
        self.n = 0

    def measure(self, **options) -> tuple[int, float]:
        self.n += 1
        rev = self.last = self.reg.push(self.ft, f"{self.name}-{self.n}", **options)
        out = self.reg.checkout(rev.ref, self.work / "rebuilt.safetensors", device="cpu").path
        f = self.forward(load_file(out))
        out.unlink()
        return rev.stored_bytes, float(torch.linalg.vector_norm(f - self.f_ft) / torch.linalg.vector_norm(self.f_base - self.f_ft))


ROWS = ("bf16", "int8", "mixed", "budget", "max-error", "exact", "smallest")


def run(subject: Subject, taus, rows_wanted=ROWS) -> list[Row]:
    rows = []
    for tau in taus:
        start = len(rows)
        paper_bytes, paper_err = subject.measure(energy=tau, encoding="fp16")
        errors = sorted(t.rel_error for t in subject.reg.show(subject.last.ref).tensors if t.kind == "lowrank")
        median_error = errors[len(errors) // 2]

        def row(mode: str, encoding: str, **options) -> None:
            stored, err = subject.measure(encoding=encoding, **options)
            rows.append(Row(subject.name, tau, mode, encoding, stored, err, paper_bytes, paper_err))

        rows.append(Row(subject.name, tau, "paper", "fp16", paper_bytes, paper_err, paper_bytes, paper_err))
        for encoding in ("bf16", "int8", "mixed"):
            if encoding in rows_wanted:
                row(f"energy={tau:g}", encoding, energy=tau)
        if "budget" in rows_wanted:
            for encoding in ("fp16", "int8", "mixed"):
                row(f"budget={TARGET:g}x", encoding, budget=int(TARGET * paper_bytes))
        if "max-error" in rows_wanted:
            # The paper's median per-layer error, as a bound every layer must meet.
            for encoding in ("fp16", "mixed"):
                row(f"max-error={median_error:.3f}", encoding, max_error=round(median_error, 3))
        if "exact" in rows_wanted:
            row("exact", "fp16", exact=True)
        if "smallest" in rows_wanted:
            for encoding in ("int8", "mixed"):
                found = _smallest_budget(subject, paper_bytes, paper_err, encoding)
                if found:
                    rows.append(Row(subject.name, tau, "budget=smallest", encoding, found[0], found[1], paper_bytes, paper_err))
        for r in rows[start:]:
            print(_line(r), flush=True)
    return rows


def _smallest_budget(subject: Subject, paper_bytes: int, paper_err: float, encoding: str, steps: int = 7):
    lo, hi, best = 0.02 * paper_bytes, 1.0 * paper_bytes, None
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        stored, err = subject.measure(budget=int(mid), encoding=encoding)
        if err <= paper_err:
            hi, best = mid, (stored, err)
        else:
            lo = mid
    return best


def small_subject(reg: Registry, work: Path, width: int = 64) -> Subject:
    base = make_base(width, steps=60)
    ft = finetune(base, subject=1, steps=40)
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    save_file(base_sd, work / "small-base.safetensors")
    save_file(ft_sd, work / "small-ft.safetensors")
    reg.add_base(work / "small-base.safetensors", "small")
    inputs = fixed_inputs()

    @torch.no_grad()
    def forward(sd: dict) -> torch.Tensor:
        model = TinyUNet(width)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model(*inputs)

    return Subject("small", reg, work / "small-ft.safetensors", base_sd, ft_sd, forward, work)


def sd15_subject(reg: Registry, work: Path, cache: Path) -> Subject:
    from diffusers import UNet2DConditionModel

    from bench.sd15 import build_pair

    base, ft = build_pair(cache)
    reg.add_base(base, "sd15")
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 32, 32, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    timestep = torch.tensor([250, 750])
    model = UNet2DConditionModel(cross_attention_dim=768).eval()

    @torch.no_grad()
    def forward(sd: dict) -> torch.Tensor:
        model.load_state_dict(sd)
        return model(sample, timestep, encoder_hidden_states=context).sample

    return Subject("sd15", reg, ft, load_file(base), load_file(ft), forward, work)


# ---------------------------------------------------------------- real fine-tunes: how budget mode spends bytes

TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ENCODINGS = ("fp16", "bf16", "int8", "mixed")
BUDGETS = (0.1, 0.2, 0.33, 0.5)
# The three that docs/rank-rules.md's table compares; --criteria names any of ranking.CRITERIA.
COMPARED = ("frobenius", "relative", "tau+frobenius")


def real_subject(reg: Registry, work: Path, pair) -> Subject:
    save_file(pair.base, work / f"{pair.name}-base.safetensors")
    save_file(pair.ft, work / f"{pair.name}-ft.safetensors")
    reg.add_base(work / f"{pair.name}-base.safetensors", pair.name)
    return Subject(pair.name, reg, work / f"{pair.name}-ft.safetensors", pair.base, pair.ft, pair.forward, work)


def allocation(subject: Subject, criteria=COMPARED) -> None:
    """Every energy rule in every encoding, then each budget criterion at fractions of the paper's
    bytes against the best energy rule (any encoding) that fits the same budget. Quality is
    1 - functional error (1: the fine-tune)."""
    measured: list[tuple[str, str, int, float]] = []
    paper_bytes, paper_err = subject.measure(energy=0.5, encoding="fp16")
    print(f"\n{subject.name}: paper (tau 0.5, fp16) {paper_bytes / 1e6:.3f} MB, quality {1 - paper_err:.4f}", flush=True)
    print("| rule | encoding | x paper bytes | quality |\n|---|---|---|---|")
    for tau in TAUS:
        for encoding in ENCODINGS:
            stored, err = subject.measure(energy=tau, encoding=encoding)
            measured.append((f"energy={tau:g}", encoding, stored, err))
            print(f"| energy={tau:g} | {encoding} | {stored / paper_bytes:.3f} | {1 - err:.4f} |", flush=True)
    print("\n| budget | criterion | x paper bytes | quality | best energy rule within it | its quality | margin |\n|---|---|---|---|---|---|---|")
    default = ranking.BUDGET_CRITERION
    try:
        for share in BUDGETS:
            budget = int(share * paper_bytes)
            fits = [m for m in measured if m[2] <= budget]
            best = min(fits, key=lambda m: m[3]) if fits else None
            for criterion in criteria:
                ranking.BUDGET_CRITERION = criterion
                stored, err = subject.measure(budget=budget, encoding="mixed")
                rival = f"{best[0]} {best[1]} | {1 - best[3]:.4f} | {best[3] - err:+.4f}" if best else "none fits | |"
                print(f"| {share:g}x | {criterion} | {stored / paper_bytes:.3f} | {1 - err:.4f} | {rival} |", flush=True)
    finally:
        ranking.BUDGET_CRITERION = default


def lossless(subject: Subject, pair) -> None:
    """``--exact`` against ZipNN (pip ``zipnn``), the lossless model compressor, on the same
    fine-tune: the file alone as ZipNN stores it, and ZipNN's delta mode (the XOR with the base
    it is given, tensor by tensor), beside the file zstd-compressed whole as dsreg stores a base."""
    import zstandard
    from zipnn import ZipNN

    def raw(t: torch.Tensor) -> bytes:
        return t.contiguous().view(torch.uint8).numpy().tobytes()

    exact = subject.reg.push(subject.ft, f"{subject.name}-exact", exact=True).stored_bytes
    file = subject.ft.read_bytes()
    alone = delta = 0
    for key, t in pair.ft.items():
        dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(t.dtype)
        if dtype is None:  # integer bookkeeping (position ids): ZipNN's byte grouping is for floats
            alone += len(zstandard.ZstdCompressor().compress(raw(t)))
            delta += len(zstandard.ZstdCompressor().compress(raw(t)))
            continue
        alone += len(ZipNN(input_format="byte", bytearray_dtype=dtype).compress(raw(t)))
        delta += len(ZipNN(input_format="byte", bytearray_dtype=dtype, delta_compressed_type="byte").compress(raw(t), delta_second_data=raw(pair.base[key])))
    whole = len(zstandard.ZstdCompressor(level=3).compress(file))
    print(f"\n{subject.name} lossless: file {len(file) / 1e6:.3f} MB | zstd {whole / 1e6:.3f} MB | ZipNN {alone / 1e6:.3f} MB | "
          f"ZipNN delta {delta / 1e6:.3f} MB | dsreg --exact {exact / 1e6:.3f} MB ({exact / delta:.3f}x ZipNN delta)", flush=True)


def _line(r: Row) -> str:
    return (
        f"| {r.model} | {r.tau:g} | {r.mode} | {r.encoding} | {r.stored / 1e6:.3f} MB | {r.bytes_ratio:.3f}x | "
        f"{r.func_error:.4f} | {r.func_error / r.paper_error:.3f}x | {r.verdict} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--taus", default="0.2,0.5,0.8")
    ap.add_argument("--sd15", action="store_true", help="also the SD1.5-shaped pair (3.44 GB; minutes per row)")
    ap.add_argument("--sd15-taus", default="0.2,0.5")
    ap.add_argument("--sd15-rows", default="", help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--small", action=argparse.BooleanOptionalAction, default=True, help="the small model's rows")
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    ap.add_argument("--real", default="", help="comma-separated real fine-tunes for the budget-allocation tables: " + ",".join(real_models.MODELS))
    ap.add_argument("--lossless", action=argparse.BooleanOptionalAction, default=True, help="--exact against ZipNN on the real fine-tunes (pip zipnn)")
    ap.add_argument("--criteria", default=",".join(COMPARED), help=f"budget criteria to compare on them, of {','.join(ranking.CRITERIA)}")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsreg-quality-"))
    print(f"| model | tau | mode | encoding | stored | x paper bytes | func error | x paper error | target (<= {TARGET}x bytes, error within 1%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        with Registry.open(f"sqlite:///{work / 'catalog.db'}", str(work / "blobs")) as reg:
            if args.small:
                run(small_subject(reg, work), [float(t) for t in args.taus.split(",")])
            for name in filter(None, args.real.split(",")):
                pair = real_models.load(name)
                subject = real_subject(reg, work, pair)
                if args.lossless:
                    lossless(subject, pair)
                if args.criteria:
                    allocation(subject, tuple(args.criteria.split(",")))
            if args.sd15:
                # Minutes per row at this size: no bisection, and only the rows asked for.
                rows = tuple(args.sd15_rows.split(",")) if args.sd15_rows else tuple(r for r in ROWS if r != "smallest")
                run(sd15_subject(reg, work, args.cache), [float(t) for t in args.sd15_taus.split(",")], rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

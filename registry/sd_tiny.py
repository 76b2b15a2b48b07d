"""A tiny Stable Diffusion pipeline (diffusers UNet, VAE, CLIP text encoder and tokenizer), built
offline, and real fine-tuning steps on it: what the tests, the benchmarks and the examples push.

Needs diffusers and transformers (``pip install 'dsreg[diffusers]'``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dsreg.demo import reproducible

WORDS = "a photo of sks dog cat person in the on".split()
TOKENS = 8
HIDDEN = 32


def tiny_pipeline(workdir: Path, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, **{w + "</w>": 3 + i for i, w in enumerate(WORDS)}}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TOKENS, projection_dim=HIDDEN, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=4, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def unet_inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, TOKENS, HIDDEN, generator=g)


def train(
    pipe: StableDiffusionPipeline, steps: int = 4, *, text_encoder: bool = False, matrices_only: bool = False, seed: int = 1,
    only: str | None = None, lr: float = 2e-3,
) -> None:
    """Adam steps of a denoising loss through the text encoder and UNet, DreamBooth-style.

    ``matrices_only`` trains only weights that a LoRA can carry (conv and linear kernels, not the
    token table, norms or biases); ``text_encoder`` trains the text encoder too; ``only`` trains
    only parameters with that in their names (an adapter's, injected by peft or another tool:
    ``lora_``); ``seed`` makes the data, so that another seed trains another subject.
    """
    def trainable(name: str, p: torch.Tensor) -> bool:
        if only:
            return only in name
        return p.dim() >= 2 and "embedding" not in name if matrices_only else True

    params = [p for n, p in pipe.unet.named_parameters() if trainable(n, p)]
    if text_encoder:
        params += [p for n, p in pipe.text_encoder.named_parameters() if trainable(n, p)]
    opt = torch.optim.Adam(params, lr=lr)
    # A copy: a fast tokenizer that has padded or truncated saves those settings in tokenizer.json.
    ids = copy.deepcopy(pipe.tokenizer)(["a photo of sks dog"] * 2, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    with reproducible():
        for _ in range(steps):
            x = torch.randn(2, 4, 8, 8, generator=g)
            t = torch.randint(0, 1000, (2,), generator=g)
            cond = pipe.text_encoder(ids)[0]
            loss = ((pipe.unet(x, t, cond).sample - x) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def outputs(pipe: StableDiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's and the text encoder's outputs on fixed inputs."""
    x, t, cond = unet_inputs()
    ids = copy.deepcopy(pipe.tokenizer)(["a photo of sks dog"], padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    return pipe.unet(x, t, cond).sample, pipe.text_encoder(ids)[0]

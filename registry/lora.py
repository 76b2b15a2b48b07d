"""Stored deltas as LoRA files: Delta-SVD's A·B is a LoRA of per-layer rank.

Two key conventions, both with the scale exactly 1:

- ``kohya``: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight``. kohya's scripts,
  AUTOMATIC1111 and ComfyUI read it, and diffusers where it has only LoRA parts. There are no
  ``.alpha`` entries, which by kohya's convention means alpha = rank, scale 1. Explicit per-module
  alphas would say the same, but diffusers maps alphas of attention layers to no module and applies
  them at the most common alpha over the module's own rank. Text-encoder modules are
  ``lora_te_...``. What no LoRA carries goes beside the factors as LyCORIS names it: ``.diff`` (a
  weight's whole delta), ``.diff_b`` (a bias's), ``.w_norm`` / ``.b_norm`` (a norm layer's).
- ``peft``: ``unet.<module>`` (``transformer.<module>`` for Flux and SD3) ``.lora_A.weight`` /
  ``.lora_B.weight``, diffusers' own format, with a ``lora_adapter_metadata`` entry that gives every
  module ``lora_alpha = r``. Bias deltas ride on ``lora_B.bias`` only where every module with a
  LoRA has a bias: peft's ``lora_bias`` is one switch, and diffusers cannot fuse it into a layer
  without one.

Which names a model's modules get in each format (the layout :mod:`export` writes) is decided there;
this module names a module of the keys it is given. Conv layers become conv LoRA: down has the
layer's kh x kw kernel, up is 1x1.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import torch

from . import families
from .errors import UsageError
from .layers import key_layout, layer_type

FORMATS = ("kohya", "peft")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Where a checkpoint's keys put each model: (key prefix, kohya prefix, peft prefix). A diffusers
# pipeline names components by folder ("unet/..."); an LDM single file by its CompVis prefixes.
# The empty prefix (a bare diffusers UNet folder) must stay last.
_COMPONENTS = (
    ("unet/", "lora_unet_", "unet."),
    ("text_encoder/", "lora_te_", "text_encoder."),
    ("text_encoder_2/", "lora_te2_", "text_encoder_2."),
    ("model.diffusion_model.", "lora_unet_", None),
    ("cond_stage_model.transformer.", "lora_te_", "text_encoder."),
    ("", "lora_unet_", "unet."),
)
# Prefixes of models that LoRA conventions have no names for: the VAE, and the rest of a pipeline.
_NO_LORA = ("first_stage_model.", "cond_stage_model.", "model_ema.", "vae/", "tokenizer/", "scheduler/")
_EMBEDDING = re.compile(r"(embedding|embeddings|embed_tokens|wte|wpe)$")


@dataclass(frozen=True)
class Target:
    """Where one base-model module goes in a LoRA file."""

    module: str  # the module's path inside its model, e.g. down_blocks.0.attentions.0.proj_in
    kohya: str  # lora_unet_down_blocks_0_attentions_0_proj_in
    peft: str | None  # unet.down_blocks.0.attentions.0.proj_in; None where the keys are not diffusers'


def target(key: str, shape: tuple[int, ...]) -> Target | None:
    """The LoRA module a weight key belongs to, or None when no LoRA can carry a change to it."""
    if not key.endswith(".weight") or len(shape) not in (2, 4):
        return None
    t = module_of(key)
    if t is None or _EMBEDDING.search(t.module.rsplit(".", 1)[-1]):
        return None  # an nn.Embedding: no conv/linear LoRA
    return t


def module_of(key: str) -> Target | None:
    """The module a weight or bias key belongs to, as LoRA files name it; None for a key of a model
    that LoRA conventions have no names for."""
    suffix = next((s for s in (".weight", ".bias") if key.endswith(s)), None)
    if suffix is None:
        return None
    if key.startswith("text_model."):  # a CLIP text encoder on its own: kohya's names keep text_model
        module = key[: -len(suffix)]
        return Target(module, "lora_te_" + module.replace(".", "_"), "text_encoder." + module)
    for prefix, kohya, peft in _COMPONENTS:
        if key.startswith(prefix):
            if not prefix and key.startswith(_NO_LORA):  # after the named prefixes: cond_stage_model.transformer. is one
                return None
            module = key[len(prefix) : -len(suffix)]
            if "/" in module:
                return None  # another pipeline component
            return Target(module, kohya + module.replace(".", "_"), peft and peft + module)
    return None


# Keys that say a checkpoint is a Stable Diffusion UNet or text encoder, whose modules LoRA loaders name.
_KNOWN_MODELS = (
    "conv_in.", "down_blocks.", "mid_block.", "up_blocks.", "time_embedding.", "model.diffusion_model.",
    "text_model.", "cond_stage_model.", "unet/", "text_encoder/", "text_encoder_2/",
)


def check_format(fmt: str, keys: list[str]) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown LoRA format {fmt!r}; use kohya or peft")
    if not any(k.startswith(_KNOWN_MODELS) for k in keys) and families.detect(keys) is None:
        raise UsageError(
            f"this subject is {key_layout(keys)}: LoRA loaders name the modules of a Stable Diffusion UNet, "
            "a Flux or SD3 transformer or a text encoder (lora_unet_*, lora_te_*, unet.*, transformer.*, text_encoder.*) "
            "and would match none of these; check the subject out instead"
        )
    if fmt == "peft" and any(k.startswith("model.diffusion_model.") for k in keys) and families.detect(keys) is None:
        raise UsageError(
            "this subject is an LDM single-file checkpoint (model.diffusion_model.* keys) of no model family dsreg "
            "converts; peft LoRA files need diffusers module names: use --format kohya, which A1111 and ComfyUI map to these names"
        )


def factors_pair(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up·down = a·b, each direction's scale split evenly between the two.

    Stored factors are A = UΣ and B = Vᵀ; in fp16 a small σ in A alone can fall below the normal
    range, so each column of A and row of B get √‖A_j‖ each.
    """
    norms = torch.linalg.vector_norm(a, dim=0)
    split = torch.where(norms > 0, norms.sqrt(), torch.ones_like(norms))
    up = a / split[None, :]
    down = b * split[:, None]
    return shaped(down, up, shape)


def full_rank_pair(delta: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) that carry a whole delta exactly: the delta on one side, an identity on the other."""
    out = shape[0]
    matrix = delta.reshape(out, -1).float()
    inner = matrix.shape[1]
    if len(shape) == 2 and inner < out:
        return shaped(torch.eye(inner), matrix, shape)
    return shaped(matrix, torch.eye(out), shape)


def rows_pair(rows: torch.Tensor, row_deltas: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a delta that touches only ``rows``: up picks the rows, down holds their change."""
    up = torch.zeros(shape[0], rows.numel())
    up[rows, torch.arange(rows.numel())] = 1.0
    return shaped(row_deltas.reshape(rows.numel(), -1).float(), up, shape)


def shaped(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    rank = down.shape[0]
    if len(shape) == 4:  # conv LoRA: down keeps the kernel, up is a 1x1 conv
        return down.reshape(rank, *shape[1:]).contiguous(), up.reshape(shape[0], rank, 1, 1).contiguous()
    return down.contiguous(), up.contiguous()


class LoraFile:
    """The tensors and metadata of one LoRA file, added to module by module.

    Beside the LoRA factors, a kohya file carries whole changes as LyCORIS names them, which
    ComfyUI, A1111 and LyCORIS read: ``.diff`` (a weight's delta), ``.diff_b`` (a bias's),
    ``.w_norm`` / ``.b_norm`` (a norm layer's). A peft file carries bias deltas on ``lora_B.bias``.
    """

    def __init__(self, fmt: str, dtype: str, family: str | None = None):
        if dtype not in DTYPES:
            raise UsageError(f"unknown LoRA dtype {dtype!r}; use fp16, bf16 or fp32")
        self.format = fmt
        self.dtype = DTYPES[dtype]
        # diffusers names a transformer's modules transformer.*, a UNet's unet.*
        self.model = "transformer." if family in ("flux", "sd3") else "unet."
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}  # module name -> rank
        self.weights: dict[str, str] = {}  # module name -> the weight key its LoRA changes
        self.biases: dict[str, torch.Tensor] = {}  # peft module name -> bias delta

    def name(self, t: Target) -> str | None:
        if self.format == "kohya":
            return t.kohya
        if t.peft is not None and t.peft.startswith("unet."):
            return self.model + t.peft[len("unet."):]
        return t.peft

    def add(self, t: Target, down: torch.Tensor, up: torch.Tensor, key: str) -> bool:
        """A module's LoRA; False where the format has no name for the module."""
        name = self.name(t)
        if name is None:
            return False
        self.ranks[name] = down.shape[0]
        self.weights[name] = key
        down_key, up_key = ("lora_down.weight", "lora_up.weight") if self.format == "kohya" else ("lora_A.weight", "lora_B.weight")
        self.tensors[f"{name}.{down_key}"] = down.to(self.dtype)
        self.tensors[f"{name}.{up_key}"] = up.to(self.dtype)
        return True

    def add_biases(self, biases: list[tuple[str, Target, torch.Tensor]], has_bias: set[str]) -> set[str]:
        """Bias deltas; the keys carried. peft's ``lora_bias`` is one switch for every module of a
        model, and diffusers cannot fuse it into a layer without a bias: biases ride on lora_B.bias
        only where every module with a LoRA has a bias, else none does."""
        if self.format == "kohya":
            for key, t, delta in biases:
                part = "b_norm" if layer_type(key) == "norm" else "diff_b"
                self.tensors[f"{t.kohya}.{part}"] = delta.to(self.dtype)
            return {key for key, _, _ in biases}
        with_lora = [(key, t, delta) for key, t, delta in biases if self.name(t) in self.ranks]
        if not with_lora or any(weight not in has_bias for weight in self.weights.values()):
            return set()
        for _, t, delta in with_lora:
            self.biases[self.name(t)] = delta.float()
        return {key for key, _, _ in with_lora}

    def add_whole(self, key: str, delta: torch.Tensor) -> bool:
        """A weight's whole change where no LoRA module carries it (a norm, an embedding): kohya's
        ``.w_norm`` / ``.diff``; peft has no such part."""
        t = module_of(key)
        if self.format != "kohya" or t is None or not key.endswith(".weight"):
            return False
        self.tensors[f"{t.kohya}.{'w_norm' if layer_type(key) == 'norm' else 'diff'}"] = delta.to(self.dtype)
        return True

    def finish(self, metadata: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = dict(self.tensors)
        meta = {"format": "pt", **metadata}
        if self.format == "peft":
            if self.biases:  # lora_bias is all or nothing: the other modules get a zero bias
                for name in self.ranks:
                    up = tensors[f"{name}.lora_B.weight"]
                    tensors[f"{name}.lora_B.bias"] = self.biases.get(name, torch.zeros(up.shape[0])).to(self.dtype)
            meta["lora_adapter_metadata"] = json.dumps(self._adapter_config(), sort_keys=True)
        return tensors, meta

    def _adapter_config(self) -> dict:
        """peft LoraConfig arguments per model prefix (diffusers reads them): alpha = rank everywhere."""
        config: dict = {}
        by_model: dict[str, dict[str, int]] = {}
        for name, rank in self.ranks.items():
            model, module = name.split(".", 1)
            by_model.setdefault(model, {})[module] = rank
        for model, ranks in by_model.items():
            common = Counter(ranks.values()).most_common(1)[0][0]
            pattern = {m: r for m, r in ranks.items() if r != common}
            config.update({
                f"{model}.r": common, f"{model}.lora_alpha": common, f"{model}.rank_pattern": pattern,
                f"{model}.alpha_pattern": dict(pattern), f"{model}.target_modules": sorted(ranks),
                f"{model}.lora_bias": bool(self.biases), f"{model}.lora_dropout": 0.0,
            })
        return config


def left_out_kind(key: str) -> str:
    """What a change that no LoRA module holds is: a bias, a norm, an embedding, a file, or other."""
    if not key.endswith((".weight", ".bias")) and ("/" in key or key.endswith((".json", ".txt"))):
        return "file"
    kind = layer_type(key)
    if kind in ("norm", "embedding"):
        return kind
    return "bias" if key.endswith(".bias") else "other"

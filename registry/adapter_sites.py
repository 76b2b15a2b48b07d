"""Where an adapter file's modules land in a base: every name a trainer may give a module, in
either layout of the base's family, and the rows of base tensors that the module's weight and bias
are made of.

A base is stored in one layout, and adapters are trained in both: kohya's Flux LoRA names BFL's
fused ``double_blocks.N.img_attn.qkv``, diffusers' names the split ``transformer_blocks.N.attn.to_q``.
The family's table (:mod:`families`) says which rows of the base's tensors each tensor of the other
layout is, so a module of either layout is a :class:`Site`: its weight as row ranges of base
tensors, stacked. A LoRA on a fused tensor against a split base then changes each split tensor by
its row block of ``up`` times the one shared ``down``; split LoRAs against a fused base change the
row blocks of the fused tensor, which :func:`combine` joins into one low-rank update (the ups
block-diagonal, the downs stacked).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import torch

from . import encodings, families, unet_names
from .catalog import BaseTensor
from .checkpoint import TensorSpec
from .errors import CheckpointError
from .families import Piece
from .lora import module_of

_LDM_UNET, _LDM_TEXT = "model.diffusion_model.", "cond_stage_model.transformer."


@dataclass(frozen=True)
class Site:
    """An adapter module's weight (and bias) as rows of base tensors, joined in order."""

    weight: tuple[Piece, ...]  # every piece with its stop filled in
    bias: tuple[Piece, ...]  # empty where some part of the module has no bias in the base
    shape: tuple[int, ...]  # the weight as the adapter's module sees it
    key: str | None = None  # the base key of the weight, when the module is one whole base weight


def index(base: Mapping[str, BaseTensor]) -> dict[str, Site]:
    """Every name an adapter file may give a module of ``base`` -> where that module is."""
    rows = {k: (t.shape[0] if t.shape else 1) for k, t in base.items()}
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in base.items()]
    views = [({s.key: s for s in specs}, {s.key: (Piece(s.key, 0, rows[s.key]),) for s in specs})]
    own = families.detect(base)
    family = families.FAMILIES[own.family] if own is not None else None
    if own is not None:
        other = "diffusers" if own.layout == "original" else "original"
        steps = families.plan(specs, own, families.ModelLayout(own.family, other, ""))
        views.append((
            {spec.key: spec for spec, _ in steps},
            {spec.key: tuple(Piece(p.key, p.start, rows[p.key] if p.stop is None else p.stop) for p in rule.pieces) for spec, rule in steps},
        ))
    ldm = [k[len(_LDM_UNET):].rsplit(".", 1)[0] for k in base if k.startswith(_LDM_UNET)]
    layers = unet_names.layers_per_block(ldm) if ldm else 0
    out: dict[str, Site] = {}
    diffusers_sites: dict[str, Site] = {}
    for n, (view_specs, pieces) in enumerate(views):
        for key, spec in view_specs.items():
            if not key.endswith(".weight"):
                continue
            module = key[: -len(".weight")]
            bias = pieces.get(module + ".bias", ())
            whole = pieces[key]
            direct = whole[0].key if len(whole) == 1 and whole[0].start == 0 and whole[0].stop == rows[whole[0].key] else None
            site = Site(whole, bias, tuple(spec.shape), direct)
            for name in _names(key, layers, family is not None):
                out.setdefault(name, site)
            if own is not None and (own.layout == "diffusers") == (n == 0):
                diffusers_sites[module[len(own.prefix):] if n == 0 else module] = site
    if family is not None and family.adapter_aliases is not None:
        for alias, members in family.adapter_aliases(diffusers_sites.keys()).items():
            parts = [diffusers_sites[m] for m in members]
            bias = sum((p.bias for p in parts), ()) if all(p.bias for p in parts) else ()
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            out.setdefault(alias, Site(_joined(sum((p.weight for p in parts), ())), _joined(bias), shape))
    return out


def _joined(pieces: tuple[Piece, ...]) -> tuple[Piece, ...]:
    """Adjacent rows of one tensor as one piece (XLabs' single-block qkv is the first rows of linear1)."""
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].key == p.key and out[-1].stop == p.start:
            out[-1] = Piece(p.key, out[-1].start, p.stop)
        else:
            out.append(p)
    return tuple(out)


def _names(key: str, layers: int, family: bool) -> list[str]:
    """The names adapter files give the module of weight ``key``."""
    t = module_of(key)
    if t is None:
        return []
    peft = "text_encoder." + t.module if key.startswith(_LDM_TEXT) else t.peft
    names = [t.kohya, peft]
    if key.startswith(_LDM_UNET):
        # Trainers name an LDM base's UNet modules as diffusers does (lora_unet_down_blocks_0_...).
        renamed = unet_names.diffusers_module(t.module, layers)
        if renamed:
            names += ["lora_unet_" + renamed.replace(".", "_"), "unet." + renamed]
    if t.kohya.startswith(("lora_te_", "lora_te2_")):
        # CLIP's modules sit under text_model. in transformers 4 and in most files, not in
        # transformers 5; diffusers' own text-encoder LoRA keys leave it out. Either name fits.
        module = t.module
        head = t.kohya[: len(t.kohya) - len(module)]  # lora_te_ or lora_te2_
        other = module[len("text_model."):] if module.startswith("text_model.") else "text_model." + module
        names.append(head + other.replace(".", "_"))
        if peft:
            names.append(peft.split(".", 1)[0] + "." + other)
    names += ["lora_te1_" + n[len("lora_te_"):] for n in names if n and n.startswith("lora_te_")]  # SDXL trainers number the first encoder too
    # LyCORIS' own default prefix, for a network made on the denoiser or a text encoder alone.
    names += ["lycoris_" + n.split("_", 2)[2] for n in names if n and n.startswith(("lora_unet_", "lora_te_", "lora_te2_"))]
    if family and t.peft and t.peft.startswith("unet."):
        # A transformer's files: diffusers' pipelines prefix transformer., ComfyUI's diffusion_model.
        names += ["transformer." + t.module, "diffusion_model." + t.module]
    return [n for n in names if n]


def spread(pieces: tuple[Piece, ...]) -> Iterator[tuple[Piece, int]]:
    """Each base piece of a site's weight or bias, with its first row in the module's tensor."""
    offset = 0
    for p in pieces:
        yield p, offset
        offset += p.stop - p.start


@dataclass(frozen=True)
class Part:
    """One module's change to rows start:stop of a base tensor."""

    module: str
    start: int
    stop: int
    update: object  # a LowRankUpdate or DenseUpdate of those rows


def combine(key: str, shape: tuple[int, ...], parts: list[Part]):
    """The one update of base tensor ``key`` that its parts make together."""
    from .adapters import DenseUpdate, LowRankUpdate

    parts = sorted(parts, key=lambda p: p.start)
    for a, b in zip(parts, parts[1:]):
        if b.start < a.stop:
            raise CheckpointError(f"adapter modules {a.module} and {b.module} both change rows of {key!r}; nothing was stored")
    rows = shape[0] if shape else 1
    if len(parts) == 1 and parts[0].start == 0 and parts[0].stop == rows:
        return parts[0].update
    if all(isinstance(p.update, LowRankUpdate) for p in parts):
        blocks = tuple((p.start, p.stop, p.update.up * p.update.scale, p.update.down) for p in parts)
        up = encodings.block_diagonal(rows, [(start, stop, up) for start, stop, up, _ in blocks])
        return LowRankUpdate(up, torch.cat([down for _, _, _, down in blocks]), 1.0, blocks=blocks)
    value = torch.zeros(rows, *(shape[1:] if shape else ()))
    for p in parts:
        value[p.start:p.stop] = p.update.delta((p.stop - p.start, *value.shape[1:]))
    return DenseUpdate(value.reshape(shape))


def rows_of(update, start: int, stop: int):
    """Rows start:stop of a module's update (the down of a LoRA stays whole: it is shared)."""
    from .adapters import LowRankUpdate

    if isinstance(update, LowRankUpdate):
        if (start, stop) == (0, update.up.shape[0]):
            return update
        return LowRankUpdate(update.up[start:stop], update.down, update.scale)
    return replace(update, value=update.value.reshape(update.value.shape[0] if update.value.dim() else 1, -1)[start:stop])

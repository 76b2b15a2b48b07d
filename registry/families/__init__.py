"""Model families and their layouts: which tensors of one layout make each tensor of the other.

A family (Flux.1, SD3/SD3.5, the Stable Diffusion UNet) is released in its authors' layout
("original": BFL's ``double_blocks``, Stability's ``joint_blocks``, the LDM ``input_blocks``) and
used through diffusers' layout, which splits fused projections and renames every module. Each
family is one module beside this one with a ``table``: for every tensor of the original layout,
the row ranges of diffusers tensors it is made of, in order. A rename is one whole piece; a fused
q/k/v is three pieces; a swap of two halves (``swap_scale_shift``) is two pieces of one tensor in
the other order. Conversions both ways come from that table (:func:`plan`), and only cut, join and
reorder rows, so they never change a bit: an exact revision checks out bit-identical in either
layout. The tables are checked against diffusers' own converters (tests/test_families.py).

Push, checkout, load and apply ask :func:`detect` which family and layout a set of keys is in
and :func:`plan` how to get from one layout to another; none of them names a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from ..checkpoint import Checkpoint, TensorSpec
from ..errors import UsageError

LAYOUTS = ("original", "diffusers")
# Where a family's keys sit in a file: bare (a model file), or under the prefix single-file
# checkpoints use (ComfyUI and the original repositories save ``model.diffusion_model.*``).
PREFIXES = ("", "model.diffusion_model.")


@dataclass(frozen=True)
class Piece:
    """Rows ``start`` to ``stop`` (None: to the end) of tensor ``key``."""

    key: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Rule:
    """Tensor ``key`` of the target layout: its pieces of source tensors, joined along rows."""

    key: str
    pieces: tuple[Piece, ...]

    @property
    def renamed(self) -> str | None:
        """The source key, when the tensor is one whole source tensor under another name."""
        if len(self.pieces) == 1 and self.pieces[0].start == 0 and self.pieces[0].stop is None:
            return self.pieces[0].key
        return None


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    # Which layout a set of bare keys (no prefix) is in, or None if not this family.
    detect: Callable[[set[str]], str | None]
    # For specs (bare keys) in the given layout: original key -> its pieces of diffusers keys.
    table: Callable[[Mapping[str, TensorSpec], str], dict[str, tuple[Piece, ...]]]
    # The diffusers class a model of the family loads into, for messages and docs.
    diffusers_class: str
    # Where the original layout's keys sit in the files its tools load: single-file SD checkpoints
    # (A1111, ComfyUI, diffusers' from_single_file) have the UNet under model.diffusion_model.
    original_prefix: str = ""
    # Module names that adapter files of the family use beyond either layout's (XLabs' Flux LoRA):
    # given the diffusers layout's module names, alias -> the diffusers modules it stacks.
    adapter_aliases: Callable[[Iterable[str]], dict[str, tuple[str, ...]]] | None = None


@dataclass(frozen=True)
class ModelLayout:
    """A family's tensors in one layout, under a key prefix."""

    family: str
    layout: str
    prefix: str = ""

    def __str__(self) -> str:
        where = f", keys under {self.prefix}" if self.prefix else ""
        return f"{FAMILIES[self.family].title} ({self.layout} layout{where})"

    def to_json(self) -> dict:
        return {"family": self.family, "layout": self.layout, "prefix": self.prefix}

    @classmethod
    def from_json(cls, data: dict | None) -> "ModelLayout | None":
        return cls(data["family"], data["layout"], data.get("prefix", "")) if data else None


def _families() -> dict[str, Family]:
    from . import flux, sd3, unet

    return {f.name: f for f in (flux.FAMILY, sd3.FAMILY, unet.FAMILY)}


FAMILIES: dict[str, Family] = _families()


def detect(keys: Iterable[str]) -> ModelLayout | None:
    """The family and layout of a model's keys, or None for a model of no known family (its
    names are then used as given, with no conversion)."""
    keys = set(keys)
    for prefix in PREFIXES:
        bare = {k[len(prefix):] for k in keys if k.startswith(prefix)} if prefix else keys
        if not bare:
            continue
        for family in FAMILIES.values():
            layout = family.detect(bare)
            if layout is not None:
                return ModelLayout(family.name, layout, prefix)
    return None


def check_layout(layout: str | None) -> None:
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"unknown layout {layout!r}; use {' or '.join(LAYOUTS)}")


def plan(specs: list[TensorSpec], src: ModelLayout, dst: ModelLayout) -> list[tuple[TensorSpec, Rule]]:
    """The tensors of ``specs`` (keys in ``src``) as ``dst`` has them: each target's spec and the
    rule that makes it from the sources. Keys outside ``src``'s prefix (a folder's config.json, an
    EMA copy) and keys the family's table does not name are carried over unchanged."""
    if src.family != dst.family:
        raise ValueError(f"cannot convert {src} to {dst}")
    by_key = {s.key: s for s in specs}
    inside = {s.key[len(src.prefix):]: s for s in specs if s.key.startswith(src.prefix)}
    family = FAMILIES[src.family]
    if src.layout == dst.layout:
        rules = {k: Rule(k, (Piece(k),)) for k in inside}
    else:
        table = family.table(inside, src.layout)
        rules = _invert(table, inside) if src.layout == "original" else {k: Rule(k, p) for k, p in table.items()}
        used = {p.key for rule in rules.values() for p in rule.pieces}
        for key in inside:  # what the table does not name stays as it is
            if key not in used:
                rules.setdefault(key, Rule(key, (Piece(key),)))
    out: list[tuple[TensorSpec, Rule]] = []
    for key, rule in rules.items():
        pieces = tuple(Piece(src.prefix + p.key, p.start, p.stop) for p in rule.pieces)
        rule = Rule(dst.prefix + key, pieces)
        out.append((_spec(rule, by_key), rule))
    for spec in specs:
        if not spec.key.startswith(src.prefix):
            out.append((spec, Rule(spec.key, (Piece(spec.key),))))
    return out


def _spec(rule: Rule, by_key: Mapping[str, TensorSpec]) -> TensorSpec:
    first = by_key[rule.pieces[0].key]
    rows = 0
    for p in rule.pieces:
        source = by_key[p.key]
        if source.dtype != first.dtype or source.shape[1:] != first.shape[1:]:
            raise ValueError(f"{rule.key}: pieces of unlike tensors ({first.key}, {source.key})")
        total = source.shape[0] if source.shape else 1
        rows += (total if p.stop is None else p.stop) - p.start
    return TensorSpec(rule.key, first.dtype, (rows, *first.shape[1:]) if first.shape else first.shape)


def _invert(table: dict[str, tuple[Piece, ...]], originals: Mapping[str, TensorSpec]) -> dict[str, Rule]:
    """original key -> pieces of diffusers keys, turned round: diffusers key -> pieces of original keys."""
    found: dict[str, list[tuple[int, Piece]]] = {}
    for key, pieces in table.items():
        offset = 0
        for p in pieces:
            rows = p.stop - p.start if p.stop is not None else None
            if rows is None:  # a whole tensor: as many rows as the original has left
                rows = (originals[key].shape[0] if originals[key].shape else 1) - offset
            found.setdefault(p.key, []).append((p.start, Piece(key, offset, offset + rows)))
            offset += rows
    rules = {}
    for key, parts in found.items():
        parts.sort(key=lambda x: x[0])
        pieces = tuple(p for _, p in parts)
        if len(pieces) == 1 and pieces[0].start == 0 and _whole(pieces[0], originals):
            pieces = (Piece(pieces[0].key),)
        rules[key] = Rule(key, pieces)
    return rules


def _whole(piece: Piece, specs: Mapping[str, TensorSpec]) -> bool:
    shape = specs[piece.key].shape
    return piece.stop == (shape[0] if shape else 1)


def assemble(rule: Rule, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """A rule's tensor from its sources (read with ``get``)."""
    if rule.renamed is not None:
        return get(rule.renamed)
    parts = [get(p.key)[p.start:p.stop] for p in rule.pieces]
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def convert_checkpoint(ckpt: Checkpoint, src: ModelLayout, dst: ModelLayout) -> Checkpoint:
    """``ckpt`` as ``dst`` names and cuts its tensors, read from ``ckpt`` as they are asked for."""
    steps = plan(ckpt.specs, src, dst)
    rules = {spec.key: rule for spec, rule in steps}

    def get(key: str, scratch=None) -> torch.Tensor:
        rule = rules[key]
        if rule.renamed is not None:
            return ckpt.get(rule.renamed, scratch)
        return assemble(rule, ckpt.get)  # several reads: none may land in one reused buffer

    # No streamed digest: the conversion reads the file out of order, so the source digest is a
    # pass of its own (Checkpoint.file_digest).
    return Checkpoint(ckpt.path, [spec for spec, _ in steps], ckpt.layout, get, ckpt.close, None)

"""Adapter files as subjects of a base: LoRA, LoCon and LyCORIS files in kohya's naming, and
diffusers/peft LoRA files, read into per-tensor changes of a base and opened as the checkpoint they
make when merged into it.

Push stores that merged checkpoint like any fine-tune, so an adapter subject gets what every subject
gets (rank rules, encodings, checkout, load/apply, export-lora, gc), with one difference: a change
that the file gives as a product, ΔW = scale · up · down, is decomposed from its factors
(:class:`deltasvd.FactoredSpectrum`), never from the merged tensor rounded into the base's dtype.

What a file says per module (docs/adapters.md has the table):

- kohya / A1111 / LyCORIS: ``lora_unet_<module with _>`` and ``lora_te_`` (``lora_te1_``,
  ``lora_te2_``) with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (absent: alpha = rank),
  ``.lora_mid.weight`` (LyCORIS' Tucker conv), ``.diff`` / ``.diff_b`` (whole weight and bias
  deltas) and ``.w_norm`` / ``.b_norm`` (a norm's). ΔW = alpha / rank · up · down.
- diffusers / peft: ``unet.<module>``, ``text_encoder.<module>`` with ``.lora_A.weight`` /
  ``.lora_B.weight`` (and ``.lora_B.bias``), the older ``.lora.down.weight`` / ``.lora.up.weight``
  and ``.lora_linear_layer.down/up.weight`` that diffusers' ``save_lora_weights`` writes, and the
  oldest attention-processor names (``processor.to_q_lora.down.weight``). Scale alpha / r from the
  file's ``lora_adapter_metadata`` (peft's ``lora_alpha``, ``r``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``); without it alpha = rank, as diffusers assumes.

- SVDiff: ``<module>.delta`` in ``spectral_shifts.safetensors`` (UNet) and
  ``spectral_shifts_te.safetensors`` (text encoder), shifts of the base weight's singular values.

A base stored as an LDM single file is matched by its CompVis names and by the diffusers names that
trainers give its UNet modules (:mod:`unet_names`). Algorithms whose ΔW is none of these (LoHa,
LoKr, DoRA, OFT) are refused by name: no key of a file is ever dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from . import adapter_sites, codec, encodings, spectral
from .bases import base_tensor
from .catalog import BaseTensor, BlobRecord, Derived
from .checkpoint import Checkpoint, Layout, TensorSpec, open_checkpoint
from .deltasvd import FactoredSpectrum
from .errors import AmbiguousBase, BaseMismatch, CheckpointError, NonFiniteWeights, UsageError

KOHYA = "kohya"
DIFFUSERS = "diffusers"
SVDIFF = "svdiff"
# SVDiff's files, as svdiff-pytorch's training script writes them: the UNet's shifts and the text encoder's.
SVDIFF_FILES = {"spectral_shifts.safetensors": "unet.", "spectral_shifts_te.safetensors": "text_encoder."}

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
_KOHYA_PARTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "diff": "weight", "diff_b": "bias", "w_norm": "weight", "b_norm": "bias",
}
# Longest first: ".lora.down.weight" must not be read as a module ending in ".lora".
_DIFFUSERS_PARTS = {
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias", "alpha": "alpha",
}
_PROCESSOR = re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
# XLabs' Flux LoRA: a processor's LoRAs on each stream's fused qkv and output projection.
_XLABS = re.compile(r"^(?:diffusion_model\.)?(?P<module>(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]?)\.(?P<part>down|up)\.weight$")
# Parts of other algorithms, by the name a user knows them by.
_OTHER_ALGORITHMS = {
    "hada_": "LoHa (hada_*)", "lokr_": "LoKr (lokr_*)", "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)", "oft_": "OFT", "bias_indices": "LyCORIS' sparse bias (bias_indices)",
}
# Why each is refused: what its merge is, so that a user knows what to do instead.
_WHY = {
    "DoRA": "its merge rescales every column of a layer's merged weight to a stored magnitude, a full-rank change "
            "(diffusers drops the magnitudes with a warning, so its merge is not the file's)",
    "LoHa": "its change is a Hadamard product of two low-rank products, of rank up to the square of its own",
    "LoKr": "its change is a Kronecker product, of rank up to the product of its factors' ranks",
}
# Which model of a pipeline an adapter module is for, by its name's head (--only picks models).
MODELS = ("unet", "text_encoder", "text_encoder_2")
_MODEL_HEADS = {
    "lora_te2_": "text_encoder_2", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
    "text_encoder_2.": "text_encoder_2", "text_encoder.": "text_encoder",
}


@dataclass(frozen=True)
class SharedFactors:
    """One LoRA over several base tensors (a fused q/k/v LoRA against split q, k, v): its up
    (scale folded in) and its down, with the rows of up each base tensor takes."""

    up: torch.Tensor
    down: torch.Tensor
    rows: tuple[tuple[str, int, int], ...]  # (base key, first row, row past the last)


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale · up · down, with up (out, r) and down (r, in·kh·kw) as matrices."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    tucker: tuple[torch.Tensor, torch.Tensor] | None = None  # LyCORIS' (lora_mid, lora_down as r x in), which fold into ``down``
    shared: SharedFactors | None = None  # the LoRA these rows are cut from, stored once for all its tensors
    blocks: tuple | None = None  # several LoRAs on row blocks: (first row, past the last, up · scale, down) each
    factored: ClassVar[bool] = True

    def given(self, encoding: str) -> tuple[dict[str, torch.Tensor], int] | None:
        """(blob, rank) that stores this update as the file gave it, where decomposing it would
        store more; None where the decomposition is as small."""
        if encoding not in encodings.FLOAT_ENCODINGS:
            return None
        if self.shared is not None:
            return encodings.encode_shared(self.shared.up, self.shared.down, self.shared.rows, encoding), self.down.shape[0]
        if self.blocks is not None:
            return encodings.encode_blocks(self.blocks, self.up.shape[0], encoding), self.down.shape[0]
        return None

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        return (self.up.float() @ self.down.float()).mul_(self.scale).reshape(shape)

    def stored(self) -> None:
        return None

    def spectrum(self, device) -> FactoredSpectrum:
        basis = None if self.tucker is None else {"b.mid": self.tucker[0], "b.down": self.tucker[1]}
        return FactoredSpectrum(self.up.to(device) * self.scale, self.down.to(device), basis)


@dataclass(frozen=True)
class DenseUpdate:
    """ΔW given whole (LyCORIS' diff, a norm's w_norm, a LoRA's bias)."""

    value: torch.Tensor
    factored: ClassVar[bool] = False

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.value.float().reshape(shape)

    def spectrum(self, device) -> FactoredSpectrum:
        raise TypeError("a dense update has no factors")

    def stored(self) -> None:
        return None

    def given(self, encoding: str) -> None:
        return None


@dataclass(frozen=True)
class SpectralUpdate:
    """SVDiff's shift δ of a base weight's singular values, bound to that weight's stored SVD and to
    the one blob that holds every shift of the subject."""

    shift: torch.Tensor
    svd: dict[str, torch.Tensor] | None = None
    blob: dict[str, torch.Tensor] | None = None  # spectral.pack of the subject's shifts
    factored: ClassVar[bool] = False

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        return spectral.change(shape, self.svd, self.shift)

    def spectrum(self, device) -> FactoredSpectrum:
        raise TypeError("spectral shifts have no factors")

    def stored(self) -> dict[str, torch.Tensor]:
        return self.blob

    def given(self, encoding: str) -> None:
        return None


@dataclass(frozen=True)
class Adapter:
    """An adapter file, parsed: its modules' parts by name, before they are matched to a base."""

    path: Path
    format: str  # KOHYA or DIFFUSERS
    modules: dict[str, dict[str, torch.Tensor]]  # module name as the file gives it -> part -> tensor
    config: dict = field(default_factory=dict)  # diffusers' lora_adapter_metadata, if any
    nbytes: int = 0
    left_out: tuple[str, ...] = ()  # modules of models that --only left out

    def only(self, models: tuple[str, ...] | None) -> "Adapter":
        """The adapter's modules for ``models`` alone (unet, text_encoder, text_encoder_2)."""
        if not models:
            return self
        wanted = {"unet" if m == "transformer" else m for m in models}
        unknown = wanted - set(MODELS)
        if unknown:
            raise UsageError(f"unknown model {sorted(unknown)[0]!r} for --only; use unet (or transformer), text_encoder or text_encoder_2")
        kept = {m: p for m, p in self.modules.items() if model_of(m) in wanted}
        if not kept:
            raise CheckpointError(f"{self.path.name} has no modules for {', '.join(sorted(wanted))}; nothing was stored")
        return replace(self, modules=kept, left_out=tuple(sorted(m for m in self.modules if m not in kept)))


def model_of(module: str) -> str:
    """The pipeline model an adapter module is for: unet (also a transformer), text_encoder or text_encoder_2."""
    return next((model for head, model in _MODEL_HEADS.items() if module.startswith(head)), "unet")


def looks_like_adapter(keys: list[str]) -> bool:
    """Whether a file's keys are an adapter's rather than a model's: most of them name adapter parts.
    A full checkpoint named lora.safetensors is a checkpoint, and a LoRA named model.ckpt a LoRA."""
    hits = sum(_adapter_key(k) for k in keys)
    return bool(keys) and hits * 2 > len(keys)


def _adapter_key(key: str) -> bool:
    if key.startswith(_KOHYA_PREFIXES) or key.endswith(".delta"):  # .delta: SVDiff's shift of a module's singular values
        return True
    return "lora" in key and not key.startswith(("model.", "first_stage_model.", "cond_stage_model."))


def read(ckpt: Checkpoint) -> Adapter:
    """Parse an opened adapter file; refuses what it cannot read in full, naming it."""
    keys = [s.key for s in ckpt.specs]
    if all(k.endswith(".delta") for k in keys):
        # SVDiff names modules inside their model; which model, its file's name says.
        fmt, model = SVDIFF, "text_encoder." if "_te" in ckpt.path.stem else "unet."
    else:
        fmt, model = (KOHYA if any(k.startswith(_KOHYA_PREFIXES) for k in keys) else DIFFUSERS), ""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key in keys:
        found = (model + key[: -len(".delta")], "shift") if fmt == SVDIFF else _split(key, fmt)
        if found is None:
            unknown.append(key)
            continue
        module, part = found
        tensor = ckpt.get(key).detach().clone()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeights(f"{ckpt.path}: adapter tensor {key!r} has NaN or Inf values; nothing was stored")
        modules.setdefault(module, {})[part] = tensor
    if unknown:
        for prefix, name in _OTHER_ALGORITHMS.items():
            if any(prefix in k for k in unknown):
                why = next((f": {text}" for algo, text in _WHY.items() if name.startswith(algo)), "")
                raise CheckpointError(
                    f"{ckpt.path.name} is a {name} adapter, which dsreg does not store as a subject{why}; merge it "
                    "into the base with its trainer's tool and push the merged checkpoint"
                )
        raise CheckpointError(f"{ckpt.path.name}: {len(unknown)} keys are no adapter part dsreg reads, e.g. {', '.join(unknown[:3])}")
    config = _config((ckpt.layout.metadata or {}).get("lora_adapter_metadata"))
    size = ckpt.path.stat().st_size if ckpt.path.is_file() else ckpt.nbytes
    return Adapter(ckpt.path, fmt, modules, config, size)


def _split(key: str, fmt: str) -> tuple[str, str] | None:
    if fmt == KOHYA:
        module, _, part = key.partition(".")
        return (module, _KOHYA_PARTS[part]) if module.startswith(_KOHYA_PREFIXES) and part in _KOHYA_PARTS else None
    m = _XLABS.match(key)
    if m:
        return m["module"], m["part"]
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['module']}.{proj}", m["part"]
    for suffix, part in _DIFFUSERS_PARTS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    return None


def _config(text: str | None) -> dict:
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        raise CheckpointError("the adapter's lora_adapter_metadata is not JSON") from None
    for key, value in config.items():
        if key.endswith(".use_dora") and value:
            raise CheckpointError(
                f"this is a DoRA adapter (use_dora in its metadata), which dsreg does not store as a subject: {_WHY['DoRA']}; "
                "merge it with its trainer's tool and push the merged checkpoint"
            )
    return config


# ---------------------------------------------------------------- matching a base


def updates(adapter: Adapter, base: dict[str, BaseTensor]) -> dict[str, LowRankUpdate | DenseUpdate]:
    """The adapter's changes by base key; BaseMismatch where it does not fit ``base``.

    A module may be named in either layout of the base's family: its change is cut into the base
    tensors' rows it covers (:mod:`adapter_sites`), and the parts that land in one tensor joined."""
    sites = adapter_sites.index(base)
    missing = sorted(m for m in adapter.modules if m not in sites)
    if missing:
        raise BaseMismatch(_missing(missing, adapter))
    parts: dict[str, list[adapter_sites.Part]] = {}

    def put(key: str, update, module: str, start: int, stop: int) -> None:
        parts.setdefault(key, []).append(adapter_sites.Part(module, start, stop, update))

    def land(module: str, pieces, update) -> None:
        spread = list(adapter_sites.spread(pieces))
        shared = None
        if isinstance(update, LowRankUpdate) and len(spread) > 1 and all(p.start == 0 and p.stop == base[p.key].shape[0] for p, _ in spread):
            rows = tuple((p.key, offset, offset + p.stop - p.start) for p, offset in spread)
            shared = SharedFactors(update.up * update.scale, update.down, rows)
        for piece, offset in spread:
            part = adapter_sites.rows_of(update, offset, offset + piece.stop - piece.start)
            put(piece.key, part if shared is None else replace(part, shared=shared), module, piece.start, piece.stop)

    for module, found in adapter.modules.items():
        site = sites[module]
        scale = None
        if "down" in found or "up" in found:
            up, down, tucker = _factors(module, found, site)
            scale = _scale(adapter, module, found, down.shape[0])
            land(module, site.weight, LowRankUpdate(up, down, scale, tucker))
        elif "mid" in found:
            raise CheckpointError(f"adapter module {module} has lora_mid without lora_down and lora_up")
        if "weight" in found:
            if tuple(found["weight"].shape) != site.shape:
                raise BaseMismatch(f"adapter module {module}: its weight delta has shape {list(found['weight'].shape)}, the base's module {list(site.shape)}")
            land(module, site.weight, DenseUpdate(found["weight"].float()))
        for part, what in (("bias", "bias delta"), ("up_bias", "lora_B.bias")):
            if part not in found:
                continue
            value = found[part].float() * (1.0 if part == "bias" or scale is None else scale)  # peft's lora_bias: bias += scale · lora_B.bias
            rows = sum(p.stop - p.start for p in site.bias)
            if not site.bias or value.dim() != 1 or value.numel() != rows:
                has = f"{rows} values" if site.bias else "no bias"
                raise BaseMismatch(f"adapter module {module}: its {what} has shape {list(value.shape)}; the base's module has {has}")
            land(module, site.bias, DenseUpdate(value))
        if "shift" in found:
            key = site.key
            if key is None:
                raise BaseMismatch(f"SVDiff module {module} shifts a weight that the base keeps in other tensors")
            shift, rank = found["shift"], min(spectral.as_matrix(torch.empty(base[key].shape, device="meta")).shape)
            if shift.dim() != 1 or shift.numel() > rank:
                raise CheckpointError(
                    f"SVDiff module {module} has a shift of shape {list(shift.shape)}; the base's {key!r} "
                    f"{list(base[key].shape)} has {rank} singular values"
                )
            put(key, SpectralUpdate(shift.float()), module, 0, base[key].shape[0])
    out = {key: adapter_sites.combine(key, base[key].shape, found) for key, found in parts.items()}
    if not out:
        raise CheckpointError(f"{adapter.path.name} changes nothing: it has no LoRA factors or deltas")
    return out


def _missing(modules: list[str], adapter: Adapter) -> str:
    """Why modules have no place: a whole model the base lacks is named, with --only for the rest."""
    by_model: dict[str, list[str]] = {}
    for m in modules:
        by_model.setdefault(model_of(m), []).append(m)
    total = Counter(model_of(m) for m in adapter.modules)
    whole = [m for m, names in by_model.items() if len(names) == total[m]]  # models none of whose modules fit
    fits = set(total) - set(whole)
    if fits and whole:
        lacks = ", ".join(f"{len(by_model[m])} {m} modules (e.g. {by_model[m][0]})" for m in whole)
        keep = " ".join(f"--only {m}" for m in sorted(fits))
        return f"the adapter has {lacks}, and the base has no such model; `dsreg push {keep}` stores the part that fits"
    return f"{len(modules)} adapter modules match no module of the base, e.g. {', '.join(modules[:3])}"


def _factors(module: str, parts: dict[str, torch.Tensor], site: adapter_sites.Site):
    """(up, down, tucker): up and down as matrices of the module's out x in·kh·kw form, and a
    Tucker conv's (lora_mid, lora_down) that fold into that down, else None."""
    if "up" not in parts or "down" not in parts:
        raise CheckpointError(f"adapter module {module} has only one of its two LoRA factors")
    up, down = parts["up"].float(), parts["down"].float()
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank or up[0].numel() != rank:
        raise CheckpointError(f"adapter module {module}: lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")
    up = up.reshape(up.shape[0], rank)
    tucker = None
    if "mid" in parts:  # LyCORIS' Tucker conv: ΔW[p,q,k,l] = Σ up[p,i] · mid[i,j,k,l] · down[j,q]
        mid = parts["mid"].float()
        if mid.dim() != 4 or mid.shape[:2] != (rank, rank) or down[0].numel() != down.shape[1]:
            raise CheckpointError(f"adapter module {module}: lora_mid {list(mid.shape)} does not fit rank {rank} and lora_down {list(down.shape)}")
        tucker = (mid, down.reshape(rank, -1))
        down = encodings.fold_tucker(*tucker)
    down = down.reshape(rank, -1)
    out, inner = site.shape[0], _numel(site.shape[1:])
    if up.shape[0] != out or down.shape[1] != inner:
        raise BaseMismatch(
            f"adapter module {module} is a LoRA of {up.shape[0]} x {down.shape[1]}; the base's module is "
            f"{list(site.shape)}: this adapter was made for another base"
        )
    if rank > min(out, inner):
        raise CheckpointError(f"adapter module {module} has rank {rank}, more than its {out} x {inner} layer can have; nothing was stored")
    return up, down, tucker


def _scale(adapter: Adapter, module: str, parts: dict[str, torch.Tensor], rank: int) -> float:
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1:
            raise CheckpointError(f"adapter module {module}: alpha has {alpha.numel()} values, not one")
        if float(alpha.reshape(())) == 0:
            # LyCORIS reads alpha 0 as no scaling, diffusers, A1111 and ComfyUI as scale 0: no reading is safe.
            raise CheckpointError(
                f"adapter module {module} has alpha 0, which LyCORIS reads as scale 1 and diffusers, A1111 and ComfyUI "
                "as scale 0 (no change); set its alpha to the rank it was trained with (scale 1) and push again"
            )
        return float(alpha.reshape(())) / rank
    if not adapter.config:
        return 1.0
    model, _, path = module.partition(".")
    config = {k[len(model) + 1:]: v for k, v in adapter.config.items() if k.startswith(model + ".")}
    if not config:
        return 1.0
    declared = _pattern(config.get("rank_pattern") or {}, path, config.get("r"))
    alpha = _pattern(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", declared))
    if declared is not None and int(declared) != rank:
        raise CheckpointError(f"adapter module {module} has rank {rank} in its tensors but r = {declared} in its metadata")
    if alpha is None:
        return 1.0
    return float(alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)


def _pattern(patterns: dict, path: str, default):
    """peft's rank_pattern / alpha_pattern: the value of the first pattern that ends the module's path."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return value
    return default


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- the merged checkpoint


class MergedCheckpoint(Checkpoint):
    """A base with an adapter merged in, W + ΔW in the base's dtype, as a checkpoint that push reads.

    The base's layout, so that checkout writes what the base looks like; the adapter file's size as
    the bytes pushed; every unchanged tensor's digest known from the catalog, so the scan need not
    read it.
    """

    def __init__(self, reg, adapter: Adapter, base_name: str, base: dict[str, BaseTensor], changes: dict):
        layout = Layout.from_json(reg.catalog.base_layout(base_name))
        specs = [TensorSpec(t.key, t.dtype, t.shape) for t in base.values()]
        super().__init__(adapter.path, specs, layout, self._tensor)
        self.adapter = adapter
        self.merged_onto = base_name
        self._reg, self._base = reg, base
        self.derived_new: list[tuple[Derived, bytes]] = []  # base SVDs this push computed: uploaded with it
        self.updates = self._with_svds(changes)
        self.known_digests = {k: t.tensor_digest for k, t in base.items() if k not in changes}

    def _with_svds(self, changes: dict) -> dict:
        """Spectral shifts bound to their base tensors' SVDs: the stored ones, else computed now."""
        wanted = {k: self._base[k].tensor_digest for k, u in changes.items() if isinstance(u, SpectralUpdate)}
        if not wanted:
            return changes
        known = self._reg.catalog.derived(list(wanted.values()), spectral.SVD)
        done: dict[str, tuple[dict, BlobRecord]] = {}
        svds: dict[str, tuple[dict, BlobRecord]] = {}
        for key, tensor in wanted.items():
            if tensor not in done:
                blob = known.get(tensor)
                if blob is not None:
                    svd = codec.decode(self._reg.store.get(blob.digest), blob.raw_size, f"SVD of base tensor {key!r}")
                else:
                    svd = spectral.decompose(base_tensor(self._reg, self._base[key]))
                    data, raw, digest = spectral.encode(svd)
                    blob = BlobRecord(digest, len(data), raw)
                    self.derived_new.append((Derived(tensor, spectral.SVD, blob), data))
                done[tensor] = (svd, blob)
            svds[key] = done[tensor]
        shifts = spectral.pack({k: (changes[k].shift, blob.digest, blob.raw_size) for k, (_, blob) in svds.items()})
        return {**changes, **{k: replace(changes[k], svd=svd, blob=shifts) for k, (svd, _) in svds.items()}}

    @property
    def nbytes(self) -> int:
        return self.adapter.nbytes

    def _tensor(self, key: str, scratch=None) -> torch.Tensor:
        bt = base_tensor(self._reg, self._base[key])
        update = self.updates.get(key)
        if update is None:
            return bt
        return (bt.float() + update.delta(tuple(bt.shape))).to(bt.dtype)

    def describe(self) -> dict:
        """What the revision's layout keeps of the adapter: export-lora writes its format back."""
        parts = sorted({p for parts in self.adapter.modules.values() for p in parts})
        out = {"format": self.adapter.format, "file": self.adapter.path.name, "modules": len(self.adapter.modules), "parts": parts}
        if self.adapter.left_out:
            out["left_out"] = list(self.adapter.left_out)
        return out


@contextmanager
def open_input(reg, path, base: str | None = None, only: tuple[str, ...] | None = None) -> Iterator[Checkpoint]:
    """What a push reads at ``path``: a checkpoint as it is, or an adapter merged onto its base
    (``base``, else the one registered base it fits); ``only`` keeps an adapter's modules for
    those models (unet, text_encoder, text_encoder_2)."""
    folder = Path(path)
    if folder.is_dir() and any((folder / f).is_file() for f in SVDIFF_FILES):
        adapter = _read_svdiff_folder(folder)
    else:
        with open_checkpoint(_weights_file(folder)) as ckpt:
            if not looks_like_adapter([s.key for s in ckpt.specs]):
                if only:
                    raise UsageError("--only picks models of an adapter file; this is a checkpoint")
                yield ckpt
                return
            adapter = read(ckpt)
    adapter = adapter.only(only)
    name, tensors, changes = _fit(reg, adapter, base)
    yield MergedCheckpoint(reg, adapter, name, tensors, changes)


def _weights_file(path: Path) -> Path:
    """The file a push reads: a folder that is no model (diffusers' save_lora_weights writes one
    file and no config) is its one safetensors file."""
    if not path.is_dir() or any((path / name).is_file() for name in ("config.json", "model_index.json")):
        return path
    files = sorted(path.glob("*.safetensors"))
    return files[0] if len(files) == 1 else path


def _read_svdiff_folder(folder: Path) -> Adapter:
    """An SVDiff output folder: the UNet's and the text encoder's shift files, as one subject."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    size = 0
    for name in SVDIFF_FILES:
        if (folder / name).is_file():
            with open_checkpoint(folder / name) as ckpt:
                part = read(ckpt)
            if part.format != SVDIFF:
                raise CheckpointError(f"{folder / name} holds keys other than SVDiff's <module>.delta; nothing was stored")
            modules.update(part.modules)
            size += part.nbytes
    return Adapter(folder, SVDIFF, modules, {}, size)


def _fit(reg, adapter: Adapter, name: str | None):
    names = [name] if name else [b.name for b in reg.catalog.bases()]
    if not names:
        raise BaseMismatch("no base is registered; add one first with `dsreg base add FILE --name NAME`")
    fitting, reasons = [], []
    for n in names:
        tensors = {t.key: t for t in reg.catalog.base_tensors(n)}
        try:
            fitting.append((n, tensors, updates(adapter, tensors)))
        except BaseMismatch as exc:
            if name:
                raise BaseMismatch(f"adapter does not fit base {n!r}: {exc}") from None
            reasons.append(f"{n} ({exc})")
    if not fitting:
        raise BaseMismatch("the adapter fits no registered base: " + "; ".join(reasons[:5]))
    if len(fitting) > 1:
        raise AmbiguousBase(f"the adapter fits bases {', '.join(n for n, _, _ in fitting)}; name one with --base")
    return fitting[0]


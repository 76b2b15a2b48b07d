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
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from . import codec, spectral, unet_names
from .bases import base_tensor
from .catalog import BaseTensor, BlobRecord, Derived
from .checkpoint import Checkpoint, Layout, TensorSpec, open_checkpoint
from .deltasvd import FactoredSpectrum
from .encodings import fold_tucker
from .errors import AmbiguousBase, BaseMismatch, CheckpointError, NonFiniteWeights
from .lora import module_of

KOHYA = "kohya"
DIFFUSERS = "diffusers"
SVDIFF = "svdiff"
# SVDiff's files, as svdiff-pytorch's training script writes them: the UNet's shifts and the text encoder's.
SVDIFF_FILES = {"spectral_shifts.safetensors": "unet.", "spectral_shifts_te.safetensors": "text_encoder."}

_LDM_UNET, _LDM_TEXT = "model.diffusion_model.", "cond_stage_model.transformer."
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
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
# Parts of other algorithms, by the name a user knows them by.
_OTHER_ALGORITHMS = {
    "hada_": "LoHa (hada_*)", "lokr_": "LoKr (lokr_*)", "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)", "oft_": "OFT", "bias_indices": "LyCORIS' sparse bias (bias_indices)",
}


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale · up · down, with up (out, r) and down (r, in·kh·kw) as matrices."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    tucker: tuple[torch.Tensor, torch.Tensor] | None = None  # LyCORIS' (lora_mid, lora_down as r x in), which fold into ``down``
    factored: ClassVar[bool] = True

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


@dataclass(frozen=True)
class Adapter:
    """An adapter file, parsed: its modules' parts by name, before they are matched to a base."""

    path: Path
    format: str  # KOHYA or DIFFUSERS
    modules: dict[str, dict[str, torch.Tensor]]  # module name as the file gives it -> part -> tensor
    config: dict = field(default_factory=dict)  # diffusers' lora_adapter_metadata, if any
    nbytes: int = 0


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
                raise CheckpointError(
                    f"{ckpt.path.name} is a {name} adapter, which dsreg does not read; merge it into the base "
                    "with its own tool and push the merged checkpoint"
                )
        raise CheckpointError(f"{ckpt.path.name}: {len(unknown)} keys are no adapter part dsreg reads, e.g. {', '.join(unknown[:3])}")
    config = _config((ckpt.layout.metadata or {}).get("lora_adapter_metadata"))
    size = ckpt.path.stat().st_size if ckpt.path.is_file() else ckpt.nbytes
    return Adapter(ckpt.path, fmt, modules, config, size)


def _split(key: str, fmt: str) -> tuple[str, str] | None:
    if fmt == KOHYA:
        module, _, part = key.partition(".")
        return (module, _KOHYA_PARTS[part]) if module.startswith(_KOHYA_PREFIXES) and part in _KOHYA_PARTS else None
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
            raise CheckpointError("this is a DoRA adapter (use_dora in its metadata), which dsreg does not read; merge it and push the merged checkpoint")
    return config


# ---------------------------------------------------------------- matching a base


def module_index(base: dict[str, BaseTensor]) -> dict[str, str]:
    """Every name an adapter file may give a base module -> the module's key without .weight/.bias."""
    index: dict[str, str] = {}
    ldm_unet = [k[len(_LDM_UNET):].rsplit(".", 1)[0] for k in base if k.startswith(_LDM_UNET)]
    layers = unet_names.layers_per_block(ldm_unet) if ldm_unet else 0
    for key in base:
        t = module_of(key)
        if t is None:
            continue
        prefix = key.rsplit(".", 1)[0]
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
        for name in filter(None, names):
            index.setdefault(name, prefix)
    return index


def updates(adapter: Adapter, base: dict[str, BaseTensor]) -> dict[str, LowRankUpdate | DenseUpdate]:
    """The adapter's changes by base key; BaseMismatch where it does not fit ``base``."""
    index = module_index(base)
    missing = sorted(m for m in adapter.modules if m not in index)
    if missing:
        raise BaseMismatch(f"{len(missing)} adapter modules match no module of the base, e.g. {', '.join(missing[:3])}")
    out: dict[str, LowRankUpdate | DenseUpdate] = {}

    def put(key: str, update, module: str) -> None:
        if key not in base:
            raise BaseMismatch(f"adapter module {module} changes {key!r}, which the base does not have")
        if key in out:
            raise CheckpointError(f"adapter module {module} changes {key!r} twice (a LoRA and a whole delta); nothing was stored")
        out[key] = update

    for module, parts in adapter.modules.items():
        prefix = index[module]
        scale = None
        if "down" in parts or "up" in parts:
            weight = f"{prefix}.weight"
            up, down, tucker = _factors(module, parts, base.get(weight))
            scale = _scale(adapter, module, parts, down.shape[0])
            put(weight, LowRankUpdate(up, down, scale, tucker), module)
        elif "mid" in parts:
            raise CheckpointError(f"adapter module {module} has lora_mid without lora_down and lora_up")
        for part, suffix in (("weight", ".weight"), ("bias", ".bias")):
            if part in parts:
                key = prefix + suffix
                if key in base and tuple(parts[part].shape) != base[key].shape:
                    raise BaseMismatch(
                        f"adapter module {module}: its {part} delta has shape {list(parts[part].shape)}, "
                        f"the base's {key!r} {list(base[key].shape)}"
                    )
                put(key, DenseUpdate(parts[part].float()), module)
        if "shift" in parts:
            key = f"{prefix}.weight"
            if key not in base:
                raise BaseMismatch(f"SVDiff module {module} shifts {key!r}, which the base does not have")
            shift, rank = parts["shift"], min(spectral.as_matrix(torch.empty(base[key].shape, device="meta")).shape)
            if shift.dim() != 1 or shift.numel() > rank:
                raise CheckpointError(
                    f"SVDiff module {module} has a shift of shape {list(shift.shape)}; the base's {key!r} "
                    f"{list(base[key].shape)} has {rank} singular values"
                )
            put(key, SpectralUpdate(shift.float()), module)
        if "up_bias" in parts:  # peft's lora_bias: the bias moves by scale · lora_B.bias
            key = f"{prefix}.bias"
            if key in base and base[key].shape != tuple(parts["up_bias"].shape):
                raise BaseMismatch(f"adapter module {module}: lora_B.bias has {parts['up_bias'].numel()} values, the base's {key!r} {base[key].shape}")
            put(key, DenseUpdate(parts["up_bias"].float() * (1.0 if scale is None else scale)), module)
    if not out:
        raise CheckpointError(f"{adapter.path.name} changes nothing: it has no LoRA factors or deltas")
    return out


def _factors(module: str, parts: dict[str, torch.Tensor], weight: BaseTensor | None):
    """(up, down, tucker): up and down as matrices of the base weight's out x in·kh·kw form, and a
    Tucker conv's (lora_mid, lora_down) that fold into that down, else None."""
    if "up" not in parts or "down" not in parts:
        raise CheckpointError(f"adapter module {module} has only one of its two LoRA factors")
    if weight is None:
        raise BaseMismatch(f"adapter module {module} is a LoRA on a module whose weight the base does not have")
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
        down = fold_tucker(*tucker)
    down = down.reshape(rank, -1)
    out, inner = weight.shape[0], _numel(weight.shape[1:])
    if up.shape[0] != out or down.shape[1] != inner:
        raise BaseMismatch(
            f"adapter module {module} is a LoRA of {up.shape[0]} x {down.shape[1]}; the base's {weight.key!r} "
            f"is {list(weight.shape)}: this adapter was made for another base"
        )
    return up, down, tucker


def _scale(adapter: Adapter, module: str, parts: dict[str, torch.Tensor], rank: int) -> float:
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1:
            raise CheckpointError(f"adapter module {module}: alpha has {alpha.numel()} values, not one")
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
        return {"format": self.adapter.format, "file": self.adapter.path.name, "modules": len(self.adapter.modules), "parts": parts}


@contextmanager
def open_input(reg, path, base: str | None = None) -> Iterator[Checkpoint]:
    """What a push reads at ``path``: a checkpoint as it is, or an adapter merged onto its base
    (``base``, else the one registered base it fits)."""
    folder = Path(path)
    if folder.is_dir() and any((folder / f).is_file() for f in SVDIFF_FILES):
        adapter = _read_svdiff_folder(folder)
    else:
        with open_checkpoint(path) as ckpt:
            if not looks_like_adapter([s.key for s in ckpt.specs]):
                yield ckpt
                return
            adapter = read(ckpt)
    name, tensors, changes = _fit(reg, adapter, base)
    yield MergedCheckpoint(reg, adapter, name, tensors, changes)


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


"""Bases: storing one (each tensor once per content digest), and reading its tensors back.

A base is the shared half of every subject: push, checkout, load and export all read its
tensors through :func:`base_tensor`, and find the part a checkpoint was made from with
:func:`base_map`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket

import torch

from . import codec, families
from .catalog import BaseTensor, BlobRecord, Catalog, Lease
from .checkpoint import Checkpoint, open_checkpoint, refuse_scaled_fp8
from .concurrency import Background, Scratch
from .config import BASE_ZSTD_LEVEL
from .errors import Conflict, IntegrityError
from .families import ModelLayout
from .names import validate_name
from .records import BaseInfo, Progress, quiet
from .scan import Scan, Scanned

log = logging.getLogger(__name__)


def writer_lease(reg, what: str) -> Lease:
    """A lease on what a write makes live, named for the host and process that holds it."""
    return reg.catalog.lease(f"{what} on {socket.gethostname()} pid {os.getpid()}", reg.settings.lease_ttl)


def scan_all(ckpt: Checkpoint, progress: Progress) -> Scanned:
    with Scan(ckpt, progress) as scan:
        return scan.result()


def add_base(reg, path: str | os.PathLike, name: str, progress: Progress | None = None) -> tuple[BaseInfo, bool]:
    """Store a base model; returns (base, whether it was new). Adding the same weights again stores
    nothing, but writes again any of their blobs that is missing from the store or fails its digest."""
    validate_name(name, "base")
    progress = progress or quiet
    with open_checkpoint(path) as ckpt:
        refuse_scaled_fp8(ckpt)
        scanned = scan_all(ckpt, progress)
        digest = manifest_digest(scanned)
        existing = reg.catalog.base_by_digest(digest)
        if existing is not None:
            heal_base(reg, existing, ckpt.get, progress)
            return existing, False
        model = families.detect(s.key for s in ckpt.specs)
        same = _in_other_layout(reg, ckpt, model, progress) if model is not None else None
        if same is not None:
            log.info("%s holds the weights of base %s in another layout (%s); it is that base", path, same.name, model)
            return same, False
        if any(b.name == name for b in reg.catalog.bases()):
            raise Conflict(f"a different base is already named {name!r}; choose another --name")
        with writer_lease(reg, f"base add {name}") as lease:
            tensors, blobs = _upload_base_tensors(reg, ckpt, scanned, lease, progress)
            layout = {**ckpt.layout.to_json(), "model": model.to_json() if model else None}
            return reg.catalog.add_base(name, digest, layout, tensors, blobs, scanned.nbytes, lease.id), True


def _in_other_layout(reg, ckpt: Checkpoint, model: ModelLayout, progress: Progress) -> BaseInfo | None:
    """The registered base of ``model``'s family, stored in another layout, whose every weight is
    one of ``ckpt``'s converted to that layout bit for bit; None if there is none. The same weights
    in two layouts are one base: one set of blobs, and a subject in either layout fits it."""
    for info in reg.catalog.bases():
        theirs = base_model_layout(reg.catalog, info.name)
        if theirs is None or theirs.family != model.family or theirs == model:
            continue
        tensors = {t.key: t for t in reg.catalog.base_tensors(info.name) if not is_file_key(t.key, t)}
        view = families.convert_checkpoint(ckpt, model, theirs)
        weights = [s for s in view.specs if s.key in tensors]
        if len(weights) != len(tensors) or any(tensors[s.key].shape != s.shape or tensors[s.key].dtype != s.dtype for s in weights):
            continue
        for i, spec in enumerate(weights):
            if codec.tensor_digest(view.get(spec.key)) != tensors[spec.key].tensor_digest:
                break
            progress("compare", i + 1, len(weights))
        else:
            heal_base(reg, info, lambda key, view=view: view.get(key), progress)
            return info
    return None


def _upload_base_tensors(reg, ckpt: Checkpoint, scanned: Scanned, lease: Lease, progress: Progress):
    tensors: list[BaseTensor] = []
    blobs: dict[str, BlobRecord] = {}
    by_tensor: dict[str, BlobRecord] = {}
    shared = reg.catalog.blobs_for_tensors([scanned.digests[spec.key] for spec in scanned.specs])
    lease.claim([blob.digest for blob in shared.values()])
    with Background() as uploads:
        for i, spec in enumerate(scanned.specs):
            tdigest = scanned.digests[spec.key]
            blob = by_tensor.get(tdigest)
            if blob is None:
                blob = shared.get(tdigest)
                # Gone (its base was removed and collected since the lookup) or damaged: encode it
                # again; bytes that hash to the same digest repair the damaged object.
                if blob is not None and not reg.store.intact(blob.digest):
                    blob = None
            if blob is None:
                data, raw = codec.encode({"tensor": ckpt.get(spec.key)}, level=BASE_ZSTD_LEVEL)
                blob = BlobRecord(hashlib.sha256(data).hexdigest(), len(data), raw)
                lease.claim([blob.digest])
                uploads.submit(reg.store.put, data, blob.digest)
            by_tensor[tdigest] = blob
            blobs[blob.digest] = blob
            tensors.append(BaseTensor(spec.key, spec.dtype, spec.shape, tdigest, blob.digest, blob.raw_size))
            progress("upload", i + 1, len(scanned.specs))
        uploads.wait()
    return tensors, list(blobs.values())


def heal_base(reg, base: BaseInfo, tensor_of, progress: Progress) -> list[str]:
    """Write again each blob of ``base`` that is missing or fails its digest, from ``tensor_of(key)``
    (the tensors of a file holding the base's weights); returns the repaired digests."""
    tensors = reg.catalog.base_tensors(base.name)
    by_blob = {t.blob: t for t in tensors}
    broken = []
    for i, (digest, t) in enumerate(by_blob.items()):
        if not reg.store.intact(digest):
            broken.append(t)
        progress("check", i + 1, len(by_blob))
    if not broken:
        return []
    with writer_lease(reg, f"base repair {base.name}") as lease:
        lease.claim([t.blob for t in broken])
        for t in broken:
            rewrite_base_blob(reg, lease, t, tensor_of(t.key))
    fixed = [t.blob for t in broken]
    reg.catalog.record("base.repair", base=base.name, blobs=len(fixed))
    log.warning("base %s: wrote again %d blobs that were missing or damaged in the store", base.name, len(fixed))
    return fixed


def rewrite_base_blob(reg, lease: Lease, t: BaseTensor, tensor: torch.Tensor) -> None:
    """Store base tensor ``t`` again from ``tensor`` (which must be it): under its old digest where
    the encoder gives the same bytes, else as a new blob the base's rows then point to."""
    data, raw = codec.encode({"tensor": tensor}, level=BASE_ZSTD_LEVEL)
    digest = hashlib.sha256(data).hexdigest()
    if digest == t.blob:
        reg.store.replace(data, digest)
        return
    if codec.tensor_digest(tensor) != t.tensor_digest:
        raise IntegrityError(f"the file's tensor {t.key!r} is not the one the base stored; nothing was written for it")
    lease.claim([digest])
    reg.store.put(data, digest)
    reg.catalog.repoint_base_blob(t.blob, BlobRecord(digest, len(data), raw), t.tensor_digest, lease.id)


def base_model_layout(catalog: Catalog, name: str) -> ModelLayout | None:
    """The family and layout of a base's model tensors (None: no family dsreg knows). Recorded at
    ``base add``; bases added before that are told by their keys."""
    layout = catalog.base_layout(name)
    if "model" in layout:
        return ModelLayout.from_json(layout["model"])
    return families.detect(t.key for t in catalog.base_tensors(name))


def base_map(catalog: Catalog, name: str, component: str | None = None) -> dict[str, BaseTensor]:
    """A base's tensors by key; of a pipeline base's ``component``, by key inside that component."""
    tensors = catalog.base_tensors(name)
    if component is None:
        return {t.key: t for t in tensors}
    return component_tensors(tensors, component)


def base_tensor(reg, t: BaseTensor, blobs: Scratch | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A base tensor, decoded into fresh memory; with ``blobs``, its stored frame is read into the
    thread's reused buffer (from the disk itself, for a local store) rather than a fresh one. With
    ``shape``, the shape of a fine-tune's tensor that gained rows, it is padded to it (:func:`grown`)."""
    if blobs is None:
        tensor = codec.decode(reg.base_blobs.get(t.blob), t.raw_size, f"base tensor {t.key!r}")["tensor"]
    else:
        data = reg.base_blobs.read_into(t.blob, blobs)
        try:
            tensor = codec.decode(data, t.raw_size, f"base tensor {t.key!r}")["tensor"]
        finally:
            data.release()
    return tensor if shape is None else grown(tensor, shape)


# LDM trainers (LitEma) save an EMA copy of each trained weight of ``model`` under this prefix, its
# name relative to ``model`` with the dots removed: model.diffusion_model.out.2.weight is mirrored
# at model_ema.diffusion_modelout2weight. Beside them sit model_ema.decay and model_ema.num_updates.
EMA_PREFIX = "model_ema."
_EMA_OF = "model."


def with_ema_mirrors(base: dict[str, BaseTensor], keys) -> dict[str, BaseTensor]:
    """``base`` plus, for each EMA key among ``keys``, the base tensor it mirrors: an EMA weight is
    stored as a delta against the base weight it is an average of, as the weight itself is."""
    mirrors = {EMA_PREFIX + key[len(_EMA_OF):].replace(".", ""): t for key, t in base.items() if key.startswith(_EMA_OF)}
    found = {k: mirrors[k] for k in keys if k.startswith(EMA_PREFIX) and k in mirrors and k not in base}
    return {**base, **found} if found else base


def can_grow(shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """Whether a fine-tune's tensor of ``shape`` extends a base tensor by rows (new tokens appended
    to an embedding): more rows, the same of everything else."""
    return len(shape) == len(base_shape) >= 1 and shape[0] > base_shape[0] and shape[1:] == base_shape[1:]


def grown(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The base of a tensor that gained rows: the base's rows, then zero rows. The delta of an
    appended row is then the row itself, and a token that only some rows changed stays sparse."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = tensor.new_zeros(shape)
    out[: tensor.shape[0]] = tensor
    return out


def component_tensors(tensors: list[BaseTensor], component: str) -> dict[str, BaseTensor]:
    """One component's tensors of a pipeline base (its weights, and its files such as config.json),
    by their key inside the component."""
    prefix = f"{component}/"
    return {t.key[len(prefix):]: t for t in tensors if t.key.startswith(prefix)}


def is_file_key(key: str, t: BaseTensor) -> bool:
    """A folder's file in a base (stored as 1-D uint8: a pipeline's, or a model folder's config.json):
    a fine-tune may lack it."""
    return t.dtype == "uint8" and len(t.shape) == 1 and ("/" in key or key.endswith((".json", ".txt")))


def manifest_digest(scanned: Scanned) -> str:
    h = hashlib.sha256()
    for spec in scanned.specs:
        h.update(f"{spec.key}\0{scanned.digests[spec.key]}\n".encode())
    return h.hexdigest()

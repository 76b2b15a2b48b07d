"""The registry facade: everything a user can do, in one object.

Each workflow lives in a module of its own, as functions over the registry's catalog and stores
(``bases``, ``push``, ``checkout``, ``export``, ``gc``); the methods here check nothing of their own,
they name the operation and delegate.
"""

from __future__ import annotations

import os
import re
from datetime import datetime

from typing import TYPE_CHECKING

from .blobstore import BlobStore
from .cache import BlobCache, FactorCache, Memo
from .catalog import Catalog
from .config import DEFAULT_ENCODING, Settings
from .errors import StoreError, UsageError
from .layers import layer_group, layer_type, summarize
from .names import Ref, as_ref, validate_name
from .records import (
    BaseInfo, CheckoutResult, Event, GcReport, LoraExport, PolicyInfo, Progress, RepairReport, RevisionDetail, RevisionInfo, Stats,
    SubjectInfo, SweepRow,
    VerifyReport,
)

if TYPE_CHECKING:
    import torch

    from .live import Applied
    from .ranking import RankRule

# The workflows (push, checkout, ...) import torch; each method imports its own where it runs, so
# that opening a registry and querying its catalog (`dsreg ls`) does not wait for torch.


class Registry:
    """A registry: its catalog (SQLite or Postgres), its blob store (a folder or S3) and its settings.

    ``Registry.open()`` with no arguments opens the embedded default under ``~/.dsreg``.
    """

    def __init__(self, catalog: Catalog, store: BlobStore, settings: Settings):
        self.catalog = catalog
        self.store = store
        self.settings = settings
        # Base tensors from a remote store go through a local cache; a local store is its own cache.
        self.base_blobs = store if store.local else BlobCache(store, settings.cache_dir, settings.cache_size)
        # Subjects' decoded factors, for apply: a switch among recent subjects reads no store.
        self.factors = FactorCache(settings.factor_cache)
        # Base tensors' fingerprints by (tensor digest, dtype), for apply's default check.
        self.fingerprints = Memo()

    @classmethod
    def open(
        cls,
        catalog: str | None = None,
        store: str | None = None,
        *,
        home: str | os.PathLike | None = None,
        storage_options: dict | None = None,
        factor_cache: int | str | None = None,
        create: bool = True,
    ) -> "Registry":
        """Open (creating and migrating if new) the registry: flags, then ``DSREG_*`` variables, then ``~/.dsreg``.

        ``factor_cache`` bounds the memory that ``apply`` keeps decoded factors in
        (bytes, or e.g. "4GB"; ``DSREG_FACTOR_CACHE``; 2 GB by default). With ``create=False`` a
        registry that does not exist is a StoreError rather than made (what the CLI's reads do).
        A registry at this version's schema is opened without writing anything, so read-only
        credentials serve every read (docs/scaling.md).
        """
        settings = Settings.resolve(catalog=catalog, store=store, home=home, store_options=storage_options, factor_cache=factor_cache)
        if settings.home.exists() and not settings.home.is_dir():
            raise StoreError(f"the registry home {settings.home} is not a folder (--home / DSREG_HOME)")
        catalog_ = Catalog.open(settings.catalog_url, settings.actor, create=create)
        try:
            blob_store = BlobStore(settings.store_url, create=create, **settings.store_options)
        except BaseException:
            catalog_.close()
            raise
        return cls(catalog_, blob_store, settings)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ bases

    def add_base(self, path: str | os.PathLike, name: str, progress: Progress | None = None) -> tuple[BaseInfo, bool]:
        """Store a base model; returns (base, whether it was new). Adding the same weights again is a no-op."""
        from . import bases

        return bases.add_base(self, path, name, progress)

    def bases(self) -> list[BaseInfo]:
        return self.catalog.bases()

    # ------------------------------------------------------------ push

    def push(
        self,
        path: str | os.PathLike,
        subject: str | None = None,
        *,
        base: str | None = None,
        energy: float | None = None,
        max_error: float | None = None,
        budget: int | str | None = None,
        exact: bool = False,
        encoding: str | None = None,
        method: str = "gram",
        device: str = "auto",
        ema: bool = True,
        only: tuple[str, ...] | None = None,
        progress: Progress | None = None,
    ) -> RevisionInfo:
        """Compress a fine-tuned checkpoint against its base and record it as a new revision of ``subject``.

        Ranks come from one of: ``energy`` (the paper's tau, default 0.5), ``max_error`` (per tensor,
        relative Frobenius error of the delta), ``budget`` (bytes for the whole revision, e.g. "20MB")
        or ``exact`` (lossless: checkout is bit-identical). An LDM checkpoint's EMA copy
        (``model_ema.*``) is stored against the weights it mirrors; ``ema=False`` leaves it out.

        ``path`` may also be an adapter file (kohya/LyCORIS LoRA and LoCon, diffusers/peft LoRA,
        XLabs' Flux LoRA, SVDiff; docs/adapters.md), in either layout of the base's family: it is
        stored as its base with the adapter merged, its LoRA factors decomposed as given, at
        ``energy=1`` (its whole rank) unless a rule is named. ``only`` keeps the adapter's modules
        for those models (``"unet"`` or ``"transformer"``, ``"text_encoder"``, ``"text_encoder_2"``),
        for a file with text-encoder modules pushed against a denoiser-only base.

        ``encoding`` (:data:`config.ENCODINGS`): how factors are stored; fp16 by default, mixed
        int8/int4 under a ``budget``.
        """
        from . import push

        return push.push(
            self, path, subject, base=base, energy=energy, max_error=max_error, budget=budget, exact=exact,
            encoding=encoding, method=method, device=device, ema=ema, only=only, progress=progress,
        )

    def sweep(
        self,
        path: str | os.PathLike,
        rules: list[RankRule | str],
        encodings: list[str] = (DEFAULT_ENCODING,),
        *,
        base: str | None = None,
        method: str = "gram",
        progress: Progress | None = None,
    ) -> list[SweepRow]:
        """Stored bytes and error of a checkpoint under each rule and encoding, without storing anything.

        One read and one spectrum per tensor serve every row, so a sweep costs about one push.
        """
        from . import push

        return push.sweep(self, path, rules, encodings, base=base, method=method, progress=progress)

    # ------------------------------------------------------------ checkout

    def checkout(
        self,
        ref: str | Ref,
        output: str | os.PathLike | None = None,
        *,
        format: str | None = None,
        layout: str | None = None,
        device: str = "auto",
        verify: bool = False,
        overwrite: bool = True,
        progress: Progress | None = None,
    ) -> CheckoutResult:
        """Rebuild a revision's full checkpoint at ``output`` (written whole, or not at all).

        ``layout`` (``original`` or ``diffusers``) names and cuts a Flux, SD3 or SD UNet model's
        tensors as that layout does, whichever it was pushed in (default: as pushed); the
        conversion only moves rows, so an exact revision comes back bit for bit in either.

        With ``verify``, every tensor stored losslessly is hashed and compared with the digest its
        push recorded; a mismatch raises IntegrityError and writes nothing. Without ``overwrite``, an
        existing file at ``output`` is a Conflict.
        """
        from . import checkout

        return checkout.checkout(self, ref, output, format=format, layout=layout, device=device, verify=verify, overwrite=overwrite, progress=progress)

    # ------------------------------------------------------------ in memory

    def load(
        self, ref: str | Ref, *, device: str = "auto", dtype=None, layout: str | None = None, progress: Progress | None = None
    ) -> dict[str, "torch.Tensor"]:
        """A revision's full state dict in memory, keys as pushed (``component/key`` for a pipeline;
        a folder's config and text files are left out), on ``device`` and cast to ``dtype`` if given;
        with ``layout``, in that layout of its family as :meth:`checkout` gives it.

        The values are those ``checkout`` writes, bit for bit on the same device and dtype; the
        tensors are formed a few at a time, so memory peaks at the result and a small working set.
        """
        from . import live

        return live.load(self, ref, device=device, dtype=dtype, layout=layout, progress=progress)

    def apply(self, target, ref: str | Ref, *, keep: str = "device", check: str = "fingerprint") -> "Applied":
        """Write a subject's weights into a live ``torch.nn.Module`` or diffusers pipeline, in place.

        Each touched tensor becomes base + delta, formed in fp32 on the module's device and cast to
        its dtype. A module that holds another subject is switched directly (only the tensors either
        subject changes are written). Leaving a ``with`` block (or ``restore()`` on its handle)
        gives the module back exactly what it held when the block was entered, the base's bits or
        an outer block's subject (docs/python-api.md lists the rules); ``keep`` says where the base
        values it needs wait: on the module's ``"device"``, in ``"host"`` memory, or ``"mapped"``: in this
        machine's memory-mapped copy of the base, shared through the page cache (no copy kept). Before anything is
        written, the module must have the subject's keys and shapes, and the touched tensors the
        base's values (``check="fingerprint"``: every one by a fingerprint formed on its device, and
        not again while its version counter says nothing changed it; ``"all"``: every one by sha256
        on the host, every time); a module that does not fit raises BaseMismatch and is left
        untouched, and a failure half-way (a corrupt blob, a store going away) leaves it as it was.
        See docs/python-api.md for thread safety.
        """
        from . import live

        return live.apply(self, target, ref, keep=keep, check=check)

    # ------------------------------------------------------------ LoRA export

    def export_lora(
        self,
        ref: str | Ref,
        output: str | os.PathLike | None = None,
        *,
        format: str | None = None,
        factors_only: bool = False,
        dtype: str = "fp16",
        overwrite: bool = True,
        progress: Progress | None = None,
    ) -> LoraExport:
        """Write a revision's stored factors as a LoRA file (no full checkpoint is rebuilt).

        Each low-rank entry becomes a LoRA module of its stored rank with scale 1; 2-D deltas stored
        dense, sparse or exact go in as exact full-rank modules, and in peft format bias deltas as
        ``lora_B.bias``, so that the file differs from the checkout only by what no LoRA carries
        (norms, embeddings, and in kohya format biases): those are returned in ``left_out`` and
        listed in the file's metadata. ``factors_only`` writes the low-rank entries alone.
        ``format``: ``kohya`` or ``peft``; by default an adapter subject's own kind, else kohya.
        """
        from . import export

        return export.export_lora(
            self, ref, output, format=format, factors_only=factors_only, dtype=dtype, overwrite=overwrite, progress=progress
        )

    # ------------------------------------------------------------ queries

    def subjects(
        self,
        base: str | None = None,
        name_like: str | None = None,
        tag: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        offset: int = 0,
        after: str | None = None,
    ) -> list[SubjectInfo]:
        """Subjects with their latest revision, by name; ``name_like`` is a prefix, or a pattern with ``*``.

        For deep pages pass ``after=<last name of the previous page>``: it reads from the name index,
        where ``offset`` has to step over every row before it.
        """
        return self.catalog.subjects(base=base, name_like=name_like, tag=tag, since=since, limit=limit, offset=offset, after=after)

    def revisions(self, subject: str) -> list[RevisionInfo]:
        validate_name(subject)
        return self.catalog.revisions(subject)

    def revision(self, ref: str | Ref) -> RevisionInfo:
        return self.catalog.revision(as_ref(ref))

    def show(self, ref: str | Ref) -> RevisionDetail:
        """A revision with every tensor's storage and a summary per layer group."""
        ref = as_ref(ref)
        info = self.catalog.revision(ref)
        tensors = self.catalog.tensor_infos(Ref(info.subject, info.number))
        return RevisionDetail(
            info, tuple(tensors), tuple(summarize(tensors, lambda t: layer_group(t.key))),
            tuple(summarize(tensors, lambda t: layer_type(t.key, t.shape))),
        )

    def tag(self, ref: str | Ref, name: str) -> RevisionInfo:
        validate_name(name, "tag")
        return self.catalog.tag(as_ref(ref), name)

    def untag(self, subject: str, name: str) -> RevisionInfo:
        """Remove a subject's tag; returns the revision that carried it."""
        validate_name(subject)
        validate_name(name, "tag")
        return self.catalog.untag(subject, name)

    def stats(self) -> Stats:
        return self.catalog.stats()

    def events(
        self, subject: str | None = None, *, since: datetime | None = None, limit: int | None = None, action: str | None = None,
        base: str | None = None,
    ) -> list[Event]:
        """The audit log, newest first: every change with its time, actor and details (see :class:`Event`)."""
        if subject is not None:
            validate_name(subject)
        return self.catalog.events(subject=subject, since=since, limit=limit, action=action, base=base)

    # ------------------------------------------------------------ removal, retention, gc, verify

    def rm(self, ref: str | Ref, force: bool = False) -> list[RevisionInfo]:
        """Remove a revision (``SUBJECT@REV``) or a whole subject from the catalog; gc frees the bytes.
        A tagged revision is a Conflict unless ``force``."""
        return self.catalog.remove(as_ref(ref), force)

    def remove_base(self, name: str) -> BaseInfo:
        """Remove a base that no revision uses any more."""
        validate_name(name, "base")
        return self.catalog.remove_base(name)

    def set_policy(self, name: str, pattern: str = "*", keep_last: int | None = None, max_age: float | None = None) -> PolicyInfo:
        """Store a retention policy for gc to apply (``max_age`` in seconds)."""
        validate_name(name, "policy")
        if keep_last is None and max_age is None:
            raise UsageError("a retention policy needs keep_last or max_age (--keep-last, --max-age), or both")
        if keep_last is not None and keep_last < 1:
            raise UsageError("keep_last (--keep-last) must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9._*-]{1,256}", pattern):
            raise UsageError(f"invalid subject pattern {pattern!r}: use name characters and * wildcards")
        return self.catalog.set_policy(name, pattern, keep_last, None if max_age is None else int(max_age))

    def policies(self) -> list[PolicyInfo]:
        return self.catalog.policies()

    def remove_policy(self, name: str) -> None:
        self.catalog.remove_policy(name)

    def gc(self, grace: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Apply retention policies, then delete unreferenced objects older than ``grace`` seconds, and
        the half-written outputs of checkouts on this machine whose process was killed."""
        if grace < 0:
            raise UsageError("grace (--grace) cannot be negative")
        from dataclasses import replace

        from . import gc
        from .checkpoint import remove_dead_writes

        report = gc.collect(self.catalog, self.store, grace, dry_run)
        if dry_run:
            return report
        return replace(report, removed_temporaries=tuple(map(str, remove_dead_writes(self.settings.journal))))

    def repair(self, paths: list[str | os.PathLike], progress: Progress | None = None) -> RepairReport:
        """Verify every object (as ``verify(full=True)``) and write again each missing or corrupt blob
        that one of ``paths`` rebuilds bit for bit: a base's weights (any file holding its tensors),
        or the file a revision was pushed from (exact revisions, and per-tensor rules on the same
        machine). The report lists what was repaired and what stays lost, with what that breaks."""
        from . import repair

        return repair.repair(self, paths, progress)

    def verify(self, full: bool = False, progress: Progress | None = None) -> VerifyReport:
        """Check that every reference resolves (and, with ``full``, that every object hashes to its name)."""
        from . import gc

        return gc.verify(self.catalog, self.store, full, progress)

"""The typed records that the Python API returns and the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; the CLI turns it into progress bars."""


def quiet(stage: str, done: int, total: int) -> None:
    """The progress callback that reports nothing."""


def _ratio(original: int, stored: int) -> float:
    return original / stored if stored else float("inf")


@dataclass(frozen=True)
class BaseInfo:
    name: str
    digest: str
    n_tensors: int
    n_params: int
    nbytes: int
    created_at: datetime


@dataclass(frozen=True)
class TensorInfo:
    """How one tensor of a revision is stored.

    kind: one of :mod:`registry.deltas`' kinds (``base``, ``lowrank``, ``dense``, ``sparse``,
    ``exact``, ``full``, ``dropped``). ``rank`` is the kept rank for ``lowrank`` and the number of
    stored rows for ``sparse``; ``encoding`` is how factors or a dense delta are stored.
    """

    key: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    rank: int | None
    full_rank: int | None
    rel_error: float
    stored_bytes: int
    blob: str | None
    encoding: str | None = None

    @property
    def kept_params(self) -> int:
        return kept_params(self.kind, self.rank, self.shape)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def kept_params(kind: str, rank: int | None, shape: tuple[int, ...]) -> int:
    """Parameters a stored tensor costs: rank·(out + in·kh·kw) for factors, all of them for dense."""
    if kind == "lowrank":
        return (rank or 0) * (shape[0] + numel(shape[1:]))
    if kind == "sparse":
        return (rank or 0) * numel(shape[1:])
    if kind in ("dense", "full", "exact"):
        return numel(shape)
    return 0


@dataclass(frozen=True)
class RevisionInfo:
    subject: str
    number: int
    base: str
    created_at: datetime
    energy: float | None  # tau, for revisions ranked by the paper's energy rule
    rank_rule: str  # energy=0.5, max-error=0.05, budget=20000000 or exact
    encoding: str  # of the factors: fp16, bf16, fp32, int8 or mixed
    original_bytes: int
    stored_bytes: int
    kept_params: int
    n_tensors: int
    n_changed: int
    source_digest: str
    source_format: str
    tags: tuple[str, ...] = ()
    adapter: str | None = None  # the adapter format it was pushed as (kohya, diffusers, svdiff), if one

    @property
    def ref(self) -> str:
        return f"{self.subject}@{self.number}"

    @property
    def ratio(self) -> float:
        return _ratio(self.original_bytes, self.stored_bytes)


@dataclass(frozen=True)
class SubjectInfo:
    name: str
    created_at: datetime
    n_revisions: int
    latest: RevisionInfo
    tags: tuple[str, ...] = ()
    tagged: RevisionInfo | None = None  # listed by tag: the revision that carries it

    @property
    def shown(self) -> RevisionInfo:
        """The revision a listing shows: the tagged one when listed by tag, else the latest."""
        return self.tagged or self.latest


@dataclass(frozen=True)
class GroupSummary:
    """Per layer group (a stage such as down_blocks.0, or a layer type such as attention): what was kept and what it cost."""

    group: str
    n_tensors: int
    n_changed: int
    rank: int
    full_rank: int
    kept_params: int
    stored_bytes: int
    max_error: float
    mean_error: float


@dataclass(frozen=True)
class RevisionDetail:
    revision: RevisionInfo
    tensors: tuple[TensorInfo, ...]
    groups: tuple[GroupSummary, ...]  # by stage: conv_in, down_blocks.0, mid_block, up_blocks.3, conv_out, ...
    types: tuple[GroupSummary, ...] = ()  # by layer type: attention, feed-forward, conv, norm, embedding, other


@dataclass(frozen=True)
class Stats:
    n_bases: int
    n_subjects: int
    n_revisions: int
    original_bytes: int
    stored_bytes: int
    base_bytes: int

    @property
    def ratio(self) -> float:
        return _ratio(self.original_bytes, self.stored_bytes)


@dataclass(frozen=True)
class CheckoutResult:
    ref: str
    path: Path
    format: str
    n_tensors: int
    nbytes: int
    device: str
    # With --verify: tensors whose digest was checked against the push's (every lossless entry), and
    # tensors stored lossy by design, which no digest can vouch for.
    verified: int = 0
    lossy: int = 0


@dataclass(frozen=True)
class LoraExport:
    """A revision written as a LoRA file; ``left_out`` are the changed tensors no LoRA module carries."""

    ref: str
    path: Path
    format: str
    n_modules: int
    max_rank: int
    n_params: int
    nbytes: int
    left_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyInfo:
    """A retention rule applied by gc to the subjects matching ``pattern`` (``*`` wildcards).

    A revision is removed when it is outside the newest ``keep_last`` of its subject, or older than
    ``max_age_seconds``; a revision that carries a tag is never removed.
    """

    name: str
    pattern: str
    keep_last: int | None
    max_age_seconds: int | None


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    expired: tuple[str, ...]  # revisions removed (or, dry run, to be removed) by retention policies
    removed_objects: int
    removed_bytes: int
    young_objects: int  # younger than the grace period: not considered
    leased_objects: int  # unreferenced, but claimed by a write in progress
    expired_leases: int
    removed_temporaries: tuple[str, ...] = ()  # half-written outputs of killed checkouts on this machine


@dataclass(frozen=True)
class VerifyReport:
    full: bool
    checked: int  # objects looked at
    missing: tuple[tuple[str, str], ...]  # (digest, who references it)
    corrupt: tuple[tuple[str, str], ...]  # (digest, what is wrong)
    orphans: tuple[str, ...]  # stored objects nothing references (gc takes them after the grace)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


@dataclass(frozen=True)
class RepairReport:
    """What ``verify --repair`` wrote again and what stays lost."""

    checked: int  # objects hashed
    fixed: tuple[tuple[str, str], ...]  # (digest, what it holds), rebuilt bit for bit
    lost: tuple[tuple[str, str], ...]  # (digest, why it could not be rebuilt and what it breaks)

    @property
    def ok(self) -> bool:
        return not self.lost


@dataclass(frozen=True)
class SweepRow:
    """What one rank rule and encoding would store for a checkpoint, estimated without storing it."""

    rule: str
    encoding: str
    kept_params: int
    stored_bytes: int  # an upper bound: zstd usually takes a few percent off
    original_bytes: int
    rel_error: float  # relative Frobenius error of all changed 2-D deltas together
    max_error: float  # the largest per-tensor relative error

    @property
    def ratio(self) -> float:
        return _ratio(self.original_bytes, self.stored_bytes)


@dataclass(frozen=True)
class Event:
    """One change recorded in the audit log (``dsreg log``), in the transaction that made it.

    ``action``: base.add, base.rm, base.repair, push, rm, expire (by a retention policy in gc), tag,
    untag, policy.set, policy.rm, gc, repair. ``details`` holds what else the action records.
    """

    id: int
    at: datetime
    actor: str  # DSREG_ACTOR, else user@host of the process that made the change
    action: str
    subject: str | None = None
    revision: int | None = None
    base: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def ref(self) -> str | None:
        if self.subject is None:
            return None
        return self.subject if self.revision is None else f"{self.subject}@{self.revision}"

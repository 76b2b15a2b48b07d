"""Repair: write again, from the files they were made of, the blobs that verify finds missing or corrupt.

restic's ``repair`` and borg's ``check --repair`` are the models: find what is damaged, rebuild what
the given files can rebuild bit for bit, and say what stays lost and what it breaks. A blob is only
ever written under its digest when the rebuilt bytes hash to it; a base tensor whose encoder now
writes other bytes is stored as a new blob that the base's rows point to (the tensor is the same).
A revision's blob is rebuilt by pushing its source again under its own rule: bit for bit for exact
revisions and per-tensor rules on the same machine; a budget plan spans all layers and is not redone.
"""

from __future__ import annotations

import os
from collections import defaultdict

from . import deltas, gc
from .bases import base_tensor, rewrite_base_blob, scan_all, writer_lease
from .catalog import BlobUser
from .checkpoint import open_checkpoint
from .errors import DsregError, IntegrityError
from .push import fitting_base, to_base_layout
from .ranking import RankRule
from .records import Progress, RepairReport, quiet


def repair(reg, paths: list[str | os.PathLike], progress: Progress | None = None) -> RepairReport:
    """Registry.repair: see its docstring."""
    progress = progress or quiet
    report = gc.verify(reg.catalog, reg.store, full=True, progress=progress)
    bad = dict(report.missing) | {d: problem for d, problem in report.corrupt}
    users = reg.catalog.blob_users(list(bad))
    bad = {d: problem for d, problem in bad.items() if users[d]}  # a damaged orphan is gc's to remove, not to repair
    if not bad:
        return RepairReport(report.checked, (), ())
    fixed: dict[str, str] = {}
    why_not: dict[str, str] = {}
    with writer_lease(reg, "repair") as lease:
        lease.claim(sorted(bad))  # the blobs it writes anew are referenced; a new base blob is claimed too
        for path in paths:
            if len(fixed) == len(bad):
                break
            with open_checkpoint(path) as ckpt:
                scanned = scan_all(ckpt, progress)
                todo = {d: u for d, u in users.items() if d not in fixed}
                _bases(reg, lease, ckpt, scanned, todo, fixed, why_not)
                # A file of another layout than its base's was stored through the conversion.
                stored, _, _ = to_base_layout(reg.catalog, ckpt, None)
                if stored is not ckpt:
                    ckpt, scanned = stored, scan_all(stored, progress)
                _revisions(reg, ckpt, scanned, {d: u for d, u in todo.items() if d not in fixed}, fixed, why_not)
    lost = tuple(
        (d, f"{why_not.get(d, 'no given file holds what it was made of')}; breaks {gc.breaks(users[d])}") for d in sorted(bad) if d not in fixed
    )
    if fixed:
        reg.catalog.record("repair", fixed=len(fixed), lost=len(lost), files=[os.fspath(p) for p in paths])
    return RepairReport(report.checked, tuple(sorted(fixed.items())), lost)


def _bases(reg, lease, ckpt, scanned, todo: dict[str, list[BlobUser]], fixed: dict, why_not: dict) -> None:
    """Base blobs: any tensor of the file with the recorded tensor digest rebuilds them."""
    by_tensor = {scanned.digests[s.key]: s.key for s in scanned.specs}
    for digest, users in todo.items():
        for u in users:
            if u.kind == "base" and u.tensor_digest in by_tensor:
                base = {t.blob: t for t in reg.catalog.base_tensors(u.name)}[digest]
                rewrite_base_blob(reg, lease, base, ckpt.get(by_tensor[u.tensor_digest]))
                fixed[digest] = f"base {u.name} tensor {u.key!r}"
                break


def _revisions(reg, ckpt, scanned, todo: dict[str, list[BlobUser]], fixed: dict, why_not: dict) -> None:
    """A revision's blobs, where the file is the source it was pushed from: compressed again under
    the revision's rule, and written only if the bytes hash to the lost blob's digest."""
    keys = {s.key for s in scanned.specs}
    mine: dict[tuple[str, str], list[tuple[str, BlobUser]]] = defaultdict(list)
    for digest, users in todo.items():
        for u in users:
            if u.kind == "entry" and u.source_digest == scanned.source_digest and u.key in keys:
                mine[(u.base, u.rank_rule)].append((digest, u))
    for (base_name, rule_text), items in mine.items():
        rule = RankRule.parse(rule_text)
        if rule.mode == "budget":
            for digest, u in items:
                why_not.setdefault(digest, f"{u.label} was planned under a budget across all its layers, which is not redone per tensor")
            continue
        try:
            base, _ = fitting_base(reg.catalog, base_name, scanned)
        except DsregError as exc:
            for digest, _u in items:
                why_not.setdefault(digest, str(exc))
            continue
        for digest, u in items:
            if digest in fixed:
                continue
            try:
                bt = base_tensor(reg, base[u.key]) if u.key in base else None
            except IntegrityError:
                why_not[digest] = f"{u.label} tensor {u.key!r} is stored against a base tensor that is damaged too; repair the base first"
                continue
            stored = deltas.compress(ckpt.get(u.key), bt, rule, u.encoding or "fp16")
            if stored.digest == digest:
                reg.store.replace(stored.data, digest)
                fixed[digest] = f"{u.label} tensor {u.key!r}"
            else:
                why_not[digest] = f"{u.label} tensor {u.key!r} compressed again to other bytes (a lossy rule's factors depend on the machine)"

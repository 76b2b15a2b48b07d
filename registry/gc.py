"""Garbage collection, retention and verification, safe while pushes run.

The protocol that makes it safe, and the write ordering it rests on, are specified once, in
docs/format.md ("Write ordering and garbage collection"): a write claims each blob in a lease before
it checks for or uploads it; gc deletes in batches, each under the catalog's exclusive write lock,
re-reading inside it which digests a committed row references or a live lease claims.
"""

from __future__ import annotations

import fcntl
import logging
import re
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import sqlalchemy as sa

from .blobstore import BlobStore
from .catalog import Catalog
from .tables import GC_LOCK
from .errors import Conflict, IntegrityError
from .concurrency import prefetch, process_alive
from .records import GcReport, PolicyInfo, VerifyReport

log = logging.getLogger(__name__)

SWEEP_BATCH = 1000
_GONE = "gone"
PARTIAL_MIN_AGE = 600


@contextmanager
def single_gc(catalog: Catalog) -> Iterator[None]:
    """Hold the one-gc-at-a-time lock for the catalog, or raise Conflict if another gc has it."""
    if catalog.dialect == "postgresql":
        conn = catalog.engine.connect()
        try:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": GC_LOCK}).scalar()
            conn.commit()
            if not got:
                raise Conflict("another gc is running on this catalog; try again when it has finished")
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": GC_LOCK})
                conn.commit()
        finally:
            conn.close()
        return
    database = catalog.engine.url.database
    path = Path(f"{database}.gc-lock") if database and database != ":memory:" else None
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict("another gc is running on this catalog; try again when it has finished") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def expired_by_policies(catalog: Catalog, policies: list[PolicyInfo], now: datetime) -> list[tuple[str, int]]:
    """(subject, number) of every revision some policy expires; tagged revisions never are."""
    doomed: set[tuple[str, int]] = set()
    for policy in policies:
        by_subject: dict[str, list[tuple[int, datetime, bool]]] = {}
        for name, number, created, tagged in catalog.retention_view(policy.pattern):
            by_subject.setdefault(name, []).append((number, created, tagged))
        for name, revs in by_subject.items():
            revs.sort(reverse=True)
            for i, (number, created, tagged) in enumerate(revs):
                if tagged:
                    continue
                too_many = policy.keep_last is not None and i >= policy.keep_last
                too_old = policy.max_age_seconds is not None and created < now - timedelta(seconds=policy.max_age_seconds)
                if too_many or too_old:
                    doomed.add((name, number))
    return sorted(doomed)


_HOLDER = re.compile(r" on (?P<host>\S+) pid (?P<pid>[0-9]+)$")


def dead_writers(leases: list[tuple[str, str]]) -> list[str]:
    """The leases held on this host by processes that no longer exist (a killed push): their claims
    need not wait for the lease to expire. A lease of another host, or of a live pid, is left alone."""
    host = socket.gethostname()
    dead = []
    for lease_id, holder in leases:
        match = _HOLDER.search(holder)
        if match is not None and match["host"] == host and not process_alive(int(match["pid"])):
            dead.append(lease_id)
    return dead


def collect(catalog: Catalog, store: BlobStore, grace: float, dry_run: bool = False) -> GcReport:
    """Apply retention, then delete every stored object nothing references, older than ``grace`` seconds."""
    with single_gc(catalog):
        now = datetime.now(timezone.utc)
        policies = catalog.policies()
        expired = expired_by_policies(catalog, policies, now)
        if expired and not dry_run:
            catalog.remove_revisions(expired, why={"by": "gc", "policies": [p.name for p in policies]})
        expired_leases = 0 if dry_run else catalog.drop_expired_leases() + catalog.drop_leases(dead_writers(catalog.live_leases()))
        cutoff = now - timedelta(seconds=grace)
        old, young = [], 0
        for obj in store.list():
            # Unknown age counts as young: never delete what cannot be shown to be old.
            if obj.modified is not None and obj.modified <= cutoff:
                old.append(obj)
            else:
                young += 1
        removed = removed_bytes = leased = 0
        for start in range(0, len(old), SWEEP_BATCH):
            batch = old[start : start + SWEEP_BATCH]
            with catalog.session(lock="exclusive") as s:
                referenced, claimed = catalog.claims(s, [o.digest for o in batch])
                doomed = [o for o in batch if o.digest not in referenced and o.digest not in claimed]
                if not dry_run and doomed:
                    # Rows first: credentials that may not forget them (a writer's) fail before
                    # any object goes. Nothing commits until the objects are gone; a crash between
                    # leaves rows of deleted objects, which the last step of a later gc forgets.
                    catalog.forget_blobs(s, [o.digest for o in doomed])
                    store.delete_many([o.digest for o in doomed])
                removed += len(doomed)
                removed_bytes += sum(o.size for o in doomed)
                leased += len(claimed - referenced)
        # A temporary file may belong to a write in progress: whatever the grace, leave it 10 minutes.
        for partial in store.partial_uploads(min(cutoff, now - timedelta(seconds=PARTIAL_MIN_AGE))):
            if not dry_run:
                store.remove_partial(partial.digest)
            removed += 1
            removed_bytes += partial.size
        if not dry_run:
            # Rows whose object is gone already (an earlier gc died between store and catalog).
            with catalog.session(lock="exclusive") as s:
                stale = catalog.unreferenced_blob_rows(s, cutoff)
                _, claimed = catalog.claims(s, stale)
                catalog.forget_blobs(s, [d for d in stale if d not in claimed])
        if not dry_run and (expired or removed or expired_leases):
            catalog.record(
                "gc", expired=len(expired), removed_objects=removed, removed_bytes=removed_bytes, expired_leases=expired_leases,
                grace_seconds=grace,
            )
        log.info(
            "gc%s: %d revisions expired, %d objects (%d bytes) removed, %d kept for writes in progress",
            " (dry run)" if dry_run else "", len(expired), removed, removed_bytes, leased,
        )
        return GcReport(
            dry_run=dry_run,
            expired=tuple(f"{n}@{r}" for n, r in expired),
            removed_objects=removed,
            removed_bytes=removed_bytes,
            young_objects=young,
            leased_objects=leased,
            expired_leases=expired_leases,
        )


def verify(catalog: Catalog, store: BlobStore, full: bool = False, progress: Callable[[str, int, int], None] | None = None) -> VerifyReport:
    """Every reference resolves to a stored object of the recorded size; with ``full``, every object's bytes hash to its name."""
    references = catalog.references()
    sizes = catalog.blob_sizes()
    stored = {b.digest: b.size for b in store.list()}
    missing = tuple(sorted((d, who) for d, who in references.items() if d not in stored))
    corrupt = [(d, f"{stored[d]} bytes stored, {sizes[d]} recorded") for d in sorted(references) if d in stored and d in sizes and stored[d] != sizes[d]]
    if full:
        digests = sorted(stored)

        def check(digest: str) -> tuple[str, str | None]:
            try:
                store.get(digest)
            except IntegrityError as exc:
                if not store.exists(digest):
                    return digest, _GONE
                return digest, str(exc).split(";", 1)[0]  # the hint to run verify is this
            return digest, None

        gone = set()
        for i, (digest, problem) in enumerate(prefetch(check, digests, window=16, workers=8)):
            if problem is _GONE:
                # Deleted since the listing: by a gc running meanwhile if nothing references it
                # (not a problem), else missing.
                gone.add(digest)
            elif problem and all(d != digest for d, _ in corrupt):
                corrupt.append((digest, problem))
            if progress:
                progress("verify", i + 1, len(digests))
        missing = tuple(sorted(set(missing) | {(d, references[d]) for d in gone if d in references}))
        stored = {d: n for d, n in stored.items() if d not in gone}
    orphans = tuple(sorted(d for d in stored if d not in references))
    if missing or corrupt:  # name everything each bad blob breaks, not one place
        users = catalog.blob_users([d for d, _ in missing] + [d for d, _ in corrupt])
        # Read again now: a blob whose last reference went since the first read (an rm, then a
        # gc, while this ran) is no loss.
        missing = tuple((d, f"breaks {breaks(users[d])}") for d, _ in missing if users[d])
        corrupt = [(d, f"{problem}; breaks {breaks(users[d])}" if users[d] else problem) for d, problem in corrupt]
    return VerifyReport(full=full, checked=len(stored), missing=missing, corrupt=tuple(corrupt), orphans=orphans)


def breaks(users) -> str:
    """The bases, revisions and derived blobs that reference a blob, for a message."""
    labels = list(dict.fromkeys(u.label for u in users))
    return ", ".join(labels[:10]) + (f" (+{len(labels) - 10} more)" if len(labels) > 10 else "") or "nothing"

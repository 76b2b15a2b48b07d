"""The catalog: the queries over the tables of :mod:`dsreg.tables`, on SQLite or Postgres alike.

The schema is created and changed only by the Alembic migrations in ``dsreg.migrations``; opening a
catalog brings it to the newest revision first.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError, ProgrammingError, InterfaceError
from sqlalchemy.orm import Session

from .config import default_actor, redact
from .errors import BaseNotFound, Conflict, NotFound, RevisionNotFound, StoreError, SubjectNotFound, first_line
from .names import AUTO_PREFIX, Ref, auto_number
from .records import BaseInfo, Event, PolicyInfo, RevisionInfo, Stats, SubjectInfo, TensorInfo, kept_params, numel
from .tables import (
    WRITE_LOCK, BaseRow, BaseTensorRow, BlobRow, DerivedRow, EntryRow, EventRow, LeaseBlobRow, LeaseRow, PolicyRow, RevisionRow, SubjectRow,
    TagRow, utcnow,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- records handed between modules


@dataclass(frozen=True)
class BaseTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    tensor_digest: str
    blob: str
    raw_size: int


@dataclass(frozen=True)
class BlobRecord:
    digest: str
    size: int
    raw_size: int


@dataclass(frozen=True)
class NewEntry:
    key: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    rank: int | None
    full_rank: int | None
    rel_error: float
    tensor_digest: str
    blob: BlobRecord | None
    encoding: str | None = None


@dataclass(frozen=True)
class Derived:
    """A blob computed from a base tensor (docs/format.md, ``derived``)."""

    tensor_digest: str
    kind: str
    blob: BlobRecord


@dataclass(frozen=True)
class NewRevision:
    subject: str | None
    base_id: int
    energy: float | None
    rank_rule: str
    encoding: str
    original_bytes: int
    source_digest: str
    source_format: str
    layout: dict
    entries: tuple[NewEntry, ...]
    derived: tuple[Derived, ...] = ()  # computed by this push from its base, shared with later ones


@dataclass(frozen=True)
class BlobUser:
    """One place that references a blob: a base's tensor, a revision's entry, or a derived blob."""

    kind: str  # base, entry, derived; or revision: one that reads a base through the base's blob
    name: str  # the base's name; the subject's; the derived kind
    key: str  # the tensor's key (derived: the base tensor's digest)
    tensor_digest: str
    number: int | None = None  # the revision, for an entry
    base: str | None = None  # the revision's base, for an entry
    rank_rule: str | None = None
    encoding: str | None = None  # the revision's
    source_digest: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "base":
            return f"base {self.name}"
        if self.kind in ("entry", "revision"):
            return f"{self.name}@{self.number}"
        return f"{self.name} of base tensor {self.key[:12]}"


@dataclass(frozen=True)
class StoredEntry:
    key: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    blob: str | None
    raw_size: int | None
    tensor_digest: str


class Lease:
    """A write's claim on the blobs it uploads, kept live by a heartbeat thread until it is closed.

    Closing a lease that was not committed drops it: the blobs it claimed become orphans for gc.
    """

    def __init__(self, catalog: "Catalog", holder: str, ttl: float):
        self.catalog = catalog
        self.ttl = ttl
        self.id = catalog.create_lease(holder, ttl)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"dsreg-lease-{self.id[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.catalog.renew_lease(self.id, self.ttl):
                    return  # expired or committed: nothing left to keep alive
            except Exception as exc:  # the commit's own check reports a lapse; keep trying meanwhile
                log.warning("could not renew upload lease: %s", exc)

    def claim(self, digests: Sequence[str]) -> None:
        if digests:
            self.catalog.lease_blobs(self.id, digests)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.catalog.drop_lease(self.id)  # a no-op after a commit, which deleted it

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(json.loads(text))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # pysqlite's own transaction handling is off so that BEGIN IMMEDIATE (below) takes the write
    # lock up front: two deferred transactions that both upgrade to writing would deadlock.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    # Case-sensitive LIKE, as on Postgres; it also lets SQLite answer prefix queries from the name index.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(url: str, create: bool = True) -> Engine:
    """An engine for the catalog at ``url``; with ``create``, an SQLite file's folder is made if
    it is missing, else a missing file is a StoreError (reads never create a registry)."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(f"invalid catalog URL {redact(url)}: expected an SQLAlchemy URL such as sqlite:///path.db") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database).expanduser()
            if not create and not path.is_file():
                raise StoreError(f"no registry at {path}: the catalog file does not exist (a write such as `dsreg base add` creates one)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the catalog's folder {path.parent}: {exc.strerror or exc}") from None
        engine = sa.create_engine(parsed, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        return sa.create_engine(parsed, pool_pre_ping=True)
    except ImportError as exc:
        raise StoreError(f"catalog {redact(url)} needs a driver that is not installed: {exc}") from None


class Catalog:
    def __init__(self, engine: Engine, url: str, actor: str | None = None):
        self.engine = engine
        self.url = url
        self.actor = actor or default_actor()  # who the audit log names for this catalog's changes

    @classmethod
    def open(cls, url: str, actor: str | None = None, create: bool = True) -> "Catalog":
        """Open the catalog, bringing its schema to this version's (creating it, if ``create``).

        A catalog already at this version is only read, so credentials that may only SELECT open it."""
        from .migrate import current_revision, head_revision, upgrade

        engine = create_engine(url, create)
        try:
            current = current_revision(engine)
            if current is None and not create:
                raise StoreError(f"no registry in catalog {redact(url)}: it has no dsreg tables (a write such as `dsreg base add` creates them)")
            if current != head_revision():
                try:
                    upgrade(engine)
                except ProgrammingError as exc:
                    if not _denied(exc):
                        raise
                    raise StoreError(
                        f"catalog {redact(url)} has schema {current or 'none'} and this dsreg needs {head_revision()}; these credentials "
                        f"may not migrate it ({_db_message(exc)}): open it once with the role that owns its tables"
                    ) from None
        except (OperationalError, InterfaceError, ProgrammingError) as exc:
            engine.dispose()
            raise StoreError(f"cannot open catalog {redact(url)}: {_db_message(exc)}") from None
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url, actor)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self, lock: str | None = None) -> Iterator[Session]:
        """A transaction; ``lock="shared"`` for writes that make blobs live, ``"exclusive"`` for a gc sweep."""
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                if lock and self.dialect == "postgresql":
                    fn = "pg_advisory_xact_lock_shared" if lock == "shared" else "pg_advisory_xact_lock"
                    session.execute(sa.text(f"SELECT {fn}(:key)"), {"key": WRITE_LOCK})
                yield session
        except (OperationalError, InterfaceError) as exc:
            raise StoreError(f"catalog {redact(self.url)}: {_db_message(exc)}") from None
        except ProgrammingError as exc:
            if not _denied(exc):
                raise
            raise StoreError(
                f"catalog {redact(self.url)}: {_db_message(exc)}; these credentials may not make this change, and nothing was changed "
                "(docs/scaling.md lists what the reader, writer and gc roles may do)"
            ) from None

    # ------------------------------------------------------------ the audit log

    def _event(self, s: Session, action: str, subject: str | None = None, revision: int | None = None, base: str | None = None, **details) -> None:
        """Append an event to the transaction ``s``: it commits with the change it records, or not at all."""
        s.add(EventRow(
            at=utcnow(), actor=self.actor, action=action, subject=subject, revision=revision, base=base,
            details=json.dumps(details, sort_keys=True, default=str),
        ))

    def record(self, action: str, **details) -> None:
        """An event of its own (a gc round's counts): for changes made over many transactions."""
        with self.session() as s:
            self._event(s, action, **details)

    def events(
        self, subject: str | None = None, since: datetime | None = None, limit: int | None = None, action: str | None = None,
        base: str | None = None,
    ) -> list[Event]:
        q = sa.select(EventRow).order_by(EventRow.id.desc())
        if subject is not None:
            q = q.where(EventRow.subject == subject)
        if since is not None:
            q = q.where(EventRow.at >= since)
        if action is not None:
            q = q.where(EventRow.action == action)
        if base is not None:
            q = q.where(EventRow.base == base)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return [
                Event(r.id, _aware(r.at), r.actor, r.action, r.subject, r.revision, r.base, json.loads(r.details))
                for r in s.scalars(q)
            ]

    # ------------------------------------------------------------ leases

    def lease(self, holder: str, ttl: float) -> Lease:
        return Lease(self, holder, ttl)

    def create_lease(self, holder: str, ttl: float) -> str:
        lease_id = uuid.uuid4().hex
        with self.session(lock="shared") as s:
            s.add(LeaseRow(id=lease_id, holder=holder[:256], expires_at=utcnow() + timedelta(seconds=ttl)))
        return lease_id

    def lease_blobs(self, lease_id: str, digests: Sequence[str]) -> None:
        """Claim blobs before checking for or uploading them, so that gc cannot take them meanwhile."""
        with self.session(lock="shared") as s:
            self._live_lease(s, lease_id)
            _insert_ignore(s, LeaseBlobRow, [{"lease_id": lease_id, "digest": d} for d in sorted(set(digests))], ["lease_id", "digest"])

    def renew_lease(self, lease_id: str, ttl: float) -> bool:
        """Extend a live lease; an expired one stays expired, since gc may have acted on it."""
        now = utcnow()
        with self.session() as s:
            done = s.execute(
                sa.update(LeaseRow).where(LeaseRow.id == lease_id, LeaseRow.expires_at > now).values(expires_at=now + timedelta(seconds=ttl))
            )
            return done.rowcount == 1

    def drop_lease(self, lease_id: str) -> None:
        with self.session() as s:
            self._delete_lease(s, lease_id)

    @staticmethod
    def _delete_lease(s: Session, lease_id: str) -> None:
        s.execute(sa.delete(LeaseBlobRow).where(LeaseBlobRow.lease_id == lease_id))
        s.execute(sa.delete(LeaseRow).where(LeaseRow.id == lease_id))

    @staticmethod
    def _live_lease(s: Session, lease_id: str) -> None:
        row = s.get(LeaseRow, lease_id)
        if row is None or _aware(row.expires_at) <= utcnow():
            raise Conflict("the upload lease of this write expired before it could commit (was the process paused?); run it again")

    def drop_expired_leases(self) -> int:
        with self.session() as s:
            expired = list(s.scalars(sa.select(LeaseRow.id).where(LeaseRow.expires_at <= utcnow())))
            for lease_id in expired:
                self._delete_lease(s, lease_id)
            return len(expired)

    def live_leases(self) -> list[tuple[str, str]]:
        """(id, holder) of every lease that has not expired."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(sa.select(LeaseRow.id, LeaseRow.holder).where(LeaseRow.expires_at > utcnow()))]

    def drop_leases(self, ids: Sequence[str]) -> int:
        """End these leases now (their writers are known to be gone); a commit under one then fails."""
        with self.session() as s:
            for lease_id in ids:
                self._delete_lease(s, lease_id)
        return len(ids)

    # ------------------------------------------------------------ gc primitives

    def claims(self, s: Session, digests: Sequence[str]) -> tuple[set[str], set[str]]:
        """(those of ``digests`` that a committed row references, those that a live lease claims)."""
        referenced: set[str] = set()
        leased: set[str] = set()
        now = utcnow()
        for chunk in _chunks(sorted(set(digests)), 500):
            referenced.update(s.scalars(sa.select(BaseTensorRow.blob_digest).where(BaseTensorRow.blob_digest.in_(chunk))))
            referenced.update(s.scalars(sa.select(EntryRow.blob_digest).where(EntryRow.blob_digest.in_(chunk))))
            referenced.update(s.scalars(sa.select(DerivedRow.blob_digest).where(DerivedRow.blob_digest.in_(chunk))))
            leased.update(
                s.scalars(
                    sa.select(LeaseBlobRow.digest)
                    .join(LeaseRow, LeaseRow.id == LeaseBlobRow.lease_id)
                    .where(LeaseBlobRow.digest.in_(chunk), LeaseRow.expires_at > now)
                )
            )
        return referenced, leased

    def forget_blobs(self, s: Session, digests: Sequence[str]) -> None:
        for chunk in _chunks(list(digests), 500):
            s.execute(sa.delete(BlobRow).where(BlobRow.digest.in_(chunk)))

    def unreferenced_blob_rows(self, s: Session, before: datetime) -> list[str]:
        """Blob rows that nothing references any more, older than ``before``."""
        return list(
            s.scalars(
                sa.select(BlobRow.digest).where(
                    BlobRow.created_at < before,
                    ~sa.exists().where(BaseTensorRow.blob_digest == BlobRow.digest),
                    ~sa.exists().where(EntryRow.blob_digest == BlobRow.digest),
                    ~sa.exists().where(DerivedRow.blob_digest == BlobRow.digest),
                )
            )
        )

    def references(self) -> dict[str, str]:
        """Every referenced blob digest, with one place that references it (``SUBJECT@REV`` or ``base NAME``)."""
        refs: dict[str, str] = {}
        with self.session() as s:
            for digest, name in s.execute(
                sa.select(BaseTensorRow.blob_digest, BaseRow.name).join(BaseRow, BaseRow.id == BaseTensorRow.base_id)
            ):
                refs.setdefault(digest, f"base {name}")
            for digest, name, number in s.execute(
                sa.select(EntryRow.blob_digest, SubjectRow.name, RevisionRow.number)
                .join(RevisionRow, RevisionRow.id == EntryRow.revision_id)
                .join(SubjectRow, SubjectRow.id == RevisionRow.subject_id)
                .where(EntryRow.blob_digest.is_not(None))
            ):
                refs.setdefault(digest, f"{name}@{number}")
            for digest, kind, tensor in s.execute(sa.select(DerivedRow.blob_digest, DerivedRow.kind, DerivedRow.tensor_digest)):
                refs.setdefault(digest, f"{kind} of base tensor {tensor[:12]}")
        return refs

    def blob_users(self, digests: Sequence[str]) -> dict[str, list[BlobUser]]:
        """Every base, revision and derived blob that references each of ``digests`` (what a bad blob breaks)."""
        users: dict[str, list[BlobUser]] = {d: [] for d in digests}
        with self.session() as s:
            for chunk in _chunks(sorted(set(digests)), 500):
                for digest, name, key, tdigest in s.execute(
                    sa.select(BaseTensorRow.blob_digest, BaseRow.name, BaseTensorRow.key, BaseTensorRow.tensor_digest)
                    .join(BaseRow, BaseRow.id == BaseTensorRow.base_id)
                    .where(BaseTensorRow.blob_digest.in_(chunk))
                    .order_by(BaseRow.name, BaseTensorRow.position)
                ):
                    users[digest].append(BlobUser("base", name, key, tdigest))
                # A base's every revision reads all its tensors: a bad base blob breaks them too.
                for digest, name, number in s.execute(
                    sa.select(BaseTensorRow.blob_digest, SubjectRow.name, RevisionRow.number)
                    .join(RevisionRow, RevisionRow.base_id == BaseTensorRow.base_id)
                    .join(SubjectRow, SubjectRow.id == RevisionRow.subject_id)
                    .where(BaseTensorRow.blob_digest.in_(chunk))
                    .distinct()
                    .order_by(SubjectRow.name, RevisionRow.number)
                ):
                    users[digest].append(BlobUser("revision", name, "", "", number))
                for digest, name, number, key, tdigest, base, rule, encoding, source in s.execute(
                    sa.select(
                        EntryRow.blob_digest, SubjectRow.name, RevisionRow.number, EntryRow.key, EntryRow.tensor_digest, BaseRow.name,
                        RevisionRow.rank_rule, RevisionRow.encoding, RevisionRow.source_digest,
                    )
                    .join(RevisionRow, RevisionRow.id == EntryRow.revision_id)
                    .join(SubjectRow, SubjectRow.id == RevisionRow.subject_id)
                    .join(BaseRow, BaseRow.id == RevisionRow.base_id)
                    .where(EntryRow.blob_digest.in_(chunk))
                    .order_by(SubjectRow.name, RevisionRow.number, EntryRow.position)
                ):
                    users[digest].append(BlobUser("entry", name, key, tdigest, number, base, rule, encoding, source))
                for digest, kind, tdigest in s.execute(
                    sa.select(DerivedRow.blob_digest, DerivedRow.kind, DerivedRow.tensor_digest).where(DerivedRow.blob_digest.in_(chunk))
                ):
                    users[digest].append(BlobUser("derived", kind, tdigest, tdigest))
        return users

    def repoint_base_blob(self, old: str, new: BlobRecord, tensor_digest: str, lease_id: str) -> None:
        """Let the base tensors with ``tensor_digest`` that were stored in blob ``old`` use ``new``, which
        holds the same tensor (a repair whose encoder writes other bytes than the lost blob's)."""
        with self.session(lock="shared") as s:
            self._live_lease(s, lease_id)
            self._ensure_blobs(s, [new])
            s.execute(
                sa.update(BaseTensorRow)
                .where(BaseTensorRow.blob_digest == old, BaseTensorRow.tensor_digest == tensor_digest)
                .values(blob_digest=new.digest)
            )

    def derived(self, tensor_digests: Sequence[str], kind: str) -> dict[str, BlobRecord]:
        """The ``kind`` blobs already derived from these base tensors, by tensor digest."""
        return self._blobs_by_tensor(tensor_digests, lambda chunk: (
            sa.select(DerivedRow.tensor_digest, BlobRow)
            .join(BlobRow, BlobRow.digest == DerivedRow.blob_digest)
            .where(DerivedRow.kind == kind, DerivedRow.tensor_digest.in_(chunk))
        ))

    def blob_sizes(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(sa.select(BlobRow.digest, BlobRow.size)).all())

    # ------------------------------------------------------------ blobs

    def blobs_for_tensors(self, tensor_digests: Sequence[str]) -> dict[str, BlobRecord]:
        """Already stored blobs holding exactly these base tensors, by tensor digest, to share rather
        than upload again: one query per 500 tensors, where a query each cost a round trip per tensor."""
        return self._blobs_by_tensor(tensor_digests, lambda chunk: (
            sa.select(BaseTensorRow.tensor_digest, BlobRow)
            .join(BlobRow, BaseTensorRow.blob_digest == BlobRow.digest)
            .where(BaseTensorRow.tensor_digest.in_(chunk))
        ))

    def _blobs_by_tensor(self, tensor_digests: Sequence[str], select) -> dict[str, BlobRecord]:
        """The first blob that ``select(chunk)`` pairs with each tensor digest, 500 digests a query."""
        found: dict[str, BlobRecord] = {}
        with self.session() as s:
            for chunk in _chunks(sorted(set(tensor_digests)), 500):
                for tdigest, row in s.execute(select(chunk)):
                    found.setdefault(tdigest, BlobRecord(row.digest, row.size, row.raw_size))
        return found

    @staticmethod
    def _ensure_blobs(s: Session, blobs: Sequence[BlobRecord]) -> None:
        """Insert blob rows that are not there yet; concurrent writers of the same digests are fine."""
        now = utcnow()
        rows = [{"digest": b.digest, "size": b.size, "raw_size": b.raw_size, "created_at": now} for b in {b.digest: b for b in blobs}.values()]
        _insert_ignore(s, BlobRow, rows, ["digest"])

    # ------------------------------------------------------------ bases

    def add_base(
        self, name: str, digest: str, layout: dict, tensors: Sequence[BaseTensor], blobs: Sequence[BlobRecord], nbytes: int,
        lease_id: str | None = None,
    ) -> BaseInfo:
        with self.session(lock="shared") as s:
            if lease_id:
                self._live_lease(s, lease_id)
            self._ensure_blobs(s, blobs)
            row = BaseRow(
                name=name,
                digest=digest,
                n_tensors=len(tensors),
                n_params=sum(numel(t.shape) for t in tensors),
                nbytes=nbytes,
                layout=json.dumps(layout),
            )
            s.add(row)
            try:
                s.flush()
            except SAIntegrityError:
                raise Conflict(f"base name {name!r} was taken while adding it; choose another --name") from None
            s.add_all(
                BaseTensorRow(
                    base_id=row.id, position=i, key=t.key, dtype=t.dtype, shape=json.dumps(list(t.shape)),
                    tensor_digest=t.tensor_digest, blob_digest=t.blob,
                )
                for i, t in enumerate(tensors)
            )
            if lease_id:
                self._delete_lease(s, lease_id)
            self._event(s, "base.add", base=name, digest=digest, n_tensors=len(tensors), nbytes=nbytes)
            return self._base_info(row)

    def remove_base(self, name: str) -> BaseInfo:
        with self.session(lock="shared") as s:
            row = s.scalar(sa.select(BaseRow).where(BaseRow.name == name))
            if row is None:
                raise BaseNotFound(f"no base named {name!r}")
            used = s.scalar(sa.select(sa.func.count()).select_from(RevisionRow).where(RevisionRow.base_id == row.id))
            if used:
                raise Conflict(f"base {name!r} is used by {used} revisions; remove them first (dsreg rm)")
            # A push claims its base's blobs in its lease (docs/format.md): while one runs, it reads them.
            writer = s.scalar(
                sa.select(LeaseRow.holder)
                .join(LeaseBlobRow, LeaseBlobRow.lease_id == LeaseRow.id)
                .join(BaseTensorRow, BaseTensorRow.blob_digest == LeaseBlobRow.digest)
                .where(BaseTensorRow.base_id == row.id, LeaseRow.expires_at > utcnow())
                .limit(1)
            )
            if writer is not None:
                raise Conflict(f"base {name!r} is in use by a write in progress ({writer}); try again when it has finished")
            s.execute(sa.delete(BaseTensorRow).where(BaseTensorRow.base_id == row.id))
            # What was derived from tensors that no base holds any more goes with them (gc takes the blobs).
            s.execute(sa.delete(DerivedRow).where(~sa.exists().where(BaseTensorRow.tensor_digest == DerivedRow.tensor_digest)))
            s.delete(row)
            self._event(s, "base.rm", base=name, digest=row.digest)
            return self._base_info(row)

    def base_by_name(self, name: str) -> BaseInfo:
        with self.session() as s:
            row = s.scalar(sa.select(BaseRow).where(BaseRow.name == name))
            if row is None:
                known = ", ".join(s.scalars(sa.select(BaseRow.name).order_by(BaseRow.name).limit(20))) or "none"
                raise BaseNotFound(f"no base named {name!r} (registered: {known}); add it with `dsreg base add FILE --name {name}`")
            return self._base_info(row)

    def base_by_digest(self, digest: str) -> BaseInfo | None:
        with self.session() as s:
            row = s.scalar(sa.select(BaseRow).where(BaseRow.digest == digest))
            return self._base_info(row) if row else None

    def base_id(self, name: str) -> int:
        with self.session() as s:
            base_id = s.scalar(sa.select(BaseRow.id).where(BaseRow.name == name))
        if base_id is None:
            self.base_by_name(name)  # raises with the list of known bases
        return base_id

    def bases(self) -> list[BaseInfo]:
        with self.session() as s:
            return [self._base_info(r) for r in s.scalars(sa.select(BaseRow).order_by(BaseRow.name))]

    def base_layout(self, name: str) -> dict:
        base_id = self.base_id(name)
        with self.session() as s:
            return json.loads(s.scalar(sa.select(BaseRow.layout).where(BaseRow.id == base_id)))

    def base_tensors(self, name: str) -> list[BaseTensor]:
        base_id = self.base_id(name)
        with self.session() as s:
            rows = s.execute(
                sa.select(BaseTensorRow, BlobRow.raw_size)
                .join(BlobRow, BlobRow.digest == BaseTensorRow.blob_digest)
                .where(BaseTensorRow.base_id == base_id)
                .order_by(BaseTensorRow.position)
            ).all()
            return [BaseTensor(r.key, r.dtype, _shape(r.shape), r.tensor_digest, r.blob_digest, raw) for r, raw in rows]

    @staticmethod
    def _base_info(row: BaseRow) -> BaseInfo:
        return BaseInfo(row.name, row.digest, row.n_tensors, row.n_params, row.nbytes, _aware(row.created_at))

    # ------------------------------------------------------------ revisions

    def commit_revision(self, new: NewRevision, lease_id: str | None = None) -> RevisionInfo:
        """Record a pushed revision and its blobs in one transaction: all of it or none.

        The push's lease must still be live: it is what kept gc off the blobs since their upload.
        """
        blobs = [e.blob for e in new.entries if e.blob]
        with self.session(lock="shared") as s:
            if lease_id:
                self._live_lease(s, lease_id)
            self._ensure_blobs(s, blobs + [d.blob for d in new.derived])
            _insert_ignore(
                s, DerivedRow, [{"tensor_digest": d.tensor_digest, "kind": d.kind, "blob_digest": d.blob.digest} for d in new.derived],
                ["tensor_digest", "kind"],
            )
            subject = self._subject_for_push(s, new.subject)
            s.execute(
                sa.update(SubjectRow).where(SubjectRow.id == subject.id).values(counter=SubjectRow.counter + 1, latest=SubjectRow.counter + 1)
            )
            number = s.scalar(sa.select(SubjectRow.counter).where(SubjectRow.id == subject.id))
            stored = sum({b.digest: b.size for b in blobs}.values())
            revision = RevisionRow(
                subject_id=subject.id, number=number, base_id=new.base_id, energy=new.energy,
                rank_rule=new.rank_rule, encoding=new.encoding, original_bytes=new.original_bytes, stored_bytes=stored,
                kept_params=sum(kept_params(e.kind, e.rank, e.shape) for e in new.entries), n_tensors=len(new.entries),
                n_changed=sum(e.kind != "base" for e in new.entries), source_digest=new.source_digest,
                source_format=new.source_format, layout=json.dumps(new.layout),
            )
            s.add(revision)
            s.flush()
            s.add_all(
                EntryRow(
                    revision_id=revision.id, position=i, key=e.key, kind=e.kind, dtype=e.dtype,
                    shape=json.dumps(list(e.shape)), rank=e.rank, full_rank=e.full_rank, rel_error=e.rel_error,
                    encoding=e.encoding, tensor_digest=e.tensor_digest, blob_digest=e.blob.digest if e.blob else None,
                )
                for i, e in enumerate(new.entries)
            )
            s.flush()
            if lease_id:
                self._delete_lease(s, lease_id)
            info = self._revision_info(s, revision, subject.name)
            self._event(
                s, "push", subject.name, number, info.base, rank_rule=info.rank_rule, encoding=info.encoding,
                original_bytes=info.original_bytes, stored_bytes=info.stored_bytes, source_digest=info.source_digest,
                source_format=info.source_format,
            )
            return info

    def _subject_for_push(self, s: Session, name: str | None) -> SubjectRow:
        if name is not None:
            row = s.scalar(sa.select(SubjectRow).where(SubjectRow.name == name).with_for_update())
            if row is None:
                row = self._insert_subject(s, name)
                if row is None:  # created by a concurrent push since our select
                    row = s.scalar(sa.select(SubjectRow).where(SubjectRow.name == name).with_for_update())
            return row
        number = self._max_auto_number(s) + 1
        while True:
            row = self._insert_subject(s, f"{AUTO_PREFIX}{number}")
            if row is not None:
                return row
            number += 1

    @staticmethod
    def _insert_subject(s: Session, name: str) -> SubjectRow | None:
        row = SubjectRow(name=name, latest=0, counter=0)
        try:
            with s.begin_nested():
                s.add(row)
                s.flush()
        except SAIntegrityError:
            return None
        return row

    @staticmethod
    def _max_auto_number(s: Session) -> int:
        # Among subject-<digits> names only (a subject-final must not hide the numbers), the longest,
        # then greatest, is the largest N: one indexed range scan, whatever other names exist.
        suffix = sa.func.substr(SubjectRow.name, len(AUTO_PREFIX) + 1)
        if s.get_bind().dialect.name == "postgresql":
            digits = suffix.op("~")("^[0-9]+$")
        else:
            digits = (suffix != "") & ~suffix.op("GLOB")("*[^0-9]*")
        name = s.scalar(
            sa.select(SubjectRow.name)
            .where(SubjectRow.name.like(f"{AUTO_PREFIX}%"), digits)
            .order_by(sa.func.length(SubjectRow.name).desc(), SubjectRow.name.desc())
            .limit(1)
        )
        return (auto_number(name) or 0) if name else 0

    def _subject_row(self, s: Session, name: str, lock: bool = False) -> SubjectRow:
        q = sa.select(SubjectRow).where(SubjectRow.name == name)
        row = s.scalar(q.with_for_update() if lock else q)
        if row is None:
            raise SubjectNotFound(f"no subject named {name!r}; `dsreg ls` lists them")
        return row

    def _revision_row(self, s: Session, ref: Ref) -> tuple[SubjectRow, RevisionRow]:
        subject = self._subject_row(s, ref.subject)
        number = ref.revision if ref.revision is not None else subject.latest
        row = s.scalar(sa.select(RevisionRow).where(RevisionRow.subject_id == subject.id, RevisionRow.number == number))
        if row is None:
            raise RevisionNotFound(_no_revision(ref, subject))
        return subject, row

    def remove(self, ref: Ref, force: bool = False) -> list[RevisionInfo]:
        """Remove one revision, or all of a subject's; their blobs stay until gc. A tagged revision
        is removed only with ``force``, as retention policies never remove one."""
        with self.session(lock="shared") as s:
            # Locked as a push locks it, so that the latest number this sets cannot undo a push's.
            subject = self._subject_row(s, ref.subject, lock=True)
            if ref.revision is None:
                revs = list(s.scalars(sa.select(RevisionRow).where(RevisionRow.subject_id == subject.id).order_by(RevisionRow.number)))
                if not revs:
                    raise RevisionNotFound(_no_revision(ref, subject))
            else:
                revs = [self._revision_row(s, ref)[1]]
            removed = [self._revision_info(s, r, subject.name) for r in revs]
            tagged = [r for r in removed if r.tags]
            if tagged and not force:
                listed = ", ".join(f"{r.ref} ({', '.join(r.tags)})" for r in tagged[:3])
                raise Conflict(f"{listed} {'is' if len(tagged) == 1 else 'are'} tagged; untag first, or remove anyway with --force")
            self._delete_revisions(s, subject, [r.id for r in revs])
            for r in removed:
                self._event(s, "rm", r.subject, r.number, r.base, tags=list(r.tags), forced=bool(r.tags))
            return removed

    def remove_revisions(self, refs: Sequence[tuple[str, int]], why: dict | None = None) -> int:
        """Remove the given (subject, number) pairs that still exist (gc's retention: each logged as
        ``expire`` with ``why``); returns how many were removed."""
        removed = 0
        with self.session(lock="shared") as s:
            by_subject: dict[str, list[int]] = {}
            for name, number in refs:
                by_subject.setdefault(name, []).append(number)
            for name, numbers in by_subject.items():
                subject = s.scalar(sa.select(SubjectRow).where(SubjectRow.name == name).with_for_update())
                if subject is None:
                    continue
                gone = s.execute(
                    sa.select(RevisionRow.id, RevisionRow.number).where(RevisionRow.subject_id == subject.id, RevisionRow.number.in_(numbers))
                ).all()
                self._delete_revisions(s, subject, [rid for rid, _ in gone])
                for _, number in sorted(gone, key=lambda g: g[1]):
                    self._event(s, "expire", name, number, **(why or {}))
                removed += len(gone)
        return removed

    @staticmethod
    def _delete_revisions(s: Session, subject: SubjectRow, ids: list[int]) -> None:
        for chunk in _chunks(ids, 500):
            s.execute(sa.delete(TagRow).where(TagRow.revision_id.in_(chunk)))
            s.execute(sa.delete(EntryRow).where(EntryRow.revision_id.in_(chunk)))
            s.execute(sa.delete(RevisionRow).where(RevisionRow.id.in_(chunk)))
        # The subject row stays when its last revision goes (a tombstone, latest 0): its counter is
        # what keeps a pinned SUBJECT@REV from ever naming other weights, and what keeps an
        # auto-named subject-N from coming back with another meaning.
        remaining = s.scalar(sa.select(sa.func.max(RevisionRow.number)).where(RevisionRow.subject_id == subject.id))
        s.execute(sa.update(SubjectRow).where(SubjectRow.id == subject.id).values(latest=remaining or 0))

    # ------------------------------------------------------------ retention policies

    def set_policy(self, name: str, pattern: str, keep_last: int | None, max_age_seconds: int | None) -> PolicyInfo:
        with self.session() as s:
            row = s.get(PolicyRow, name) or PolicyRow(name=name)
            row.pattern, row.keep_last, row.max_age_seconds = pattern, keep_last, max_age_seconds
            s.add(row)
            s.flush()
            self._event(s, "policy.set", policy=name, pattern=pattern, keep_last=keep_last, max_age_seconds=max_age_seconds)
            return _policy_info(row)

    def policies(self) -> list[PolicyInfo]:
        with self.session() as s:
            return [_policy_info(r) for r in s.scalars(sa.select(PolicyRow).order_by(PolicyRow.name))]

    def remove_policy(self, name: str) -> None:
        with self.session() as s:
            if s.get(PolicyRow, name) is None:
                raise NotFound(f"no retention policy named {name!r}; `dsreg policy ls` lists them")
            s.execute(sa.delete(PolicyRow).where(PolicyRow.name == name))
            self._event(s, "policy.rm", policy=name)

    def retention_view(self, pattern: str) -> list[tuple[str, int, datetime, bool]]:
        """(subject, number, created_at, tagged) of every revision of the subjects matching ``pattern``."""
        tagged = sa.exists().where(TagRow.revision_id == RevisionRow.id)
        q = (
            sa.select(SubjectRow.name, RevisionRow.number, RevisionRow.created_at, tagged)
            .join(RevisionRow, RevisionRow.subject_id == SubjectRow.id)
            .order_by(SubjectRow.name, RevisionRow.number)
        )
        if pattern != "*":
            q = q.where(SubjectRow.name.like(_like_pattern(pattern, prefix=False), escape="\\"))
        with self.session() as s:
            return [(n, num, _aware(c), bool(t)) for n, num, c, t in s.execute(q)]

    def revision(self, ref: Ref) -> RevisionInfo:
        with self.session() as s:
            subject, row = self._revision_row(s, ref)
            return self._revision_info(s, row, subject.name)

    def revision_layout(self, ref: Ref) -> dict:
        with self.session() as s:
            return json.loads(self._revision_row(s, ref)[1].layout)

    def entries(self, ref: Ref) -> list[StoredEntry]:
        with self.session() as s:
            _, row = self._revision_row(s, ref)
            rows = s.execute(
                sa.select(EntryRow, BlobRow.raw_size)
                .outerjoin(BlobRow, BlobRow.digest == EntryRow.blob_digest)
                .where(EntryRow.revision_id == row.id)
                .order_by(EntryRow.position)
            ).all()
            return [StoredEntry(e.key, e.kind, e.dtype, _shape(e.shape), e.blob_digest, raw, e.tensor_digest) for e, raw in rows]

    def tensor_infos(self, ref: Ref) -> list[TensorInfo]:
        with self.session() as s:
            _, row = self._revision_row(s, ref)
            rows = s.execute(
                sa.select(EntryRow, BlobRow.size)
                .outerjoin(BlobRow, BlobRow.digest == EntryRow.blob_digest)
                .where(EntryRow.revision_id == row.id)
                .order_by(EntryRow.position)
            ).all()
            return [
                TensorInfo(e.key, e.kind, e.dtype, _shape(e.shape), e.rank, e.full_rank, e.rel_error, size or 0, e.blob_digest, e.encoding)
                for e, size in rows
            ]

    def revisions(self, subject: str) -> list[RevisionInfo]:
        with self.session() as s:
            row = self._subject_row(s, subject)
            revs = s.scalars(sa.select(RevisionRow).where(RevisionRow.subject_id == row.id).order_by(RevisionRow.number))
            return [self._revision_info(s, r, row.name) for r in revs]

    def tag(self, ref: Ref, name: str) -> RevisionInfo:
        with self.session() as s:
            subject, row = self._revision_row(s, ref)
            tag = s.get(TagRow, (subject.id, name))
            moved_from = None
            if tag is None:
                s.add(TagRow(subject_id=subject.id, name=name, revision_id=row.id))
            else:
                moved_from = s.scalar(sa.select(RevisionRow.number).where(RevisionRow.id == tag.revision_id))
                tag.revision_id = row.id
            s.flush()
            if moved_from != row.number:
                self._event(s, "tag", subject.name, row.number, tag=name, moved_from=moved_from)
            return self._revision_info(s, row, subject.name)

    def untag(self, subject: str, name: str) -> RevisionInfo:
        with self.session() as s:
            row = self._subject_row(s, subject)
            tag = s.get(TagRow, (row.id, name))
            if tag is None:
                raise NotFound(f"subject {subject!r} has no tag {name!r}")
            revision = s.get(RevisionRow, tag.revision_id)
            s.delete(tag)
            s.flush()
            self._event(s, "untag", row.name, revision.number, tag=name)
            return self._revision_info(s, revision, row.name)

    def _revision_info(self, s: Session, row: RevisionRow, subject: str) -> RevisionInfo:
        base = s.scalar(sa.select(BaseRow.name).where(BaseRow.id == row.base_id))
        tags = tuple(s.scalars(sa.select(TagRow.name).where(TagRow.revision_id == row.id).order_by(TagRow.name)))
        return _revision_record(row, subject, base, tags)

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
        q = (
            sa.select(SubjectRow, RevisionRow, BaseRow.name)
            .join(RevisionRow, (RevisionRow.subject_id == SubjectRow.id) & (RevisionRow.number == SubjectRow.latest))
            .join(BaseRow, BaseRow.id == RevisionRow.base_id)
        )
        if base is not None:
            q = q.where(BaseRow.name == base)
        if name_like:
            q = q.where(SubjectRow.name.like(_like_pattern(name_like), escape="\\"))
        if tag is not None:
            q = q.where(sa.exists().where(TagRow.subject_id == SubjectRow.id, TagRow.name == tag))
        if since is not None:
            q = q.where(RevisionRow.created_at >= since)
        if after is not None:
            q = q.where(SubjectRow.name > after)
        q = q.order_by(SubjectRow.name).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            rows = s.execute(q).all()
            ids = [subj.id for subj, _, _ in rows]
            counts: dict[int, int] = {}
            for chunk in _chunks(ids, 500):
                counts.update(
                    s.execute(
                        sa.select(RevisionRow.subject_id, sa.func.count()).where(RevisionRow.subject_id.in_(chunk)).group_by(RevisionRow.subject_id)
                    ).all()
                )
            tags: dict[int, list[str]] = {}
            rev_tags: dict[int, list[str]] = {}
            for chunk in _chunks(ids, 500):
                for sid, rid, tname in s.execute(
                    sa.select(TagRow.subject_id, TagRow.revision_id, TagRow.name).where(TagRow.subject_id.in_(chunk)).order_by(TagRow.name)
                ):
                    tags.setdefault(sid, []).append(tname)
                    rev_tags.setdefault(rid, []).append(tname)
            tagged: dict[int, tuple[RevisionRow, str]] = {}
            if tag is not None:
                for chunk in _chunks(ids, 500):
                    for rev, base_name in s.execute(
                        sa.select(RevisionRow, BaseRow.name)
                        .join(TagRow, TagRow.revision_id == RevisionRow.id)
                        .join(BaseRow, BaseRow.id == RevisionRow.base_id)
                        .where(TagRow.name == tag, TagRow.subject_id.in_(chunk))
                    ):
                        tagged[rev.subject_id] = rev, base_name
            out = []
            for subj, rev, base_name in rows:
                latest = _revision_record(rev, subj.name, base_name, tuple(rev_tags.get(rev.id, ())))
                shown = None
                if subj.id in tagged:
                    trev, tbase = tagged[subj.id]
                    shown = _revision_record(trev, subj.name, tbase, tuple(rev_tags.get(trev.id, ())))
                out.append(SubjectInfo(subj.name, _aware(subj.created_at), counts.get(subj.id, 0), latest, tuple(tags.get(subj.id, ())), shown))
            return out

    def stats(self) -> Stats:
        with self.session() as s:
            n_bases = s.scalar(sa.select(sa.func.count()).select_from(BaseRow))
            n_subjects = s.scalar(sa.select(sa.func.count()).select_from(SubjectRow).where(SubjectRow.latest > 0))
            n_revisions, original = s.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(RevisionRow.original_bytes), 0))
            ).one()
            subject_blobs = sa.select(EntryRow.blob_digest).where(EntryRow.blob_digest.is_not(None)).distinct().subquery()
            stored = s.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(BlobRow.size), 0)).where(BlobRow.digest.in_(sa.select(subject_blobs.c.blob_digest)))
            )
            base_blobs = sa.select(BaseTensorRow.blob_digest).distinct().subquery()
            base_bytes = s.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(BlobRow.size), 0)).where(BlobRow.digest.in_(sa.select(base_blobs.c.blob_digest)))
            )
            return Stats(n_bases, n_subjects, n_revisions, int(original), int(stored), int(base_bytes))


def _revision_record(row: RevisionRow, subject: str, base: str, tags: tuple[str, ...]) -> RevisionInfo:
    return RevisionInfo(
        subject=subject, number=row.number, base=base, created_at=_aware(row.created_at), energy=row.energy,
        rank_rule=row.rank_rule, encoding=row.encoding, original_bytes=row.original_bytes, stored_bytes=row.stored_bytes,
        kept_params=row.kept_params, n_tensors=row.n_tensors, n_changed=row.n_changed,
        source_digest=row.source_digest, source_format=row.source_format, tags=tags,
        adapter=(json.loads(row.layout).get("adapter") or {}).get("format") if '"adapter"' in row.layout else None,
    )


def _no_revision(ref: Ref, subject: SubjectRow) -> str:
    if subject.latest == 0:
        return (
            f"subject {ref.subject!r} has no revisions: all {subject.counter} were removed "
            f"(a push continues at {subject.counter + 1})"
        )
    if ref.revision is not None and ref.revision <= subject.counter:
        return f"subject {ref.subject!r} has no revision {ref.revision} any more: it was removed (latest is {subject.latest})"
    return f"subject {ref.subject!r} has no revision {ref.revision} (latest is {subject.latest})"


def _like_pattern(pattern: str, prefix: bool = True) -> str:
    """``*`` matches anything; without one the pattern is a prefix (or, with ``prefix=False``, exact)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if "*" in pattern:
        return escaped.replace("*", "%")
    return escaped + "%" if prefix else escaped


def _insert_ignore(s: Session, model, rows: list[dict], keys: list[str]) -> None:
    """INSERT .. ON CONFLICT DO NOTHING, in key order so that overlapping writers cannot deadlock."""
    if not rows:
        return
    rows = sorted(rows, key=lambda r: tuple(r[k] for k in keys))
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    for chunk in _chunks(rows, 500):
        s.execute(insert(model).on_conflict_do_nothing(index_elements=keys), chunk)


def _policy_info(row: PolicyRow) -> PolicyInfo:
    return PolicyInfo(row.name, row.pattern, row.keep_last, row.max_age_seconds)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]




def _denied(exc: Exception) -> bool:
    """Whether the database refused for want of a privilege (SQLSTATE 42501, insufficient_privilege)."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == "42501"


def _db_message(exc: Exception) -> str:
    return redact(first_line(getattr(exc, "orig", None) or exc))

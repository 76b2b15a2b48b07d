"""The catalog's tables and lock keys: what the schema is, apart from the queries over it.

The Alembic migrations (``dsreg.migrations``) create and change these tables; ``migrations/env.py``,
the tests' snapshot helper and the benchmarks import only this module. The format is specified in
docs/format.md.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Postgres advisory lock keys (any fixed 64-bit numbers). Writers that make blobs live (lease
# registration, commits) share WRITE_LOCK; a gc sweep batch takes it exclusively. On SQLite every
# write transaction is exclusive already (BEGIN IMMEDIATE).
WRITE_LOCK = 0x64737265_67000002
GC_LOCK = 0x64737265_67000003

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Model(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class BlobRow(Model):
    __tablename__ = "blobs"
    digest: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    raw_size: Mapped[int] = mapped_column(sa.BigInteger)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class BaseRow(Model):
    __tablename__ = "bases"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    digest: Mapped[str] = mapped_column(sa.String(64), unique=True)
    n_tensors: Mapped[int] = mapped_column(sa.Integer)
    n_params: Mapped[int] = mapped_column(sa.BigInteger)
    nbytes: Mapped[int] = mapped_column(sa.BigInteger)
    layout: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class BaseTensorRow(Model):
    __tablename__ = "base_tensors"
    base_id: Mapped[int] = mapped_column(sa.ForeignKey("bases.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(512))
    dtype: Mapped[str] = mapped_column(sa.String(16))
    shape: Mapped[str] = mapped_column(sa.String(128))
    tensor_digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    blob_digest: Mapped[str] = mapped_column(sa.ForeignKey("blobs.digest"), index=True)
    __table_args__ = (sa.UniqueConstraint("base_id", "key"),)


class SubjectRow(Model):
    __tablename__ = "subjects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    # The newest existing revision number: 0 until the first revision commits, and again once
    # every revision is removed (the row stays, a tombstone that keeps its counter).
    latest: Mapped[int] = mapped_column(sa.Integer, default=0)
    # Revision numbers handed out so far: bumped in the push's transaction, which serializes
    # concurrent pushes to one subject on the row lock and keeps numbers gap-free. Removing a
    # revision never lowers it, so a number always means the same weights.
    counter: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    # Name-prefix queries (LIKE 'abc%') use this index on Postgres whatever the database collation.
    __table_args__ = (sa.Index("ix_subjects_name_pattern", "name", postgresql_ops={"name": "varchar_pattern_ops"}),)


class RevisionRow(Model):
    __tablename__ = "revisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    subject_id: Mapped[int] = mapped_column(sa.ForeignKey("subjects.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(sa.Integer)
    base_id: Mapped[int] = mapped_column(sa.ForeignKey("bases.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow, index=True)
    energy: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    # How ranks were chosen, as RankRule prints it: energy=0.5, max-error=0.05, budget=20000000, exact.
    rank_rule: Mapped[str] = mapped_column(sa.String(64))
    encoding: Mapped[str] = mapped_column(sa.String(16))
    original_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    stored_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    kept_params: Mapped[int] = mapped_column(sa.BigInteger)
    n_tensors: Mapped[int] = mapped_column(sa.Integer)
    n_changed: Mapped[int] = mapped_column(sa.Integer)
    source_digest: Mapped[str] = mapped_column(sa.String(64))
    source_format: Mapped[str] = mapped_column(sa.String(16))
    layout: Mapped[str] = mapped_column(sa.Text)
    __table_args__ = (sa.UniqueConstraint("subject_id", "number"),)


class EntryRow(Model):
    __tablename__ = "entries"
    revision_id: Mapped[int] = mapped_column(sa.ForeignKey("revisions.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(512))
    kind: Mapped[str] = mapped_column(sa.String(16))
    dtype: Mapped[str] = mapped_column(sa.String(16))
    shape: Mapped[str] = mapped_column(sa.String(128))
    rank: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    full_rank: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    rel_error: Mapped[float] = mapped_column(sa.Float)
    encoding: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    tensor_digest: Mapped[str] = mapped_column(sa.String(64))
    blob_digest: Mapped[str | None] = mapped_column(sa.ForeignKey("blobs.digest"), nullable=True, index=True)


class TagRow(Model):
    __tablename__ = "tags"
    subject_id: Mapped[int] = mapped_column(sa.ForeignKey("subjects.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True, index=True)
    revision_id: Mapped[int] = mapped_column(sa.ForeignKey("revisions.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class LeaseRow(Model):
    """A writer's claim on blobs it is about to reference: gc keeps them while the lease is live."""

    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(256))
    expires_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class LeaseBlobRow(Model):
    __tablename__ = "lease_blobs"
    lease_id: Mapped[str] = mapped_column(sa.ForeignKey("leases.id", ondelete="CASCADE"), primary_key=True)
    digest: Mapped[str] = mapped_column(sa.String(64), primary_key=True, index=True)


class PolicyRow(Model):
    __tablename__ = "policies"
    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    pattern: Mapped[str] = mapped_column(sa.String(256), default="*")
    keep_last: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    max_age_seconds: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class DerivedRow(Model):
    """A blob computed from a base tensor, stored once per tensor digest and kind (``svd``: the
    SVD that SVDiff subjects' spectral shifts apply to). It lives as long as a base holds the tensor."""

    __tablename__ = "derived"
    tensor_digest: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    blob_digest: Mapped[str] = mapped_column(sa.ForeignKey("blobs.digest"), index=True)


class EventRow(Model):
    """One change to the registry, appended in the same transaction as the change (the audit log).
    Rows are only ever inserted: the documented writer and gc roles may not UPDATE or DELETE them."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(sa.String(256))
    action: Mapped[str] = mapped_column(sa.String(32))
    subject: Mapped[str | None] = mapped_column(sa.String(128), nullable=True, index=True)
    revision: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    base: Mapped[str | None] = mapped_column(sa.String(128), nullable=True)
    details: Mapped[str] = mapped_column(sa.Text, default="{}")

"""Bringing a catalog's schema to the newest Alembic revision."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

# Any fixed 64-bit number: Postgres advisory locks are keyed by integers.
MIGRATION_LOCK = 0x64737265_67000001


def alembic_config(connection=None) -> Config:
    # The scripts ship inside the package (dsreg.migrations): found through it, never by a
    # top-level ``import migrations`` that another project's package could answer.
    from . import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> None:
    """Migrate under a lock, so that many processes opening a new catalog at once migrate it once.

    A catalog already at ``target`` is only read (no lock, no transaction that writes): a role
    that may only SELECT opens it."""
    head = head_revision() if target == "head" else target
    if current_revision(engine) == head:
        return
    with _migrating(engine) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
        command.upgrade(alembic_config(conn), target)


def downgrade(engine: Engine, target: str) -> None:
    with _migrating(engine) as conn, conn.begin():
        command.downgrade(alembic_config(conn), target)


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection to migrate on. On SQLite, foreign keys are off while it runs: Alembic changes a
    table there by copying it and dropping the original, and with foreign keys on, dropping
    ``revisions`` would cascade to every row of ``entries``. The keys are checked before it ends."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Outside any transaction, where SQLite honours it: at the driver, before SQLAlchemy begins one.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            yield conn
            if sqlite:
                broken = conn.connection.driver_connection.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left {len(broken)} rows whose foreign keys point nowhere, e.g. {broken[0]}")
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")

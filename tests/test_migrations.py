"""The catalog schema comes from Alembic migrations, and they agree with the models."""

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry.catalog import Catalog, Model, create_engine
from registry.migrate import current_revision, downgrade, head_revision, upgrade


def test_a_new_catalog_is_migrated_to_head(engine):
    url = engine.catalog_url
    Catalog.open(url).close()
    engine = create_engine(url)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Model.metadata) == []
    engine.dispose()


def test_downgrade_to_nothing_and_upgrade_again(engine):
    url = engine.catalog_url
    engine = create_engine(url)
    upgrade(engine)
    downgrade(engine, "base")
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()

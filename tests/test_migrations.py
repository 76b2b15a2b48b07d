"""The catalog schema comes from Alembic migrations, and they agree with the models."""

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dsreg.catalog import Catalog, create_engine
from dsreg.tables import Model
from dsreg.migrate import current_revision, downgrade, head_revision, upgrade


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


def _seed(conn, revision: str) -> None:
    """A catalog as ``revision`` wrote it: one base, one subject with one energy-ranked revision."""
    now = "2026-01-01 00:00:00+00:00"
    conn.execute(sa.text("INSERT INTO blobs (digest, size, raw_size, created_at) VALUES ('b1', 10, 20, :t), ('f1', 5, 9, :t)"), {"t": now})
    conn.execute(sa.text(
        "INSERT INTO bases (id, name, digest, n_tensors, n_params, nbytes, layout, created_at) "
        "VALUES (1, 'sd15', 'd', 1, 4, 16, '{}', :t)"), {"t": now})
    conn.execute(sa.text(
        "INSERT INTO base_tensors (base_id, position, key, dtype, shape, tensor_digest, blob_digest) "
        "VALUES (1, 0, 'w', 'float32', '[2, 2]', 't0', 'b1')"))
    if revision >= "0003":
        conn.execute(sa.text("INSERT INTO subjects (id, name, latest, counter, created_at) VALUES (1, 'corgi', 1, 1, :t)"), {"t": now})
    else:
        conn.execute(sa.text("INSERT INTO subjects (id, name, latest, created_at) VALUES (1, 'corgi', 1, :t)"), {"t": now})
    conn.execute(sa.text(
        "INSERT INTO revisions (id, subject_id, number, base_id, created_at, energy, factor_dtype, original_bytes, stored_bytes, "
        "kept_params, n_tensors, n_changed, source_digest, source_format, layout) "
        "VALUES (1, 1, 1, 1, :t, 0.2, 'bf16', 16, 5, 4, 1, 1, 's', 'safetensors', '{}')"), {"t": now})
    conn.execute(sa.text(
        "INSERT INTO entries (revision_id, position, key, kind, dtype, shape, rank, full_rank, rel_error, tensor_digest, blob_digest) "
        "VALUES (1, 0, 'w', 'lowrank', 'float32', '[2, 2]', 1, 2, 0.5, 't1', 'f1')"))
    conn.execute(sa.text("INSERT INTO tags (subject_id, name, revision_id, created_at) VALUES (1, 'prod', 1, :t)"), {"t": now})


def _finds_everything(url: str, sa_engine) -> None:
    from dsreg.catalog import Ref

    catalog = Catalog(sa_engine, url)
    info = catalog.revision(Ref("corgi", 1))
    assert (info.rank_rule, info.encoding, info.energy, info.tags, info.base) == ("energy=0.2", "bf16", 0.2, ("prod",), "sd15")
    (tensor,) = catalog.tensor_infos(Ref("corgi", 1))
    assert (tensor.key, tensor.kind, tensor.rank, tensor.encoding, tensor.stored_bytes) == ("w", "lowrank", 1, "bf16", 5)
    assert [t.key for t in catalog.base_tensors("sd15")] == ["w"]
    with sa_engine.connect() as conn:
        # 0003's data step: the revision counter starts where the numbers handed out so far end.
        assert conn.execute(sa.text("SELECT latest, counter FROM subjects")).one() == (1, 1)


@pytest.mark.parametrize("start", ["0001", "0002", "0003"])
def test_every_earlier_revision_with_data_upgrades_to_head_and_back(engine, start):
    url = engine.catalog_url
    sa_engine = create_engine(url)
    upgrade(sa_engine, start)
    with sa_engine.begin() as conn:
        _seed(conn, start)
    upgrade(sa_engine)
    _finds_everything(url, sa_engine)
    downgrade(sa_engine, start)
    with sa_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT factor_dtype, energy FROM revisions")).one() == ("bf16", 0.2)
        # SQLite rebuilds a changed table; with foreign keys on, that would have cascaded to entries.
        assert conn.execute(sa.text("SELECT key, kind, rank FROM entries")).all() == [("w", "lowrank", 1)]
    upgrade(sa_engine)
    _finds_everything(url, sa_engine)
    sa_engine.dispose()


def test_0004_downgrade_refuses_revisions_the_old_schema_cannot_hold(engine):
    url = engine.catalog_url
    sa_engine = create_engine(url)
    upgrade(sa_engine, "0003")
    with sa_engine.begin() as conn:
        _seed(conn, "0003")
    upgrade(sa_engine)
    with sa_engine.begin() as conn:
        conn.execute(sa.text("UPDATE revisions SET rank_rule = 'budget=1000', energy = NULL"))
    with pytest.raises(Exception, match="cannot hold"):
        downgrade(sa_engine, "0003")
    assert current_revision(sa_engine) == head_revision()
    sa_engine.dispose()

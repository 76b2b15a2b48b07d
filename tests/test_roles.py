"""Read-only serving nodes and the documented roles, on a real PostgreSQL role and a real SeaweedFS identity.

The grants are the SQL block of docs/scaling.md, applied verbatim but for the role and database names.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dsreg import Registry, StoreError
from dsreg.cli.main import cli
from dsreg.demo import make_base
from dsreg.migrate import downgrade
from dsreg.catalog import create_engine
from dsreg.testing import PG_ADMIN_URL, S3_READ_KEY, S3_READ_SECRET

from .conftest import snapshot

DOCS = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
READ_KEY = {"key": S3_READ_KEY, "secret": S3_READ_SECRET}


def _grants() -> str:
    return re.search(r"```sql\n(.*?)```", DOCS.read_text(), re.S)[1]


@pytest.fixture
def roles(remote_engine):
    """The three documented roles on this test's database, named for this test alone (roles are cluster-wide)."""
    suffix = uuid.uuid4().hex[:8]
    database = remote_engine.catalog_url.rsplit("/", 1)[1]
    names = {kind: f"dsreg_{kind}_{suffix}" for kind in ("reader", "writer", "gc")}
    with Registry.open(remote_engine.catalog_url, remote_engine.store_url):
        pass  # the owner (the admin here) migrates
    sql = _grants().replace("DATABASE dsreg ", f'DATABASE "{database}" ')
    for kind, name in names.items():
        sql = sql.replace(f"dsreg_{kind}", name)
    admin = sa.create_engine(remote_engine.catalog_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for statement in filter(str.strip, re.sub(r"--[^\n]*", "", sql).split(";")):
            conn.execute(sa.text(statement))
    host = PG_ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    urls = {kind: f"postgresql+psycopg://{name}@{host}/{database}" for kind, name in names.items()}
    yield urls
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP OWNED BY {", ".join(names.values())}'))
    admin.dispose()
    drop = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with drop.connect() as conn:
        for name in reversed(names.values()):
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {name}"))
    drop.dispose()


@pytest.fixture
def populated(remote_engine, roles, models, tmp_path):
    with Registry.open(remote_engine.catalog_url, remote_engine.store_url, home=tmp_path / "admin") as reg:
        reg.add_base(models.base, "tiny")
        reg.push(models.ft, "corgi", energy=0.5)
        reg.push(models.ft, "corgi", exact=True)
        reg.tag("corgi@2", "prod")
        yield reg


def test_a_reader_serves_every_read_and_writes_nothing(remote_engine, roles, populated, models, tmp_path):
    before = snapshot(populated)
    with Registry.open(roles["reader"], remote_engine.store_url, home=tmp_path / "node", storage_options=READ_KEY) as node:
        assert [s.name for s in node.subjects()] == ["corgi"]
        assert node.show("corgi@1").revision.rank_rule == "energy=0.5"
        out = node.checkout("corgi@prod" if False else "corgi@2", tmp_path / "c.safetensors", verify=True)
        assert out.verified > 0
        assert all(torch.equal(v, models.ft_sd[k]) for k, v in load_file(out.path).items())
        node.export_lora("corgi@1", tmp_path / "c-lora.safetensors")
        assert node.verify(full=True).ok
        state = node.load("corgi@2", device="cpu")
        model = make_base(32, steps=0)
        model.load_state_dict({k: v.clone() for k, v in models.base_sd.items()})
        with node.apply(model, "corgi@2"):
            assert all(torch.equal(p, models.ft_sd[k]) for k, p in model.state_dict().items())
        assert set(state) == set(models.ft_sd)
        assert [e.action for e in node.events("corgi")][:1] == ["tag"]
        assert node.stats().n_revisions == 2
    assert snapshot(populated) == before
    args = ["--catalog", roles["reader"], "--store", remote_engine.store_url, "--home", str(tmp_path / "cli"),
            "--store-option", f"key={S3_READ_KEY}", "--store-option", f"secret={S3_READ_SECRET}"]
    runner = CliRunner()
    for command in (["ls"], ["show", "corgi"], ["log"], ["stats"], ["verify", "--full"], ["checkout", "corgi@1", "-o", str(tmp_path / "d.safetensors")]):
        done = runner.invoke(cli, [*args, *command])
        assert done.exit_code == 0, (command, done.output)
    assert snapshot(populated) == before


def test_a_write_with_read_only_credentials_fails_in_one_line_and_changes_nothing(remote_engine, roles, populated, models, tmp_path):
    before = snapshot(populated)
    runner = CliRunner()
    reader = ["--catalog", roles["reader"], "--store", remote_engine.store_url, "--home", str(tmp_path / "cli")]
    for command, denied in (
        (["push", str(models.ft), "-s", "corgi"], "permission denied for table leases"),
        (["tag", "corgi@1", "dev"], "permission denied for table tags"),
        (["rm", "corgi@1"], "permission denied for table"),
        (["base", "add", str(models.base2), "--name", "other"], "permission denied for table leases"),
    ):
        done = runner.invoke(cli, [*reader, *command])
        assert done.exit_code == 8, (command, done.output)
        assert denied in done.output and "nothing was changed" in done.output and len(done.output.strip().splitlines()) == 1
    # A writable catalog with a key that may only read: the push's upload is refused, its lease dropped.
    with Registry.open(remote_engine.catalog_url, remote_engine.store_url, home=tmp_path / "w", storage_options=READ_KEY) as reg:
        with pytest.raises(StoreError, match=r"s3:PutObject denied"):
            reg.push(models.base2, "other-weights", base="tiny", exact=True)
    assert snapshot(populated) == before


def test_a_reader_meeting_an_old_schema_says_so(remote_engine, roles, populated, tmp_path):
    engine = create_engine(remote_engine.catalog_url)
    downgrade(engine, "0005")
    engine.dispose()
    done = CliRunner().invoke(cli, ["--catalog", roles["reader"], "--store", remote_engine.store_url, "--home", str(tmp_path), "ls"])
    assert done.exit_code == 8
    assert "has schema 0005 and this dsreg needs 0006" in done.output and len(done.output.strip().splitlines()) == 1


def test_the_writer_appends_to_the_audit_log_and_cannot_change_it(remote_engine, roles, populated, models, tmp_path):
    with Registry.open(roles["writer"], remote_engine.store_url, home=tmp_path / "w") as writer:
        writer.push(models.ft, "beagle", energy=0.2)
        writer.tag("beagle@1", "prod")
        writer.rm("corgi@1")
        assert [e.action for e in writer.events(limit=3)] == ["rm", "tag", "push"]
        with pytest.raises(StoreError, match="permission denied for table blobs"):
            writer.gc(grace=0)  # collecting corgi@1's blobs needs the gc role
    as_writer = sa.create_engine(roles["writer"])
    for statement in ("UPDATE events SET actor = 'mallory'", "DELETE FROM events"):
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied for table events"):
            with as_writer.begin() as conn:
                conn.execute(sa.text(statement))
    as_writer.dispose()
    with Registry.open(roles["gc"], remote_engine.store_url, home=tmp_path / "gc") as gc:
        assert gc.gc(grace=0).removed_objects > 0
        assert gc.verify(full=True).ok
        assert gc.events(limit=1)[0].action == "gc"

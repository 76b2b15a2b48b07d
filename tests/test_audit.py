"""The audit log: every change appends an event in its own transaction, read back by `dsreg log`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from dsreg import CheckpointError, Registry
from dsreg.cli.main import cli

from .conftest import snapshot


def test_every_change_is_logged_with_its_actor(engine, open_registry, models, tmp_path, monkeypatch):
    monkeypatch.setenv("DSREG_ACTOR", "alice")
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
        reg.add_base(models.base2, "other")
        a = reg.push(models.ft, "corgi", energy=0.2)
        b = reg.push(models.ft, "corgi", energy=0.5)
        reg.tag(a.ref, "prod")
        reg.tag(b.ref, "prod")  # moved
        reg.tag(b.ref, "prod")  # already there: no change, no event
        reg.untag("corgi", "prod")
        reg.set_policy("keep1", "corgi", keep_last=1)
        report = reg.gc(grace=0)
        assert report.expired == ("corgi@1",)
        reg.remove_policy("keep1")
        reg.rm("corgi@2")
        reg.remove_base("other")
    monkeypatch.setenv("DSREG_ACTOR", "bob")
    with open_registry() as reg:
        reg.gc(grace=0)  # collects corgi@2's blobs and the other base's
        reg.gc(grace=0)  # nothing left to change: no event
        events = list(reversed(reg.events()))
        got = [(e.actor, e.action, e.ref or e.base) for e in events]
        assert got == [
            ("alice", "base.add", "tiny"), ("alice", "base.add", "other"),
            ("alice", "push", "corgi@1"), ("alice", "push", "corgi@2"),
            ("alice", "tag", "corgi@1"), ("alice", "tag", "corgi@2"), ("alice", "untag", "corgi@2"),
            ("alice", "policy.set", None), ("alice", "expire", "corgi@1"), ("alice", "gc", None), ("alice", "policy.rm", None),
            ("alice", "rm", "corgi@2"), ("alice", "base.rm", "other"), ("bob", "gc", None),
        ]
        by_action = {e.action: e for e in events}
        assert by_action["push"].details["rank_rule"] == "energy=0.5" and by_action["push"].base == "tiny"
        assert events[5].details == {"tag": "prod", "moved_from": 1}
        assert by_action["expire"].details == {"by": "gc", "policies": ["keep1"]}
        assert by_action["gc"].details["removed_objects"] > 0
        assert [e.ref for e in reg.events("corgi", action="push")] == ["corgi@2", "corgi@1"]
        assert len(reg.events(limit=3)) == 3
        assert reg.events(since=datetime.now(timezone.utc) + timedelta(hours=1)) == []


def test_a_change_that_fails_leaves_no_event(reg_base, tmp_path):
    before = snapshot(reg_base)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        reg_base.push(bad, "x")
    assert snapshot(reg_base) == before


def test_cli_log(engine, models, tmp_path, monkeypatch):
    monkeypatch.setenv("DSREG_ACTOR", "ci")
    args = [*engine.cli_args(), "--home", str(tmp_path / "registry")]
    runner = CliRunner()
    assert runner.invoke(cli, [*args, "base", "add", str(models.base), "--name", "tiny"]).exit_code == 0
    assert runner.invoke(cli, [*args, "push", str(models.ft), "-s", "corgi"]).exit_code == 0
    assert runner.invoke(cli, [*args, "tag", "corgi@1", "prod"]).exit_code == 0
    done = runner.invoke(cli, [*args, "untag", "corgi", "prod"])
    assert done.exit_code == 0 and done.output == "corgi@1 untagged prod\n"
    out = runner.invoke(cli, [*args, "log", "corgi"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["time", "actor", "action", "what", "details"]
    assert [line.split()[3:5] for line in lines[1:]] == [["untag", "corgi@1"], ["tag", "corgi@1"], ["push", "corgi@1"]]
    assert all(line.split()[2] == "ci" for line in lines[1:])
    as_json = json.loads(runner.invoke(cli, [*args, "log", "--limit", "1", "--json"]).output)
    assert [(e["action"], e["subject"], e["revision"], e["actor"]) for e in as_json] == [("untag", "corgi", 1, "ci")]
    assert runner.invoke(cli, [*args, "log", "--since", "2999-01-01"]).output.splitlines() == ["time  actor  action  what  details"]
    missing = runner.invoke(cli, [*args, "untag", "corgi", "prod"])
    assert missing.exit_code == 3 and "has no tag 'prod'" in missing.output


def test_the_actor_defaults_to_user_at_host(reg_base, models, monkeypatch):
    import getpass
    import socket

    assert Registry is not None
    reg_base.push(models.ft, "s")
    (event,) = reg_base.events("s")
    assert event.actor in (f"{getpass.getuser()}@{socket.gethostname()}", "alice")

"""Removal, retention, gc and verify — on both engine pairs, and safe while pushes run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from dsreg.cli.main import cli
from dsreg import Conflict, Registry, RevisionNotFound, SubjectNotFound
from dsreg.gc import single_gc

from .conftest import snapshot, worker_pool


def _orphans(reg: Registry) -> list[str]:
    return list(reg.verify().orphans)


@pytest.fixture
def two_revisions(reg_base, models):
    a = reg_base.push(models.ft, "s", energy=0.2)
    b = reg_base.push(models.ft, "s", energy=0.8)
    return reg_base, a, b


def test_rm_then_gc_frees_only_what_nothing_references(two_revisions, tmp_path):
    reg, a, b = two_revisions
    only_a = {t.blob for t in reg.show(a.ref).tensors if t.blob} - {t.blob for t in reg.show(b.ref).tensors if t.blob}
    assert only_a
    assert [r.ref for r in reg.rm(a.ref)] == ["s@1"]
    assert set(_orphans(reg)) == only_a
    report = reg.gc(grace=0)
    assert report.removed_objects == len(only_a) and report.removed_bytes > 0
    assert _orphans(reg) == []
    assert reg.verify(full=True).ok
    reg.checkout("s@2", tmp_path / "b.safetensors")
    assert reg.revision("s").number == 2


def test_dry_run_and_grace_remove_nothing(two_revisions):
    reg, a, _ = two_revisions
    reg.rm(a.ref)
    before = snapshot(reg)
    dry = reg.gc(grace=0, dry_run=True)
    assert dry.dry_run and dry.removed_objects > 0
    young = reg.gc(grace=3600)
    assert young.removed_objects == 0 and young.young_objects > 0
    assert snapshot(reg) == before


def test_partial_local_uploads_are_collected_after_the_grace(reg_base):
    if not reg_base.store.local:
        pytest.skip("object stores never show a partial upload")
    partial = os.path.join(reg_base.store.root, "tmp", "0" * 64 + ".deadbeef")
    with open(partial, "wb") as fh:
        fh.write(b"half a blob")
    assert reg_base.gc(grace=0).removed_objects == 0  # it may still be being written
    an_hour_ago = time.time() - 3600
    os.utime(partial, (an_hour_ago, an_hour_ago))
    assert reg_base.gc(grace=7200).removed_objects == 0 and os.path.exists(partial)
    report = reg_base.gc(grace=0)
    assert report.removed_objects == 1 and report.removed_bytes == len(b"half a blob")
    assert not os.path.exists(partial)


def test_revision_numbers_are_never_reused(two_revisions, models):
    reg, _, b = two_revisions
    reg.rm(b.ref)
    assert reg.revision("s").number == 1
    assert reg.push(models.ft, "s").number == 3


def test_removing_a_whole_subject(two_revisions, models):
    reg, _, _ = two_revisions
    assert [r.ref for r in reg.rm("s")] == ["s@1", "s@2"]
    assert reg.subjects() == [] and reg.stats().n_subjects == 0
    reg.gc(grace=0)
    assert reg.stats().stored_bytes == 0
    with pytest.raises(RevisionNotFound, match="all 2 were removed"):
        reg.revision("s")
    with pytest.raises(RevisionNotFound, match="has no revisions"):
        reg.rm("s")
    assert reg.push(models.ft, "s").number == 3  # s@1 and s@2 keep meaning the removed weights


def test_a_subject_keeps_its_numbers_when_its_last_revision_goes(reg_base, models, tmp_path):
    reg = reg_base
    assert [reg.push(models.ft, "mlp1", energy=tau).number for tau in (0.2, 0.3, 0.4, 0.5)] == [1, 2, 3, 4]
    reg.rm("mlp1@2")
    reg.rm("mlp1@4")
    assert reg.revision("mlp1").number == 3
    reg.rm("mlp1@3")
    reg.rm("mlp1@1")  # the last one: the subject has none now, but keeps its counter
    assert reg.revisions("mlp1") == []
    reg.gc(grace=0)
    with pytest.raises(RevisionNotFound, match="removed"):
        reg.checkout("mlp1@4", tmp_path / "x.safetensors")
    rev = reg.push(models.base, "mlp1", exact=True)
    assert rev.number == 5 and [r.number for r in reg.revisions("mlp1")] == [5]
    with pytest.raises(RevisionNotFound, match="no revision 4 any more"):
        reg.checkout("mlp1@4", tmp_path / "x.safetensors")
    assert [s.name for s in reg.subjects()] == ["mlp1"]


def test_auto_names_never_come_back(reg_base, models):
    reg = reg_base
    first = reg.push(models.ft)
    assert first.ref == "subject-1@1"
    reg.rm("subject-1")
    reg.gc(grace=0)
    assert reg.push(models.ft).ref == "subject-2@1"


def _push_one(args) -> int:
    catalog, store, home, path = args
    with Registry.open(catalog, store, home=home) as r:
        return r.push(path, "race", base="tiny", exact=True, device="cpu").number


def test_pushes_racing_rm_never_hand_out_a_number_twice(engine, open_registry, models, tmp_path):
    """Pushes to one subject in other processes while this one removes every revision it sees."""
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
        jobs = [(engine.catalog_url, engine.store_url, str(tmp_path / "registry"), str(models.ft))] * 6
        removed: set[int] = set()
        with worker_pool(3) as pool:
            pending = pool.map_async(_push_one, jobs)
            while not pending.ready():
                try:
                    removed.update(r.number for r in reg.rm("race"))
                except (SubjectNotFound, RevisionNotFound):
                    pass
                time.sleep(0.05)
            numbers = pending.get()
        left = reg.revisions("race")
        assert sorted(numbers) == [1, 2, 3, 4, 5, 6] and removed | {r.number for r in left} == set(numbers)
        if left:
            reg.rm("race")
        reg.gc(grace=0)
        assert reg.push(models.ft, "race", exact=True).number == 7
        assert reg.verify(full=True).ok


def test_retention_keep_last_and_tags(reg_base, models):
    for tau in (0.2, 0.3, 0.4, 0.5):
        reg_base.push(models.ft, "kept", energy=tau)
    reg_base.push(models.ft, "other", energy=0.2)
    reg_base.tag("kept@1", "golden")
    reg_base.set_policy("last-two", "kep*", keep_last=2)
    report = reg_base.gc(grace=0)
    assert report.expired == ("kept@2",)
    assert [r.number for r in reg_base.revisions("kept")] == [1, 3, 4]
    assert [r.number for r in reg_base.revisions("other")] == [1]
    assert reg_base.verify(full=True).ok and _orphans(reg_base) == []


def test_retention_max_age(reg_base, models):
    reg_base.push(models.ft, "old", energy=0.2)
    reg_base.push(models.ft, "old", energy=0.3)
    reg_base.tag("old@2", "keep")
    reg_base.set_policy("expire-all", "*", max_age=0)
    assert [p.name for p in reg_base.policies()] == ["expire-all"]
    report = reg_base.gc(grace=0)
    assert report.expired == ("old@1",)
    assert [r.number for r in reg_base.revisions("old")] == [2]
    reg_base.remove_policy("expire-all")
    assert reg_base.policies() == []


def test_a_used_base_cannot_be_removed(reg_base, models):
    reg_base.push(models.ft, "s")
    with pytest.raises(Conflict, match="used by 1 revisions"):
        reg_base.remove_base("tiny")
    reg_base.rm("s")
    reg_base.remove_base("tiny")
    reg_base.gc(grace=0)
    assert list(reg_base.store.list()) == []


def test_only_one_gc_at_a_time(reg_base):
    with single_gc(reg_base.catalog):
        with pytest.raises(Conflict, match="another gc"):
            reg_base.gc(grace=0)
    reg_base.gc(grace=0)


def test_verify_reports_missing_and_corrupt_objects(engine, reg_base, models, tmp_path):
    reg_base.push(models.ft, "s")
    args = ["--home", str(tmp_path / "registry"), *engine.cli_args(), "-q", "verify"]
    ok = CliRunner().invoke(cli, args + ["--full"])
    assert ok.exit_code == 0 and ok.stdout.startswith("ok:"), ok.output
    blobs = [t.blob for t in reg_base.show("s").tensors if t.kind == "lowrank"]
    reg_base.store.delete(blobs[0])
    path = reg_base.store.path(blobs[1])
    reg_base.store.fs.pipe_file(path, reg_base.store.fs.cat_file(path)[:-1] + b"!")
    listed = CliRunner().invoke(cli, args)
    assert listed.exit_code == 7 and f"missing  {blobs[0]}  breaks s@1" in listed.stdout
    hashed = CliRunner().invoke(cli, args + ["--full"])
    assert hashed.exit_code == 7 and f"corrupt  {blobs[1]}" in hashed.stdout


def test_cli_rm_policy_gc(engine, models, tmp_path):
    base = ["--home", str(tmp_path / "h"), *engine.cli_args(), "-q"]

    def run(*args):
        result = CliRunner().invoke(cli, base + list(map(str, args)))
        assert result.exit_code == 0, result.output
        return result.stdout

    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "a", "-e", "0.2")
    run("push", models.ft, "-s", "a", "-e", "0.9")
    assert run("rm", "a@1").startswith("removed a@1")
    assert "would remove" in run("gc", "--dry-run", "--grace", "0")
    assert run("gc", "--grace", "0").startswith("removed ")
    assert "keep last 1" in run("policy", "set", "one", "--keep-last", "1")
    assert "one" in run("policy", "ls")
    run("policy", "rm", "one")
    assert run("verify", "--full").startswith("ok:")
    assert run("rm", "a@2").splitlines()[1] == "a has no revisions now; its numbers are never given out again (a push continues after them)"
    assert "a rev 3" in run("push", models.ft, "-s", "a")


# ---------------------------------------------------------------- crashes and concurrency

_BLOCKED_PUSH = textwrap.dedent(
    """
    import socket, sys, time
    from dsreg import catalog

    if sys.argv[6] == "another host":  # as if the push ran on another machine: its pid means nothing here
        socket.gethostname = lambda: "another-host"

    def never_commits(self, new, lease_id=None):
        open(sys.argv[4], "w").write("uploaded")
        time.sleep(3600)

    catalog.Catalog.commit_revision = never_commits
    from dsreg import Registry
    with Registry.open(sys.argv[1], sys.argv[2], home=sys.argv[3]) as r:
        r.push(sys.argv[5], "killed", base="tiny", device="cpu")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["this host", "another host"])
def test_a_push_killed_between_upload_and_commit(engine, open_registry, models, tmp_path, where):
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
        before = {b.digest for b in reg.store.list()}
    ready = tmp_path / "ready"
    env = {**os.environ, "DSREG_LEASE_TTL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_PUSH, engine.catalog_url, engine.store_url, str(tmp_path / "registry"), str(ready), str(models.ft), where],
        env=env,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the push never reached its commit"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_registry() as reg:
        uploaded = {b.digest for b in reg.store.list()} - before
        assert uploaded and reg.subjects() == []
        if where == "another host":
            # The lease is still live: even a grace of 0 must not take the blobs.
            assert reg.gc(grace=0).removed_objects == 0
            time.sleep(3.5)  # the lease expires without its heartbeat
        # On this host the writer's pid is gone, so its lease ends at once. Orphans now, but younger
        # than the grace period: kept.
        assert reg.gc(grace=3600).removed_objects == 0
        assert uploaded <= {b.digest for b in reg.store.list()}
        report = reg.gc(grace=0)
        assert report.removed_objects == len(uploaded)
        assert {b.digest for b in reg.store.list()} == before
        assert reg.verify(full=True).ok
        assert reg.push(models.ft, "killed", base="tiny").number == 1  # the push, repeated, succeeds


def _digest_of(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _pusher(args) -> list[tuple[str, str]]:
    catalog, store, home, workdir, source, subject, seconds = args
    kept: list[tuple[str, str]] = []
    deadline = time.monotonic() + seconds
    energies = [0.2, 0.5]
    with Registry.open(catalog, store, home=home) as r:
        i = 0
        while time.monotonic() < deadline or i < 2:
            rev = r.push(source, subject, base="tiny", energy=energies[i % 2], device="cpu")
            out = r.checkout(rev.ref, f"{workdir}/{subject}-{rev.number}.safetensors", device="cpu").path
            kept.append((rev.ref, _digest_of(out)))
            if i % 2 == 1:
                # Remove the previous revision: its blobs turn to garbage, and the next push
                # produces exactly those blobs again while gc is trying to collect them.
                r.rm(kept[-2][0])
                kept.pop(-2)
            i += 1
    return kept


def _collector(args) -> tuple[int, int]:
    catalog, store, home, seconds = args
    runs = removed = 0
    deadline = time.monotonic() + seconds
    with Registry.open(catalog, store, home=home) as r:
        while time.monotonic() < deadline:
            try:
                removed += r.gc(grace=0).removed_objects
                runs += 1
            except Conflict:
                pass
            time.sleep(0.05)
    return runs, removed


@pytest.mark.slow
def test_gc_while_pushing_loses_nothing(engine, open_registry, models, tmp_path):
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
    home, seconds = str(tmp_path / "registry"), 12
    work = tmp_path / "out"
    work.mkdir()
    sources = [models.ft, models.ft_fp16, models.ft]
    jobs = [(engine.catalog_url, engine.store_url, home, str(work), str(src), f"p{i}", seconds) for i, src in enumerate(sources)]
    with worker_pool(len(jobs) + 1) as pool:
        gc_job = pool.apply_async(_collector, [(engine.catalog_url, engine.store_url, home, seconds + 2)])
        kept = [ref for part in pool.map(_pusher, jobs) for ref in part]
        runs, removed = gc_job.get()
    assert runs > 0 and removed > 0  # gc really ran, and really collected, during the pushes
    with open_registry() as reg:
        for ref, digest in kept:
            out = reg.checkout(ref, tmp_path / "again.safetensors", device="cpu").path
            assert _digest_of(out) == digest, ref
        assert reg.verify(full=True).ok
        reg.gc(grace=0)
        assert _orphans(reg) == []


_BLOCKED_AFTER_CLAIMS = textwrap.dedent(
    """
    import sys, time
    from dsreg import push

    def stalls(*args, **kwargs):
        open(sys.argv[4], "w").write("claimed")
        time.sleep(3600)

    push._compress = stalls
    from dsreg import Registry
    with Registry.open(sys.argv[1], sys.argv[2], home=sys.argv[3]) as r:
        r.push(sys.argv[5], "busy", base="tiny", device="cpu")
    """
)


@pytest.mark.slow
def test_a_base_in_use_by_a_push_cannot_be_removed(engine, open_registry, models, tmp_path):
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_AFTER_CLAIMS, engine.catalog_url, engine.store_url, str(tmp_path / "registry"), str(ready), str(models.ft)],
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the push never started"
            time.sleep(0.1)
        with open_registry() as reg:
            with pytest.raises(Conflict, match="in use by a write in progress .push busy on"):
                reg.remove_base("tiny")
            assert reg.gc(grace=0).removed_objects == 0  # and gc keeps what the push reads
    finally:
        proc.kill()
        proc.wait()
    with open_registry() as reg:  # the writer is gone: its lease ends with the next gc, and the base can go
        reg.gc(grace=0)
        reg.remove_base("tiny")
        assert reg.gc(grace=0).removed_objects > 0
        assert reg.verify(full=True).ok


_STALLED_CHECKOUT = textwrap.dedent(
    """
    import sys, time
    from dsreg import checkout

    def stalls(tmp, *args, **kwargs):
        open(tmp, "wb").write(b"half a checkpoint")
        open(sys.argv[4], "w").write("writing")
        time.sleep(3600)

    checkout.fill_safetensors = stalls
    from dsreg import Registry
    with Registry.open(sys.argv[1], sys.argv[2], home=sys.argv[3]) as r:
        r.checkout("dog", sys.argv[5], device="cpu")
    """
)


def test_gc_removes_what_a_killed_checkout_left_half_written(engine, open_registry, models, tmp_path):
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
        reg.push(models.ft, "dog")
    ready, out = tmp_path / "ready", tmp_path / "outputs" / "dog.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALLED_CHECKOUT, engine.catalog_url, engine.store_url, str(tmp_path / "registry"), str(ready), str(out)],
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the checkout never started writing"
        time.sleep(0.1)
    with open_registry() as reg:
        (left,) = out.parent.glob(".dog.safetensors.dsreg-*")
        assert reg.gc(grace=3600).removed_temporaries == ()  # its writer is alive: not touched
        assert left.exists()
        proc.kill()
        proc.wait()
        assert reg.gc(grace=3600, dry_run=True).removed_temporaries == ()
        assert reg.gc(grace=3600).removed_temporaries == (str(left),)
        assert list(out.parent.iterdir()) == [] and list((tmp_path / "registry" / "writing").iterdir()) == []

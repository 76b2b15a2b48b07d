"""kill -9 at random points of push, checkout, rm and gc, on both engine pairs: nothing is lost.

Each trial SIGKILLs a forked child after a seeded random delay drawn over the operation's own
duration, so kills land before, during and after uploads, commits and renames. After every trial:
``verify --full`` finds no missing or corrupt object; an interrupted push, repeated, succeeds; a
checkout's output is absent or complete and correct. At the end gc reclaims every orphan.
``DSREG_CRASH_TRIALS`` sets the trials per operation (default 10 on the embedded default and 5 on
Postgres + S3, where each trial costs twice as much and the test machine's speed varies by up to
1.7x from day to day: the defaults keep the whole suite under 15 minutes on its slow days, and the
long mode below runs 50);
``DSREG_CRASH_SEED`` the seed. ``DSREG_CRASH_GC_RACE=1`` runs ``dsreg gc --grace 0 --every 0.2s``
beside the trials, so that kills land while another process collects (the long mode of
docs/robustness.md: ``DSREG_CRASH_TRIALS=50 DSREG_CRASH_GC_RACE=1 python -m pytest tests/test_crash.py``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import save_file

from dsreg import Registry
from dsreg.demo import finetune, make_base, state_dict

ROOT = Path(__file__).resolve().parent.parent
LEASE_TTL = 2.0
OPS = ("push", "checkout", "rm", "gc")


class Worker:
    def __init__(self, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crashworker"], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def run(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the crash worker died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _gc_racer(conn: dict) -> subprocess.Popen | None:
    """Another process collecting all the while, if the long mode asks for one."""
    if os.environ.get("DSREG_CRASH_GC_RACE") != "1":
        return None
    return subprocess.Popen(
        [sys.executable, "-c", "from dsreg.cli.main import main; main()", "-q", "--catalog", conn["catalog"], "--store", conn["store"],
         "--home", conn["home"], "gc", "--grace", "0", "--every", "0.2s"],
        env={**os.environ, "DSREG_LEASE_TTL": str(LEASE_TTL), "DSREG_ACTOR": "gc-racer"}, stdout=subprocess.DEVNULL,
    )


def _trials(engine) -> int:
    return int(os.environ.get("DSREG_CRASH_TRIALS", "10" if engine.name == "local" else "5"))


@pytest.mark.slow
def test_kill_minus_nine_loses_nothing(engine, tmp_path, report_line):
    base = make_base(16, steps=5)
    save_file(state_dict(base), tmp_path / "base.safetensors")
    save_file(state_dict(finetune(base, steps=5)), tmp_path / "ft.safetensors")
    home = tmp_path / "registry"
    conn = {"catalog": engine.catalog_url, "store": engine.store_url, "home": str(home)}
    reg = Registry.open(engine.catalog_url, engine.store_url, home=home)
    reg.add_base(tmp_path / "base.safetensors", "tiny")
    reg.push(tmp_path / "ft.safetensors", "ref", device="cpu")
    reference = reg.checkout("ref", tmp_path / "reference.safetensors", device="cpu").path.read_bytes()

    rng = random.Random(int(os.environ.get("DSREG_CRASH_SEED", "20261124")))
    worker = Worker({**os.environ, "DSREG_LEASE_TTL": str(LEASE_TTL)})
    n = _trials(engine)
    tally: dict[str, Counter] = {op: Counter() for op in OPS}
    push = {**conn, "op": "push", "path": str(tmp_path / "ft.safetensors"), "subject": "p"}
    racer = _gc_racer(conn)
    try:
        for op in OPS:
            # How long the operation takes when nothing kills it: kills are drawn over that span.
            span = max(0.05, _setup_and_run(worker, reg, op, conn, push, tmp_path, -1, 60.0)["elapsed"])
            for i in range(n):
                result = _setup_and_run(worker, reg, op, conn, push, tmp_path, i, rng.uniform(0, 1.2 * span))
                tally[op][result["outcome"]] += 1
                _check(reg, op, i, result, tmp_path, reference, push)
    finally:
        worker.close()
        if racer is not None:
            racer.kill()
            racer.wait(timeout=30)
    raced = len(reg.events(action="gc", limit=100000)) if racer is not None else 0

    # The killed writers' leases lapse; then one gc takes every orphan, and everything still checks out.
    time.sleep(LEASE_TTL + 0.5)
    reg.gc(grace=0)
    report = reg.verify(full=True)
    assert report.ok and not report.orphans, report
    for info in reg.subjects():
        for rev in reg.revisions(info.name):
            reg.checkout(rev.ref, tmp_path / "final.safetensors", device="cpu")
    assert reg.checkout("ref", tmp_path / "final.safetensors", device="cpu").path.read_bytes() == reference
    assert reg.checkout("ref", tmp_path / "out.safetensors", device="cpu").path.read_bytes() == reference
    assert not list(tmp_path.glob(".out.safetensors.dsreg-*"))  # the killed checkouts' temporaries are gone
    reg.close()
    report_line(
        f"crash injection on {engine.name}: " + "; ".join(f"{op} {dict(tally[op])}" for op in OPS)
        + (f"; {raced} gc rounds of a racing process changed something" if racer is not None else "")
    )
    for op in OPS:
        assert sum(tally[op].values()) == n and tally[op]["failed"] == 0, (op, tally[op])
        assert tally[op]["killed"] > 0


def _setup_and_run(worker, reg, op, conn, push, tmp_path, i, delay) -> dict:
    if op == "push":
        return worker.run(**push, delay=delay)
    if op == "checkout":
        # One output name for every trial: a later checkout clears what killed ones left behind.
        (tmp_path / "out.safetensors").unlink(missing_ok=True)
        return worker.run(**conn, op=op, ref="ref", output=str(tmp_path / "out.safetensors"), delay=delay)
    if op == "rm":
        rev = reg.push(tmp_path / "ft.safetensors", "r", energy=0.5, device="cpu")
        return worker.run(**conn, op=op, ref=rev.ref, delay=delay)
    # gc: a revision with blobs of its own, removed, leaves garbage for the killed gc to collect.
    rev = reg.push(tmp_path / "ft.safetensors", "g", energy=0.3 + 0.004 * (i % 100), device="cpu")
    reg.rm(rev.ref)
    return worker.run(**conn, op=op, delay=delay)


def _check(reg, op, i, result, tmp_path, reference, push) -> None:
    report = reg.verify(full=True)
    assert not report.missing and not report.corrupt, (op, i, result, report)
    if op == "push":
        # The push, repeated, succeeds (its blobs may be half uploaded or still leased).
        reg.push(push["path"], "p", device="cpu")
    elif op == "checkout":
        out = tmp_path / "out.safetensors"
        assert not out.exists() or out.read_bytes() == reference, (i, result)
    elif op == "rm":
        revs = reg.revisions("r")
        if revs:  # not removed before the kill: removing it again works
            reg.rm(f"r@{revs[-1].number}")

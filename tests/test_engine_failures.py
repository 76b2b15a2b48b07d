"""The engines fail under a running operation: Postgres restarted in the middle of a push, the S3
server killed during uploads and started again. The operation fails cleanly or rides it out, and
nothing is lost: the catalog holds the whole revision or none of it, every reference resolves, and
the push repeated succeeds."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from dsreg import Registry, StoreError

from dsreg.testing import S3_BUCKET, S3_KEY, S3_SECRET, SeaweedFS, create_database, drop_database


def _same(a, b) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _outcome(reg: Registry, push) -> str:
    try:
        push()
        return "finished"
    except StoreError as exc:
        assert "\n" not in str(exc)  # one line a user can read
        return "failed cleanly"


def _after(reg: Registry, models, tmp_path, outcome: str) -> None:
    """Whatever happened, the registry is whole and the push can be repeated."""
    report = reg.verify(full=True)
    assert report.ok, report
    names = [s.name for s in reg.subjects()]
    assert names == (["dog"] if outcome == "finished" else [])
    rev = reg.push(models.ft, "dog", device="cpu")
    reg.checkout(rev.ref, tmp_path / "dog.safetensors", device="cpu")
    reg.push(models.ft, "reference", device="cpu")
    reg.checkout("reference", tmp_path / "reference.safetensors", device="cpu")
    assert _same(tmp_path / "dog.safetensors", tmp_path / "reference.safetensors")


@pytest.mark.slow
def test_postgres_restarted_in_the_middle_of_a_push(own_postgres, s3_server, models, tmp_path, report_line):
    store = f"s3://{S3_BUCKET}/pg-restart-{os.getpid()}-{time.time_ns()}"
    with Registry.open(own_postgres.url, store, home=tmp_path / "registry") as reg:
        reg.add_base(models.base, "tiny")
        restarted = []

        def progress(stage, done, total):
            if stage == "compress" and not restarted:
                restarted.append(time.monotonic())
                own_postgres.restart()  # every catalog connection of the push dies here

        outcome = _outcome(reg, lambda: reg.push(models.ft, "dog", device="cpu", progress=progress))
        assert restarted
    with Registry.open(own_postgres.url, store, home=tmp_path / "registry") as reg:
        _after(reg, models, tmp_path, outcome)
        report_line(f"postgres restart during push: {outcome}")


@pytest.mark.slow
def test_s3_killed_during_uploads_and_restarted(postgres, models, tmp_path, report_line):
    server = SeaweedFS(tmp_path / "weed")
    server.start()
    url = create_database()
    options = {"endpoint_url": server.endpoint, "key": S3_KEY, "secret": S3_SECRET}
    store = f"s3://{S3_BUCKET}/killed"
    try:
        with Registry.open(url, store, home=tmp_path / "registry", storage_options=options) as reg:
            reg.add_base(models.base, "tiny")
            failures: list[BaseException] = []

            def start_again() -> None:
                try:
                    server.start()
                except BaseException as exc:  # reported below: a Timer thread would swallow it
                    failures.append(exc)

            restart = threading.Timer(1.0, start_again)
            killed = []

            def progress(stage, done, total):
                if stage == "compress" and done == 3 and not killed:
                    killed.append(True)
                    server.stop()  # SIGKILL, with uploads in flight
                    restart.start()  # back on the same ports a second later

            outcome = _outcome(reg, lambda: reg.push(models.ft, "dog", device="cpu", progress=progress))
            restart.join()
            assert killed and not failures, failures
        with Registry.open(url, store, home=tmp_path / "registry", storage_options=options) as reg:
            _after(reg, models, tmp_path, outcome)
            report_line(f"S3 killed during push: {outcome}")
    finally:
        server.stop()
        drop_database(url)

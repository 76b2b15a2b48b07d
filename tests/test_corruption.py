"""Damaged objects: a flipped byte, a truncation or a deletion of each kind of stored object.

Checkout fails with an integrity error that names the object and writes nothing, or, for the local
cache of a remote store, fetches the object again; ``verify --full`` reports the damage; wrong
weights are never returned.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file

from dsreg import IntegrityError, Registry
from dsreg.names import Ref

FAULTS = ("flip", "truncate", "delete")


def _damage(fs, path: str, fault: str) -> None:
    if fault == "delete":
        fs.rm_file(path)
        return
    data = bytearray(fs.cat_file(path))
    if fault == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    fs.pipe_file(path, bytes(data))


def _objects(reg: Registry) -> dict[str, str]:
    """A factor blob of the subject, and the blob of the base tensor that factor is added to."""
    entry = next(e for e in reg.catalog.entries(Ref("dog", 1)) if e.kind == "lowrank")
    base = next(t for t in reg.catalog.base_tensors("tiny") if t.key == entry.key)
    return {"factor": entry.blob, "base": base.blob}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", ["factor", "base"])
def test_a_damaged_object_is_named_and_never_returned(engine, open_registry, models, tmp_path, kind, fault):
    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
        reg.push(models.ft, "dog")
        digest = _objects(reg)[kind]
        _damage(reg.store.fs, reg.store.path(digest), fault)
    shutil.rmtree(tmp_path / "registry" / "cache", ignore_errors=True)  # a remote store's good cached copy would hide it
    with open_registry() as reg:
        out = tmp_path / "out.safetensors"
        with pytest.raises(IntegrityError, match=digest[:12]) as err:
            reg.checkout("dog", out)
        assert ("missing" if fault == "delete" else "corrupt") in str(err.value)
        assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))
        report = reg.verify(full=True)
        found = report.missing if fault == "delete" else report.corrupt
        assert not report.ok and [d for d, _ in found] == [digest]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_cached_copy_is_fetched_again(remote_engine, models, tmp_path, fault):
    def open_registry() -> Registry:
        return Registry.open(remote_engine.catalog_url, remote_engine.store_url, home=tmp_path / "registry")

    with open_registry() as reg:
        reg.add_base(models.base, "tiny")
        reg.push(models.ft, "dog")
        good = load_file(reg.checkout("dog", tmp_path / "good.safetensors").path)
        digest = _objects(reg)["base"]
        cached = reg.base_blobs._path(digest)
        assert cached.exists()
        _damage(LocalFileSystem(), str(cached), fault)
    with open_registry() as reg:
        got = load_file(reg.checkout("dog", tmp_path / "again.safetensors").path)
        assert got.keys() == good.keys() and all(torch.equal(got[k], good[k]) for k in got)
        assert reg.verify(full=True).ok  # the store itself was never damaged
        assert reg.base_blobs._path(digest).read_bytes() == reg.store.get(digest)  # and the cache is whole again


def _damaged_registry(reg: Registry, models, fault: str) -> dict[str, str]:
    """dog@1 at tau 0.5 and dog@2 exact; one base blob, one exact blob and one factor damaged."""
    reg.add_base(models.base, "tiny")
    reg.push(models.ft, "dog", energy=0.5)
    reg.push(models.ft, "dog", exact=True)
    exact = next(e for e in reg.catalog.entries(Ref("dog", 2)) if e.kind == "exact")
    factor = next(e for e in reg.catalog.entries(Ref("dog", 1)) if e.kind == "lowrank" and e.key != exact.key)
    base = next(t for t in reg.catalog.base_tensors("tiny") if t.key not in (exact.key, factor.key))
    damaged = {"base": base.blob, "exact": exact.blob, "factor": factor.blob}
    for digest in damaged.values():
        _damage(reg.store.fs, reg.store.path(digest), fault)
    return damaged


@pytest.mark.parametrize("fault", FAULTS)
def test_verify_names_what_a_bad_blob_breaks_and_repair_heals_it(engine, open_registry, models, tmp_path, fault):
    import threading

    with open_registry() as reg:
        damaged = _damaged_registry(reg, models, fault)
        report = reg.verify(full=True)
        problems = dict(report.missing) | dict(report.corrupt)
        assert problems.keys() == set(damaged.values())
        assert "breaks base tiny, dog@1, dog@2" in problems[damaged["base"]]
        assert problems[damaged["exact"]].endswith("breaks dog@2") and problems[damaged["factor"]].endswith("breaks dog@1")
        # gc races the repair: it may only take what nothing references.
        stop = threading.Event()
        rounds, errors = [], []

        def collect():
            try:
                with open_registry() as other:
                    while True:  # at least one round, however fast the repair
                        rounds.append(other.gc(grace=0))
                        if stop.is_set():
                            return
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        racer = threading.Thread(target=collect)
        racer.start()
        try:
            fixed = reg.repair([models.base, models.ft])
        finally:
            stop.set()
            racer.join()
        assert rounds and not errors, errors
        repaired = dict(fixed.fixed)
        assert {damaged["base"], damaged["exact"]} <= repaired.keys()
        assert "base tiny tensor" in repaired[damaged["base"]] and "dog@2 tensor" in repaired[damaged["exact"]]
        if damaged["factor"] not in repaired:  # a lossy factor comes back only where the machine computes it the same
            (lost,) = fixed.lost
            assert lost[0] == damaged["factor"] and "breaks dog@1" in lost[1]
        exact = reg.checkout("dog@2", tmp_path / "dog2.safetensors", verify=True)
        assert all(torch.equal(v, models.ft_sd[k]) for k, v in load_file(exact.path).items())
        after = reg.verify(full=True)
        assert {d for d, _ in after.missing + after.corrupt} <= {damaged["factor"]} - repaired.keys()
        assert [e.action for e in reg.events(action="repair")] == ["repair"]


def test_adding_a_base_again_and_pushing_an_exact_source_again_heal_their_blobs(engine, open_registry, models, tmp_path):
    with open_registry() as reg:
        damaged = _damaged_registry(reg, models, "flip")
        info, new = reg.add_base(models.base, "tiny")
        assert not new and reg.store.intact(damaged["base"])
        assert reg.push(models.ft, "dog", exact=True).number == 3
        assert reg.store.intact(damaged["exact"])  # dog@2's blob too: the same bytes
        assert reg.events(limit=2)[1].action == "base.repair"


def test_cli_verify_repair(engine, open_registry, models, tmp_path):
    from click.testing import CliRunner

    from dsreg.cli.main import cli

    with open_registry() as reg:
        damaged = _damaged_registry(reg, models, "delete")
    args = [*engine.cli_args(), "--home", str(tmp_path / "registry")]
    done = CliRunner().invoke(cli, [*args, "verify", "--repair", str(models.base)])
    assert done.exit_code == 7  # the exact and factor blobs need the fine-tune
    assert f"repaired {damaged['base']}  base tiny tensor" in done.output and f"lost     {damaged['exact']}" in done.output
    assert "no given file holds what it was made of; breaks dog@2" in done.output
    done = CliRunner().invoke(cli, [*args, "verify", "--repair", str(models.ft)])
    assert f"repaired {damaged['exact']}  dog@2 tensor" in done.output, done.output

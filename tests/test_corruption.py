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

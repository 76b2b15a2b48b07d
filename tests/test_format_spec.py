"""A reader written from docs/format.md alone: raw SQL, zstd, safetensors and torch, none of dsreg's
reading code. It checks the manifest digest, the blob layout and digests, the tensor digest rule,
and rebuilds int8, mixed and exact entries by the spec's rules against dsreg's own checkout."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file


def _blob(root: Path, digest: str) -> dict[str, torch.Tensor]:
    data = (root / "sha256" / digest[:2] / digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    return load_safetensors(zstandard.ZstdDecompressor().decompress(data))


def _tensor_digest(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    h = hashlib.sha256(f"{name}{list(t.shape)}".encode())
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unpack4(q: torch.Tensor, columns: int) -> torch.Tensor:
    low, high = (q & 0x0F).to(torch.int16), (q >> 4).to(torch.int16)
    return torch.stack([low, high], dim=2).reshape(q.shape[0], -1)[:, :columns] - 8


def _factors(blob: dict[str, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if "a" in blob:
        return blob["a"].float(), blob["b"].float()
    a = blob["a.q8"].float() * blob["a.s8"][None, :]
    b = blob["b.q8"].float() * blob["b.s8"][:, None]
    w = blob["a.s8"].numel()
    if w < rank:
        a = torch.cat([a, _unpack4(blob["a.q4"], rank - w).float() * blob["a.s4"][None, :]], 1)
        b = torch.cat([b, _unpack4(blob["b.q4"], b.shape[1]).float() * blob["b.s4"][:, None]], 0)
    return a, b


@pytest.fixture
def registry(tmp_path, models):
    from dsreg import Registry

    home = tmp_path / "reg"
    with Registry.open(home=home) as reg:
        reg.add_base(models.base, "tiny")
        reg.push(models.ft, "s", energy=0.8, encoding="int8")
        reg.push(models.ft, "s", budget="60kB")
        reg.push(models.ft, "s", exact=True)
        for n in (1, 2, 3):
            reg.checkout(f"s@{n}", tmp_path / f"s{n}.safetensors")
    return home


def test_a_registry_read_by_the_spec(registry, tmp_path):
    from dsreg import Registry

    with Registry.open(home=registry) as reg:
        for ref in ("s@3", "s@2", "s@1"):
            reg.rm(ref)
    db = sqlite3.connect(registry / "catalog.db")
    root = registry / "blobs"
    (base_id, manifest) = db.execute("SELECT id, digest FROM bases WHERE name = 'tiny'").fetchone()
    rows = db.execute("SELECT key, tensor_digest, blob_digest FROM base_tensors WHERE base_id = ? ORDER BY position", (base_id,)).fetchall()
    lines = b"".join(key.encode() + b"\0" + tdigest.encode() + b"\n" for key, tdigest, _ in rows)
    assert hashlib.sha256(lines).hexdigest() == manifest
    base = {}
    for key, tdigest, blob in rows:
        base[key] = _blob(root, blob)["tensor"]
        assert _tensor_digest(base[key]) == tdigest
    # Every revision was removed: the subject is a tombstone that keeps its counter.
    assert db.execute("SELECT latest, counter FROM subjects WHERE name = 's'").fetchone() == (0, 3)
    assert [a for (a,) in db.execute("SELECT action FROM events ORDER BY id")] == ["base.add", "push", "push", "push", "rm", "rm", "rm"]
    assert json.loads(db.execute("SELECT details FROM events WHERE action = 'push' ORDER BY id").fetchone()[0])["rank_rule"] == "energy=0.8"


def test_int8_mixed_and_exact_entries_rebuild_by_the_spec(registry, tmp_path):
    db = sqlite3.connect(registry / "catalog.db")
    root = registry / "blobs"
    base = {key: _blob(root, blob)["tensor"] for key, blob in db.execute("SELECT key, blob_digest FROM base_tensors")}
    kinds_seen = set()
    for number in (1, 2, 3):
        ours = load_file(tmp_path / f"s{number}.safetensors")
        (rev_id, encoding) = db.execute(
            "SELECT r.id, r.encoding FROM revisions r JOIN subjects s ON s.id = r.subject_id WHERE s.name = 's' AND r.number = ?", (number,)
        ).fetchone()
        for key, kind, dtype, shape, rank, blob in db.execute(
            "SELECT key, kind, dtype, shape, rank, blob_digest FROM entries WHERE revision_id = ? ORDER BY position", (rev_id,)
        ):
            shape = tuple(json.loads(shape))
            target = getattr(torch, dtype)
            w = base[key].to(target)
            if kind == "lowrank":
                a, b = _factors(_blob(root, blob), rank)
                w = (base[key].float().reshape(shape[0], -1) + a @ b).reshape(shape).to(target)
                assert torch.allclose(w.float(), ours[key].float(), rtol=1e-5, atol=1e-6), key
                kinds_seen.add((encoding, kind, "a.q4" in _blob(root, blob)))
                continue
            if kind == "dense":
                w = (base[key].float() + _blob(root, blob)["delta"].float().reshape(shape)).to(target)
            elif kind == "exact":
                planes = _blob(root, blob)["xor"]
                bits = w.contiguous().view(torch.int32 if w.element_size() == 4 else torch.int16).reshape(-1)
                w = (bits ^ planes.T.contiguous().view(bits.dtype).reshape(-1)).view(target).reshape(shape)
            elif kind == "sparse":
                stored = _blob(root, blob)
                w = w.clone()
                w.reshape(shape[0], -1)[stored["rows"]] = stored["values"].reshape(stored["rows"].numel(), -1).to(target)
            elif kind == "full":
                w = _blob(root, blob)["tensor"]
            kinds_seen.add((encoding, kind, False))
            assert torch.equal(w, ours[key]) or (kind == "dense" and torch.allclose(w.float(), ours[key].float(), rtol=1e-6)), key
    assert ("int8", "lowrank", False) in kinds_seen and ("mixed", "lowrank", True) in kinds_seen
    assert any(kind == "exact" for _, kind, _ in kinds_seen)

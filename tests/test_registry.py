"""Push and checkout through the Python API: round trips, sizes, errors, formats, queries."""

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsreg import AmbiguousBase, BaseMismatch, Registry, RevisionNotFound, SubjectNotFound
from dsreg.demo import FROZEN_IN_FINETUNE

from .conftest import snapshot


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = torch.linalg.vector_norm(b.float())
    return float(torch.linalg.vector_norm(a.float() - b.float()) / den) if den else float(torch.linalg.vector_norm(a.float()))


def _assert_same_layout(out: dict, ref: dict):
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape, k
        assert out[k].dtype == ref[k].dtype, k


def test_push_then_checkout_round_trips_safetensors(reg_base, models, tmp_path):
    rev = reg_base.push(models.ft, "corgi")
    assert (rev.subject, rev.number, rev.base, rev.energy) == ("corgi", 1, "tiny", 0.5)
    assert rev.stored_bytes < rev.original_bytes / 3
    out = reg_base.checkout("corgi", tmp_path / "corgi.safetensors")
    rebuilt = load_file(out.path)
    assert sorted(rebuilt) == sorted(models.ft_sd)
    _assert_same_layout(rebuilt, models.ft_sd)
    detail = reg_base.show("corgi@1")
    for t in detail.tensors:
        delta = models.ft_sd[t.key] - models.base_sd[t.key]
        # The stored error is the error of the delta; the rebuilt tensor must show exactly that.
        assert _rel(rebuilt[t.key] - models.base_sd[t.key], delta) == pytest.approx(t.rel_error, abs=2e-3), t.key


def test_bytes_fall_and_error_rises_as_tau_falls(reg_base, models):
    taus = [1.0, 0.8, 0.5, 0.2, 0.06]
    revs = [reg_base.push(models.ft, "s", energy=tau) for tau in taus]
    stored = [r.stored_bytes for r in revs]
    kept = [r.kept_params for r in revs]
    errors = [sum(t.rel_error for t in reg_base.show(r.ref).tensors) for r in revs]
    assert stored == sorted(stored, reverse=True) and stored[0] > stored[-1]
    assert kept == sorted(kept, reverse=True)
    assert errors == sorted(errors) and errors[-1] > errors[0]


def test_tau_one_with_fp32_factors_rebuilds_every_tensor_to_roundoff(reg_base, models, tmp_path):
    reg_base.push(models.ft, "exactish", energy=1.0, encoding="fp32")
    rebuilt = load_file(reg_base.checkout("exactish", tmp_path / "o.safetensors").path)
    for k, v in models.ft_sd.items():
        assert torch.allclose(rebuilt[k], v, rtol=1e-5, atol=1e-6), k


def test_unchanged_tensors_cost_no_blob_bytes(reg_base, models, tmp_path):
    rev = reg_base.push(models.ft, "frozen")
    detail = reg_base.show(rev.ref)
    frozen = [t for t in detail.tensors if t.key.startswith(FROZEN_IN_FINETUNE)]
    assert frozen and all(t.kind == "base" and t.blob is None and t.stored_bytes == 0 for t in frozen)
    assert rev.n_changed == sum(t.kind != "base" for t in detail.tensors) <= len(detail.tensors) - len(frozen)
    rebuilt = load_file(reg_base.checkout(rev.ref, tmp_path / "f.safetensors").path)
    for t in frozen:
        assert torch.equal(rebuilt[t.key], models.base_sd[t.key])


def test_pushing_the_base_itself_stores_nothing(reg_base, models):
    rev = reg_base.push(models.base, "same")
    assert rev.n_changed == 0 and rev.stored_bytes == 0


def test_one_dim_deltas_are_dense_and_matrices_low_rank(reg_base, models):
    detail = reg_base.show(reg_base.push(models.ft, "kinds").ref)
    for t in detail.tensors:
        if t.kind == "base":
            continue
        if t.key == "token_embedding.weight":
            # The fine-tune trained a few tokens' rows: they are cheaper stored as they are.
            assert t.kind == "sparse" and 1 <= t.rank < t.shape[0]
            continue
        assert t.kind == ("lowrank" if len(t.shape) >= 2 else "dense"), t.key
        if t.kind == "lowrank":
            assert 1 <= t.rank <= t.full_rank


def test_pickle_round_trip_keeps_the_state_dict_wrapper(reg_base, models, tmp_path):
    reg_base.push(models.ft_ckpt, "pickled")
    out = reg_base.checkout("pickled", tmp_path / "p.ckpt")
    assert out.format == "pickle"
    loaded = torch.load(out.path, weights_only=True)
    assert set(loaded) == {"state_dict", "global_step"} and loaded["global_step"] == 30  # the small entries come back
    _assert_same_layout(loaded["state_dict"], models.ft_sd)


def test_what_a_pickle_holds_beside_its_state_dict_is_kept_or_named(reg_base, models, tmp_path, caplog):
    trainer = {
        "state_dict": models.ft_sd, "epoch": 3, "global_step": 1200, "hyper": {"lr": 1e-6, "prompts": ["a sks dog"]},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4)}}}], "ema_tensor": torch.zeros(3),
    }
    torch.save(trainer, tmp_path / "trainer.ckpt")
    with caplog.at_level("WARNING", logger="dsreg.checkpoint"):
        rev = reg_base.push(tmp_path / "trainer.ckpt", "trained")
    assert "leaving out 2 entries" in caplog.text and "optimizer_states" in caplog.text and "ema_tensor" in caplog.text
    loaded = torch.load(reg_base.checkout(rev.ref, tmp_path / "back.ckpt").path, weights_only=True)
    assert {k: loaded[k] for k in ("epoch", "global_step", "hyper")} == {"epoch": 3, "global_step": 1200, "hyper": trainer["hyper"]}
    assert set(loaded) == {"state_dict", "epoch", "global_step", "hyper"}


def test_checkout_format_follows_the_output_suffix(reg_base, models, tmp_path):
    reg_base.push(models.ft, "corgi")
    out = reg_base.checkout("corgi@1", tmp_path / "corgi.ckpt")
    assert out.format == "pickle"
    _assert_same_layout(torch.load(out.path, weights_only=True), models.ft_sd)
    forced = reg_base.checkout("corgi@1", tmp_path / "corgi.bin", format="safetensors")
    _assert_same_layout(load_file(forced.path), models.ft_sd)


@pytest.mark.parametrize("which, exact", [("ft", False), ("ft", True), ("ft_fp16", False), ("ft_bf16", True)])
def test_in_place_and_streamed_checkouts_rebuild_the_same_bits(reg_base, models, tmp_path, which, exact):
    # A .safetensors checkout forms tensors in the output in any order on several threads; a .ckpt
    # one streams them in order through the same deltas. Both must give every tensor bit for bit
    # (low-rank, dense, sparse and XOR entries; fine-tunes in the base's dtype and in another).
    rev = reg_base.push(getattr(models, which), "both", exact=exact)
    placed = load_file(reg_base.checkout(rev.ref, tmp_path / "a.safetensors", device="cpu").path)
    streamed = torch.load(reg_base.checkout(rev.ref, tmp_path / "b.ckpt", device="cpu").path, weights_only=True)
    assert placed.keys() == streamed.keys()
    for key, tensor in placed.items():
        other = streamed[key]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, key
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), key


def test_sharded_diffusers_folder_round_trips(reg_base, models, tmp_path):
    reg_base.push(models.ft_diffusers, "folder")
    out = reg_base.checkout("folder", tmp_path / "unet")
    assert out.format == "diffusers"
    files = sorted(p.name for p in out.path.iterdir())
    assert files == sorted(p.name for p in models.ft_diffusers.iterdir())
    assert json.loads((out.path / "config.json").read_text())["_class_name"] == "TinyUNet"
    index = json.loads((out.path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    rebuilt = {}
    for shard in set(index["weight_map"].values()):
        rebuilt.update(load_file(out.path / shard))
    _assert_same_layout(rebuilt, models.ft_sd)
    single = reg_base.checkout("folder", tmp_path / "single.safetensors")
    _assert_same_layout(load_file(single.path), models.ft_sd)


@pytest.mark.parametrize("which,dtype", [("ft_fp16", torch.float16), ("ft_bf16", torch.bfloat16)])
def test_half_precision_finetunes_round_trip_in_their_dtype(reg_base, models, tmp_path, which, dtype):
    reg_base.push(getattr(models, which), "half", encoding="fp32", energy=1.0)
    rebuilt = load_file(reg_base.checkout("half", tmp_path / "h.safetensors").path)
    for k, v in models.ft_sd.items():
        assert rebuilt[k].dtype == dtype
        expected = v.to(dtype)
        # The fp32 rebuild may land one rounding step away from the half-precision original.
        assert torch.allclose(rebuilt[k].float(), expected.float(), rtol=2 ** -7, atol=1e-3), k
    detail = reg_base.show("half")
    frozen = [t for t in detail.tensors if t.key.startswith(FROZEN_IN_FINETUNE)]
    assert all(t.kind == "base" for t in frozen)  # a half-precision copy of a base tensor is a reference


def test_subject_names_are_assigned_and_revisions_counted(reg_base, models):
    assert reg_base.push(models.ft).ref == "subject-1@1"
    assert reg_base.push(models.ft).ref == "subject-2@1"
    assert reg_base.push(models.ft, "subject-2").ref == "subject-2@2"
    assert [r.number for r in reg_base.revisions("subject-2")] == [1, 2]
    assert reg_base.revision("subject-2").number == 2
    assert reg_base.revision("subject-2@1").number == 1


def test_auto_names_skip_other_subject_names_in_one_try(reg_base, models, monkeypatch):
    """A long subject-<word> name once sent every auto-named push through inserts from 1 up."""
    for name in ("subject-final", "subject-9x", "subject-", "subject-12345678901234567890z"):
        reg_base.push(models.base, name)
    assert reg_base.push(models.base).subject == "subject-1"
    from dsreg.catalog import Catalog

    tries = []
    insert = Catalog._insert_subject
    monkeypatch.setattr(Catalog, "_insert_subject", staticmethod(lambda s, name: tries.append(name) or insert(s, name)))
    assert [reg_base.push(models.base).subject for _ in range(3)] == ["subject-2", "subject-3", "subject-4"]
    assert tries == ["subject-2", "subject-3", "subject-4"]


def test_unknown_subject_and_revision(reg_base, models, tmp_path):
    reg_base.push(models.ft, "known")
    with pytest.raises(SubjectNotFound):
        reg_base.checkout("nobody", tmp_path / "x.safetensors")
    with pytest.raises(RevisionNotFound, match="latest is 1"):
        reg_base.checkout("known@5", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_base_is_stored_once_and_adding_it_again_is_a_no_op(reg, models):
    info, new = reg.add_base(models.base, "tiny")
    before = snapshot(reg)
    again, new_again = reg.add_base(models.base, "tiny")
    assert new and not new_again and again.digest == info.digest
    same_weights, _ = reg.add_base(models.base, "other-name")
    assert same_weights.name == "tiny"
    assert snapshot(reg) == before


def _variant_base(models, tmp_path) -> Path:
    """The base with one tensor changed: it shares every other tensor with it."""
    sd = dict(models.base_sd)
    sd["conv_in.bias"] = sd["conv_in.bias"] + 1.0
    save_file(sd, tmp_path / "variant.safetensors")
    return tmp_path / "variant.safetensors"


def test_bases_share_identical_tensors(reg, models, tmp_path):
    reg.add_base(models.base, "tiny")
    before = len(list(reg.store.list()))
    reg.add_base(_variant_base(models, tmp_path), "variant")
    assert len(list(reg.store.list())) == before + 1


def test_a_shared_tensor_whose_blob_is_gone_is_uploaded_again(reg, models, tmp_path):
    info, _ = reg.add_base(models.base, "tiny")
    # A blob the next base shares, gone as if collected between that base's lookup and its upload.
    lost = next(t.blob for t in reg.catalog.base_tensors(info.name) if t.key != "conv_in.bias")
    reg.store.delete(lost)
    reg.add_base(_variant_base(models, tmp_path), "variant")
    assert reg.store.exists(lost)  # the same bytes again, so the first base is whole too
    assert reg.verify(full=True).ok


def test_base_is_detected_among_several(reg, models):
    reg.add_base(models.base2, "unrelated")
    reg.add_base(models.base, "tiny")
    rev = reg.push(models.ft)
    assert rev.base == "tiny"


def test_base_detection_fails_clearly_when_ambiguous(reg, models, tmp_path):
    g = torch.Generator().manual_seed(3)
    b1 = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in models.base_sd.items()}
    b2 = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in models.base_sd.items()}
    save_file(b1, tmp_path / "b1.safetensors")
    save_file(b2, tmp_path / "b2.safetensors")
    reg.add_base(tmp_path / "b1.safetensors", "b1")
    reg.add_base(tmp_path / "b2.safetensors", "b2")
    before = snapshot(reg)
    with pytest.raises(AmbiguousBase, match="b1.*b2|b2.*b1"):
        reg.push(models.base)  # equally far from both
    assert snapshot(reg) == before
    assert reg.push(models.base, base="b1").base == "b1"


def test_no_base_fits(reg, models, tmp_path):
    reg.add_base(models.base, "tiny")
    save_file({"other.weight": torch.ones(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(BaseMismatch, match="tiny"):
        reg.push(tmp_path / "other.safetensors")


def test_a_push_that_fails_halfway_leaves_no_catalog_rows(reg_base, models, monkeypatch):
    before = snapshot(reg_base)["rows"]
    calls = {"n": 0}
    real_put = reg_base.store.put

    def failing_put(data, digest=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_put(data, digest)

    monkeypatch.setattr(reg_base.store, "put", failing_put)
    with pytest.raises(OSError):
        reg_base.push(models.ft, "halfway")
    assert snapshot(reg_base)["rows"] == before
    monkeypatch.undo()
    assert reg_base.push(models.ft, "halfway").number == 1  # a retry succeeds


def test_catalog_queries(reg, models):
    reg.add_base(models.base, "tiny")
    reg.add_base(models.base2, "unrelated")
    for name in ("corgi", "corgi-2", "cat"):
        reg.push(models.ft, name, base="tiny")
    reg.push(models.base2, "other", base="unrelated")
    reg.tag("corgi@1", "prod")
    names = lambda subjects: [s.name for s in subjects]
    assert names(reg.subjects()) == ["cat", "corgi", "corgi-2", "other"]
    assert names(reg.subjects(base="unrelated")) == ["other"]
    assert names(reg.subjects(name_like="corgi")) == ["corgi", "corgi-2"]
    assert names(reg.subjects(name_like="*-2")) == ["corgi-2"]
    assert names(reg.subjects(tag="prod")) == ["corgi"]
    assert names(reg.subjects(limit=2, offset=1)) == ["corgi", "corgi-2"]
    assert names(reg.subjects(limit=2, after="corgi")) == ["corgi-2", "other"]
    assert names(reg.subjects(since=datetime.now(timezone.utc) + timedelta(hours=1))) == []
    assert names(reg.subjects(since=datetime.now(timezone.utc) - timedelta(hours=1))) == names(reg.subjects())
    assert reg.revision("corgi@1").tags == ("prod",)
    stats = reg.stats()
    assert (stats.n_bases, stats.n_subjects, stats.n_revisions) == (2, 4, 4)
    assert stats.original_bytes == sum(s.latest.original_bytes for s in reg.subjects())
    # Three pushes of the same fine-tune share their blobs.
    assert stats.stored_bytes == reg.revision("corgi").stored_bytes + reg.revision("other").stored_bytes
    assert stats.ratio > 1


def test_show_summarises_layer_groups(reg_base, models):
    detail = reg_base.show(reg_base.push(models.ft, "g").ref)
    groups = {g.group: g for g in detail.groups}
    assert {"conv_in", "mid", "mid_attn", "token_embedding", "time_embedding"} <= set(groups)
    assert groups["time_embedding"].n_changed == 0 and groups["time_embedding"].stored_bytes == 0
    assert sum(g.n_tensors for g in detail.groups) == len(detail.tensors)
    distinct = {t.blob: t.stored_bytes for t in detail.tensors if t.blob}
    assert sum(distinct.values()) == detail.revision.stored_bytes  # identical blobs are stored once
    assert sum(g.stored_bytes for g in detail.groups) >= detail.revision.stored_bytes


def test_checkout_on_a_machine_with_only_the_registry(tmp_path, models):
    home = tmp_path / "reg"
    with Registry.open(home=home) as r:
        r.add_base(models.base, "tiny")
        r.push(models.ft, "portable")
    moved = tmp_path / "moved"
    home.rename(moved)
    with Registry.open(home=moved) as r:
        out = r.checkout("portable", tmp_path / "p.safetensors")
    _assert_same_layout(load_file(out.path), models.ft_sd)


def test_fast_and_exact_methods_store_the_same_ranks_and_weights(reg_base, models, tmp_path):
    fast = reg_base.push(models.ft, "fast", energy=0.5, method="gram", encoding="fp32")
    exact = reg_base.push(models.ft, "exact", energy=0.5, method="svd", encoding="fp32")
    fast_t = {t.key: t for t in reg_base.show(fast.ref).tensors}
    exact_t = {t.key: t for t in reg_base.show(exact.ref).tensors}
    for key, t in fast_t.items():
        if t.kind == "lowrank":
            assert abs(t.rank - exact_t[key].rank) <= 1, key
    a = load_file(reg_base.checkout(fast.ref, tmp_path / "fast.safetensors").path)
    b = load_file(reg_base.checkout(exact.ref, tmp_path / "exact.safetensors").path)
    for key in a:
        if fast_t[key].kind != "lowrank" or fast_t[key].rank == exact_t[key].rank:
            delta = models.ft_sd[key] - models.base_sd[key]
            assert torch.linalg.vector_norm(a[key] - b[key]) <= 1e-4 * torch.linalg.vector_norm(delta) + 1e-7, key


@pytest.mark.parametrize("which", ["ft", "ft_ckpt", "ft_diffusers"])
def test_the_source_digest_is_the_sha256_of_what_was_pushed(reg_base, models, which):
    import hashlib

    from dsreg.checkpoint import source_digest

    path = getattr(models, which)
    rev = reg_base.push(path, "src")
    assert rev.source_digest == source_digest(path)
    if path.is_file():
        assert rev.source_digest == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_finetunes_are_stored_and_given_back_in_their_dtype(reg, models, tmp_path, dtype):
    def fp8(sd):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    save_file(fp8(models.base_sd), tmp_path / "base8.safetensors")
    save_file(fp8(models.ft_sd), tmp_path / "ft8.safetensors")
    reg.add_base(tmp_path / "base8.safetensors", "base8")
    pushed = fp8(models.ft_sd)
    exact = load_file(reg.checkout(reg.push(tmp_path / "ft8.safetensors", "s8", exact=True).ref, tmp_path / "e.safetensors").path)
    assert all(exact[k].dtype == v.dtype and torch.equal(exact[k].view(torch.uint8), v.view(torch.uint8)) for k, v in pushed.items() if v.is_floating_point())
    # a full-rank rule: the delta formed in fp32, the rebuilt weights cast back to the same fp8 values
    full = load_file(reg.checkout(reg.push(tmp_path / "ft8.safetensors", "s8", energy=1.0).ref, tmp_path / "f.safetensors").path)
    for k, v in pushed.items():
        assert full[k].dtype == v.dtype and torch.equal(full[k].float(), v.float()), k


def test_new_tokens_appended_to_an_embedding_are_stored_and_given_back(reg_base, models, tmp_path):
    """Textual inversion or DreamBooth with a new token: the embedding has more rows than the base's."""
    ft = dict(models.ft_sd)
    table = ft["token_embedding.weight"]
    g = torch.Generator().manual_seed(9)
    ft["token_embedding.weight"] = torch.cat([table, table[:2] + 0.1 * torch.randn(2, table.shape[1], generator=g)])
    save_file(ft, tmp_path / "tokens.safetensors")
    for kwargs in ({}, {"exact": True}):
        rev = reg_base.push(tmp_path / "tokens.safetensors", "tokens", **kwargs)
        back = load_file(reg_base.checkout(rev.ref, tmp_path / "back.safetensors", overwrite=True).path)
        assert back["token_embedding.weight"].shape == ft["token_embedding.weight"].shape
        if kwargs:
            assert all(torch.equal(back[k], ft[k]) for k in ft)
        else:  # the base's rows under the rank rule, the new rows whole
            assert torch.equal(back["token_embedding.weight"][-2:], ft["token_embedding.weight"][-2:])
    # only the new rows changed: stored as those rows, exactly
    textual_inversion = dict(models.base_sd)
    textual_inversion["token_embedding.weight"] = ft["token_embedding.weight"][:].clone()
    textual_inversion["token_embedding.weight"][: table.shape[0]] = models.base_sd["token_embedding.weight"]
    save_file(textual_inversion, tmp_path / "ti.safetensors")
    rev = reg_base.push(tmp_path / "ti.safetensors", "ti")
    (entry,) = [t for t in reg_base.show(rev.ref).tensors if t.kind != "base"]
    assert entry.key == "token_embedding.weight" and entry.kind == "sparse" and entry.rank == 2
    assert torch.equal(load_file(reg_base.checkout(rev.ref, tmp_path / "ti-back.safetensors").path)["token_embedding.weight"], textual_inversion["token_embedding.weight"])
    export = reg_base.export_lora("tokens@1", tmp_path / "tokens-lora.safetensors")
    assert "token_embedding.weight" in export.left_out
    budget = reg_base.push(tmp_path / "tokens.safetensors", "tokens", budget="400kB")
    back = load_file(reg_base.checkout(budget.ref, tmp_path / "budget.safetensors").path)
    assert budget.stored_bytes <= 400_000 and torch.equal(back["token_embedding.weight"], ft["token_embedding.weight"])


def test_a_tensor_that_lost_rows_is_still_refused(reg_base, models, tmp_path):
    ft = dict(models.ft_sd)
    ft["token_embedding.weight"] = ft["token_embedding.weight"][:-1].contiguous()
    save_file(ft, tmp_path / "fewer.safetensors")
    with pytest.raises(BaseMismatch, match="token_embedding.weight"):
        reg_base.push(tmp_path / "fewer.safetensors", "fewer", base="tiny")

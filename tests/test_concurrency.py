"""Many writers at once, in separate processes, against one catalog and one store."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsreg import Registry
from dsreg.demo import finetune, make_base, state_dict

from .conftest import worker_pool


def _push(args) -> tuple[str, int, str]:
    catalog, store, home, path, subject = args
    with Registry.open(catalog, store, home=home) as r:
        rev = r.push(path, subject, base="tiny", energy=1.0, encoding="fp32", device="cpu")
    return rev.subject, rev.number, path


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory, models):
    """Three different real fine-tunes of the session's base."""
    d = tmp_path_factory.mktemp("finetunes")
    base = make_base(32, steps=40)
    paths = []
    for subject in (2, 3, 4):
        path = d / f"ft{subject}.safetensors"
        save_file(state_dict(finetune(base, subject=subject, steps=5)), path)
        paths.append(path)
    return paths


def _check_all(reg: Registry, pushed: list[tuple[str, int, str]], tmp_path) -> None:
    by_subject: dict[str, list[int]] = {}
    for subject, number, path in pushed:
        by_subject.setdefault(subject, []).append(number)
        out = reg.checkout(f"{subject}@{number}", tmp_path / f"{subject}-{number}.safetensors", device="cpu")
        rebuilt, original = load_file(out.path), load_file(path)
        for k, v in original.items():
            assert torch.allclose(rebuilt[k], v, rtol=1e-5, atol=1e-6), (subject, number, k)
    for subject, numbers in by_subject.items():
        assert sorted(numbers) == list(range(1, len(numbers) + 1)), subject
        assert reg.revision(subject).number == len(numbers)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [8])
def test_concurrent_pushes_from_separate_processes(engine, open_registry, models, finetunes, tmp_path, processes):
    with open_registry() as r:
        r.add_base(models.base, "tiny")
    home = str(tmp_path / "registry")
    # Three workers share "alpha", two share "beta", three ask for automatic names.
    subjects = ["alpha", "alpha", "alpha", "beta", "beta", None, None, None]
    jobs = [(engine.catalog_url, engine.store_url, home, str(finetunes[i % 3]), subjects[i]) for i in range(processes)]
    with worker_pool(processes) as pool:
        pushed = pool.map(_push, jobs)
    assert sorted(s for s, _, _ in pushed if not s.startswith("subject-")) == ["alpha"] * 3 + ["beta"] * 2
    assert sorted(s for s, _, _ in pushed if s.startswith("subject-")) == ["subject-1", "subject-2", "subject-3"]
    with open_registry() as r:
        _check_all(r, pushed, tmp_path)
        stored = {b.digest for b in r.store.list()}
        referenced = {t.blob for s, n, _ in pushed for t in r.show(f"{s}@{n}").tensors if t.blob}
        assert referenced <= stored


def test_uploading_an_existing_blob_is_a_no_op(reg):
    digest, new = reg.store.put(b"same bytes")
    again, new_again = reg.store.put(b"same bytes")
    assert digest == again and new and not new_again
    assert reg.store.get(digest) == b"same bytes"

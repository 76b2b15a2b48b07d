"""Shared fixtures: small real fine-tunes saved in every input format, and fresh registries."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry import Registry
from registry.demo import finetune, make_base, state_dict

WIDTH = 32


@dataclass(frozen=True)
class Models:
    dir: Path
    base_sd: dict
    ft_sd: dict
    base: Path  # base.safetensors
    ft: Path  # ft.safetensors
    ft_ckpt: Path  # torch pickle with a "state_dict" wrapper
    ft_diffusers: Path  # diffusers folder with sharded weights
    ft_fp16: Path
    ft_bf16: Path
    base2: Path  # an unrelated base of the same architecture


def _save_diffusers(sd: dict, folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "TinyUNet", "width": WIDTH}))
    keys = list(sd)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half], "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, folder / name)
        weight_map.update({k: name for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    d = tmp_path_factory.mktemp("models")
    base = make_base(WIDTH, steps=40)
    ft = finetune(base, subject=1, steps=30)
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    save_file(base_sd, d / "base.safetensors")
    save_file(ft_sd, d / "ft.safetensors", metadata={"trained_by": "tests"})
    torch.save({"state_dict": ft_sd, "global_step": 30}, d / "ft.ckpt")
    _save_diffusers(ft_sd, d / "ft-diffusers")
    save_file({k: v.half() for k, v in ft_sd.items()}, d / "ft-fp16.safetensors")
    save_file({k: v.bfloat16() for k, v in ft_sd.items()}, d / "ft-bf16.safetensors")
    save_file(state_dict(make_base(WIDTH, steps=10, seed=7)), d / "base2.safetensors")
    return Models(
        d, base_sd, ft_sd, d / "base.safetensors", d / "ft.safetensors", d / "ft.ckpt", d / "ft-diffusers",
        d / "ft-fp16.safetensors", d / "ft-bf16.safetensors", d / "base2.safetensors",
    )


@pytest.fixture
def reg(tmp_path) -> Registry:
    with Registry.open(home=tmp_path / "registry") as r:
        yield r


@pytest.fixture
def reg_base(reg: Registry, models: Models) -> Registry:
    reg.add_base(models.base, "tiny")
    return reg


def snapshot(registry: Registry) -> dict:
    """Every catalog row and every stored object: two equal snapshots mean nothing was written."""
    import sqlalchemy as sa

    from registry.catalog import Model

    rows = {}
    with registry.catalog.engine.connect() as conn:
        for table in Model.metadata.sorted_tables:
            rows[table.name] = sorted(tuple(map(str, r)) for r in conn.execute(sa.select(table)))
    objects = sorted(b.digest for b in registry.store.list())
    return {"rows": rows, "objects": objects}

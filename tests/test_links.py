"""Symbolic links in pushed folders, and the permissions of what checkout writes."""

import os
import shutil
import stat

import pytest

from dsreg import Registry
from dsreg.errors import CheckpointError

from .conftest import snapshot


@pytest.fixture
def local(tmp_path):
    with Registry.open(home=tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("not for the registry")
    path.chmod(0o600)
    return path


def _refused(reg, call, *args, match):
    before = snapshot(reg)
    with pytest.raises(CheckpointError, match=match) as info:
        call(*args)
    assert "\n" not in str(info.value)
    assert snapshot(reg) == before
    return str(info.value)


def test_a_link_out_of_a_model_folder_is_refused_naming_it(local, models, tmp_path, secret):
    folder = tmp_path / "ft-linked"
    shutil.copytree(models.ft_diffusers, folder)
    (folder / "notes.txt").symlink_to(secret)
    local.add_base(models.base, "tiny")
    message = _refused(local, local.push, folder, "corgi", match="notes.txt")
    assert str(secret) in message and "outside" in message
    _refused(local, local.add_base, folder, "other", match="notes.txt")


def test_a_link_out_of_a_pipeline_folder_is_refused(local, pipelines, tmp_path, secret):
    folder = tmp_path / "pipe"
    shutil.copytree(pipelines.ft, folder)
    (folder / "tokenizer" / "merges.txt").symlink_to(secret)
    local.add_base(pipelines.base, "pipe")
    _refused(local, local.push, folder, "dog", match="merges.txt")


def test_relative_links_that_climb_out_and_links_to_folders_are_refused(local, models, tmp_path, secret):
    climbing = tmp_path / "climbing"
    shutil.copytree(models.ft_diffusers, climbing)
    (climbing / "notes.txt").symlink_to(os.path.relpath(secret, climbing))
    _refused(local, local.add_base, climbing, "climbing", match="outside")
    looping = tmp_path / "looping"
    shutil.copytree(models.ft_diffusers, looping)
    (looping / "again").symlink_to(looping)
    _refused(local, local.add_base, looping, "looping", match="a link to a folder")


def test_a_link_inside_the_folder_is_read_as_the_file_it_names(local, models, tmp_path):
    folder = tmp_path / "snapshot"
    shutil.copytree(models.ft_diffusers, folder)
    shard = next(folder.glob("diffusion_pytorch_model-00001-*.safetensors"))
    (folder / "blobs").mkdir()
    shard.rename(folder / "blobs" / "shard1")
    shard.symlink_to(os.path.join("blobs", "shard1"))
    local.add_base(models.base, "tiny")
    rev = local.push(folder, "corgi", exact=True)
    out = local.checkout(rev.ref, tmp_path / "out", format="diffusers").path
    assert (out / shard.name).is_file() and not (out / shard.name).is_symlink()
    assert (out / shard.name).read_bytes() == (folder / "blobs" / "shard1").read_bytes()


def test_checkout_never_gives_a_file_wider_permissions_than_its_source(local, models, pipelines, tmp_path):
    ft = tmp_path / "ft.safetensors"
    shutil.copyfile(models.ft, ft)
    ft.chmod(0o600)
    local.add_base(models.base, "tiny")
    rev = local.push(ft, "corgi")
    for name in ("corgi.safetensors", "corgi.ckpt"):
        out = local.checkout(rev.ref, tmp_path / name).path
        assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0, name

    folder = tmp_path / "pipe"
    shutil.copytree(pipelines.ft, folder)
    private = folder / "tokenizer" / "tokenizer.json"
    private.chmod(0o600)
    local.add_base(pipelines.base, "pipe")
    rev = local.push(folder, "dog")
    out = local.checkout(rev.ref, tmp_path / "dog").path
    assert stat.S_IMODE((out / "tokenizer" / "tokenizer.json").stat().st_mode) == 0o600 & ~_umask()
    public = out / "unet" / "config.json"
    assert stat.S_IMODE(public.stat().st_mode) == stat.S_IMODE((pipelines.ft / "unet" / "config.json").stat().st_mode) & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_model_folders_files_are_blobs_not_catalog_text(local, models, tmp_path):
    folder = tmp_path / "ft-folder"
    shutil.copytree(models.ft_diffusers, folder)
    (folder / "notes.txt").write_text("trained on 12 photos of my dog")
    local.add_base(models.base, "tiny")
    rev = local.push(folder, "dog")
    with local.catalog.engine.connect() as conn:
        import sqlalchemy as sa

        layouts = " ".join(conn.execute(sa.text("SELECT layout FROM revisions")).scalars())
    assert "12 photos" not in layouts and "TinyUNet" not in layouts
    stored = {t.key: t.kind for t in local.show(rev.ref).tensors}
    assert stored["notes.txt"] == "full" and stored["config.json"] == "full"
    out = local.checkout(rev.ref, tmp_path / "back", format="diffusers").path
    assert (out / "notes.txt").read_text() == "trained on 12 photos of my dog"
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    single = local.checkout(rev.ref, tmp_path / "back.safetensors").path  # no files among the weights
    from safetensors.torch import load_file

    assert set(load_file(single)) == set(models.ft_sd)

"""What only a remote store has: the local base cache, and secrets kept out of messages."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from dsreg.cli.main import cli
from dsreg import Registry, StoreError
from dsreg.cache import BlobCache


@pytest.fixture
def remote(remote_engine, models, tmp_path):
    with Registry.open(remote_engine.catalog_url, remote_engine.store_url, home=tmp_path / "pusher") as r:
        r.add_base(models.base, "tiny")
        r.push(models.ft, "one")
        r.push(models.ft_fp16, "two")
    return remote_engine


def _base_blobs(reg: Registry) -> set[str]:
    return {t.blob for t in reg.catalog.base_tensors("tiny")}


def test_second_checkout_downloads_only_the_subjects_own_blobs(remote, models, tmp_path):
    with Registry.open(remote.catalog_url, remote.store_url, home=tmp_path / "worker") as r:
        assert isinstance(r.base_blobs, BlobCache)
        r.checkout("one", tmp_path / "one.safetensors")
        base_blobs = _base_blobs(r)
        assert r.base_blobs.size() > 0
        # Take every base tensor away from the remote store: only the cache can serve them now.
        for digest in base_blobs:
            r.store.delete(digest)
        out = r.checkout("two", tmp_path / "two.safetensors")
    assert set(load_file(out.path)) == set(models.ft_sd)


def test_a_corrupt_cached_copy_is_fetched_again(remote, tmp_path):
    with Registry.open(remote.catalog_url, remote.store_url, home=tmp_path / "worker") as r:
        r.checkout("one", tmp_path / "a.safetensors")
        cached = [p for p in (tmp_path / "worker" / "cache").glob("??/*")]
        assert cached
        for p in cached:
            p.write_bytes(b"rotten")
        r.checkout("one", tmp_path / "b.safetensors")
        assert all(p.read_bytes() != b"rotten" for p in cached)
    assert load_file(tmp_path / "a.safetensors").keys() == load_file(tmp_path / "b.safetensors").keys()


def test_the_cache_stays_under_its_size_limit(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("DSREG_CACHE_SIZE", "200kB")
    with Registry.open(remote.catalog_url, remote.store_url, home=tmp_path / "worker") as r:
        r.checkout("one", tmp_path / "one.safetensors")
        assert 0 < r.base_blobs.size() <= 200_000
    assert sum(t.raw_size for t in r.catalog.base_tensors("tiny")) > 200_000  # so eviction really ran


def test_store_errors_never_show_secrets(tmp_path, monkeypatch, remote_engine):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    args = ["--home", str(tmp_path), "--catalog", remote_engine.catalog_url.replace("postgres@", "postgres:pw-secret@"),
            "--store", "s3://nowhere/x", "-q", "ls"]
    result = CliRunner().invoke(cli, args)
    assert "very-secret-value" not in result.output and "pw-secret" not in result.output
    with pytest.raises(StoreError) as info:
        with Registry.open(remote_engine.catalog_url, "s3://nowhere/x", home=tmp_path) as r:
            r.store.put(b"x")
    assert "very-secret-value" not in str(info.value)


def test_endpoint_as_a_store_option(remote, tmp_path, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    args = ["--home", str(tmp_path), "--catalog", remote.catalog_url, "--store", remote.store_url,
            "--store-option", f"endpoint_url={endpoint}", "-q", "checkout", "one", "-o", str(tmp_path / "o.safetensors")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("DSREG_S3_ENDPOINT_URL", endpoint)
    result = CliRunner().invoke(cli, args[:6] + args[8:-1] + [str(tmp_path / "p.safetensors")])
    assert result.exit_code == 0, result.output


def test_eviction_never_touches_a_write_in_progress(tmp_path):
    from dsreg.blobstore import BlobStore

    store = BlobStore(str(tmp_path / "store"))
    digest, _ = store.put(b"x" * 1000)
    cache = BlobCache(store, tmp_path / "cache", max_bytes=1500)  # room for the blob, not for both
    in_progress = tmp_path / "cache" / digest[:2] / f".{digest}.abcd1234"
    in_progress.parent.mkdir(parents=True)
    in_progress.write_bytes(b"y" * 1000)
    os.utime(in_progress, (0, 0))  # the oldest file there: first in line if eviction could see it
    cache.get(digest)  # stores the 1000-byte blob, then evicts down to the limit
    assert in_progress.exists()
    assert cache.size() == 1000

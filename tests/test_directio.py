"""Writing a file from pieces formed in any order, and reading whole files, around the page cache."""

from __future__ import annotations

import os
import platform
import random

import pytest
import torch
import zstandard
from safetensors.torch import save_file

from dsreg import IntegrityError
from dsreg.checkpoint import TensorSpec, fill_safetensors, write_safetensors
from dsreg.codec import decode_into, dtype_name, encode
from dsreg.directio import BLOCK, DIRECT_READ_MIN, DirectFile, RangeReader, aligned_buffer, all_cached, read_whole
from dsreg.concurrency import Scratch


def _cuts(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Pieces that tile [0, size): tiny ones, ones inside one block, ones across many, empty ones."""
    cuts, at = [], 0
    while at < size:
        n = min(size - at, rng.choice([0, 1, 3, 100, BLOCK - 1, BLOCK, BLOCK + 5, 3 * BLOCK + 7, 40_000]))
        cuts.append((at, n))
        at += n
    return cuts


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_written_in_any_order_make_the_exact_file(tmp_path, direct, seed):
    rng = random.Random(seed)
    size = rng.randrange(1, 200_000)
    content = bytes(rng.randrange(256) for _ in range(size))
    cuts = _cuts(size, rng)
    rng.shuffle(cuts)
    path = tmp_path / "out.bin"
    with DirectFile(path, size, direct=direct) as out:
        assert out.direct == direct  # this test's filesystem takes O_DIRECT
        buffer = aligned_buffer(200_000 + BLOCK)
        for offset, n in cuts:
            phase = out.phase(offset)
            buffer[phase : phase + n] = content[offset : offset + n]
            out.write(offset, memoryview(buffer)[phase : phase + n])
    assert path.read_bytes() == content


def test_a_failed_write_leaves_no_descriptor_open(tmp_path):
    with pytest.raises(RuntimeError):
        with DirectFile(tmp_path / "out.bin", 10) as out:
            raise RuntimeError("stop")
    assert out.fd == -1


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 5])
def test_read_whole_reads_cold_and_cached_files_into_any_buffer(tmp_path, size):
    data = bytes(random.Random(size).randrange(256) for _ in range(size))
    path = tmp_path / "blob"
    path.write_bytes(data)
    with Scratch() as scratch:
        assert bytes(read_whole(path, scratch)) == data  # page-aligned: direct, or from the page cache
    assert bytes(read_whole(path, bytearray)) == data  # unaligned: through the page cache


def test_read_whole_returns_the_file_not_the_buffer(tmp_path):
    # A lane's reused buffer is sized for the largest blob; a small file read into it is cut to its own length.
    data = os.urandom(3 * BLOCK + 11)
    path = tmp_path / "blob"
    path.write_bytes(data)
    big = aligned_buffer(64 * BLOCK)
    view = read_whole(path, lambda n: big)
    assert len(view) == len(data) and bytes(view) == data
    view.release()
    big.close()


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        return tuple(int(x) for x in platform.release().split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


@pytest.mark.skipif(not _kernel_at_least(6, 5), reason="cachestat needs Linux 6.5")
def test_all_cached_tells_a_cached_file_from_an_evicted_one(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(64 * BLOCK))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert all_cached(fd, 64 * BLOCK)  # just written: every page is in the cache
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not all_cached(fd, 64 * BLOCK)
        with Scratch() as scratch:
            assert bytes(read_whole(path, scratch)) == path.read_bytes()  # from the disk, direct
    finally:
        os.close(fd)


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cold", [True, False])
def test_ranges_read_at_any_offset_cold_or_cached(tmp_path, cold):
    data = os.urandom(3 * DIRECT_READ_MIN + 12345)
    path = tmp_path / "file"
    path.write_bytes(data)
    if cold:
        _evict(path)
    ranges = [
        (0, 8), (7, DIRECT_READ_MIN + 1), (BLOCK, DIRECT_READ_MIN), (BLOCK - 3, 2 * DIRECT_READ_MIN + 5), (100, 1000),
        (len(data) - DIRECT_READ_MIN - 17, DIRECT_READ_MIN + 17),  # to the very end, not on a block boundary
    ]
    reader = RangeReader(path)
    try:
        with Scratch() as scratch:
            for offset, size in ranges:
                for buffer_for in (None, scratch):  # fresh memory, or a reused buffer
                    got = reader.read(offset, size, buffer_for)
                    assert len(got) == size and bytes(got) == data[offset : offset + size], (offset, size)
                    got[:1] = b"x"  # writable
                    got.release()
        assert bytes(reader.read(len(data) - 5, DIRECT_READ_MIN)) == data[-5:]  # past the end: what is there
    finally:
        reader.close()
    assert path.read_bytes() == data


def test_a_safetensors_file_read_cold_gives_back_its_tensors(tmp_path):
    """Large tensors that start inside a block come from direct reads as views of their buffer."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        "a": torch.randn(3, generator=g).half(),  # pushes the next tensor off the block boundary
        "b": torch.randn(700, 1000, generator=g),
        "c": torch.randn(513, 2049, generator=g).to(torch.bfloat16),
        "d": torch.randn(5, generator=g).double(),
    }
    path = tmp_path / "ft.safetensors"
    save_file(tensors, path)
    _evict(path)
    from dsreg.checkpoint import open_checkpoint

    with open_checkpoint(path) as ckpt:
        for key, tensor in tensors.items():
            got = ckpt.get(key)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)
            got.add_(1)  # its own memory, not the file's


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [
        (torch.float16, (3,)), (torch.float32, (1000, 37)), (torch.int8, (5,)), (torch.float32, (7, 3)),
        (torch.bfloat16, (4097,)), (torch.float32, ()), (torch.float32, (0, 3)), (torch.bool, (9,)), (torch.float64, (300, 30)),
    ]
    return {f"t{i}": (torch.randn(shape, generator=g) * 10).to(dtype) for i, (dtype, shape) in enumerate(shapes)}


@pytest.mark.parametrize("workers", [1, 3])
def test_fill_safetensors_writes_what_the_streaming_writer_writes(tmp_path, workers):
    # Odd-sized fp16/int8/bool tensors put the ones after them at offsets that are no multiple of
    # their item size; each still lands byte for byte where the format puts it.
    tensors = _tensors()
    specs = [TensorSpec(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    values = list(tensors.values())
    done = []
    fill_safetensors(tmp_path / "a.safetensors", specs, lambda i, out: out.copy_(values[i]), {"k": "v"}, workers, done.append)
    write_safetensors(tmp_path / "b.safetensors", specs, iter(values), {"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(done) == list(range(1, len(specs) + 1))


def test_fill_safetensors_raises_the_first_failure(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]

    def fill(i, out):
        if specs[i].key == "t3":
            raise IntegrityError("t3 is damaged")
        out.zero_()

    with pytest.raises(IntegrityError, match="t3 is damaged"):
        fill_safetensors(tmp_path / "a.safetensors", specs, fill)


def test_decode_into_fills_a_tensor_of_the_blobs_dtype_and_shape_only():
    tensor = torch.randn(64, 33)
    data, raw = encode({"tensor": tensor})
    out = torch.empty(64, 33)
    decode_into(data, raw, out)
    assert torch.equal(out, tensor)
    for wrong in (torch.empty(33, 64), torch.empty(64, 33, dtype=torch.float16), torch.empty(64, 32)):
        with pytest.raises(IntegrityError, match="does not hold one"):
            decode_into(data, raw, wrong)
    two, raw2 = encode({"a": tensor, "b": tensor.clone()})
    with pytest.raises(IntegrityError, match="does not hold one"):
        decode_into(two, raw2, torch.empty(64, 33))
    with pytest.raises(IntegrityError):
        decode_into(data[: len(data) // 2], raw, out)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 64)
    with pytest.raises(IntegrityError):
        decode_into(frame, raw, out)

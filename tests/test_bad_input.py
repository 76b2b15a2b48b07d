"""Bad input: one clear line on stderr, a non-zero exit, and the catalog and store exactly as before."""

import os
import pickle
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dsreg.cli.main import cli
from dsreg import Registry

from .conftest import snapshot


class _Gadget:
    """A pickle that, if loaded unsafely, would create a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def home(engine, open_registry, tmp_path, models):
    """The CLI arguments that reach this test's registry, which holds one base and one subject."""
    with open_registry() as r:
        r.add_base(models.base, "sd15")
        r.push(models.ft, "known")
    return ["--home", str(tmp_path / "registry"), *engine.cli_args()]


def _state(home):
    with _open(home) as r:
        return snapshot(r)


def _open(home):
    return Registry.open(catalog=home[3], store=home[5], home=home[1])


def _fails(home, *args, code=None, match=None, state=True):
    """The command fails in one line with ``code``, and (``state``) leaves the registry as it was."""
    before = _state(home) if state else None
    result = CliRunner().invoke(cli, [*home, "-q", *map(str, args)])
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    if match:
        assert match in lines[0], lines[0]
    if state:
        assert _state(home) == before
    return lines[0]


def test_missing_file(home, tmp_path):
    _fails(home, "push", tmp_path / "nope.safetensors", code=4, match="no such file")


def test_not_a_checkpoint(home, tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not weights\n" * 10)
    _fails(home, "push", tmp_path / "notes.txt", code=4, match="not a checkpoint")
    (tmp_path / "fake.ckpt").write_bytes(b"\x00garbage" * 100)
    _fails(home, "push", tmp_path / "fake.ckpt", code=4)


def test_truncated_safetensors(home, models, tmp_path):
    data = models.ft.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _fails(home, "push", tmp_path / "cut.safetensors", code=4, match="truncated")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    _fails(home, "push", tmp_path / "tiny.safetensors", code=4)


@pytest.mark.parametrize("wrap", ["top", "nested"])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(home, models, tmp_path, wrap):
    marker = tmp_path / "pwned"
    sd = dict(models.ft_sd)
    if wrap == "top":
        payload = _Gadget(marker)
    else:
        sd["evil"] = _Gadget(marker)
        payload = {"state_dict": sd}
    with open(tmp_path / "evil.ckpt", "wb") as fh:
        pickle.dump(payload, fh)
    torch.save(payload, tmp_path / "evil-zip.ckpt")
    for name in ("evil.ckpt", "evil-zip.ckpt"):
        line = _fails(home, "push", tmp_path / name, code=4, match="refused")
        assert "system" in line
        assert not marker.exists()


def test_keys_or_shapes_that_do_not_match_the_base(home, models, tmp_path):
    sd = dict(models.ft_sd)
    sd["conv_in.weight"] = torch.zeros(5, 4, 3, 3)
    save_file(sd, tmp_path / "shape.safetensors")
    _fails(home, "push", tmp_path / "shape.safetensors", "--base", "sd15", code=5, match="conv_in.weight")
    _fails(home, "push", tmp_path / "shape.safetensors", code=5, match="no registered base fits")
    sd = dict(models.ft_sd)
    sd["extra.weight"] = torch.zeros(2, 2)
    save_file(sd, tmp_path / "keys.safetensors")
    _fails(home, "push", tmp_path / "keys.safetensors", "--base", "sd15", code=5, match="extra.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_weights(home, models, tmp_path, bad):
    sd = dict(models.ft_sd)
    w = sd["mid.conv2.weight"].clone()
    w[0, 0, 0, 0] = bad
    sd["mid.conv2.weight"] = w
    save_file(sd, tmp_path / "nan.safetensors")
    _fails(home, "push", tmp_path / "nan.safetensors", code=4, match="mid.conv2.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finite_check_finds_every_nan_and_inf_and_passes_huge_finite_weights(dtype):
    from dsreg.scan import _all_finite

    big = torch.finfo(dtype).max
    assert _all_finite(torch.full((1000,), big, dtype=dtype))  # the fast sum overflows; the exact test passes it
    assert _all_finite(torch.tensor([big, -big, 1.0], dtype=dtype))
    assert _all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(64, 33).to(dtype)
        w[17, 5] = bad
        assert not _all_finite(w)
        assert not _all_finite(w.T)  # not contiguous
    mixed = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # the sum is NaN, as it must be
    assert not _all_finite(mixed)


def test_unknown_subject_or_revision(home, tmp_path):
    _fails(home, "checkout", "nobody", "-o", tmp_path / "o.safetensors", code=3, match="no subject named 'nobody'")
    _fails(home, "checkout", "known@9", "-o", tmp_path / "o.safetensors", code=3, match="no revision 9")
    _fails(home, "show", "nobody", code=3)
    _fails(home, "push", tmp_path / "x", "--base", "nope", code=4)
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_base(home, models):
    _fails(home, "push", models.ft, "--base", "nope", code=3, match="no base named 'nope'")


@pytest.mark.parametrize("ref", ["known@0", "known@x", "known@-1", "../known"])
def test_invalid_refs(home, tmp_path, ref):
    _fails(home, "checkout", ref, "-o", tmp_path / "o.safetensors", code=2)


def test_bad_energy(home, models):
    _fails(home, "push", models.ft, "--energy", "0", code=2, match="--energy")
    _fails(home, "push", models.ft, "--energy", "1.5", code=2)


def test_cuda_when_there_is_none(home, models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails(home, "checkout", "known", "-o", tmp_path / "o.safetensors", "--device", "cuda", code=2, match="CUDA")


def test_corrupt_blob_is_detected_never_returned(home, tmp_path):
    with _open(home) as r:
        blob = next(t.blob for t in r.show("known").tensors if t.kind == "lowrank")
        data = bytearray(r.store.fs.cat_file(r.store.path(blob)))
        data[len(data) // 2] ^= 0xFF
        r.store.fs.pipe_file(r.store.path(blob), bytes(data))
    _fails(home, "checkout", "known", "-o", tmp_path / "o.safetensors", code=7, match="corrupt")
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if "dsreg" in p.name]  # no temporary left behind


def test_unreachable_catalog_is_one_line(tmp_path, models):
    result = CliRunner().invoke(cli, ["--catalog", "postgresql+psycopg://nobody:s3cret@127.0.0.1:1/x", "--store", str(tmp_path / "s"), "ls"])
    assert result.exit_code == 8
    assert "s3cret" not in result.output and result.stderr.startswith("error: cannot open catalog")


# ---------------------------------------------------------------- hostile files


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _gadgets(marker):
    """Several ways a pickle can run code on load; each would create ``marker``."""
    import builtins
    import subprocess

    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "eval": _Reduce(builtins.eval, touch),
        "exec": _Reduce(builtins.exec, touch),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
        "import chain": _Reduce(getattr, _Reduce(builtins.__import__, "os"), "system"),
    }


def test_pickle_gadgets_are_refused_and_run_nothing(home, models, tmp_path):
    marker = tmp_path / "pwned"
    before = _state(home)  # one snapshot around the refusals (see test_hostile_names_are_refused)
    for gadget, evil in _gadgets(marker).items():
        payloads = {
            "top": evil,
            "in the state dict": {**models.ft_sd, "evil": evil},
            "deep in a list": {"state_dict": models.ft_sd, "extra": [1, {"x": [evil]}]},
        }
        for place, payload in payloads.items():
            path = tmp_path / f"evil-{len(list(tmp_path.iterdir()))}.ckpt"
            torch.save(payload, path)
            _fails(home, "push", path, code=4, match="refused", state=False)
            _fails(home, "base", "add", path, "--name", "evil", code=4, match="refused", state=False)
            assert not marker.exists(), (gadget, place)
    assert _state(home) == before


def _safetensors(header: dict, data: bytes, declared: int | None = None) -> bytes:
    import json
    import struct

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


_LIES = {
    "header length past the end": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, 10**6),
    "data past the end": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, None),
    "overlapping offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, None),
    "offsets out of order": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, None),
    "negative offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, None),
    "huge shape": ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, 8, None),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, None),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16, None),
    "header not an object": ([1, 2, 3], 0, None),
    "entry not an object": ({"a": 5}, 0, None),
}


def test_safetensors_with_a_lying_header_is_refused(home, tmp_path):
    before = _state(home)  # one snapshot around the refusals (see test_hostile_names_are_refused)
    for lie, (header, size, declared) in _LIES.items():
        path = tmp_path / "lie.safetensors"
        path.write_bytes(_safetensors(header, b"\0" * size, declared))
        _fails(home, "push", path, code=4, state=False)
        _fails(home, "base", "add", path, "--name", "lie", code=4, state=False)
    assert _state(home) == before


HOSTILE_NAMES = ["../etc", "a/b", "with space", "-dash", "", "x" * 200, "semi;colon", "quote'", "nul\x00", "tab\tname", "ünï", "a\\b", "..", "./x", "a/../b", "x" * 10_000, "'; DROP TABLE subjects; --", 'q"q', "bell\x07", "new\nline", "del\x7f", "\u202eevil"]


@pytest.mark.slow
def test_hostile_names_are_refused(home, models, tmp_path):
    # One snapshot around the 88 refusals, not two each: on S3 a snapshot lists and reads every
    # object, and the refusals write nothing that a later one could undo.
    before = _state(home)
    for name in HOSTILE_NAMES:
        _fails(home, "push", models.ft, f"--subject={name}", code=2, match="invalid subject name", state=False)
        _fails(home, "checkout", "-o", tmp_path / "o.safetensors", "--", name, code=2, state=False)
        _fails(home, "tag", "--", "known@1", name, code=2, match="invalid tag name", state=False)
        _fails(home, "base", "add", models.base, f"--name={name}", code=2, match="invalid base name", state=False)
        assert not (tmp_path / "o.safetensors").exists()
    assert _state(home) == before


def test_a_blob_that_would_inflate_past_its_recorded_size_is_refused():
    import zstandard

    from dsreg import IntegrityError
    from dsreg.codec import decode, encode

    data, raw = encode({"a": torch.zeros(1000)})
    with pytest.raises(IntegrityError, match="declares"):
        decode(data, raw - 1)
    # A frame that does not declare its size: decompression stops at the recorded size.
    chunker = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = chunker.compress(b"\0" * (64 << 20)) + chunker.flush()
    assert len(bomb) < 10_000
    with pytest.raises(IntegrityError):
        decode(bomb, 1000)


def test_a_bad_last_tensor_uploads_nothing_even_when_compression_is_far_ahead(home, models, tmp_path, monkeypatch):
    """The scan runs beside compression; uploads wait for it, here from the first blob on."""
    from dsreg import scan

    monkeypatch.setattr(scan, "HELD_LIMIT", 0)
    from dsreg.checkpoint import open_checkpoint

    sd = dict(models.ft_sd)
    with open_checkpoint(models.ft) as ckpt:
        last = [s.key for s in ckpt.specs if sd[s.key].is_floating_point()][-1]  # the last the scan reads
    w = sd[last].clone()
    w.reshape(-1)[-1] = float("nan")
    sd[last] = w
    save_file(sd, tmp_path / "late-nan.safetensors")
    _fails(home, "push", tmp_path / "late-nan.safetensors", code=4, match=last)


def _cli(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_a_read_on_a_registry_that_does_not_exist_says_so_and_creates_nothing(tmp_path):
    where = tmp_path / "nonexistent" / "dir"
    done = _cli("--catalog", f"sqlite:///{where / 'x.db'}", "--store", tmp_path / "blobs", "ls")
    assert done.exit_code == 8 and "no registry at" in done.stderr and str(where / "x.db") in done.stderr
    assert not where.exists() and not (tmp_path / "blobs").exists()
    for command in (["stats"], ["show", "x"], ["log"], ["verify"], ["base", "ls"]):
        assert _cli("--home", tmp_path / "fresh", *command).exit_code == 8, command
    assert not (tmp_path / "fresh").exists()
    # A write creates it.
    assert _cli("--home", tmp_path / "fresh", "policy", "set", "p", "--keep-last", "3").exit_code == 0
    assert _cli("--home", tmp_path / "fresh", "ls").exit_code == 0


def test_a_store_or_home_that_cannot_be_a_folder_is_one_line_exit_8(tmp_path):
    Registry.open(home=tmp_path / "reg").close()
    done = _cli("--home", tmp_path / "reg", "--store", "/proc/blobs", "ls")
    assert done.exit_code == 8 and "no object store at /proc/blobs" in done.stderr, done.output
    done = _cli("--home", tmp_path / "reg", "--store", "/proc/blobs", "policy", "set", "p", "--keep-last", "1")
    assert done.exit_code == 8 and "cannot create the object store's folder /proc/blobs" in done.stderr, done.output
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for command in (["ls"], ["policy", "set", "p", "--keep-last", "1"]):
        done = _cli("--home", a_file, *command)
        assert done.exit_code == 8 and f"{a_file} is not a folder" in done.stderr, done.output
        assert len(done.stderr.strip().splitlines()) == 1


def test_a_budget_that_leaves_layers_with_nothing_says_so(home, models, caplog):
    with _open(home) as r, caplog.at_level("WARNING", logger="dsreg.push"):
        r.push(models.ft, "tiny-budget", budget="7kB")
    assert re.search(r"leaves [0-9]+ of 50 changed tensors with nothing stored", caplog.text), caplog.text


def test_progress_bars_let_tqdm_throttle(monkeypatch):
    import io
    import sys

    from dsreg.cli.output import Bars

    err = io.StringIO()
    err.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", err)
    with Bars(enabled=True) as bars:
        for i in range(1, 20001):
            bars("compress", i, 20000)
    assert len(err.getvalue()) < 20000  # a redraw per tensor wrote about 60 bytes each


def test_ctrl_c_during_gc_every_says_what_was_committed(home, monkeypatch):
    from dsreg import registry as registry_module

    calls = []
    real = registry_module.Registry.gc

    def gc(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(registry_module.Registry, "gc", gc)
    done = CliRunner().invoke(cli, [*home, "gc", "--every", "0.01s"])
    assert done.exit_code == 130
    assert "2 earlier rounds" in done.stderr and "nothing was committed" not in done.output

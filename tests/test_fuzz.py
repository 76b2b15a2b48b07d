"""Property-based fuzzing of the checkpoint readers and of name parsing.

Whatever the bytes or the text, a reader either gives tensors or raises CheckpointError, and a name
is either refused with InvalidName or is one of the safe names; nothing else escapes.
"""

from __future__ import annotations

import io
import re
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from dsreg import CheckpointError, InvalidName
from dsreg.checkpoint import open_checkpoint
from dsreg.names import parse_ref, validate_name

SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_VALID_ST = save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3, dtype=torch.float16)})
_buf = io.BytesIO()
torch.save({"state_dict": {"w": torch.arange(6, dtype=torch.float32)}}, _buf)
_VALID_PT = _buf.getvalue()


def _read_all(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            with open_checkpoint(path) as ckpt:
                for spec, tensor in ckpt:
                    assert tuple(tensor.shape) == spec.shape
                ckpt.file_digest()
        except CheckpointError:
            pass


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([".safetensors", ".ckpt", ".bin", ""]))
def test_random_bytes_are_read_or_refused(data, suffix):
    _read_all(data, suffix)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6), st.one_of(st.none(), st.integers(0, len(_VALID_ST))))
def test_damaged_safetensors_are_read_or_refused(edits, cut):
    _read_all(_mutate(_VALID_ST, edits, cut), ".safetensors")


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_any_declared_header_length_is_read_or_refused(declared, rest):
    _read_all(struct.pack("<Q", declared) + rest, ".safetensors")


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6), st.one_of(st.none(), st.integers(0, len(_VALID_PT))))
def test_damaged_pickles_are_read_or_refused(edits, cut):
    _read_all(_mutate(_VALID_PT, edits, cut), ".ckpt")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_a_name_is_refused_or_safe(text):
    try:
        assert validate_name(text) == text
    except InvalidName:
        assert not SAFE.fullmatch(text)
    else:
        assert SAFE.fullmatch(text) and "/" not in text and "\\" not in text and not text.startswith(".")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=50), st.builds(lambda a, b: f"{a}@{b}", st.from_regex(SAFE, fullmatch=True), st.text(max_size=12))))
def test_a_reference_is_refused_or_well_formed(text):
    try:
        ref = parse_ref(text)
    except InvalidName:
        return
    assert SAFE.fullmatch(ref.subject)
    assert ref.revision is None or (isinstance(ref.revision, int) and ref.revision >= 1)
    assert str(ref) == text

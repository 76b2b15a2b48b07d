"""The one safetensors parser and writer, against the safetensors library and hostile headers."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from dsreg import CheckpointError
from dsreg.checkpoint import open_checkpoint
from dsreg.safetensors_format import CODES, FormatError, build_header, header_length, parse_header, size_bound

DTYPES = {name: getattr(torch, name) for name in CODES}
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
tensors = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), st.tuples(st.sampled_from(sorted(CODES)), shapes), max_size=6)


def _parse(data: bytes):
    n = header_length(data[:8], len(data))
    return parse_header(data[8 : 8 + n], len(data) - 8 - n)


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_what_the_library_writes_parses_to_its_tensors(specs):
    made = {k: torch.zeros(shape, dtype=DTYPES[dtype]) for k, (dtype, shape) in specs.items()}
    data = save(made, metadata={"who": "tests"})
    entries, metadata = _parse(data)
    assert metadata == {"who": "tests"}
    assert {e.key: (e.dtype, e.shape) for e in entries} == {k: (d, s) for k, (d, s) in specs.items()}


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_what_we_write_the_library_reads_and_the_size_bound_holds(specs):
    from safetensors.torch import load

    listed = [(k, dtype, shape) for k, (dtype, shape) in specs.items()]
    header, offsets = build_header(listed)
    payload = sum(torch.zeros(shape, dtype=DTYPES[dtype]).nbytes for _, dtype, shape in listed)
    data = header + bytes(payload)
    assert len(data) <= size_bound(listed)
    loaded = load(data)
    assert {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in loaded.items()} == {k: (d, s) for k, d, s in listed}
    assert [e.start for e in sorted(_parse(data)[0], key=lambda e: e.start)] == sorted(offsets)


def _file(header_json: str, data: bytes = b"") -> bytes:
    raw = header_json.encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, message", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"__metadata__": {"step": 30}}', "__metadata__"),
    ('{"__metadata__": "x"}', "__metadata__"),
    ('{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "declares 8 bytes"),
    ('{"t": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}', "unsupported dtype"),
    ('{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', "malformed shape"),
    ('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "spans bytes"),
    ('{"t": 1}', "malformed"),
    ("not json", "not valid JSON"),
])
def test_a_hostile_header_is_one_clear_error(tmp_path, header, message):
    with pytest.raises(FormatError, match=message):
        _parse(_file(header))
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(_file(header))
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(path)
    assert "\n" not in str(info.value)


def test_data_past_the_last_tensor_is_refused():
    header = json.dumps({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})
    with pytest.raises(FormatError, match="covers 1 of 2"):
        _parse(_file(header, b"\0\0"))

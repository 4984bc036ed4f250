"""The safetensors reader/writer: round trips, agreement with the safetensors library, and
thousands of malformed headers that must all end in a clean SafetensorsError."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from engine.checkpoint.format import (
    DTYPES,
    MAX_HEADER_BYTES,
    Header,
    SafetensorsError,
    TensorPlan,
    canonical_order,
    parse_header,
    read_header,
)
from engine.checkpoint.reader import TensorReader
from engine.checkpoint.writer import StreamingWriter, partial_path, write_file

ALL_DTYPES = [d.torch_dtype for d in DTYPES.values()]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _sample(dtype: torch.dtype, shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_round_trip_every_dtype(tmp_path, dtype):
    tensors = {"a": _sample(dtype, (3, 5)), "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 4))}
    path = write_file(tmp_path / "x.safetensors", tensors, {"k": "v", "ü": "✓"})
    header = read_header(path)
    assert header.metadata == {"k": "v", "ü": "✓"}
    assert header.file_size == path.stat().st_size
    assert (8 + header.header_len) % 8 == 0
    with TensorReader(path) as reader:
        for key, t in tensors.items():
            assert _same_bytes(reader.read_tensor(key), t)
        assert reader.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())


def test_our_files_load_in_safetensors_and_theirs_in_ours(tmp_path):
    tensors = {f"t{i}": _sample(d, (2, 3), i) for i, d in enumerate(ALL_DTYPES)}
    ours = write_file(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    loaded = safetensors.torch.load_file(ours)
    for k, t in tensors.items():
        assert _same_bytes(loaded[k], t)

    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, theirs, metadata={"format": "pt"})
    header = read_header(theirs)
    assert header.metadata == {"format": "pt"}
    with TensorReader(theirs, header) as reader:
        for k, t in tensors.items():
            assert _same_bytes(reader.read_tensor(k), t)
    # with one dtype (every SDXL base tensor is F16) the layouts agree to the byte
    f16 = {f"k{i}": _sample(torch.float16, (i + 1, 3), i) for i in range(8)}
    ours = write_file(tmp_path / "ours16.safetensors", f16, {"format": "pt"})
    safetensors.torch.save_file(f16, theirs, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_read_into_a_preallocated_buffer(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = write_file(tmp_path / "x.safetensors", {"w": t})
    buf = torch.empty(12, dtype=torch.float32)
    with TensorReader(path) as reader:
        assert reader.read_into("w", buf) == 48
    assert torch.equal(buf, t.reshape(-1))
    with TensorReader(path) as reader, pytest.raises(KeyError, match="no tensor 'missing'"):
        reader.read_tensor("missing")


def test_reader_notices_a_file_that_shrank(tmp_path):
    path = write_file(tmp_path / "x.safetensors", {"w": torch.zeros(1000)})
    header = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(header.file_size - 100)
    with pytest.raises(SafetensorsError, match="changed size"):
        TensorReader(path, header)


def test_streaming_writer_commits_atomically_and_resumes_identically(tmp_path):
    tensors = {f"k{i}": _sample(torch.float16, (64, 8), i) for i in range(6)}
    plans = canonical_order(TensorPlan(k, "F16", tuple(t.shape)) for k, t in tensors.items())
    reference = write_file(tmp_path / "ref.safetensors", tensors, {"m": "1"}).read_bytes()

    target = tmp_path / "out.safetensors"
    writer = StreamingWriter(target, plans, {"m": "1"})
    writer.open()
    for p in plans[:3]:
        writer.write(p.key, tensors[p.key])
    writer.sync()
    writer.close()  # interrupted
    assert not target.exists() and partial_path(target).exists()

    writer = StreamingWriter(target, plans, {"m": "1"})
    writer.open(resume_tensors=3)
    with pytest.raises(ValueError, match="refusing to commit"):
        writer.commit()
    for p in plans[3:]:
        writer.write(p.key, tensors[p.key])
    writer.commit()
    assert target.read_bytes() == reference
    assert not partial_path(target).exists()


def test_streaming_writer_rejects_wrong_order_and_size_and_abort_cleans_up(tmp_path):
    plans = [TensorPlan("a", "F32", (2,)), TensorPlan("b", "F32", (2,))]
    writer = StreamingWriter(tmp_path / "o.safetensors", plans)
    writer.open()
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="header promised"):
        writer.write("a", torch.zeros(3))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_str_to_str_when_writing(tmp_path):
    with pytest.raises(ValueError, match="str to str"):
        write_file(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"nested": {"a": 1}})


# --------------------------------------------------------------------------- specific rejections


def _file_bytes(obj, data: bytes = b"", header_len: int | None = None) -> bytes:
    text = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


VALID = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"x": "y"}}


@pytest.mark.parametrize(
    "obj, data, reason",
    [
        ({**VALID, "a": {**VALID["a"], "dtype": "F17"}}, b"\0" * 8, "unknown dtype"),
        ({**VALID, "a": {**VALID["a"], "shape": [-2]}}, b"\0" * 8, "bad shape"),
        ({**VALID, "a": {**VALID["a"], "shape": [True, 2]}}, b"\0" * 8, "bad shape"),
        ({**VALID, "a": {**VALID["a"], "shape": [2.0]}}, b"\0" * 8, "bad shape"),
        ({**VALID, "a": {**VALID["a"], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
        ({**VALID, "a": {**VALID["a"], "data_offsets": [4, 0]}}, b"\0" * 8, "outside"),
        ({**VALID, "a": {**VALID["a"], "data_offsets": [0, 4]}}, b"\0" * 8, "needs 8"),
        ({**VALID, "a": {**VALID["a"], "data_offsets": [0]}}, b"\0" * 8, "bad data_offsets"),
        (
            {**VALID, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            "overlaps",
        ),
        ({**VALID, "__metadata__": {"x": {"y": 1}}}, b"\0" * 8, "not a string"),
        ({**VALID, "__metadata__": ["x"]}, b"\0" * 8, "__metadata__ is not an object"),
        ({**VALID, "a": 5}, b"\0" * 8, "not an object"),
        ([1, 2], b"", "not an object"),
        (b"\xc3\x28", b"", "not UTF-8"),
        (b"{" * 100000, b"", "not valid JSON"),
        (b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}', b"", "not valid JSON"),
    ],
)
def test_malformed_headers_name_the_reason(tmp_path, obj, data, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_file_bytes(obj, data))
    with pytest.raises(SafetensorsError, match=reason) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_header_length_checks(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(SafetensorsError, match="limit"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(SafetensorsError, match="runs past the end"):
        read_header(path)
    path.write_bytes(b"\0" * 5)
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(path)
    with pytest.raises(SafetensorsError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")


def test_gaps_between_tensors_are_allowed_but_reads_stay_in_bounds(tmp_path):
    obj = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}
    path = tmp_path / "gap.safetensors"
    path.write_bytes(_file_bytes(obj, b"\0\0\0\0\x07\x09\0\0"))
    with TensorReader(path) as reader:
        assert reader.read_tensor("a").tolist() == [7, 9]


# --------------------------------------------------------------------------- property-based

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _check_accepted(header: Header, file_size: int) -> None:
    """What an accepted header guarantees: every tensor inside the data section, sized by its
    shape and dtype, none overlapping, metadata str to str."""
    data_size = file_size - 8 - header.header_len
    end = 0
    for t in sorted(header.tensors.values(), key=lambda t: t.begin):
        assert t.dtype in DTYPES
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert 0 <= t.begin <= t.end <= data_size
        assert t.end - t.begin == math.prod(t.shape) * DTYPES[t.dtype].itemsize
        assert t.begin >= end
        end = t.end
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


def _parse(raw: bytes, data_size: int) -> None:
    file_size = 8 + len(raw) + data_size
    try:
        header = parse_header(raw, file_size)
    except SafetensorsError as e:
        assert e.reason
        event("rejected")
        return
    event("accepted")
    _check_accepted(header, file_size)


@settings(max_examples=1500, deadline=None)
@given(raw=st.binary(max_size=300), data_size=st.integers(0, 1 << 40))
def test_random_bytes_as_header(raw, data_size):
    _parse(raw, data_size)


@settings(max_examples=1500, deadline=None)
@given(value=_json_values, data_size=st.integers(0, 4096))
def test_random_json_as_header(value, data_size):
    _parse(json.dumps(value).encode(), data_size)


def _valid_header_dict(draw) -> tuple[dict, int]:
    n = draw(st.integers(0, 5))
    obj: dict = {}
    offset = 0
    for i in range(n):
        dtype = draw(st.sampled_from(list(DTYPES)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        size = math.prod(shape) * DTYPES[dtype].itemsize
        obj[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        obj["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    return obj, offset


_bad_numbers = st.one_of(
    st.integers(-(2**65), 2**65), st.booleans(), st.floats(), st.none(), st.text(max_size=3), st.just(2**64)
)


@st.composite
def _mutated_headers(draw):
    obj, data_size = _valid_header_dict(draw)
    keys = [k for k in obj if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(
            st.sampled_from(
                [
                    "dtype",
                    "shape",
                    "shape_item",
                    "offsets",
                    "offset_item",
                    "entry",
                    "metadata",
                    "metadata_value",
                    "drop",
                    "overlap",
                ]
            )
        )
        if what == "metadata":
            obj["__metadata__"] = draw(_json_values)
            continue
        if what == "metadata_value":
            obj["__metadata__"] = {draw(st.text(max_size=4)): draw(_json_values)}
            continue
        if not keys:
            continue
        key = draw(st.sampled_from(keys))
        entry = obj[key]
        if not isinstance(entry, dict):
            continue
        if what == "dtype":
            entry["dtype"] = draw(st.one_of(st.text(max_size=8), _bad_numbers, st.sampled_from(list(DTYPES))))
        elif what == "shape":
            entry["shape"] = draw(st.one_of(_json_values, st.lists(_bad_numbers, max_size=3)))
        elif what == "shape_item" and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(_bad_numbers)
        elif what == "offsets":
            entry["data_offsets"] = draw(st.one_of(_json_values, st.lists(_bad_numbers, max_size=3)))
        elif what == "offset_item" and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
            entry["data_offsets"][draw(st.integers(0, len(entry["data_offsets"]) - 1))] = draw(
                st.one_of(_bad_numbers, st.integers(0, data_size + 16))
            )
        elif what == "entry":
            obj[key] = draw(_json_values)
        elif what == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif what == "overlap" and len(keys) > 1:
            other = obj[draw(st.sampled_from(keys))]
            # an earlier mutation may have made the other entry's offsets any JSON value
            if isinstance(other, dict) and isinstance(other.get("data_offsets"), list):
                entry["data_offsets"] = list(other["data_offsets"])
    data_size += draw(st.integers(-16, 16))
    return obj, max(0, data_size)


@settings(max_examples=2500, deadline=None)
@given(case=_mutated_headers())
def test_mutated_valid_headers(case):
    obj, data_size = case
    _parse(json.dumps(obj).encode(), data_size)


@st.composite
def _files(draw):
    """A valid file, then mutated on disk: header length field, truncation, or flipped bytes."""
    obj, data_size = _valid_header_dict(draw)
    text = json.dumps(obj).encode()
    raw = bytearray(struct.pack("<Q", len(text)) + text + bytes(data_size))
    how = draw(st.sampled_from(["length", "truncate", "flip", "none"]))
    if how == "length":
        raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    elif how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif how == "flip" and raw:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
    return bytes(raw)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hypothesis-files")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=_files())
def test_mutated_files_on_disk(scratch, content):
    path = scratch / "case.safetensors"
    path.write_bytes(content)
    try:
        header = read_header(path)
    except SafetensorsError as e:
        assert e.reason and str(path) in str(e)
        event("rejected")
        return
    event("accepted")
    _check_accepted(header, len(content))
    with TensorReader(path, header) as reader:  # every accepted tensor can be read
        for key in header.tensors:
            reader.read_bytes(key)


@settings(max_examples=300, deadline=None)
@given(content=_files())
def test_whatever_safetensors_accepts_we_read_the_same(scratch, content):
    path = scratch / "diff.safetensors"
    path.write_bytes(content)
    try:
        with safetensors.safe_open(path, "pt") as f:
            theirs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            their_meta = f.metadata() or {}
    except Exception:
        event("safetensors rejects")
        return
    assume(all(dtype in DTYPES for dtype, _ in theirs.values()))
    event("safetensors accepts")
    header = read_header(path)
    assert {k: (t.dtype, t.shape) for k, t in header.tensors.items()} == theirs
    assert header.metadata == their_meta

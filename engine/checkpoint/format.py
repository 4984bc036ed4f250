"""The safetensors file format: dtypes, a header parser that trusts nothing, and the header a
writer puts in front of tensors it will stream (``reader`` and ``writer`` beside this use it).

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the
data section. The JSON maps each tensor key to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``__metadata__`` map of str to str.

Models are untrusted files: every number in the header is checked against the file before any
offset is believed, and nothing here ever unpickles anything.
"""

from __future__ import annotations

import gc
import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, NamedTuple

if TYPE_CHECKING:  # torch is imported on first use: reading headers must not pay its ~1 s import
    import torch

# Largest header we accept. Real SDXL headers are ~400 KB; safetensors itself caps at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGNMENT = 8


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    torch_name: str

    @property
    def torch_dtype(self) -> "torch.dtype":
        return getattr(_torch(), self.torch_name)
    is_float: bool


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("F64", 8, "float64", True),
        DType("F32", 4, "float32", True),
        DType("F16", 2, "float16", True),
        DType("BF16", 2, "bfloat16", True),
        DType("F8_E4M3", 1, "float8_e4m3fn", True),
        DType("F8_E5M2", 1, "float8_e5m2", True),
        DType("I64", 8, "int64", False),
        DType("I32", 4, "int32", False),
        DType("I16", 2, "int16", False),
        DType("I8", 1, "int8", False),
        DType("U8", 1, "uint8", False),
        DType("BOOL", 1, "bool", False),
    )
}


def _torch():
    import torch

    return torch


def dtype_name(torch_dtype: "torch.dtype") -> str:
    """The safetensors dtype name of a torch dtype (``torch.float16`` -> ``"F16"``)."""
    for d in DTYPES.values():
        if d.torch_dtype == torch_dtype:
            return d.name
    raise ValueError(f"safetensors has no dtype for {torch_dtype}")


class SafetensorsError(Exception):
    """A file that is not a well-formed safetensors file. The message names file and reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class TensorInfo(NamedTuple):
    """One tensor's entry in a header. ``begin``/``end`` are relative to the data section.

    A NamedTuple rather than a frozen dataclass: an SDXL header builds 2,500 of these per file
    and the dataclass constructor was most of the time it took to scan a folder."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_float


@dataclass
class Header:
    path: Path
    file_size: int
    header_len: int
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of ``path``. Reads only the header bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise SafetensorsError(path, f"file is {file_size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise SafetensorsError(
                    path, f"header length {header_len} is larger than the {MAX_HEADER_BYTES} byte limit"
                )
            if 8 + header_len > file_size:
                raise SafetensorsError(
                    path,
                    f"header length {header_len} runs past the end of the file ({file_size} bytes)"
                    " - the file is truncated or not safetensors",
                )
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsError(path, f"cannot read: {e.strerror or e}") from None
    return parse_header(raw, file_size, path)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects.

    An SDXL header is ~15,000 JSON containers; with torch imported every few thousand new
    containers trigger a collection that walks torch's whole object graph, which made parsing
    a header 4x slower. Nothing built here is cyclic, so nothing is leaked by waiting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_header(raw: bytes, file_size: int, path: str | os.PathLike = "<memory>") -> Header:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes."""
    with paused_gc():
        return _parse_header(raw, file_size, Path(path))


def _parse_header(raw: bytes, file_size: int, path: Path) -> Header:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SafetensorsError(path, "header is not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError includes JSONDecodeError and huge ints
        raise SafetensorsError(path, f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise SafetensorsError(path, "header JSON is not an object")

    data_size = file_size - 8 - len(raw)
    metadata = _parse_metadata(obj.pop("__metadata__", None), path)
    tensors: list[TensorInfo] = []
    for key, entry in obj.items():
        tensors.append(_parse_entry(key, entry, data_size, path))

    tensors.sort(key=lambda t: (t.begin, t.end))
    previous_end = 0
    previous_key = None
    for t in tensors:
        if t.begin < previous_end:
            raise SafetensorsError(path, f"tensor {t.key!r} overlaps tensor {previous_key!r}")
        previous_end, previous_key = t.end, t.key
    return Header(
        path=path,
        file_size=file_size,
        header_len=len(raw),
        tensors={t.key: t for t in tensors},
        metadata=metadata,
    )


def _parse_metadata(meta: object, path: Path) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise SafetensorsError(path, "__metadata__ is not an object")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise SafetensorsError(
                path,
                f"__metadata__ value for {k!r} is {type(v).__name__}, not a string"
                " (safetensors metadata must map strings to strings)",
            )
    return dict(meta)




def _parse_entry(key: str, entry: object, data_size: int, path: Path) -> TensorInfo:
    # Exact type checks (not isinstance) keep this loop fast for 2500-key SDXL headers.
    if type(entry) is not dict:
        raise SafetensorsError(path, f"entry for {key!r} is not an object")
    dtype = entry.get("dtype")
    dt = DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise SafetensorsError(path, f"tensor {key!r} has unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if type(shape) is not list:
        raise SafetensorsError(path, f"tensor {key!r} has a bad shape {shape!r}")
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise SafetensorsError(path, f"tensor {key!r} has a bad shape {shape!r}")
        numel *= d
    offsets = entry.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2:
        raise SafetensorsError(path, f"tensor {key!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    if type(begin) is not int or type(end) is not int:
        raise SafetensorsError(path, f"tensor {key!r} has bad data_offsets {offsets!r}")
    if not 0 <= begin <= end <= data_size:
        raise SafetensorsError(
            path,
            f"tensor {key!r} data [{begin}, {end}) lies outside the {data_size}-byte data section"
            " - the file is truncated or corrupt",
        )
    expected = numel * dt.itemsize
    if end - begin != expected:
        raise SafetensorsError(
            path,
            f"tensor {key!r} has {end - begin} bytes but shape {shape} of {dtype} needs {expected}",
        )
    return TensorInfo(key, dtype, tuple(shape), begin, end)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorPlan:
    """A tensor the writer will write: known before any data is computed."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def canonical_order(plans: Iterable[TensorPlan]) -> list[TensorPlan]:
    """safetensors' own order: larger item size first (keeps alignment), then by key."""
    return sorted(plans, key=lambda p: (-DTYPES[p.dtype].itemsize, p.key))


def build_header(plans: list[TensorPlan], metadata: Mapping[str, str] | None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in ``plans`` order."""
    obj: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        obj["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for p in plans:
        obj[p.key] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((-len(text)) % ALIGNMENT)
    return struct.pack("<Q", len(text)) + text

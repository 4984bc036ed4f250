"""The safetensors file format: a header parser that trusts nothing, a reader that reads one
tensor by key, and a writer that streams tensors after a header computed up front.

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
from typing import Iterable, Iterator, Mapping, NamedTuple

from typing import TYPE_CHECKING

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


def _is_int(v: object) -> bool:
    return type(v) is int  # JSON integers only: bool and float are rejected


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


class TensorReader:
    """Reads tensors of one file by key, with positional reads (no mmap, no shared offset).

    Opened read-only; safe to share across threads because ``os.pread`` takes its own offset.
    """

    def __init__(self, path: str | os.PathLike, header: Header | None = None):
        self.path = Path(path)
        self.header = header if header is not None else read_header(self.path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise SafetensorsError(self.path, f"cannot open: {e.strerror or e}") from None
        size = os.fstat(self._fd).st_size
        if size != self.header.file_size:
            os.close(self._fd)
            raise SafetensorsError(self.path, "file changed size since its header was read")
        self.bytes_read = 0

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def info(self, key: str) -> TensorInfo:
        try:
            return self.header.tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None

    def read_into(self, key: str, out: memoryview | bytearray | torch.Tensor) -> int:
        """Read the raw bytes of ``key`` into ``out`` (a byte buffer at least as long)."""
        info = self.info(key)
        view = _byte_view(out)[: info.nbytes]
        self.read_range(self.header.data_start + info.begin, view)
        return info.nbytes

    def read_range(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from absolute file ``offset``; a short read means the file shrank."""
        pread_exact(self._fd, view, offset, self.path)
        self.bytes_read += len(view)

    def read_bytes(self, key: str) -> bytes:
        buf = bytearray(self.info(key).nbytes)
        self.read_into(key, buf)
        return bytes(buf)

    def read_tensor(self, key: str) -> torch.Tensor:
        """A new CPU tensor of the stored dtype and shape."""
        info = self.info(key)
        torch = _torch()
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(key, raw)
        return raw.view(DTYPES[info.dtype].torch_dtype).reshape(info.shape)


def pread_exact(fd: int, view: memoryview, offset: int, path: str | os.PathLike) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (positional: threads may share the fd). A failed or
    short read is a SafetensorsError naming the file and the byte."""
    done, total = 0, len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise SafetensorsError(path, f"read failed at byte {offset + done}: {e.strerror or e}") from None
        if n <= 0:
            raise SafetensorsError(path, f"unexpected end of file at byte {offset + done} (file truncated?)")
        done += n


def _byte_view(out: memoryview | bytearray | torch.Tensor) -> memoryview:
    if not isinstance(out, (memoryview, bytearray, bytes)):  # a torch.Tensor
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("read buffer must be a contiguous CPU tensor")
        return memoryview(out.reshape(-1).view(_torch().uint8).numpy()).cast("B")
    return memoryview(out).cast("B")


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


class StreamingWriter:
    """Writes a safetensors file whose header is known up front, tensor by tensor, in order.

    Data goes to ``<target>.partial`` beside the target; ``commit()`` flushes, fsyncs and
    renames it into place, so the target appears only when complete. ``abort()`` removes it.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        plans: list[TensorPlan],
        metadata: Mapping[str, str] | None = None,
        temp_path: str | os.PathLike | None = None,
    ):
        self.target = Path(target)
        self.temp_path = Path(temp_path) if temp_path else partial_path(self.target)
        self.plans = list(plans)
        self.header_bytes = build_header(self.plans, metadata)
        self.total_bytes = len(self.header_bytes) + sum(p.nbytes for p in self.plans)
        self._index = 0
        self._file = None

    @property
    def tensors_written(self) -> int:
        return self._index

    def open(self, resume_tensors: int = 0) -> None:
        """Start writing; with ``resume_tensors`` > 0 keep that many tensors already in the
        temporary file (written by an earlier, interrupted run with the same plan)."""
        if resume_tensors:
            keep = len(self.header_bytes) + sum(p.nbytes for p in self.plans[:resume_tensors])
            f = open(self.temp_path, "r+b")
            head = f.read(len(self.header_bytes))
            if head != self.header_bytes or os.fstat(f.fileno()).st_size < keep:
                f.close()
                raise ValueError(f"{self.temp_path}: partial file does not match this merge plan")
            f.truncate(keep)
            f.seek(keep)
            self._file = f
            self._index = resume_tensors
            return
        self.temp_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.temp_path, "wb")
        self._file.write(self.header_bytes)

    def write(self, key: str, data: bytes | memoryview | torch.Tensor) -> None:
        plan = self.plans[self._index]
        if key != plan.key:
            raise ValueError(f"expected tensor {plan.key!r} next, got {key!r}")
        view = memoryview(data).cast("B") if isinstance(data, (bytes, bytearray, memoryview)) else _byte_view(data.contiguous())
        if len(view) != plan.nbytes:
            raise ValueError(f"tensor {key!r}: {len(view)} bytes, header promised {plan.nbytes}")
        self._file.write(view)
        self._index += 1

    def sync(self) -> None:
        """Make everything written so far durable (used for resumable progress marks)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def commit(self) -> Path:
        if self._index != len(self.plans):
            raise ValueError(f"{self._index} of {len(self.plans)} tensors written; refusing to commit")
        self.sync()
        self._file.close()
        self._file = None
        os.replace(self.temp_path, self.target)
        _fsync_dir(self.target.parent)
        return self.target

    def close(self) -> None:
        """Close without committing or deleting (leaves the partial file for a resume)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def abort(self) -> None:
        self.close()
        try:
            self.temp_path.unlink()
        except FileNotFoundError:
            pass


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a whole dict of CPU tensors atomically (for small files: tests, synthetic models)."""
    plans = canonical_order(
        TensorPlan(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()
    )
    writer = StreamingWriter(path, plans, metadata)
    writer.open()
    try:
        for p in plans:
            writer.write(p.key, tensors[p.key].detach().cpu().contiguous())
        return writer.commit()
    except BaseException:
        writer.abort()
        raise

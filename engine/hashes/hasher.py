"""Fingerprints of a model file, all computed in one sequential read of it.

File hashes users already know from A1111 and CivitAI:
  - SHA256 of the whole file; AutoV2 is its first 10 hex digits.
  - AutoV1 (A1111's legacy "model hash"): sha256 of the 0x10000 bytes at offset 0x100000, 8 hex.
  - AutoV3 (kohya/addnet): sha256 of the data section, everything after the 8-byte length and the
    JSON header (so editing metadata leaves it unchanged); shown as 12 hex.

Per component (unet, te0, te1, vae; te for SD 1.5), from the tensors the report recognised:
  - ``exact``: BLAKE3 over the component's tensors in canonical order (key without the component
    prefix, dtype, shape, digest of the raw bytes). Equal means byte-identical weights.
  - ``fp16``: the same with every value rounded to fp16 first and buffers that are not weights
    (``position_ids``) left out, so an fp32 copy, an fp16 copy and a copy saved without
    ``position_ids`` of the same weights all match. Equal means "the same weights, up to fp16".
  - NaN and Inf counts.
  - arenasys' model-toolkit 4-digit metric for SD1's CLIP (SD 1.5 ``te``, SDXL ``te0``) and the VAE.
    It is a familiar fingerprint ("0000" = the original SD1 CLIP/VAE up to fp16), not an identity.

SDXL te0 keys are compared without their leading ``transformer.`` so that te0 and SD 1.5's ``te``
use the same key names: the same CLIP weights give the same hashes in either architecture.

The file is read once, front to back, into a small pool of buffers; three threads consume every
buffer (whole-file SHA256 and AutoV1; AutoV3; per-tensor work), so on a machine with spare cores
the hashes overlap each other and the read. hashlib, blake3 and torch release the GIL on big
buffers, so these threads run in parallel.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import blake3
import torch

from engine.checkpoint.architectures import Architecture, get_architecture
from engine.checkpoint.format import DTYPES, Header, SafetensorsError, TensorInfo, read_header
from engine.checkpoint.reader import pread_exact
from engine.hashes.model import (
    CLIP_METRIC,
    VAE_METRIC,
    ComponentHashes,
    FileHashes,
    HashCancelled,
    HashError,
    MetricReference,
    ProgressFn,
    metric_string,
    relative_key,
)
from engine.library.diagnose import inspect_file
from engine.library.report import CHECKPOINT, ModelReport

CHUNK_BYTES = 8 << 20
POOL_CHUNKS = 6
PREFETCH_CHUNKS = 4  # how far ahead of the read the kernel is asked to fetch
AUTOV1_OFFSET, AUTOV1_LENGTH = 0x100000, 0x10000
_COMPONENT_TAG = b"astolfo-component-v1\0"

# (architecture, component) -> the toolkit reference that applies to it.
METRICS: dict[tuple[str, str], MetricReference] = {
    ("sd15", "te"): CLIP_METRIC,
    ("sd15", "vae"): VAE_METRIC,
    ("sdxl", "te0"): CLIP_METRIC,
    ("sdxl", "vae"): VAE_METRIC,
}


def combine_digests(records: list[tuple[str, str, tuple[int, ...], bytes]]) -> str:
    """A component hash from per-tensor ``(relative key, dtype, shape, 32-byte digest)`` records:
    BLAKE3 over the records sorted by key, each field length-prefixed so no two different
    components can produce the same byte stream."""
    h = blake3.blake3(_COMPONENT_TAG)
    for key, dtype, shape, digest in sorted(records, key=lambda r: r[0]):
        kb = key.encode("utf-8")
        db = dtype.encode("ascii")
        h.update(struct.pack("<I", len(kb)) + kb + struct.pack("<B", len(db)) + db)
        h.update(struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}q", *shape) + digest)
    return h.hexdigest()


# --------------------------------------------------------------------------- what to read


@dataclass
class _TensorJob:
    """The work for one component tensor: running digests, counts, metric sum."""

    info: TensorInfo
    cid: str
    rel_key: str
    in_fp16: bool  # counted in the fp16 hash (weights, not buffers)
    metric: bool  # summed into the component's toolkit metric
    exact: "blake3.blake3" = field(default_factory=blake3.blake3)
    fp16: "blake3.blake3 | None" = None
    nan: int = 0
    inf: int = 0
    metric_sum: float = 0.0


@dataclass
class _Piece:
    job: _TensorJob
    start: int  # byte offsets within the chunk
    stop: int


@dataclass
class _Chunk:
    offset: int  # absolute file offset
    length: int
    is_data: bool  # inside the data section (after the header)
    pieces: list[_Piece]
    buf: torch.Tensor | None = None
    pending: int = 0


@dataclass
class _Layout:
    header: Header | None
    arch: Architecture | None
    jobs: list[_TensorJob]  # in file order
    metric_refs: dict[str, MetricReference]


def _layout(path: Path, report: ModelReport | None) -> _Layout:
    try:
        header = read_header(path)
    except SafetensorsError:
        return _Layout(None, None, [], {})
    if report is None:
        report = inspect_file(path)
    if report.kind != CHECKPOINT or not report.arch:
        return _Layout(header, None, [], {})
    arch = get_architecture(report.arch)
    jobs: list[_TensorJob] = []
    metric_refs = {}
    for cid, status in report.components.items():
        comp = arch.components.get(cid)
        if comp is None or status.keys_found == 0:
            continue
        ref = METRICS.get((arch.id, cid))
        if ref is not None:
            metric_refs[cid] = ref
        for canonical, stored in report.key_map.items():
            if not canonical.startswith(comp.prefix):
                continue
            info = header.tensors.get(stored)
            if info is None:
                raise HashError(path, f"tensor {stored!r} is no longer in the file (changed since it was scanned?)")
            rel = relative_key(cid, comp.prefix, canonical)
            jobs.append(
                _TensorJob(
                    info=info,
                    cid=cid,
                    rel_key=rel,
                    in_fp16=canonical not in arch.buffers,
                    metric=ref is not None and ref.select(rel),
                )
            )
    for job in jobs:
        if job.in_fp16 and job.info.dtype != "F16":
            job.fp16 = blake3.blake3()
    jobs.sort(key=lambda j: j.info.begin)
    return _Layout(header, arch, jobs, metric_refs)


def _plan_chunks(file_size: int, layout: _Layout, chunk_bytes: int) -> list[_Chunk]:
    """Cut the file into contiguous ranges of about ``chunk_bytes``. The header is its own range;
    data ranges start at the data section and never split a tensor inside an element, so every
    piece of a tensor can be viewed as values."""
    chunks: list[_Chunk] = []
    data_start = layout.header.data_start if layout.header else 0
    pos = 0
    while pos < data_start:
        n = min(chunk_bytes, data_start - pos)
        chunks.append(_Chunk(pos, n, False, []))
        pos += n
    jobs = layout.jobs
    j = 0
    while pos < file_size:
        end = min(pos + chunk_bytes, file_size)
        pieces = []
        while j < len(jobs):
            info = jobs[j].info
            t_begin, t_end = data_start + info.begin, data_start + info.end
            if t_end <= pos:
                j += 1
                continue
            if t_begin >= end:
                break
            if t_end > end:
                itemsize = DTYPES[info.dtype].itemsize
                end = t_begin + (end - t_begin) // itemsize * itemsize
                if end <= pos:  # cannot happen for chunk_bytes >= 8; guards the loop anyway
                    end = min(pos + itemsize, file_size)
            if min(t_end, end) > max(t_begin, pos):
                pieces.append(_Piece(jobs[j], max(t_begin, pos) - pos, min(t_end, end) - pos))
            if t_end <= end:
                j += 1
            else:
                break
        chunks.append(_Chunk(pos, end - pos, layout.header is not None, pieces))
        pos = end
    return chunks


# --------------------------------------------------------------------------- per-tensor work

_NONFINITE_DIRECT = {"F16", "F32", "F64", "BF16"}


def _values(buf: torch.Tensor, start: int, stop: int, dtype: str) -> torch.Tensor:
    raw = buf[start:stop]
    itemsize = DTYPES[dtype].itemsize
    if start % itemsize:
        raw = raw.clone()
    return raw.view(DTYPES[dtype].torch_dtype)


class _TensorWork:
    """Per-tensor work on each chunk: digests, NaN/Inf counts, fp16 conversion, metric sums.

    Conversions go into scratch buffers reused from chunk to chunk: a fresh tensor per piece
    costs more in page faults than the arithmetic on it."""

    def __init__(self) -> None:
        self._f32 = torch.empty(0, dtype=torch.float32)
        self._f16 = torch.empty(0, dtype=torch.float16)

    def _scratch(self, which: str, n: int) -> torch.Tensor:
        t = getattr(self, which)
        if t.numel() < n:
            t = torch.empty(n, dtype=t.dtype)
            setattr(self, which, t)
        return t[:n]

    def __call__(self, chunk: _Chunk) -> None:
        buf = chunk.buf
        mv = memoryview(buf.numpy())
        pieces = chunk.pieces
        i = 0
        while i < len(pieces):
            # a run of contiguous pieces of one dtype gets one NaN/Inf check
            dtype = pieces[i].job.info.dtype
            k = i + 1
            while k < len(pieces) and pieces[k].job.info.dtype == dtype and pieces[k].start == pieces[k - 1].stop:
                k += 1
            run = pieces[i:k]
            if DTYPES[dtype].is_float:
                self._count_nonfinite(buf, run, dtype)
            for p in run:
                job = p.job
                job.exact.update(mv[p.start : p.stop])
                if job.fp16 is None and not job.metric:
                    continue
                v = _values(buf, p.start, p.stop, dtype)
                if dtype != "F16":
                    v = self._scratch("_f16", v.numel()).copy_(v)
                if job.fp16 is not None:
                    job.fp16.update(memoryview(v.numpy()).cast("B"))
                if job.metric:
                    x = self._scratch("_f32", v.numel()).copy_(v)
                    torch.sigmoid(x, out=x)
                    job.metric_sum += float(x.sub_(0.5).sum())
            i = k

    def _count_nonfinite(self, buf: torch.Tensor, run: list[_Piece], dtype: str) -> None:
        if run[-1].stop <= run[0].start:
            return
        vals = _values(buf, run[0].start, run[-1].stop, dtype)
        if dtype not in _NONFINITE_DIRECT:
            vals = self._scratch("_f16", vals.numel()).copy_(vals)
        lo, hi = torch.aminmax(vals)
        if math.isfinite(lo.item()) and math.isfinite(hi.item()):
            return
        for p in run:
            v = _values(buf, p.start, p.stop, dtype)
            if dtype not in _NONFINITE_DIRECT:
                v = v.to(torch.float16)
            p.job.nan += int(torch.isnan(v).sum())
            p.job.inf += int(torch.isinf(v).sum())


# --------------------------------------------------------------------------- the read pass


# With the OpenMP backend torch's thread count is per calling thread; elsewhere it is
# process-wide, and a hash lane must not throttle a merge running in the same process.
_THREAD_LOCAL_TORCH_THREADS = "parallel backend: OpenMP" in torch.__config__.parallel_info()


class _Lane(threading.Thread):
    """A consumer that sees every chunk, in order."""

    def __init__(self, name: str, work: Callable[[_Chunk], None], done: Callable[[_Chunk], None], failed: list):
        super().__init__(name=name, daemon=True)
        self.inbox: queue.Queue = queue.Queue()
        self._work = work
        self._done = done
        self._failed = failed

    def run(self) -> None:
        if _THREAD_LOCAL_TORCH_THREADS:
            # This lane's torch ops stay on its own thread: the SHA256 lanes keep the other
            # cores busy, and OpenMP workers spin-waiting beside them burn the CPU they need.
            torch.set_num_threads(1)
        while True:
            chunk = self.inbox.get()
            if chunk is None:
                return
            if not self._failed:
                try:
                    self._work(chunk)
                except BaseException as e:  # reported by the reading thread
                    self._failed.append(e)
            self._done(chunk)


def hash_file(
    path: str | os.PathLike,
    report: ModelReport | None = None,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> FileHashes:
    """Hash ``path`` in one sequential read. ``report`` (from ``inspect_file``) names the
    architecture and the stored key of each component tensor; without it the file is inspected
    here. ``on_progress(bytes_done, bytes_total)`` is called as the read advances; setting
    ``cancel`` stops the read and raises ``HashCancelled``. Raises ``HashError`` when the file
    cannot be read or changes while it is read. A file that is not safetensors still gets its
    file hashes (SHA256, AutoV1), and no AutoV3 or component hashes."""
    path = Path(path)
    layout = _layout(path, report)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise HashError(path, f"cannot open: {e.strerror or e}") from None
    try:
        st0 = os.fstat(fd)
        if layout.header is not None and st0.st_size != layout.header.file_size:
            raise HashError(path, "file changed size while it was being hashed")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        result = _read_pass(fd, path, st0.st_size, layout, on_progress, cancel, chunk_bytes)
        st1 = os.stat(path)
        if (st1.st_size, st1.st_mtime_ns) != (st0.st_size, st0.st_mtime_ns):
            raise HashError(path, "file changed while it was being hashed")
        return result
    finally:
        os.close(fd)


def _read_pass(
    fd: int,
    path: Path,
    size: int,
    layout: _Layout,
    on_progress: ProgressFn | None,
    cancel: threading.Event | None,
    chunk_bytes: int,
) -> FileHashes:
    chunk_bytes = max(chunk_bytes, 64)
    chunks = _plan_chunks(size, layout, chunk_bytes)
    sha_file = hashlib.sha256()
    sha_v1 = hashlib.sha256()
    sha_v3 = hashlib.sha256()

    def whole_file(c: _Chunk) -> None:
        view = memoryview(c.buf.numpy())[: c.length]
        sha_file.update(view)
        lo = max(c.offset, AUTOV1_OFFSET)
        hi = min(c.offset + c.length, AUTOV1_OFFSET + AUTOV1_LENGTH)
        if lo < hi:
            sha_v1.update(view[lo - c.offset : hi - c.offset])

    def data_section(c: _Chunk) -> None:
        if c.is_data:
            sha_v3.update(memoryview(c.buf.numpy())[: c.length])

    tensor_work = _TensorWork()

    def tensors(c: _Chunk) -> None:
        if c.pieces:
            tensor_work(c)

    done_q: queue.Queue = queue.Queue()
    lock = threading.Lock()

    def finished(c: _Chunk) -> None:
        with lock:
            c.pending -= 1
            last = c.pending == 0
        if last:
            done_q.put(c)

    failed: list[BaseException] = []
    works = [whole_file, tensors]
    if layout.header is not None:
        works.append(data_section)
    lanes = [_Lane(f"astolfo-hash-{w.__name__}", w, finished, failed) for w in works]
    for lane in lanes:
        lane.start()

    free = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(min(POOL_CHUNKS, max(1, len(chunks))))]
    done_bytes = 0
    in_flight = 0
    last_report = 0.0

    def collect(block: bool) -> None:
        nonlocal done_bytes, in_flight, last_report
        while True:
            try:
                c = done_q.get(timeout=0.1) if block else done_q.get_nowait()
            except queue.Empty:
                return
            free.append(c.buf)
            c.buf = None
            in_flight -= 1
            done_bytes += c.length
            now = time.monotonic()
            if on_progress is not None and (now - last_report >= 0.05 or done_bytes == size):
                last_report = now
                on_progress(done_bytes, size)
            block = False

    try:
        if on_progress is not None:
            on_progress(0, size)
        for i, c in enumerate(chunks):
            if i + PREFETCH_CHUNKS < len(chunks):
                _prefetch(fd, chunks[i + PREFETCH_CHUNKS])
            while not free:
                _check(path, cancel, failed)
                collect(block=True)
            _check(path, cancel, failed)
            buf = free.pop()
            _read_exact(fd, path, memoryview(buf.numpy())[: c.length], c.offset)
            c.buf = buf
            c.pending = len(lanes)
            in_flight += 1
            for lane in lanes:
                lane.inbox.put(c)
            collect(block=False)
        while in_flight:
            _check(path, cancel, failed)
            collect(block=True)
        _check(path, cancel, failed)
    finally:
        for lane in lanes:
            lane.inbox.put(None)
        for lane in lanes:
            lane.join()
    if on_progress is not None and done_bytes != size:
        on_progress(done_bytes, size)
    return FileHashes(
        sha256=sha_file.hexdigest(),
        autov1=sha_v1.hexdigest()[:8],
        autov3=sha_v3.hexdigest() if layout.header is not None else None,
        components=_finish_components(layout),
        size=size,
        arch=layout.arch.id if layout.arch else None,
    )


def _check(path: Path, cancel: threading.Event | None, failed: list[BaseException]) -> None:
    if failed:
        e = failed[0]
        if isinstance(e, HashError):
            raise e
        raise HashError(path, f"hashing failed: {e.__class__.__name__}: {e}") from e
    if cancel is not None and cancel.is_set():
        raise HashCancelled(path)


def _prefetch(fd: int, chunk: _Chunk) -> None:
    """Ask the kernel to start reading a later chunk now, so a cold read never waits on the disk
    while the hash threads are idle."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, chunk.offset, chunk.length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


def _read_exact(fd: int, path: Path, view: memoryview, offset: int) -> None:
    try:
        pread_exact(fd, view, offset, path)
    except SafetensorsError as e:
        raise HashError(path, e.reason) from None


def _finish_components(layout: _Layout) -> dict[str, ComponentHashes]:
    by_comp: dict[str, list[_TensorJob]] = {}
    for job in layout.jobs:
        by_comp.setdefault(job.cid, []).append(job)
    out = {}
    for cid, jobs in by_comp.items():
        exact = combine_digests([(j.rel_key, j.info.dtype, j.info.shape, j.exact.digest()) for j in jobs])
        fp16 = combine_digests(
            [
                (j.rel_key, "F16", j.info.shape, (j.fp16 if j.fp16 is not None else j.exact).digest())
                for j in jobs
                if j.in_fp16
            ]
        )
        ref = layout.metric_refs.get(cid)
        total = sum(j.metric_sum for j in jobs if j.metric) if ref else None
        out[cid] = ComponentHashes(
            exact=exact,
            fp16=fp16,
            metric=metric_string(total, ref) if ref and total is not None else None,
            nan_count=sum(j.nan for j in jobs),
            inf_count=sum(j.inf for j in jobs),
            tensors=len(jobs),
            metric_sum=total if total is not None and math.isfinite(total) else None,
        )
    order = list(layout.arch.components) if layout.arch else []
    return {cid: out[cid] for cid in sorted(out, key=lambda c: order.index(c) if c in order else len(order))}

"""The one read: every model's tensors, chunk by chunk, all models in the same pass, into fp64
Gram matrices of their deltas per component and UNet block.

Per tensor, a chunk of the same elements is read from every model (and from the reference
file, if any) into one fixed buffer; the pass widens it to fp64, subtracts the reference (or the
mean of the models, per element) and adds the deltas' products to the Gram matrix of the
tensor's group. The buffer is sized by ``budget_bytes`` whatever the number of models (chunks
shrink as models are added; on the CPU kept within the L3 cache), so memory is the buffer plus
the N x N matrices.

The next chunk is read by a thread of its own while this one is reduced. The reduction is a
*pass*: ``engine.compare.cpu_pass`` (numba kernels, each chunk split across the cores, the same
bits for any number of threads) or ``engine.compare.cuda_pass`` (the chunk uploaded from pinned
buffers, one fp64 matrix product per chunk; the same numbers to fp64 rounding).

The reference is the last row of every Gram matrix, so a group's matrix also holds the
reference's squared norm and its products with the deltas. Additions happen in a fixed order
(tensors by key, lanes fixed by element index), so reruns give the same bits. Key order is the
order safetensors writes a file's tensors in (those of one dtype), so each file is read front to
back; in architecture order the reads jumped about every file and a cold pass ran at a third of
the disk's speed.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.checkpoint.architectures import get_architecture
from engine.checkpoint.format import DTYPES, Header, SafetensorsError, read_header
from engine.compare.blocks import COMPONENTS, UNET_BLOCKS, unet_block
from engine.compare.buffers import ReadBuffers, row_layout
from engine.compare.cpu_pass import CpuPass
from engine.compare.events import BadDevice, CompareCancelled, CompareError, PassStarted, Progress
from engine.compare.streams import Windows, open_windows

_SLOTS = 4  # read buffers: the one being reduced and up to three read ahead (a cold disk's bursts)


@dataclass
class Source:
    """A model file to compare; ``key_map`` is its report's canonical -> stored key map."""

    id: str
    path: Path
    key_map: dict[str, str]


class ReadFailure(Exception):
    """A model's data could not be read mid-pass; the caller leaves it out and reruns."""

    def __init__(self, index: int, reason: str):
        self.index = index
        self.reason = reason
        super().__init__(reason)


@dataclass
class Gathered:
    """What the pass found: for each component, the models (indices into the sources) that took
    part, the Gram matrix of each group ((n + 1) x (n + 1), reference last), and per model the
    components it was left out of and why."""

    members: dict[str, list[int]] = field(default_factory=dict)
    grams: dict[str, dict[str | None, np.ndarray]] = field(default_factory=dict)  # comp -> block -> G
    left_out: dict[int, dict[str, str]] = field(default_factory=dict)
    tensors: dict[str, int] = field(default_factory=dict)  # comp -> tensors compared
    device: str = "cpu"  # where the chunks were reduced, in words


@dataclass
class _Tensor:
    key: str
    comp: str
    block: str | None
    numel: int


def _headers(sources: list[Source], reference: Source | None) -> list[Header]:
    out = []
    for s in [*sources, *([reference] if reference else [])]:
        out.append(read_header(s.path))  # a SafetensorsError here is the caller's to report
    return out


def plan_tensors(sources: list[Source], headers: list[Header], reference: Source | None,
                 skip: dict[int, dict[str, str]] | None = None):
    """The tensors to compare and, per component, the models that have every one of them with
    the expected size (the reference's, else the size most models have), less those ``skip``
    leaves out (source index -> component -> reason, e.g. NaN values the hashes found)."""
    arch = get_architecture("sdxl")
    ref_i = len(sources) if reference else None
    all_sources = [*sources, *([reference] if reference else [])]
    tensors: dict[str, list[_Tensor]] = {c: [] for c in COMPONENTS}
    have: dict[int, dict[str, int]] = {}  # source index -> key -> numel (float tensors only)
    for i, (s, h) in enumerate(zip(all_sources, headers)):
        have[i] = {}
        for key, stored in s.key_map.items():
            info = h.tensors.get(stored)
            if info is not None and DTYPES[info.dtype].is_float:
                have[i][key] = info.numel
    for key in sorted(arch.tensors):  # the order safetensors lays a file out in: reads go forward
        comp = arch.component_of(key)
        if comp not in tensors or key == arch.position_ids_key:
            continue
        if ref_i is not None:
            numel = have[ref_i].get(key)
        else:
            counts = Counter(have[i][key] for i in range(len(sources)) if key in have[i])
            numel = counts.most_common(1)[0][0] if counts else None
        if numel is None:
            continue
        block = unet_block(key) if comp == "unet" else None
        tensors[comp].append(_Tensor(key, comp, block, numel))
    members: dict[str, list[int]] = {}
    left_out: dict[int, dict[str, str]] = {}
    for comp, ts in tensors.items():
        members[comp] = []
        if not ts:
            continue
        for i in range(len(sources)):
            if skip and comp in skip.get(i, {}):
                left_out.setdefault(i, {})[comp] = skip[i][comp]
                continue
            bad = sum(1 for t in ts if have[i].get(t.key) != t.numel)
            if bad == 0:
                members[comp].append(i)
            elif bad == len(ts):
                left_out.setdefault(i, {})[comp] = f"no {comp}"
            else:
                left_out.setdefault(i, {})[comp] = f"{bad} of {len(ts)} {comp} tensors missing or of another size"
    return tensors, members, left_out


def to_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of a dtype ``engine.kernels.deltas`` does not widen itself (fp8 and the
    like; ``raw``: their bytes) as fp64, exactly, by torch."""
    import torch

    return torch.from_numpy(raw).view(DTYPES[dtype].torch_dtype).to(torch.float64).numpy()


class _Prefetch:
    """Reads the next chunks of every file in a thread of its own while chunk k is reduced, so
    that on a cold cache the disk and the cores work at the same time (the pass waited for each
    read before). The read buffers go round; a read error reaches the caller's
    ``take`` for the chunk it happened in, and leaving the ``with`` stops the thread."""

    def __init__(self, jobs: list, read: Callable[[object, ReadBuffers], None], slots: list[ReadBuffers]):
        self._jobs, self._read = jobs, read
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        for slot in slots:
            self._free.put(slot)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="astolfo-compare-read", daemon=True)

    def __enter__(self) -> "_Prefetch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def take(self) -> ReadBuffers:
        """The next chunk's buffer, once read (the chunks come in ``jobs`` order)."""
        slot, error = self._ready.get()
        if error is not None:
            raise error
        return slot

    def give_back(self, slot: ReadBuffers) -> None:
        self._free.put(slot)

    def _loop(self) -> None:
        for job in self._jobs:
            slot = None
            while slot is None:
                if self._stop.is_set():
                    return
                try:
                    slot = self._free.get(timeout=0.05)
                except queue.Empty:
                    pass
            try:
                self._read(job, slot)
            except BaseException as e:  # handed to the caller, which raises it
                self._ready.put((None, e))
                return
            self._ready.put((slot, None))


def open_pass(device: str = "cpu", threads: int | None = None):
    """The reduction for ``device`` (``cpu``, ``auto``: the first CUDA GPU when torch sees
    one, ``cuda``, ``cuda:N``); ``threads``: the CPU's, default one per core, at most the
    merge's worker count. A device that cannot be used raises BadDevice."""
    from engine.merge.backends.cpu import MAX_WORKERS, cpu_count
    from engine.merge.devices import describe, device_problem, resolve_device

    problem = device_problem(device)
    if problem:
        raise BadDevice(problem)
    if device != "cpu":
        dev = resolve_device(device)
        if dev.type == "cuda":
            from engine.compare.cuda_pass import CudaPass
            from engine.merge.backends.cuda import CudaRuntime

            return CudaPass(CudaRuntime(dev), describe(dev))
    return CpuPass(threads or min(cpu_count(), MAX_WORKERS))


def gather(
    sources: list[Source],
    reference: Source | None,
    cancel: threading.Event | None = None,
    on_event: Callable[[object], None] | None = None,
    budget_bytes: int | None = None,
    skip: dict[int, dict[str, str]] | None = None,
    threads: int | None = None,
    direct: bool | None = None,
    device: str = "cpu",
    reducer=None,
) -> Gathered:
    """Read every file once and return the Gram matrices (see the module docstring).
    ``device``/``threads``: where the chunks are reduced (``open_pass``), or ``reducer``, a pass
    made by the caller (the tests' CUDA pass over a test double), closed here either way;
    ``budget_bytes``: the read buffers and deltas (default: the pass's); ``direct``: read past
    the page cache (default: when the files would fill over half the RAM, see
    ``engine.compare.streams``)."""

    from engine.kernels.deltas import TILE
    from engine.kernels.mean import KIND

    headers = _headers(sources, reference)
    tensors, members, left_out = plan_tensors(sources, headers, reference, skip)
    all_sources = [*sources, *([reference] if reference else [])]
    ref_i = len(sources) if reference else None
    minimum = 1 if reference else 2
    active = {c: m for c, m in members.items() if len(m) >= minimum and tensors[c]}
    total = sum(t.numel * (len(active[c]) + (1 if reference else 0)) for c in active for t in tensors[c])
    done = 0
    fds: dict[int, int] = {}
    out = Gathered(members={c: list(m) for c, m in active.items()}, left_out=left_out)
    backend = reducer if reducer is not None else open_pass(device, threads)
    budget = budget_bytes or backend.budget
    windows: Windows | None = None
    try:
        out.device = backend.name
        if on_event is not None:
            on_event(PassStarted(backend.name))
        for i, s in enumerate(all_sources):
            try:
                fds[i] = os.open(s.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                if os.fstat(fds[i]).st_size != headers[i].file_size:
                    raise SafetensorsError(s.path, "file changed size since its header was read")
            except OSError as e:
                err = SafetensorsError(s.path, f"cannot open: {e.strerror or e}")
                if ref_i is not None and i == ref_i:
                    raise CompareError(f"reference {s.id}: {err}") from None
                raise ReadFailure(i, str(err)) from None
            except SafetensorsError as e:
                if ref_i is not None and i == ref_i:
                    raise CompareError(f"reference {s.id}: {e}") from None
                raise ReadFailure(i, str(e)) from None
        windows = open_windows(fds, {i: s.path for i, s in enumerate(all_sources)},
                               sum(h.file_size for h in headers), direct)
        for comp, rows in active.items():
            n = len(rows)
            readers = [*rows, *([ref_i] if ref_i is not None else [])]
            chunk = max(TILE, budget // (8 * (_SLOTS + 1) * (n + 1)))  # the read buffers and the deltas
            comp_tensors = tensors[comp]
            infos = [[headers[i].tensors[all_sources[i].key_map[t.key]] for i in readers] for t in comp_tensors]
            layouts = [row_layout([info.dtype for info in row], chunk) for row in infos]
            jobs = [(ti, start, min(chunk, t.numel - start))
                    for ti, t in enumerate(comp_tensors) for start in range(0, t.numel, chunk)]

            def read(job: tuple[int, int, int], slot: ReadBuffers) -> None:
                ti, start, m = job
                for r, i in enumerate(readers):
                    info = infos[ti][r]
                    size = DTYPES[info.dtype].itemsize
                    view = memoryview(slot.raw[r])[: m * size]
                    try:
                        windows[i].read(view, headers[i].data_start + info.begin + start * size)
                    except SafetensorsError as e:
                        if i == ref_i:
                            raise CompareError(f"reference {all_sources[i].id}: {e}") from None
                        raise ReadFailure(i, str(e)) from None
                    if info.dtype not in KIND:  # fp8 and the like: widened here, read as F64
                        slot.raw[r].view(np.float64)[:m] = to_float64(slot.raw[r][: m * size], info.dtype)

            backend.start(n, ref_i is not None, chunk)
            slots = backend.buffers(len(readers), chunk, _SLOTS)
            with _Prefetch(jobs, read, slots) as prefetch:
                for job in jobs:
                    if cancel is not None and cancel.is_set():
                        raise CompareCancelled()
                    slot = prefetch.take()
                    ti, start, m = job
                    t = comp_tensors[ti]
                    backend.add(slot, t.block, layouts[ti], start, m, prefetch.give_back)
                    done += m * len(readers)
                    if on_event is not None:
                        on_event(Progress(done, total, comp, t.key))
                backend.drain(prefetch.give_back)
            grams = backend.finish()
            out.grams[comp] = {b: grams[b] for b in (*UNET_BLOCKS, None) if b in grams}
            out.tensors[comp] = len(tensors[comp])
    finally:
        backend.close()
        if windows is not None:
            windows.close()
        for fd in fds.values():
            os.close(fd)
    return out

"""The one read: every model's tensors, chunk by chunk, all models in the same pass, into fp64
Gram matrices of their deltas per component and UNet block.

Per tensor, a chunk of the same elements is read from every model (and from the reference
file, if any) into one fixed buffer; ``engine.kernels.deltas`` widens it to fp64 and subtracts
the reference (or the mean of the models, per element) in one pass, and ``engine.kernels.gram``
adds the deltas to the Gram lanes of the tensor's group. The buffer is sized by ``budget_bytes``
whatever the number of models (chunks shrink as models are added) and kept within the L3 cache,
so memory is the buffer plus the N x N matrices.

The next chunk is read by a thread of its own while this one is reduced; the reduction's two
phases (the deltas, the Gram) are split across the cores (element ranges, blocks of pairs:
disjoint memory), each finished before the next; the bits are the same for any number of
threads.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.checkpoint.architectures import get_architecture
from engine.checkpoint.format import DTYPES, Header, SafetensorsError, read_header
from engine.compare.blocks import COMPONENTS, UNET_BLOCKS, unet_block
from engine.compare.events import CompareCancelled, CompareError, Progress
from engine.compare.streams import Windows, open_windows

DEFAULT_BUDGET = 40 << 20  # bytes of the read buffers and the fp64 deltas, whatever the number of models
_SLOTS = 4  # read buffers: the one being reduced and up to three read ahead (a cold disk's bursts)
_SPLIT = 1 << 16  # elements of a chunk (all rows) below which one thread does it: not worth a hand-off


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


class _Buffers:
    """A read buffer for one chunk: ``raw`` (a row of ``8 * chunk`` bytes for each file read,
    enough for fp64) and its three dtype views, flat, as ``engine.kernels.deltas`` takes them."""

    def __init__(self, rows: int, chunk: int):
        self.raw = np.empty((rows, chunk * 8), np.uint8)
        flat = self.raw.reshape(-1)
        self.in16, self.in32, self.in64 = flat.view(np.uint16), flat.view(np.float32), flat.view(np.float64)


def _layout(dtypes: list[str], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Each read row's kind code and where its element 0 is in that kind's view of a
    ``_Buffers`` of ``chunk`` (rows of a dtype the kernel does not widen are widened into their
    row as fp64 when read)."""
    from engine.kernels.mean import BF16, F16, F32, F64, KIND

    kinds = np.array([KIND.get(d, F64) for d in dtypes], np.int64)
    per_row = {F16: 4 * chunk, BF16: 4 * chunk, F32: 2 * chunk, F64: chunk}
    offs = np.array([r * per_row[int(k)] for r, k in enumerate(kinds)], np.int64)
    return kinds, offs


class _Prefetch:
    """Reads the next chunks of every file in a thread of its own while chunk k is reduced, so
    that on a cold cache the disk and the cores work at the same time (the pass waited for each
    read before). The read buffers go round; a read error reaches the caller's
    ``take`` for the chunk it happened in, and leaving the ``with`` stops the thread."""

    def __init__(self, jobs: list, read: Callable[[object, _Buffers], None], slots: list[_Buffers]):
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

    def take(self) -> _Buffers:
        """The next chunk's buffer, once read (the chunks come in ``jobs`` order)."""
        slot, error = self._ready.get()
        if error is not None:
            raise error
        return slot

    def give_back(self, slot: _Buffers) -> None:
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


def _span(m: int, k: int, parts: int) -> tuple[int, int]:
    """Part ``k`` of ``parts`` of the elements ``0 .. m``, cut at tile boundaries."""
    from engine.kernels.deltas import TILE

    tiles = -(-m // TILE)
    return min(m, tiles * k // parts * TILE), min(m, tiles * (k + 1) // parts * TILE)


class _Team:
    """The threads a chunk's work is split across: the caller's and ``size - 1`` workers. Each
    phase (deltas, Gram) is cut into parts that touch disjoint memory and is finished by
    every part before the next starts, so the bits do not depend on the number of threads.
    numba's kernels and the reads release the GIL."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.pool = ThreadPoolExecutor(self.size - 1, thread_name_prefix="astolfo-compare") if self.size > 1 else None

    def run(self, phase: Callable[[int], None], parts: int) -> None:
        """``phase(k)`` for every part ``k``; the first error (in part order) is raised once all
        parts have stopped, so no worker still writes into a buffer the caller reuses."""
        if self.pool is None or parts == 1:
            for k in range(parts):
                phase(k)
            return
        futures = [self.pool.submit(phase, k) for k in range(1, parts)]
        error: BaseException | None = None
        try:
            phase(0)
        except BaseException as e:
            error = e
        for f in futures:
            try:
                f.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def gather(
    sources: list[Source],
    reference: Source | None,
    cancel: threading.Event | None = None,
    on_event: Callable[[object], None] | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    skip: dict[int, dict[str, str]] | None = None,
    threads: int | None = None,
    direct: bool | None = None,
) -> Gathered:
    """Read every file once and return the Gram matrices (see the module docstring); ``threads``:
    how many share each chunk (default one per core, at most the merge's worker count);
    ``direct``: read past the page cache (default: when the files would fill over half the RAM,
    see ``engine.compare.streams``)."""

    from engine.kernels.deltas import TILE, deltas
    from engine.kernels.gram import LANES, gram_add_part, gram_finish
    from engine.kernels.mean import KIND
    from engine.merge.backends.cpu import MAX_WORKERS, cpu_count

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
    team = _Team(threads or min(cpu_count(), MAX_WORKERS))
    windows: Windows | None = None
    try:
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
            chunk = max(TILE, budget_bytes // (8 * (_SLOTS + 1) * (n + 1)))  # the read buffers and the deltas
            xs = np.empty((n + 1, chunk), np.float64)
            comp_tensors = tensors[comp]
            infos = [[headers[i].tensors[all_sources[i].key_map[t.key]] for i in readers] for t in comp_tensors]
            layouts = [_layout([info.dtype for info in row], chunk) for row in infos]
            jobs = [(ti, start, min(chunk, t.numel - start))
                    for ti, t in enumerate(comp_tensors) for start in range(0, t.numel, chunk)]

            def read(job: tuple[int, int, int], slot: _Buffers) -> None:
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

            lanes: dict[str | None, np.ndarray] = {}
            with _Prefetch(jobs, read, [_Buffers(len(readers), chunk) for _ in range(_SLOTS)]) as prefetch:
                for job in jobs:
                    if cancel is not None and cancel.is_set():
                        raise CompareCancelled()
                    slot = prefetch.take()
                    ti, start, m = job
                    t = comp_tensors[ti]
                    acc = lanes.get(t.block)
                    if acc is None:
                        acc = lanes[t.block] = np.zeros((n + 1, n + 1, LANES), np.float64)
                    kinds, offs = layouts[ti]
                    parts = team.size if m * len(readers) >= _SPLIT else 1

                    def center(k: int) -> None:
                        j0, j1 = _span(m, k, parts)
                        # a NaN/Inf (inf - inf here) reaches the delta's norm on the Gram's diagonal, where
                        # result.py leaves the model out of the component (its non-finite diagonal)
                        deltas(xs, kinds, offs, slot.in16, slot.in32, slot.in64, n, ref_i is not None, j0, j1)

                    def add(k: int) -> None:
                        gram_add_part(acc, xs[:, :m], start, k, parts)

                    team.run(center, parts)
                    prefetch.give_back(slot)  # its bytes are in xs now: the next read may go there
                    team.run(add, parts)
                    done += m * len(readers)
                    if on_event is not None:
                        on_event(Progress(done, total, comp, t.key))
            order = [b for b in (*UNET_BLOCKS, None) if b in lanes]
            out.grams[comp] = {b: gram_finish(lanes[b]) for b in order}
            out.tensors[comp] = len(tensors[comp])
    finally:
        team.close()
        if windows is not None:
            windows.close()
        for fd in fds.values():
            os.close(fd)
    return out

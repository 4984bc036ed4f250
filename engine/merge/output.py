"""Writing merge outputs: tensors streamed in order to ``<target>.partial``, durable progress
marks for resume, and the atomic rename at the end.

Each output's header (with every tensor's offsets) is computed before any data, so data is
appended in the header's order. A tensor may arrive in several parts (chunks of a large tensor);
a tensor that arrives before its turn (outputs of different dtypes order a few tensors
differently) is parked in memory until it is due.

Progress marks: after ``sync()`` (flush + fsync) the stream records in ``<target>.partial.json``
(written atomically) the plan fingerprint and how many whole tensors are durable. A resumed
merge reopens the partial with ``StreamingWriter.open(resume_tensors=n)``, which checks the
header and cuts off anything after those tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from engine.checkpoint.direct_io import DirectAppendFile, direct_wanted
from engine.checkpoint.format import TensorPlan, build_header
from engine.checkpoint.writer import StreamingWriter, partial_path
from engine.durable import write_json_atomic

SIDECAR_VERSION = 1


def sidecar_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial.json")


def read_progress(target: Path, fingerprint: str) -> int | None:
    """Whole tensors durable in ``target``'s partial file for a run with ``fingerprint``, or
    None when there is nothing usable (no sidecar, another plan, unreadable)."""
    try:
        data = json.loads(sidecar_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION or data.get("fingerprint") != fingerprint:
        return None
    n = data.get("tensors_written")
    if type(n) is not int or n < 0 or not partial_path(target).exists():
        return None
    return n


def remove_progress(target: Path) -> None:
    for p in (sidecar_path(target), partial_path(target)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass


class _ChunkedWriter(StreamingWriter):
    """A StreamingWriter that also takes a tensor in several parts, in order."""

    _part = 0  # bytes of the current tensor written so far

    def write_part(self, data: memoryview, last: bool, lent: bool = False) -> None:
        """``lent``: see ``OutputStream.put``."""
        plan = self.plans[self._index]
        if lent and isinstance(self._file, DirectAppendFile):
            self._file.write(data, lent=True)
        else:
            self._file.write(data)
        self._part += len(data)
        if last:
            if self._part != plan.nbytes:
                raise ValueError(f"tensor {plan.key!r}: {self._part} bytes written, header promised {plan.nbytes}")
            self._part = 0
            self._index += 1


class OutputStream:
    def __init__(self, target: Path, plans: list[TensorPlan], metadata: dict[str, str], fingerprint: str,
                 drop_cache: bool = True, direct: bool | None = None):
        self.target = target
        # outputs are written once and not read back: past the page cache where possible
        self.writer = _ChunkedWriter(target, plans, metadata, direct=direct_wanted() if direct is None else direct)
        self.fingerprint = fingerprint
        self.total = len(plans)
        self.skip_below = 0  # tensors already durable from an earlier run
        self._parked: dict[int, list[bytes]] = {}
        self._parked_done: set[int] = set()
        self.bytes_written = 0
        self.synced_tensors = 0
        self._dropped = 0  # output bytes already dropped from the page cache
        self.drop_cache = drop_cache  # drop written pages from the page cache (see io.drop_cache_wanted)
        self._offsets: list[int] | None = None  # data_offset's table

    @property
    def header_bytes(self) -> bytes:
        return self.writer.header_bytes

    @property
    def total_bytes(self) -> int:
        return self.writer.total_bytes

    @property
    def tensors_done(self) -> int:
        return self.writer.tensors_written

    def open(self, resume_tensors: int = 0) -> None:
        """Start the partial file (removing any old progress mark first, so a mark never
        describes a file being rewritten), or reopen it keeping ``resume_tensors`` tensors."""
        self._parked.clear()
        self._parked_done.clear()
        self.writer._part = 0
        self._dropped = 0
        if resume_tensors:
            self.writer.open(resume_tensors=resume_tensors)
            self.skip_below = resume_tensors
            self.synced_tensors = resume_tensors
        else:
            try:
                sidecar_path(self.target).unlink()
            except FileNotFoundError:
                pass
            self.writer.open()
            self.skip_below = 0
            self.synced_tensors = 0

    def put(self, index: int, data: memoryview, last: bool, lent: bool = False) -> None:
        """Part of tensor ``index`` (``last``: its final part). ``lent``: ``data`` stays unchanged
        until the ``end_batch`` after next has returned, so it may be written straight from its
        memory (engine.checkpoint.direct_io)."""
        if index < self.skip_below:
            return
        if index != self.writer.tensors_written:
            self._parked.setdefault(index, []).append(bytes(data))
            if last:
                self._parked_done.add(index)
            return
        self._write(data, last, lent)
        while self.writer.tensors_written in self._parked:
            index = self.writer.tensors_written
            parts = self._parked.pop(index)
            done = index in self._parked_done
            self._parked_done.discard(index)
            for i, part in enumerate(parts):
                self._write(memoryview(part), done and i == len(parts) - 1)
            if not done:
                break

    def _write(self, data: memoryview, last: bool, lent: bool = False) -> None:
        try:
            self.writer.write_part(data, last, lent)
        except OSError as e:  # a full disk, a file size limit: name the file
            raise _named(e, self.writer.temp_path) from None
        self.bytes_written += len(data)

    def end_batch(self) -> None:
        """The parts lent since the last call go to the disk; returns once those lent before
        the last call are written (their memory may be reused)."""
        f = self.writer._file
        if isinstance(f, DirectAppendFile):
            try:
                f.end_batch()
            except OSError as e:
                raise _named(e, self.writer.temp_path) from None

    def data_offset(self, index: int) -> int:
        """Where tensor ``index``'s bytes start in the file."""
        if self._offsets is None:
            self._offsets = [len(self.writer.header_bytes)]
            for p in self.writer.plans:
                self._offsets.append(self._offsets[-1] + p.nbytes)
        return self._offsets[index]

    def checkpoint(self) -> None:
        """Make what is written durable and record it for a resume."""
        if self.writer.tensors_written == self.synced_tensors:
            return
        try:
            self._checkpoint()
        except OSError as e:
            raise _named(e, self.writer.temp_path) from None

    def _checkpoint(self) -> None:
        self.writer.sync()
        if self.drop_cache:
            self._drop_written()
        n = self.writer.tensors_written
        write_json_atomic(sidecar_path(self.target), {
            "version": SIDECAR_VERSION,
            "fingerprint": self.fingerprint,
            "tensors_written": n,
            "tensors_total": self.total,
            "target": str(self.target),
        })
        self.synced_tensors = n

    def _drop_written(self) -> None:
        """The synced part of the output is not read again: let the kernel drop it from the
        page cache now rather than reclaim memory under pressure later."""
        f = self.writer._file
        if f is None or getattr(f, "direct", False) or not hasattr(os, "posix_fadvise"):
            return
        end = f.tell() // 4096 * 4096
        if end > self._dropped:
            try:
                os.posix_fadvise(f.fileno(), self._dropped, end - self._dropped, os.POSIX_FADV_DONTNEED)
            except OSError:
                return
            self._dropped = end

    def close(self) -> None:
        """Close, keeping the partial file and its mark (for a resume or a restart)."""
        self.writer.close()

    def commit(self) -> Path:
        try:
            path = self.writer.commit()
        except OSError as e:
            raise _named(e, self.writer.temp_path) from None
        try:
            sidecar_path(self.target).unlink()
        except FileNotFoundError:
            pass
        return path

    def abort(self) -> None:
        """Remove the partial file and its mark, even when closing fails (a full disk fails
        the last flush too)."""
        try:
            self.writer.close()
        except OSError:
            self.writer._file = None
        for path in (self.writer.temp_path, sidecar_path(self.target)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with the file it happened to (writes through a file object do not say)."""
    return OSError(e.errno, e.strerror or str(e), str(path))




def plan_fingerprint(plan, format_version: int) -> str:
    """Identifies the bytes a run will produce: sources (path, size, mtime), nodes, steps and
    every output header. A resume continues only a partial file with the same fingerprint."""
    h = hashlib.sha256()
    doc = {
        "format": format_version,
        "files": [[str(f.path), f.size, f.mtime_ns] for f in plan.files],
        "nodes": [[n.kind, n.key, list(n.shape), n.dtype, n.check_finite, list(n.factors),
                   [[s.file, s.key, s.dtype, s.offset, s.weight] for s in n.sources]]
                  + ([n.method.summary(), n.scale] if n.method is not None else []) for n in plan.nodes],
        "steps": [[s.key, s.nodes] for s in plan.steps],
        "outputs": [[str(o.path), hashlib.sha256(build_header(o.tensors, o.metadata)).hexdigest(), o.nodes]
                    for o in plan.outputs],
    }
    h.update(json.dumps(doc, sort_keys=True).encode())
    return h.hexdigest()

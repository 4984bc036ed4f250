"""Writing safetensors files: tensors streamed after a header computed up front, to a
``.partial`` file that is fsynced and renamed only when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from engine.checkpoint.direct_io import DirectAppendFile
from engine.checkpoint.format import TensorPlan, build_header, canonical_order, dtype_name
from engine.checkpoint.reader import _byte_view

if TYPE_CHECKING:  # torch is imported on first use: reading headers must not pay its ~1 s import
    import torch


class StreamingWriter:
    """Writes a safetensors file whose header is known up front, tensor by tensor, in order.

    Data goes to ``<target>.partial`` beside the target; ``commit()`` flushes, fsyncs and
    renames it into place, so the target appears only when complete. ``abort()`` removes it.
    With ``direct`` the data bypasses the page cache (``engine.checkpoint.direct_io``; where
    the file system allows it).
    """

    def __init__(
        self,
        target: str | os.PathLike,
        plans: list[TensorPlan],
        metadata: Mapping[str, str] | None = None,
        temp_path: str | os.PathLike | None = None,
        direct: bool = False,
    ):
        self.target = Path(target)
        self.temp_path = Path(temp_path) if temp_path else partial_path(self.target)
        self.plans = list(plans)
        self.header_bytes = build_header(self.plans, metadata)
        self.total_bytes = len(self.header_bytes) + sum(p.nbytes for p in self.plans)
        self._index = 0
        self._file = None
        self.direct = direct

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
            if self.direct:
                f.close()
                f = DirectAppendFile(self.temp_path, keep)
            else:
                f.truncate(keep)
                f.seek(keep)
            self._file = f
            self._index = resume_tensors
            return
        self.temp_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = DirectAppendFile(self.temp_path) if self.direct else open(self.temp_path, "wb")
        self._file.write(self.header_bytes)

    def write(self, key: str, data: bytes | memoryview | torch.Tensor) -> None:
        plan = self.plans[self._index]
        if key != plan.key:
            raise ValueError(f"expected tensor {plan.key!r} next, got {key!r}")
        view = (
            memoryview(data).cast("B")
            if isinstance(data, (bytes, bytearray, memoryview))
            else _byte_view(data.contiguous())
        )
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
    plans = canonical_order(TensorPlan(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items())
    writer = StreamingWriter(path, plans, metadata)
    writer.open()
    try:
        for p in plans:
            writer.write(p.key, tensors[p.key].detach().cpu().contiguous())
        return writer.commit()
    except BaseException:
        writer.abort()
        raise

"""Reading tensors of a safetensors file by key with positional reads (threads may share the fd)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from engine.checkpoint.format import DTYPES, Header, SafetensorsError, TensorInfo, _torch, read_header

if TYPE_CHECKING:  # torch is imported on first use: reading headers must not pay its ~1 s import
    import torch


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


def close_fds(fds: list[int]) -> None:
    """Close every descriptor, ignoring errors (closing a read-only file loses nothing)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _byte_view(out: memoryview | bytearray | torch.Tensor) -> memoryview:
    if not isinstance(out, (memoryview, bytearray, bytes)):  # a torch.Tensor
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("read buffer must be a contiguous CPU tensor")
        return memoryview(out.reshape(-1).view(_torch().uint8).numpy()).cast("B")
    return memoryview(out).cast("B")

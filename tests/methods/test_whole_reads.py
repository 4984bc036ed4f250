"""engine.methods.whole_reads: whole tensors for the statistics thread, the next one read while the
current is widened: the same values as a plain read whatever was fetched ahead, a read error
raised for the source it belongs to (naming the file), a fetch nobody asks for dropped, the
buffers kept from key to key, large tensors read in pieces."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint.format import SafetensorsError
from engine.methods import whole_reads
from engine.methods.whole_reads import WholeReads, pread_pieces
from engine.methods.widening import read_f64, widen_raw
from engine.plan.model import Source


@pytest.fixture()
def stored(tmp_path) -> tuple[Path, list[Source], np.ndarray]:
    """A file of fp16 tensors back to back (sizes 1000, 5000, 3, 5000), and their Sources."""
    rng = np.random.default_rng(3)
    sizes = [1000, 5000, 3, 5000]
    values = rng.standard_normal(sum(sizes)).astype(np.float16)
    path = tmp_path / "tensors.bin"
    path.write_bytes(b"\0" * 64 + values.tobytes())
    sources, at = [], 64
    for i, n in enumerate(sizes):
        sources.append(Source(0, f"k{i}", "F16", (n,), at))
        at += 2 * n
    return path, sources, values


def _whole(path: Path, fd: int, log: list | None = None) -> WholeReads:
    def read_raw(src, view):
        if log is not None:
            log.append(src.key)
        pread_pieces(fd, view, src.offset, path)

    return WholeReads(read_raw, widen_raw)


def _plain(fd, path, src, minus=None):
    return read_f64(fd, src, path, 0, src.nbytes // 2, minus)


def test_values_equal_a_plain_read_whatever_was_fetched_ahead(stored):
    path, sources, _ = stored
    fd = os.open(path, os.O_RDONLY)
    log: list[str] = []
    whole = _whole(path, fd, log)
    try:
        whole.then = sources[2]
        base = whole.f64(sources[1], None, "base", sources[3]).clone()
        assert torch.equal(base, _plain(fd, path, sources[1]))
        tau = whole.f64(sources[3], base, "tau")  # fetched ahead; then ``then`` is fetched
        assert torch.equal(tau, _plain(fd, path, sources[3], base))
        other = whole.f64(sources[0], None, "base")  # not what was fetched: dropped, read now
        assert torch.equal(other, _plain(fd, path, sources[0]))
        whole.close()  # the last fetch (``then`` again) ends
        assert log == ["k1", "k3", "k2", "k0", "k2"]
    finally:
        whole.close()
        os.close(fd)


def test_buffers_are_kept_from_key_to_key_and_grow_to_the_largest(stored):
    path, sources, _ = stored
    fd = os.open(path, os.O_RDONLY)
    whole = _whole(path, fd)
    try:
        first = whole.f64(sources[1], None, "tau").data_ptr()
        assert whole.f64(sources[3], None, "tau").data_ptr() == first  # same size: same memory
        assert whole.f64(sources[0], None, "tau").data_ptr() == first  # smaller: its start
        small = whole.buffer("x", torch.float64, 10).data_ptr()
        assert whole.buffer("x", torch.float64, 10 ** 5).data_ptr() != small
    finally:
        whole.close()
        os.close(fd)


def test_a_failed_fetch_ahead_is_raised_for_its_source_naming_the_file(stored, tmp_path):
    path, sources, _ = stored
    short = tmp_path / "short.bin"
    short.write_bytes(path.read_bytes()[: sources[3].offset + 10])  # k3 cut short
    fd = os.open(short, os.O_RDONLY)
    whole = _whole(short, fd)
    try:
        whole.f64(sources[1], None, "base", sources[3])
        with pytest.raises(SafetensorsError, match="short.bin.*unexpected end of file"):
            whole.f64(sources[3], None, "tau")
        whole.then = None
        whole.f64(sources[0], None, "base", sources[3])  # a failed fetch nobody asks for is dropped
        assert torch.equal(whole.f64(sources[2], None, "tau"), _plain(fd, short, sources[2]))
    finally:
        whole.close()
        os.close(fd)


def test_large_ranges_are_read_in_pieces_with_the_same_bytes(stored, monkeypatch):
    path, sources, values = stored
    monkeypatch.setattr(whole_reads, "PIECE_BYTES", 1000)  # 10000 bytes: 10 pieces
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(sources[3].nbytes)
        pread_pieces(fd, memoryview(buf), sources[3].offset, path)
        assert bytes(buf) == values[-5000:].tobytes()
        with pytest.raises(SafetensorsError, match="unexpected end of file"):
            pread_pieces(fd, memoryview(bytearray(20000)), sources[3].offset, path)
    finally:
        os.close(fd)

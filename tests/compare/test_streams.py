"""The compare pass's file windows: every byte delivered from wherever a read starts, the
read-ahead buffer used or dropped, a truncated file named, the same Gram bits with O_DIRECT
windows as through the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.checkpoint.format import SafetensorsError
from engine.compare import streams


def _window(path: Path, size: int):
    fd = os.open(path, os.O_RDONLY)
    windows = streams.Windows(streams.ThreadPoolExecutor(2))
    windows[0] = streams.FileWindow(fd, path, size, True, windows.ahead)
    return fd, windows


def _direct_here(path: Path) -> bool:
    fd, windows = _window(path, 1 << 20)
    try:
        return windows[0]._own is not None
    finally:
        windows.close()
        os.close(fd)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from .support import build_models

    folder = tmp_path_factory.mktemp("stream-models")
    return folder, build_models(folder)


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(5).integers(0, 256, 3 * (1 << 20) + 12_345, np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    if not _direct_here(path):
        pytest.skip("no O_DIRECT on this file system: the windows read through the page cache")
    return path, data


def test_every_read_gets_the_files_bytes(data_file):
    path, data = data_file
    fd, windows = _window(path, 1 << 20)
    w = windows[0]
    try:
        spans = [(0, 10), (10, 300_000), (300_000, 1_500_000), (1_500_000, len(data)), (5, 4_100),
                 (2_000_000, 2_000_001), (1 << 20, (1 << 20) + 7), (100, 3_000_000)]
        for lo, hi in spans:  # forward, across windows and read-ahead buffers, and jumps back
            out = bytearray(hi - lo)
            w.read(memoryview(out), lo)
            assert bytes(out) == data[lo:hi].tobytes(), (lo, hi)
    finally:
        windows.close()
        os.close(fd)


def test_reading_past_the_end_names_the_file(data_file):
    path, data = data_file
    fd, windows = _window(path, 1 << 20)
    try:
        with pytest.raises(SafetensorsError) as e:
            windows[0].read(memoryview(bytearray(100)), len(data) - 50)
        assert str(path) in str(e.value) and "truncated" in str(e.value)
    finally:
        windows.close()
        os.close(fd)


@pytest.mark.parametrize("with_reference", [False, True])
def test_direct_windows_give_the_page_cache_bits(models, with_reference):
    from engine.compare.gather import gather

    from .test_engine import _same_grams, _sources

    folder, paths = models
    if not _direct_here(next(iter(paths.values()))):
        pytest.skip("no O_DIRECT on this file system")
    sources = _sources([paths[n] for n in sorted(paths)])
    ref = sources.pop(0) if with_reference else None
    buffered = gather(sources, ref, direct=False)
    direct = gather(sources, ref, direct=True, threads=2)
    assert _same_grams(buffered.grams, direct.grams)

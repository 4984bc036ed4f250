"""DirectAppendFile: the bytes on disk are exactly the bytes written, in whole blocks or not,
across flushes, a reopen at an unaligned offset, and the fallbacks to buffered writes."""

from __future__ import annotations

import errno
import mmap
import os
import random

import numpy as np
import pytest

from engine.checkpoint import direct_io
from engine.checkpoint.direct_io import BLOCK, DirectAppendFile
from engine.checkpoint.format import TensorPlan
from engine.merge.output import OutputStream


def _chunks(seed: int, total: int) -> list[bytes]:
    rng = random.Random(seed)
    out, n = [], 0
    while n < total:
        size = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK + 17, 70_001])
        out.append(rng.randbytes(size))
        n += size
    return out


def test_odd_sized_writes_land_byte_for_byte(tmp_path):
    path = tmp_path / "o.bin"
    chunks = _chunks(1, 600_000)
    f = DirectAppendFile(path, stage_bytes=64 * 1024)  # a small stage: many full-stage writes
    for c in chunks:
        f.write(memoryview(c))
    assert f.tell() == sum(map(len, chunks))
    f.close()
    assert path.read_bytes() == b"".join(chunks)


def test_a_flush_leaves_the_exact_length_and_writing_goes_on(tmp_path):
    path = tmp_path / "o.bin"
    f = DirectAppendFile(path, stage_bytes=4 * BLOCK)
    f.write(b"a" * (BLOCK + 5))
    f.flush()
    os.fsync(f.fileno())
    assert path.read_bytes() == b"a" * (BLOCK + 5)  # the padded tail block was cut back
    f.write(b"b" * (2 * BLOCK))
    f.flush()
    assert path.read_bytes() == b"a" * (BLOCK + 5) + b"b" * (2 * BLOCK)
    f.write(b"c")
    f.close()
    assert path.read_bytes() == b"a" * (BLOCK + 5) + b"b" * (2 * BLOCK) + b"c"


@pytest.mark.parametrize("keep", [0, 1, BLOCK - 1, BLOCK, 5 * BLOCK + 123])
def test_reopening_keeps_the_prefix_and_cuts_the_rest(tmp_path, keep):
    path = tmp_path / "o.bin"
    old = random.Random(2).randbytes(6 * BLOCK + 999)
    path.write_bytes(old)
    f = DirectAppendFile(path, offset=keep, stage_bytes=2 * BLOCK)
    assert f.tell() == keep
    f.write(b"new" * 3000)
    f.close()
    assert path.read_bytes() == old[:keep] + b"new" * 3000


def test_reopening_past_the_end_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="short.bin"):
        DirectAppendFile(path, offset=BLOCK + 10)


def test_a_file_system_that_refuses_o_direct_at_open_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", refusing)
    path = tmp_path / "o.bin"
    f = DirectAppendFile(path)
    assert not f.direct
    f.write(b"xyz" * 5000)
    f.close()
    assert path.read_bytes() == b"xyz" * 5000


def test_a_file_system_that_refuses_the_first_direct_write_gets_buffered_writes(tmp_path, monkeypatch):
    real_pwritev = os.pwritev
    refused = []

    def refusing(fd, buffers, offset):
        if direct_io.fcntl_flags(fd) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "pwritev", refusing)
    path = tmp_path / "o.bin"
    f = DirectAppendFile(path, stage_bytes=BLOCK)
    data = random.Random(3).randbytes(3 * BLOCK + 1)
    f.write(data)
    f.close()
    assert path.read_bytes() == data
    assert not f.direct and len(refused) <= 1


def _stream(tmp_path) -> OutputStream:
    plans = [TensorPlan("a", "F16", (3,))]
    stream = OutputStream(tmp_path / "out.safetensors", plans, {}, "fingerprint", drop_cache=False)
    stream.open()
    return stream


def test_merge_outputs_are_written_past_the_page_cache(tmp_path):
    stream = _stream(tmp_path)
    f = stream.writer._file
    assert isinstance(f, DirectAppendFile)
    assert f.direct, "O_DIRECT is not available on the test's file system"
    stream.abort()


def test_the_environment_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv("ASTOLFO_DIRECT_IO", "0")
    assert not direct_io.direct_wanted()
    stream = _stream(tmp_path)
    assert not isinstance(stream.writer._file, DirectAppendFile)
    stream.abort()
    f = DirectAppendFile(tmp_path / "o.bin", direct=False)
    assert not f.direct
    f.close()


def test_a_write_error_still_releases_the_descriptor(tmp_path, monkeypatch):
    f = DirectAppendFile(tmp_path / "o.bin", stage_bytes=BLOCK)
    fd = f.fileno()

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwritev", full)
    with pytest.raises(OSError, match="No space"):
        f.write(b"x" * (2 * BLOCK))
    with pytest.raises(OSError, match="No space"):
        f.close()
    assert f.closed
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_full_stage_is_written_by_the_files_thread_while_the_next_fills(tmp_path, monkeypatch):
    import threading

    real_pwritev = os.pwritev
    release, writers = threading.Event(), []

    def slow(fd, buffers, offset):
        writers.append(threading.current_thread().name)
        assert release.wait(10)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "pwritev", slow)
    path = tmp_path / "o.bin"
    data = random.Random(4).randbytes(5 * BLOCK + 11)
    f = DirectAppendFile(path, stage_bytes=2 * BLOCK)
    f.write(data[:3 * BLOCK])  # one full stage goes to the thread; this call does not wait for it
    assert not release.is_set()
    release.set()
    f.write(data[3 * BLOCK:])
    f.close()
    assert path.read_bytes() == data
    assert writers and writers[0].startswith("direct-write")


def test_an_error_of_the_write_in_flight_is_raised_and_the_descriptor_outlives_it(tmp_path, monkeypatch):
    import time

    seen = []

    def failing(fd, data, offset):
        time.sleep(0.2)  # close() is called meanwhile: it must wait for this write
        seen.append(os.fstat(fd).st_size >= 0)  # the descriptor is still this file's
        raise OSError(errno.ENOSPC, "No space left on device")

    f = DirectAppendFile(tmp_path / "o.bin", stage_bytes=BLOCK)
    monkeypatch.setattr(direct_io.os, "pwritev", failing)
    f.write(b"x" * BLOCK)  # handed to the thread
    with pytest.raises(OSError, match="No space"):
        f.close()
    assert seen and seen[0] and f.closed


def _page_aligned(nbytes: int, seed: int):
    """A page-aligned buffer of random bytes (as the merge's output buffers are) and its mmap."""
    m = mmap.mmap(-1, nbytes)
    buf = np.frombuffer(m, np.uint8)
    buf[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return m, buf


def test_lent_bytes_on_the_block_grid_are_written_from_the_callers_memory(tmp_path, monkeypatch):
    real_pwritev = os.pwritev
    addresses = []

    def recording(fd, buffers, offset):
        addresses.extend(direct_io._address(memoryview(b)) for b in buffers)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "pwritev", recording)
    m, buf = _page_aligned(1 << 20, 5)
    path = tmp_path / "o.bin"
    f = DirectAppendFile(path, stage_bytes=16 * BLOCK)
    f.write(b"h" * 100)
    a = memoryview(buf)[100:100 + 300_000]  # its address is congruent to its file offset (100)
    f.write(a, lent=True)
    f.write(b"small")
    start = 400_000 + (f.tell() - 400_000) % BLOCK
    b = memoryview(buf)[start:start + 200_001]
    f.write(b, lent=True)
    expected = b"h" * 100 + bytes(a) + b"small" + bytes(b)
    f.end_batch()
    f.end_batch()
    buf[:] ^= 0xFF  # the lent memory is the caller's again: the file keeps what was written
    f.close()
    assert path.read_bytes() == expected
    lo = direct_io._address(memoryview(buf))
    assert any(lo <= x < lo + buf.size for x in addresses), "nothing was written from the lent buffer"
    assert f.lent_bytes >= 300_000 - 2 * BLOCK + 200_001 - 2 * BLOCK
    del a, b, buf
    m.close()


@pytest.mark.parametrize("seed", range(6))
def test_lent_and_copied_writes_in_any_mix_land_byte_for_byte(tmp_path, seed, monkeypatch):
    """Random writes (lent on the grid, lent off it, copied), batch ends and flushes; after each
    batch end the memory lent before the previous one is scribbled on, as the merge reuses it."""
    rng = random.Random(seed)
    if seed % 2:  # lend from 1 KiB: writes shorter than the bytes to the next block boundary too
        monkeypatch.setattr(direct_io, "LENT_MIN", 1024)
    m, buf = _page_aligned(16 << 20, seed)
    path = tmp_path / "o.bin"
    f = DirectAppendFile(path, stage_bytes=8 * BLOCK)  # small: the stage fills between lent writes too
    expected = bytearray()
    at, lent_now, lent_before = 0, [], []
    for _ in range(80):
        op = rng.random()
        if op < 0.5:
            lent_min = direct_io.LENT_MIN
            size = rng.choice([1, 100, 1500, BLOCK, lent_min - 1, lent_min, 20 * BLOCK + 5, 150_000])
            start = at + ((f.tell() - at) % BLOCK if rng.random() < 0.8 else rng.randrange(1, BLOCK))
            if start + size > buf.size:
                break
            f.write(memoryview(buf)[start:start + size], lent=True)
            expected += buf[start:start + size].tobytes()
            lent_now.append((start, start + size))
            at = start + size + 1
        elif op < 0.8:
            data = rng.randbytes(rng.choice([3, BLOCK - 1, 3 * BLOCK + 17, 70_001]))
            f.write(data)
            expected += data
        elif op < 0.95:
            f.end_batch()
            for lo, hi in lent_before:
                buf[lo:hi] ^= 0xFF
            lent_before, lent_now = lent_now, []
        else:
            f.flush()
            for lo, hi in lent_before + lent_now:
                buf[lo:hi] ^= 0xFF
            lent_before, lent_now = [], []
    f.close()
    assert path.read_bytes() == bytes(expected)
    assert f.lent_bytes > 0
    del buf
    m.close()


def test_a_failed_lent_write_is_raised_by_the_next_batch_end(tmp_path, monkeypatch):
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    m, buf = _page_aligned(1 << 20, 7)
    f = DirectAppendFile(tmp_path / "o.bin")
    monkeypatch.setattr(direct_io.os, "pwritev", full)
    f.write(memoryview(buf)[:500_000], lent=True)
    f.end_batch()  # handed to the file's thread
    with pytest.raises(OSError, match="No space"):
        f.end_batch()
    with pytest.raises(OSError, match="No space"):
        f.close()
    assert f.closed  # (the mmap is left to the collector: the errors' tracebacks still hold the lent views)

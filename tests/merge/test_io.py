"""engine.merge.io: readers put the right file bytes at the right buffer offsets, in item
order, whatever the number of reader threads; a stop ends a throttled read at once; errors
reach the merge thread."""

from __future__ import annotations

import os
import queue
import threading

import pytest
import torch
from merge_support import make_models, recipe_text, sdxl_output

from engine.checkpoint.format import SafetensorsError
from engine.merge.direct_reads import open_direct
from engine.merge.io import Readers, ReadThrottle, Stop, drop_cache_wanted
from engine.merge.layout import build_items
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("io")
    paths = make_models(folder / "models", 2)
    models = {f"m{i}": str(p) for i, p in enumerate(paths)}
    text = recipe_text(models, {"all": list(models)}, [sdxl_output(str(folder / "out.safetensors"))])
    return build_plan(parse_recipe(text, folder))


def _read_all(plan, readers_n: int, buffer_bytes: int = 32 << 10, direct: bool = False):
    items = build_items(plan, buffer_bytes)[:40]
    fds = [os.open(f.path, os.O_RDONLY) for f in plan.files]
    files = open_direct(fds, [f.path for f in plan.files], readers_n) if direct else None
    assert files is not None or not direct, "O_DIRECT reads are not available on this file system"
    free: queue.Queue = queue.Queue()
    for _ in range(3):
        free.put(torch.empty(buffer_bytes, dtype=torch.uint8))
    stop = threading.Event()
    reader = Readers(items, fds, plan, free, stop, readers_n, drop_cache=False, direct=files)
    reader.start()
    try:
        for item in items:
            buf = None
            while buf is None:
                reader.raise_error()
                buf = reader.take(item.index, 0.1)
            yield item, buf, fds
            free.put(buf)
    finally:
        stop.set()
        reader.join()
        if files is not None:
            files.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("readers_n,direct", [(1, False), (3, False), (1, True), (4, True)])
def test_readers_fill_buffers_with_the_file_bytes(plan, readers_n, direct):
    count = 0
    for item, buf, fds in _read_all(plan, readers_n, direct=direct):
        data = buf.numpy()
        for seg in item.segments:
            for s in seg.sources:
                expected = os.pread(fds[s.file], s.nbytes, s.file_offset)
                assert data[s.buf_offset: s.buf_offset + s.nbytes].tobytes() == expected
        count += 1
    assert count == 40


@pytest.mark.parametrize("direct", [False, True])
def test_a_truncated_source_is_an_error_naming_the_file(plan, tmp_path, direct):
    first = build_items(plan, 32 << 10)[0]
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\0" * 16)
    fd = os.open(short, os.O_RDONLY)
    free: queue.Queue = queue.Queue()
    free.put(torch.empty(32 << 10, dtype=torch.uint8))
    stop = threading.Event()
    files = open_direct([fd] * len(plan.files), [f.path for f in plan.files], 1) if direct else None
    reader = Readers([first], [fd] * len(plan.files), plan, free, stop, 1, drop_cache=False, direct=files)
    reader.start()
    try:
        reader.threads[0].join(10)
        with pytest.raises(SafetensorsError, match="unexpected end of file") as e:
            reader.raise_error()
        assert any(os.path.basename(f.path) in str(e.value) for f in plan.files)
        assert stop.is_set()
    finally:
        stop.set()
        reader.join()
        if files is not None:
            files.close()
        os.close(fd)


def test_a_throttled_read_stops_when_the_merge_does():
    throttle = ReadThrottle(rate=1.0)  # one byte a second
    stop = threading.Event()
    throttle.wait_for(1, stop)  # the first read starts at once
    stop.set()
    with pytest.raises(Stop):
        throttle.wait_for(10, stop)


def test_page_dropping_only_for_merges_bigger_than_half_the_ram():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert not drop_cache_wanted(ram // 4)
    assert drop_cache_wanted(ram)

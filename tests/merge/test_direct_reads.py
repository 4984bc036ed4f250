"""engine.merge.direct_reads: the aligned windows deliver every byte of every range, and a merge
that reads past the page cache writes the same bytes as one that reads through it."""

from __future__ import annotations

import random

import pytest
from merge_support import make_models, recipe_text, sdxl_output, sha256

from engine.merge import pipeline
from engine.merge import run as merge_run
from engine.merge.direct_reads import Range, open_direct, windows
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe


def _deliver(ranges, cap, gap, block, data: bytes) -> bytearray:
    """What the windows put in a buffer, reading ``data`` as the file."""
    dest = bytearray(max((r.dest + r.hi - r.lo for r in ranges), default=0))
    for w in windows(ranges, cap, gap, block):
        assert w.start % block == 0 and w.length % block == 0 and 0 < w.length <= cap
        assert w.need <= w.start + w.length
        chunk = data[w.start:w.start + w.length]
        for src, dst, n in w.copies:
            assert 0 <= src and src + n <= len(chunk)
            dest[dst:dst + n] = chunk[src:src + n]
    return dest


@pytest.mark.parametrize("seed", range(40))
def test_windows_deliver_every_byte_of_every_range(seed):
    rng = random.Random(seed)
    block = rng.choice([8, 64, 4096])
    cap = block * rng.choice([1, 2, 5, 40])
    gap = rng.choice([0, block, 10 * block])
    data = rng.randbytes(50_000)
    ranges, dest = [], 0
    for _ in range(rng.randint(1, 30)):
        lo = rng.randrange(0, len(data) - 1)
        hi = min(len(data), lo + rng.choice([1, 3, block - 1, block + 1, rng.randrange(1, 9000)]))
        if rng.random() < 0.2 and ranges:  # the same bytes wanted twice (a model used twice)
            lo, hi = ranges[-1].lo, ranges[-1].hi
        ranges.append(Range(lo, hi, dest))
        dest += hi - lo + rng.randrange(0, 70)
    rng.shuffle(ranges)
    got = _deliver(ranges, cap, gap, block, data)
    for r in ranges:
        assert got[r.dest:r.dest + r.hi - r.lo] == data[r.lo:r.hi]


def test_small_gaps_are_read_through_and_large_ones_skipped():
    ranges = [Range(0, 100, 0), Range(5000, 5100, 100), Range(1_000_000, 1_000_010, 200)]
    ws = windows(ranges, cap=1 << 20, gap=8192, block=4096)
    assert [(w.start, w.length) for w in ws] == [(0, 8192), (999_424, 4096)]


def test_a_merge_read_past_the_page_cache_writes_the_same_bytes(tmp_path, monkeypatch):
    paths = make_models(tmp_path / "models", 3)
    models = {f"m{i}": str(p) for i, p in enumerate(paths)}

    opened = []

    def spy(*a):
        opened.append(open_direct(*a))
        return opened[-1]

    monkeypatch.setattr(pipeline, "open_direct", spy)

    def merge(name: str, drop: bool):
        monkeypatch.setattr(merge_run, "drop_cache_wanted", lambda nbytes: drop)
        out = tmp_path / name / "mix.safetensors"
        text = recipe_text(models, {"all": list(models)}, [sdxl_output(str(out))], weights={"m1": 3})
        # small buffers: many items, chunked tensors and windows that end mid-tensor
        execute(build_plan(parse_recipe(text, tmp_path)), tuning=Tuning(buffer_bytes=96 << 10))
        return sha256(out)

    assert merge("direct", True) == merge("buffered", False)
    assert opened and all(d is not None for d in opened), "the merge did not read past the page cache"

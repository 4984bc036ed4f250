"""The whole-tensor statistics computed a key ahead on their own thread (engine.methods.stats_feed):
the same bytes as a merge that waits for each key's statistics, never more held ahead than
the bound allows, an error raised for the key it belongs to, and the thread gone on every
way out of a pass (success, error, cancel)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from merge_support import load, make_models, method_table, recipe_text, sdxl_output

from engine.merge.errors import MergeCancelled
from engine.merge.run import MergeError, execute
from engine.merge.tuning import Tuning
from engine.methods import stats_feed
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("feed-models")
    make_models(folder, 4)
    return folder


def _plan(models: Path, out: Path, method: dict, **components):
    """A recipe over models b, c, d by ``method``; ``components`` name other selections' ids
    (a selection "plain" of b and c, without a method, is there to be used)."""
    ids = {m: str(models / f"m{i}.safetensors") for i, m in enumerate("abcd")}
    text = recipe_text(ids, {"all": ["b", "c", "d"], "plain": ["b", "c"]}, [sdxl_output(str(out), "all", **components)])
    return build_plan(parse_recipe(text + method_table("all", method), out.parent))


def _stats_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "astolfo-stats"]


class _Recorder:
    """compute_stats, recording for each node computed how far ahead of the pipeline it was."""

    def __init__(self, monkeypatch, fail_on: str | None = None):
        self.real = stats_feed.compute_stats
        self.seen: list[tuple[int, int, int]] = []  # (job index, pipeline's position, elements ahead)
        self.fail_on = fail_on
        self.ahead = None
        monkeypatch.setattr(stats_feed, "compute_stats", self)
        real_start = stats_feed._Ahead.start

        def start(ahead):
            self.ahead = ahead
            real_start(ahead)

        monkeypatch.setattr(stats_feed._Ahead, "start", start)

    def __call__(self, params, key, *rest):
        ahead = self.ahead
        index = next(j.index for j in ahead.jobs if j.key == key and not j.done.is_set())
        at = ahead._at
        self.seen.append((index, at, ahead._before[index + 1] - ahead._before[min(index, at + 1)]))
        if key == self.fail_on:
            raise OSError(f"failing on purpose at {key}")
        return self.real(params, key, *rest)


def test_ahead_gives_the_bytes_of_a_merge_that_waits_and_stays_within_its_bound(models, tmp_path, monkeypatch):
    method = {"method": "ties", "base": "a", "drop": 0.1, "seed": 7}
    waited = tmp_path / "waited.safetensors"
    monkeypatch.setattr(stats_feed, "AHEAD_ELEMENTS", 0)  # nothing beyond the next node
    execute(_plan(models, waited, method), tuning=Tuning(buffer_bytes=1 << 20))
    recorder = _Recorder(monkeypatch)
    monkeypatch.setattr(stats_feed, "AHEAD_ELEMENTS", 1 << 12)
    ahead = tmp_path / "ahead.safetensors"
    # a slow consumer of the progress holds the pipeline back, so the thread gets ahead
    execute(_plan(models, ahead, method), on_event=lambda e: time.sleep(0.002),
            tuning=Tuning(buffer_bytes=256 << 10, progress_interval=0.0))
    got, want = load(ahead), load(waited)  # the recipes differ in the output's name only
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(recorder.seen) == len(recorder.ahead.jobs)
    for index, at, elements in recorder.seen:
        assert index <= at + 1 or elements <= 1 << 12, (index, at, elements)
    assert any(index > at + 1 for index, at, _ in recorder.seen)  # it did run ahead
    assert not _stats_threads()


def test_an_error_in_a_statistic_fails_the_merge_at_its_key_and_ends_the_thread(models, tmp_path, monkeypatch):
    plan = _plan(models, tmp_path / "out.safetensors", {"method": "ties", "base": "a"})
    key = next(n.key for n in plan.nodes if n.key.startswith("model.diffusion_model.output_blocks"))
    _Recorder(monkeypatch, fail_on=key)
    events: list = []
    with pytest.raises(MergeError, match="failing on purpose"):
        execute(plan, on_event=events.append)
    assert not (tmp_path / "out.safetensors").exists()
    assert not _stats_threads()


def test_cancel_while_the_thread_computes_ends_it(models, tmp_path, monkeypatch):
    plan = _plan(models, tmp_path / "out.safetensors", {"method": "tgmd", "base": "a"})
    cancel = threading.Event()
    real = stats_feed.compute_stats

    def cancelling(params, key, *rest):
        if key.startswith("model.diffusion_model.middle_block"):
            cancel.set()
        return real(params, key, *rest)

    monkeypatch.setattr(stats_feed, "compute_stats", cancelling)
    with pytest.raises(MergeCancelled):
        execute(plan, cancel=cancel)
    assert not (tmp_path / "out.safetensors").exists()
    assert not _stats_threads()


def test_past_the_page_cache_the_items_the_thread_read_are_copied_from_it(models, tmp_path, monkeypatch):
    """On a merge too big to cache the readers read past the page cache (O_DIRECT), except the
    items of keys whose statistics the thread has just read through it: same bytes either way."""
    from engine.merge import io, run

    method = {"method": "ties", "base": "a"}
    cached = tmp_path / "cached.safetensors"
    execute(_plan(models, cached, method, vae="plain"))
    ways = {"cache": 0, "direct": 0}
    real_read, real_direct = io.Readers._read, io.Readers._read_direct

    def read(self, item, buf):
        ways["cache"] += 1
        return real_read(self, item, buf)

    def read_direct(self, k, item, buf):
        ways["direct"] += 1
        return real_direct(self, k, item, buf)

    monkeypatch.setattr(io.Readers, "_read", read)
    monkeypatch.setattr(io.Readers, "_read_direct", read_direct)
    monkeypatch.setattr(run, "drop_cache_wanted", lambda nbytes: True)
    past = tmp_path / "past.safetensors"
    execute(_plan(models, past, method, vae="plain"), tuning=Tuning(buffer_bytes=64 << 10))
    got, want = load(past), load(cached)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if ways["direct"] == 0:
        pytest.skip("O_DIRECT reads are not available on this file system")
    assert ways["cache"] > 0  # the items of the ties keys, while the VAE's (a plain mean) went past it


def _readers_behind_a_slow_thread(models, tmp_path, monkeypatch) -> tuple[list[int], list[int], list[bool]]:
    """A ties merge too big to cache (as far as the merge knows) with a statistics thread slowed
    behind the readers: (items with statistics read, those read before their statistics' thread
    had read them, whether each read was a reader past the page cache)."""
    from engine.merge import io, run

    waited: list[int] = []
    early: list[int] = []
    direct: list[bool] = []
    real_read, real_compute = io.Readers._read, stats_feed.compute_stats

    def read(self, item, buf):
        direct.append(self.direct is not None)
        jobs = self.cached.__self__._cached.get(item.index, [])
        if jobs:
            waited.append(item.index)
        if not all(job.done.is_set() for job in jobs):
            early.append(item.index)
        return real_read(self, item, buf)

    def slow(*args):
        time.sleep(0.002)  # the thread behind the readers
        return real_compute(*args)

    monkeypatch.setattr(io.Readers, "_read", read)
    monkeypatch.setattr(stats_feed, "compute_stats", slow)
    monkeypatch.setattr(run, "drop_cache_wanted", lambda nbytes: True)
    execute(_plan(models, tmp_path / "out.safetensors", {"method": "ties", "base": "a"}, vae="plain"),
            tuning=Tuning(buffer_bytes=64 << 10))
    return waited, early, direct


def test_past_the_page_cache_a_reader_copies_an_item_only_once_the_thread_has_read_it(models, tmp_path, monkeypatch):
    """A reader ahead of the statistics thread would read the item from the disk and drop it
    from the cache, and the thread would read it again: it waits for the thread first."""
    waited, early, direct = _readers_behind_a_slow_thread(models, tmp_path, monkeypatch)
    if not any(direct):
        pytest.skip("O_DIRECT reads are not available on this file system")
    assert waited and early == []


def test_dropping_pages_without_o_direct_a_reader_also_waits_for_the_thread(models, tmp_path, monkeypatch):
    """Where O_DIRECT is not available the readers read through the page cache and drop the
    pages behind them: they wait for the statistics thread as well, or it would read the
    dropped pages from the disk again."""
    from engine.merge import pipeline

    monkeypatch.setattr(pipeline, "open_direct", lambda *args: None)
    waited, early, direct = _readers_behind_a_slow_thread(models, tmp_path, monkeypatch)
    assert not any(direct) and waited and early == []

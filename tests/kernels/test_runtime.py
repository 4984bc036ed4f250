"""How the kernels are loaded: warmed once in the background, the on-disk cache dropped when
any kernel source changes (numba alone would keep a kernel that inlined an old helper), and
the CPU backend staying on torch when numba is missing or ASTOLFO_CPU_KERNELS=torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels import jit, warm
from engine.merge.backends import cpu_fused
from engine.merge.layout import SourceSlice
from engine.plan.model import MEAN, Node


def test_warm_starts_once_and_compiles():
    first = warm.start()
    assert warm.start() is first
    first.join(120)
    assert warm.done.is_set()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_paused_while_the_kernels_load(monkeypatch, enabled):
    """No other thread's collection may finalize LLVM objects while warm() is inside LLVM; the
    collector comes back as it was, also when loading fails."""
    import gc

    from engine.kernels import mean

    warm.start().join(120)
    warm.wait(120)  # the process's background warm-ups are over: only this call sees the stand-in
    seen = []

    def first_kernel(*args):
        seen.append(gc.isenabled())
        raise RuntimeError("stop here")

    monkeypatch.setattr(mean, "weighted_mean", first_kernel)
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            warm.warm()
        assert seen == [False] and gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_stale_cache_is_dropped_when_a_kernel_source_changes():
    folder = jit.Path(jit.numba.njit(cache=True)(jit._probe)._cache._cache_path)
    stamp = folder / "astolfo-kernels.stamp"
    good = stamp.read_text()
    stale = folder / "floats.some_kernel-1.py311.nbi"
    other = folder / "unrelated_module.f-1.py311.nbi"  # not one of this package's modules: kept
    stale.write_bytes(b"stale")
    other.write_bytes(b"other")
    try:
        jit._drop_stale_cache()
        assert stale.exists()  # the stamp matches: nothing to drop
        stamp.write_text("an older source")
        jit._drop_stale_cache()
        assert not stale.exists() and other.exists()
        assert stamp.read_text() == good
    finally:
        stale.unlink(missing_ok=True)
        other.unlink(missing_ok=True)


def test_backend_stays_on_torch_without_numba_or_when_asked(monkeypatch):
    assert cpu_fused.wanted()
    monkeypatch.setenv(cpu_fused.ENV, "torch")
    assert not cpu_fused.wanted()
    monkeypatch.delenv(cpu_fused.ENV)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else
                        real_find_spec(name, *a))
    assert not cpu_fused.wanted()


def test_a_numba_that_fails_to_import_leaves_the_node_to_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.kernels.mean", None)  # importing it raises ImportError
    fused = cpu_fused.FusedNodes()
    node = Node(0, MEAN, "k", (4,), (), True, None, (1.0, 1.0))
    kept = [SourceSlice(0, "k", "F16", 1.0, 0, 8, 0), SourceSlice(1, "k", "F16", 1.0, 0, 8, 64)]
    buf = torch.zeros(128, dtype=torch.uint8)
    assert fused.compute(node, kept, [1.0, 1.0], {"F16": 0}, 4, buf, buf.clone()) is None


def test_overlapping_warm_ups_keep_the_collector_paused_until_the_last_ends():
    """The background warm-up and a caller's own warm() may overlap: the first to finish must
    not turn the collector back on while the other is still inside LLVM."""
    import gc

    was = gc.isenabled()
    gc.enable()
    try:
        with warm._collector_paused():
            with warm._collector_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the inner one ended; the outer is still loading
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("device, methods, started", [
    ("cpu", False, [False]), ("cpu", True, [True]), ("cuda", False, []), ("cuda:1", True, []),
])
def test_a_plan_for_the_cpu_starts_loading_the_kernels_it_calls(monkeypatch, device, methods, started):
    """build_plan starts the warm-up (the mean's kernel alone without a [methods] table), so that
    the kernels load while the plan is checked; a plan for a GPU loads none."""
    from engine.plan.planner import build_plan
    from engine.recipe.toml_file import parse_recipe

    calls = []
    monkeypatch.setattr(warm, "start", lambda methods=True: calls.append(methods))
    recipe = parse_recipe(f'name = "r"\ndevice = "{device}"\n[models]\na = "a.safetensors"\n[select]\nall = ["a"]\n'
                          + ('[methods.all]\nmethod = "ties"\n' if methods else "")
                          + '[[output]]\npath = "o.safetensors"\nunet = "all"\n', Path("/nonexistent"))
    with pytest.raises(Exception):  # the model file does not exist: the warm-up has started all the same
        build_plan(recipe)
    assert calls == started
    monkeypatch.setenv(warm.ENV, "torch")
    calls.clear()
    warm.start_for("cpu", methods)
    assert calls == []

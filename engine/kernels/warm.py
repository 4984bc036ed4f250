"""Compile the kernels a merge calls before it calls them.

A kernel compiles on its first call (seconds), or loads from numba's disk cache (tens of
milliseconds). ``start()`` does either in a daemon thread, once per process, so that a caller
can start it while a plan is checked and hashed and the merge's first item finds it ready; a
worker that gets there first waits on numba's compile lock instead of compiling twice.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ENV = "ASTOLFO_CPU_KERNELS"  # "torch": the CPU merge uses the torch kernel only
_started = threading.Lock()
_threads: dict[bool, threading.Thread] = {}  # by ``methods``: the mean's kernel alone, or every kernel
done = threading.Event()  # every kernel is loaded


def warm(methods: bool = True) -> None:
    """Compile (or load) every signature the CPU merge uses (without ``methods``: the weighted
    mean's only, which is all a merge without a ``[methods]`` table calls), with Python's cyclic
    garbage collector paused meanwhile (as it was before, after).

    Why paused: LLVM's context is one for the process and not thread-safe, and numba's compile
    lock guards numba's own work only. A collection that another thread sets off while this one
    is inside LLVM can finalize llvmlite objects (disposing their LLVM modules) at the same time.
    Merges with an empty kernel cache died that way twice in about 40 runs on one machine, inside
    libllvmlite (a segfault, and LLVM's assertion "Latch block must exists"), with no Python
    traceback; it was not reproduced on demand. With the collector paused for the seconds the
    kernels load, no other thread finalizes anything of LLVM's then."""
    with _collector_paused():
        _load_mean()
        if methods:
            _load_methods()
            done.set()


_pause_lock = threading.Lock()
_pauses = 0  # warm() calls under way (the background one and a caller's own may overlap)
_was_enabled = True


@contextmanager
def _collector_paused():
    """The collector off from the first of overlapping calls to the end of the last, then as it was."""
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def _load_mean() -> None:
    """One call of the weighted mean's kernel (one signature: the types are fixed). The first
    kernel of a process also pays for numba's own set-up, about 0.4 s of CPU."""
    from engine.kernels import mean

    u16, f32, f64 = np.zeros(8, np.uint16), np.zeros(8, np.float32), np.zeros(8, np.float64)
    one = np.zeros(1, np.int64)
    mean.weighted_mean(u16, f32, f64, one, one, np.ones(1), 1.0, 8, u16, f32, f64, one, one, True)


def _load_methods() -> None:
    """One call of each kernel of the merge methods and their statistics."""
    u16, f32, f64 = np.zeros(8, np.uint16), np.zeros(8, np.float32), np.zeros(8, np.float64)
    one = np.zeros(1, np.int64)
    from engine.kernels import methods  # the merge methods' element pass (cpu_fused.FusedNodes.method)

    methods.method_elements(u16, f32, f64, 0, 0, one, one, np.ones(1), one, np.zeros(1), np.zeros((1, 1), np.uint8),
                            0, 8, 0, 0.0, False, False, False, 0, 1, 1.0, 1.0, 1.0, 0.0, 1.0, np.zeros(1), u16, f32,
                            f64, one, one)
    from engine.kernels import gram, weiszfeld  # model stock's cosines, the geometric median's steps

    lanes = np.zeros((1, 1, gram.LANES))
    gram.gram_add(lanes, np.zeros((1, 8)), 0)
    gram.gram_finish(lanes)
    lanes = np.zeros((1, weiszfeld.LANES))
    held = [np.zeros((1, 8), t) for t in (np.uint16, np.float32, np.float64)]  # fp16 bits, fp32 where exact
    for points in held:
        weiszfeld.step(points, 0, 0, 8, np.ones(1), 1.0, np.zeros(8), lanes)
    weiszfeld.finish(lanes)
    for points in held:  # the Gram route's last pass
        weiszfeld.iterate_only(points, 0, 8, np.ones(1), 1.0, np.zeros(8))
    for points in held[:2]:
        weiszfeld.narrow_exactly(np.zeros((1, 8)), points, 0)
    weiszfeld.vote_filter(np.zeros((1, 8)), np.ones(1), True)  # and the filters the median's points go through
    from engine.kernels import median_gram  # the median's Gram route: centring, the steps on the matrix

    median_gram.center(np.zeros((1, 8)))
    median_gram.iterate(np.zeros((1, 1)), np.ones(1), 1e-6, 1, 1e-20, np.zeros(1))
    from engine.kernels import median_points  # the median's points, span by span, from the stored bytes

    for points in (np.zeros((1, 0), np.float32), np.zeros((1, 0), np.uint16)):  # held in fp32 or fp16 (or not)
        median_points.span_points(u16, f32, f64, -1, 0, one, one, 8, 0, np.ones(1), 0.0, one, False,
                                  np.zeros((1, 1), np.uint8), 0, False, np.zeros(1), False, 0, np.empty(8),
                                  np.zeros(2, np.int64), median_points.ROWS, np.zeros((1, 8)), points,
                                  0, np.zeros((1, 1, gram.LANES)))
    methods._drop(f64, 0, 0, 0.5)
    methods._keep(f64, np.zeros(1, np.uint8), 0)
    methods._trim(f64, 0.5)


def wanted() -> bool:
    """The CPU merge uses the fused kernels: numba is installed and ``ASTOLFO_CPU_KERNELS`` is not
    ``torch`` (the escape hatch, and how the benchmark and tests run the torch path side by side).
    Looked up, not imported: importing numba takes a few tenths of a second, done by ``start``."""
    if os.environ.get(ENV, "").strip().lower() == "torch":
        return False
    return importlib.util.find_spec("numba") is not None


def start_for(device: str, methods: bool) -> None:
    """``start(methods)`` when a merge on ``device`` (a recipe's ``device``) will run on the CPU
    with the fused kernels: called as its plan is built, so the kernels load while the plan is
    checked and its sources hashed, not while the merge's first items wait for them (0.4-0.6 s
    of CPU on the project's machines, a fifth of a cached 3-model merge at scale 2). ``auto``
    counts as the CPU where no NVIDIA driver is loaded (a guess without importing torch; a wrong
    one costs a background load or a later one, never a result)."""
    if device == "cpu" or (device == "auto" and not Path("/proc/driver/nvidia").exists()):
        if wanted():
            start(methods)


def start(methods: bool = True) -> threading.Thread:
    """``warm(methods)`` in a background thread, started once per process for each value of
    ``methods``; returns that thread."""
    with _started:
        thread = _threads.get(methods)
        if thread is None:
            thread = threading.Thread(target=_warm_quietly, args=(methods,), name="kernels-warm", daemon=True)
            thread.start()
            _threads[methods] = thread
        return thread


def wait(timeout: float | None = None) -> None:
    """Until every warm-up thread started so far has ended."""
    with _started:
        threads = list(_threads.values())
    for thread in threads:
        thread.join(timeout)


def _warm_quietly(methods: bool) -> None:
    try:
        warm(methods)
    except Exception:  # the first real call raises the same error where it can be reported
        pass

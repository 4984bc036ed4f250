"""The compare pass's CUDA reduction, run where no GPU exists: ``CudaPass`` over the CPU test
double of the CUDA runtime (``tests/cuda_double.py``), whose streams defer their work. That
checks the host protocol (a read buffer goes back to the reader only once its upload has run,
device buffers zeroed on the stream before use, the free memory checked before allocating) and
the torch arithmetic (widening, centring, the fp64 product) against the CPU pass; it proves
nothing about CUDA kernels themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from engine.compare.events import BadDevice, CompareError, PassStarted
from engine.compare.findings import Thresholds
from engine.compare.result import build_result

from .support import build_models, dtype_variants

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cuda_double import CudaRuntimeDouble, runtime  # noqa: E402

SMALL = 1 << 18  # a budget that cuts the larger tensors into several chunks


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare-cuda")
    return folder, build_models(folder)


def _sources(paths):
    from engine.compare.gather import Source
    from engine.library.diagnose import inspect_file

    reports = [inspect_file(p, model_id=f"m{i:02d}") for i, p in enumerate(paths)]
    return [Source(r.model_id, Path(r.path), r.key_map) for r in reports]


def _on_double(sources, ref, schedule="lazy", seed=0, budget=SMALL, card=False, **double):
    """The pass over the double; ``card``: over ``cuda_double.runtime`` (the card itself under
    ASTOLFO_TEST_CUDA=real), for the tests whose checks hold on any correct runtime."""
    from engine.compare.cuda_pass import CudaPass
    from engine.compare.gather import gather

    rt = runtime(schedule, seed) if card else CudaRuntimeDouble(schedule, seed, **double)
    return gather(sources, ref, budget_bytes=budget, reducer=CudaPass(rt, "double")), rt


def _bits(grams):
    return {c: {b: g.tobytes() for b, g in blocks.items()} for c, blocks in grams.items()}


def _close(a, b):
    """Two passes' matrices agree to fp64 rounding (relative to the diagonal's scale)."""
    assert a.keys() == b.keys()
    for c in a:
        assert a[c].keys() == b[c].keys()
        for block in a[c]:
            x, y = a[c][block], b[c][block]
            scale = np.sqrt(np.outer(np.diag(y), np.diag(y))) + 1e-300
            assert np.all(np.abs(x - y) <= 1e-12 * scale), (c, block)


@pytest.mark.parametrize("with_reference", [False, True])
def test_the_cuda_pass_gives_the_cpu_pass_numbers_under_every_schedule(models, with_reference):
    from engine.compare.gather import gather

    folder, paths = models
    sources = _sources([paths[n] for n in sorted(paths)])
    ref = sources.pop(0) if with_reference else None
    cpu = gather(sources, ref, threads=2)
    runs = [_on_double(sources, ref, schedule, seed, card=True)[0]
            for schedule, seed in (("lazy", 0), ("eager", 0), ("random", 1), ("random", 2))]
    for run in runs:
        assert run.members == cpu.members and run.tensors == cpu.tensors
        _close(run.grams, cpu.grams)
        for blocks in run.grams.values():
            for g in blocks.values():
                assert np.array_equal(g, g.T)  # cosines symmetric to the bit
    first = _bits(runs[0].grams)
    assert all(_bits(r.grams) == first for r in runs[1:])  # the schedule changes no bit
    one_chunk = _on_double(sources, ref, "random", 3, budget=256 << 20, card=True)[0]
    _close(one_chunk.grams, cpu.grams)
    ids = [s.id for s in sources]
    ref_id = ref.id if ref else None
    a = build_result(cpu, ids, ref_id, Thresholds(), [])
    b = build_result(runs[0], ids, ref_id, Thresholds(), [])
    key = [(f["code"], f["component"], f["block"], f["models"]) for f in a["findings"]]
    assert key == [(f["code"], f["component"], f["block"], f["models"]) for f in b["findings"]]


def test_the_double_catches_a_buffer_given_back_before_its_upload_ran(models, monkeypatch):
    """The protocol test can fail: a pass that hands a read buffer back without waiting for its
    event gets the reader's later bytes under the lazy schedule."""
    from engine.compare import cuda_pass
    from engine.compare.gather import gather

    folder, paths = models
    sources = _sources([paths[n] for n in sorted(paths)])
    ref = sources.pop(0)
    cpu = gather(sources, ref, threads=1)

    def careless(self, give_back):
        event, slot = self.inflight.popleft()
        give_back(slot)

    monkeypatch.setattr(cuda_pass.CudaPass, "_retire", careless)
    wrong = _on_double(sources, ref, "lazy")[0]
    with pytest.raises(AssertionError):
        _close(wrong.grams, cpu.grams)


def test_every_stored_dtype_is_widened_exactly_on_the_device(models, tmp_path):
    """fp16, bf16, fp32, fp64 and fp8 (widened on the host) give the bits of the same values
    stored as fp64: the device's widening and each row's dtype and offset are exact."""
    folder, paths = models
    stored, wide = dtype_variants(paths, tmp_path)
    for with_reference in (False, True):
        a, b = _sources(stored), _sources(wide)
        ra, rb = (a.pop(0), b.pop(0)) if with_reference else (None, None)
        assert _bits(_on_double(a, ra, "random", 5, card=True)[0].grams) == _bits(
            _on_double(b, rb, "random", 5, card=True)[0].grams)


def test_too_little_free_memory_is_said_before_anything_is_allocated(models):
    folder, paths = models
    sources = _sources([paths[n] for n in sorted(paths)])
    with pytest.raises(CompareError, match="not enough free memory.*--device cpu"):
        _on_double(sources, None, free=1 << 20)


def test_an_out_of_memory_error_mid_pass_becomes_a_compare_error(models):
    from engine.compare.cuda_pass import CudaPass
    from engine.compare.gather import gather
    from engine.kernels.deltas import TILE

    folder, paths = models
    sources = _sources([paths[n] for n in sorted(paths)])
    rows = len(sources) + 1
    chunk = max(TILE, SMALL // (8 * 5 * rows))
    # room for the first component's buffers, not for its first Gram matrix
    runtime = CudaRuntimeDouble("lazy", oom_after_bytes=2 * rows * chunk * 8 + rows * rows * 8 - 1)
    with pytest.raises(CompareError, match="ran out of memory while comparing"):
        gather(sources, None, budget_bytes=SMALL, reducer=CudaPass(runtime, "double"))
    runtime = CudaRuntimeDouble("lazy", fail_pinned=2)
    with pytest.raises(CompareError, match="cannot pin"):
        gather(sources, None, budget_bytes=SMALL, reducer=CudaPass(runtime, "double"))


def test_the_pass_says_where_it_runs_and_auto_is_the_cpu_here(models):
    import torch

    from engine.compare.cpu_pass import CpuPass
    from engine.compare.gather import gather, open_pass

    folder, paths = models
    sources = _sources([paths[n] for n in sorted(paths)])[:3]
    events = []
    gather(sources, None, on_event=events.append, device="auto")
    started = [e for e in events if isinstance(e, PassStarted)]
    if torch.cuda.is_available():
        assert started[0].device.startswith("cuda")
    else:
        assert isinstance(open_pass("auto"), CpuPass) and started[0].device.startswith("cpu (")
        with pytest.raises(BadDevice, match="no CUDA GPU"):
            open_pass("cuda")
    with pytest.raises(BadDevice, match="not one of auto, cpu, cuda"):
        open_pass("gpu")

"""CudaBackend's host logic, run on the CPU over a test double of the CUDA runtime
(``cuda_double.CudaRuntimeDouble``: deferred streams, recorded operations). Whole merges give
the CPU backend's bytes under lazy, eager and random schedules; NaN stop and skip_nan restart,
cancel, errors, out-of-memory and resume across backends behave as on the CPU; and the buffer
protocol is checked directly: reuse guarded by events, the download on its own stream, flags
read after the item's event, read buffers untouched while their item is in flight, ``close``
exactly once. What this cannot show (CUDA kernels' own bytes, real overlap, real memory) is
``scripts/gpu_check.py``'s job, on a GPU."""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import pytest
import torch
from cuda_double import CudaRuntimeDouble
from merge_support import make_models, recipe_text, sdxl_output, sha256

from engine.merge.backends.cuda import SLOTS, CudaBackend, scratch_sizes
from engine.merge.errors import MergeCancelled, MergeError
from engine.merge.layout import build_items
from engine.merge.output import sidecar_path
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

SMALL = Tuning(buffer_bytes=256 << 10, sub_elems=4096, read_buffers=3, out_buffers=2)
TINY = Tuning(buffer_bytes=64 << 10, sub_elems=1000, read_buffers=2, out_buffers=2, readers=2)
SCHEDULES = [("lazy", 0), ("eager", 0), ("random", 1), ("random", 2)]
# one stream far ahead of the others (streams in creation order: upload, compute, download)
AHEAD = [(0,), (1,), (2,), (0, 1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cuda-models")
    make_models(folder, 3)
    return folder


class Recorder:
    """A backend factory: CudaBackend over the runtime double, with every backend it made, how
    often each was closed, and a checksum check of each read buffer between submit and finish."""

    def __init__(self, schedule: str = "lazy", seed: int = 0, backend=CudaBackend, **runtime):
        self.backend_class = backend
        self.schedule, self.seed, self.runtime = schedule, seed, runtime
        self.backends: list[CudaBackend] = []
        self.closes: list[int] = []
        self.kernel_sizes: list[dict] = []
        self.rewritten: list[int] = []  # items whose read buffer changed while in flight

    def __call__(self, plan, device, tuning, items):
        rt = CudaRuntimeDouble(self.schedule, self.seed + len(self.backends), **self.runtime)
        backend = self.backend_class(plan, device, tuning.buffer_bytes, items, runtime=rt)
        index = len(self.backends)
        self.backends.append(backend)
        self.closes.append(0)
        self.kernel_sizes.append(scratch_sizes(plan, items))
        submit, finish, close = backend.submit, backend.finish, backend.close

        def checked_submit(item, read_buf, out_buf, excluded):
            handle = submit(item, read_buf, out_buf, excluded)
            handle.crc = zlib.crc32(read_buf[: item.read_bytes].numpy().tobytes())
            return handle

        def checked_finish(handle):
            bads = finish(handle)
            if zlib.crc32(handle.read_buf[: handle.item.read_bytes].numpy().tobytes()) != handle.crc:
                self.rewritten.append(handle.item.index)
            return bads

        def counted_close():
            self.closes[index] += 1
            grown = {name: t.numel() for (name, _), t in backend.kernel._bufs.items()
                     if t.numel() > max(1, self.kernel_sizes[index].get(name, 0))}
            assert not grown, f"scratch buffers grew past their computed size: {grown}"
            close()
            assert rt.pending() == 0, "work left queued after close"

        backend.submit, backend.finish, backend.close = checked_submit, checked_finish, counted_close
        return backend


def _recipe(models: Path, tmp_path: Path, out="out.safetensors", select=None, outputs=None, weights=None,
            **settings):
    ids = {"a": str(models / "m0.safetensors"), "b": str(models / "m1.safetensors"),
           "c": str(models / "m2.safetensors")}
    ids.update(settings.pop("extra_models", {}))
    select = select or {"all": ["a", "b", "c"]}
    outputs = outputs or [sdxl_output(str(tmp_path / out), "all")]
    return parse_recipe(recipe_text(ids, select, outputs, weights, **settings), tmp_path)


def _cpu_then_cuda(recipe, targets: list[Path], tuning: Tuning, recorder: Recorder) -> None:
    """Merge on the CPU backend, then with CudaBackend over the double: the same bytes."""
    execute(build_plan(recipe), tuning=tuning)
    expected = [sha256(t) for t in targets]
    for t in targets:
        t.unlink()
    execute(build_plan(recipe), tuning=tuning, backend_factory=recorder)
    assert [sha256(t) for t in targets] == expected
    assert recorder.closes == [1] * len(recorder.backends)
    assert recorder.rewritten == []


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_uniform_mean_gives_the_cpu_bytes(models, tmp_path, schedule, seed):
    recorder = Recorder(schedule, seed)
    _cpu_then_cuda(_recipe(models, tmp_path), [tmp_path / "out.safetensors"], SMALL, recorder)
    assert recorder.backends[0]._count > 10  # many items, so buffer sets and rings were reused


@pytest.mark.parametrize("ahead", AHEAD)
def test_one_stream_running_ahead_gives_the_cpu_bytes(models, tmp_path, ahead):
    recorder = Recorder("lazy", eager_streams=ahead)
    _cpu_then_cuda(_recipe(models, tmp_path), [tmp_path / "out.safetensors"], SMALL, recorder)


class _NoReuseWait(CudaBackend):
    """A broken backend for the tests below: one of the reuse waits left out."""

    skip = ""

    def _submit(self, item, read_buf, out_buf, excluded):
        real = self.rt.wait
        events = {"computed": self.computed, "downloaded": self.downloaded}[self.skip]
        stream = {"computed": self.up, "downloaded": self.compute}[self.skip]
        self.rt.wait = lambda s, e: None if (s is stream and any(e is x for x in events)) else real(s, e)
        try:
            return super()._submit(item, read_buf, out_buf, excluded)
        finally:
            self.rt.wait = real


@pytest.mark.parametrize("skip,ahead", [("computed", (0,)), ("downloaded", (0, 1))])
def test_a_buffer_reused_without_its_event_is_caught(models, tmp_path, skip, ahead):
    """The double can fail: without the wait that guards a device buffer, the stream that runs
    ahead overwrites data another stream has not consumed, and the bytes differ."""
    broken = type("Broken", (_NoReuseWait,), {"skip": skip})
    recipe = _recipe(models, tmp_path)
    execute(build_plan(recipe), tuning=SMALL)
    expected = sha256(tmp_path / "out.safetensors")
    (tmp_path / "out.safetensors").unlink()
    try:
        execute(build_plan(recipe), tuning=SMALL, backend_factory=Recorder("lazy", backend=broken, eager_streams=ahead))
    except MergeError:
        return  # garbage read as NaN: caught too
    assert sha256(tmp_path / "out.safetensors") != expected


@pytest.mark.parametrize("tuning", [TINY, SMALL, Tuning()], ids=["tiny", "small", "default"])
def test_inexact_weights_several_dtypes_and_outputs_give_the_cpu_bytes(models, tmp_path, tuning):
    # weights with too many digits for exact integer factors: products are inexact, so they
    # must be made the same way (multiply, then add) on every backend
    outputs = [sdxl_output(str(tmp_path / "o16.safetensors"), "all"),
               sdxl_output(str(tmp_path / "obf.safetensors"), "all", dtype="bf16"),
               sdxl_output(str(tmp_path / "o32.safetensors"), "all", dtype="fp32")]
    recipe = _recipe(models, tmp_path, outputs=outputs, weights={"a": 0.12345678912345678, "b": 0.7, "c": 1.987654321})
    plan = build_plan(recipe)
    assert any(not float(f).is_integer() for n in plan.nodes for f in n.factors)
    _cpu_then_cuda(recipe, [tmp_path / n for n in ("o16.safetensors", "obf.safetensors", "o32.safetensors")],
                   tuning, Recorder("random", 7))


def test_copies_integer_tensors_and_position_ids_give_the_cpu_bytes(tmp_path):
    folder = tmp_path / "models"
    write_checkpoint(folder / "a.safetensors", SynthSpec(arch="sd15", seed=1, scale=32))
    write_checkpoint(folder / "b.safetensors", SynthSpec(arch="sd15", seed=2, scale=32))
    text = recipe_text({"a": str(folder / "a.safetensors"), "b": str(folder / "b.safetensors")},
                       {"all": ["a", "b"], "one": ["a"]},
                       [{"path": str(tmp_path / "o.safetensors"), "unet": "all", "te": "one", "vae": "one"}],
                       arch="sd15")
    recorder = Recorder("lazy")
    _cpu_then_cuda(parse_recipe(text, tmp_path), [tmp_path / "o.safetensors"], TINY, recorder)
    assert len(recorder.backends[0]._arange) == 0  # released at close
    assert recorder.kernel_sizes[0]["acc"] > 0


def test_scratch_is_sized_by_its_own_use(models, tmp_path):
    one = build_plan(_recipe(models, tmp_path, select={"all": ["a"]}))  # copies only: no sum
    sizes = scratch_sizes(one, build_items(one, 1 << 20))
    assert sizes["acc"] == sizes["tmp"] == sizes["via32"] == sizes["odd_low"] == 0
    plan = build_plan(_recipe(models, tmp_path, select={"all": ["a", "b", "c"], "one": ["a"]},
                              outputs=[sdxl_output(str(tmp_path / "o.safetensors"), "all", vae="one", te0="one",
                                                  te1="one")]))
    items = build_items(plan, 16 << 10)  # large tensors cut in slices, by the cost of their sources
    sizes = scratch_sizes(plan, items)
    largest = max(seg.numel for it in items for seg in it.segments)
    assert 0 < sizes["acc"] < largest  # copies (text encoders, VAE) cut larger slices than means


def test_buffer_reuse_is_guarded_by_events_and_the_download_has_its_own_stream(models, tmp_path):
    plan = build_plan(_recipe(models, tmp_path))
    items = build_items(plan, 256 << 10)
    rt = CudaRuntimeDouble("lazy")
    b = CudaBackend(plan, torch.device("cpu"), 256 << 10, items, runtime=rt)
    assert len({id(b.up), id(b.compute), id(b.down)}) == 3
    bufs = [(b.alloc(256 << 10), b.alloc(256 << 10)) for _ in range(3)]
    handles = [b.submit(items[i], *bufs[i], {}) for i in range(3)]
    # item 2 reuses item 0's device buffers: its upload waits for item 0's compute, its compute
    # for item 0's download (GPU-side waits: the host did not block)
    waits = [e for e in rt.log if e[0] == "wait"]
    assert ("wait", b.up.name, b.computed[0].name, 1) in waits
    assert ("wait", b.compute.name, b.downloaded[0].name, 1) in waits
    assert not any(e[0] in ("host_wait", "exec") for e in rt.log)  # nothing ran: all deferred
    # item 1's compute can finish while item 0's results are still to come back
    rt.host_wait(b.computed[1])
    ran = [e for e in rt.log if e[0] == "exec"]
    down_runs = [e for e in ran if e[1] == b.down.name]
    assert [e for e in ran if e[1] == b.compute.name] and not down_runs
    # flags and results are read only after the item's event: finishing forces the download
    for h in handles:
        assert b.finish(h) == []
    assert len([e for e in rt.log if e[0] == "exec" and e[1] == b.down.name]) == 3
    b.close()
    b.close()  # a second close is harmless
    assert [e for e in rt.log if e[0] == "synchronize"] == [("synchronize",)]
    assert SLOTS < b.depth  # the events, not the host loop's depth, protect the device buffers


def test_flags_come_back_through_pinned_memory_and_position_ids_are_built_once(models, tmp_path):
    from engine.merge.arithmetic import arange_values
    from engine.merge.backends.cuda import DEPTH

    plan = build_plan(_recipe(models, tmp_path))
    rt = CudaRuntimeDouble("lazy")
    b = CudaBackend(plan, torch.device("cpu"), 256 << 10, build_items(plan, 256 << 10), runtime=rt)
    pinned_flags = [e for e in rt.log if e[0] == "pinned" and e[2] == "torch.bool"]
    assert len(pinned_flags) == DEPTH  # one per item in flight, read after that item's event
    first = b._arange_on_device("F16", 77)
    assert b._arange_on_device("F16", 77) is first and first.device == b.device
    assert torch.equal(first, arange_values("F16", 77))
    b.close()


def test_the_cuda_runtime_makes_blocking_events(monkeypatch):
    """A host thread waiting for an event sleeps (blocking) instead of spinning on a core."""
    from engine.merge.backends.cuda import CudaRuntime

    made = []
    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: made.append(kw) or object())
    CudaRuntime.__new__(CudaRuntime).event()
    assert made == [{"blocking": True}]


def test_a_host_that_reads_results_before_their_event_is_caught(models, tmp_path):
    """The double can fail: a backend that skips the wait for the item's event reads flags
    and results that the lazy schedule has not produced yet."""

    class NoWait(Recorder):
        def __call__(self, plan, device, tuning, items):
            backend = super().__call__(plan, device, tuning, items)
            backend.rt.host_wait = lambda event: None
            return backend

    recipe = _recipe(models, tmp_path)
    with pytest.raises(MergeError, match="NaN/Inf"):
        execute(build_plan(recipe), tuning=SMALL, backend_factory=NoWait("lazy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_nan_stops_naming_model_and_key_and_leaves_nothing(models, tmp_path):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=8, scale=64, nan_in=("te1",)))
    recipe = _recipe(models, tmp_path, select={"all": ["a", "n", "b"]}, extra_models={"n": str(nan)})
    recorder = Recorder("random", 3)
    with pytest.raises(MergeError) as info:
        execute(build_plan(recipe), tuning=SMALL, backend_factory=recorder)
    assert info.value.model_id == "n" and info.value.key.startswith("conditioner.embedders.1.")
    assert "nan.safetensors" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]
    assert recorder.closes == [1]


@pytest.mark.parametrize("schedule,seed", [("lazy", 0), ("random", 5)])
def test_skip_nan_restarts_with_a_new_backend_and_gives_the_cpu_bytes(models, tmp_path, schedule, seed):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=8, scale=64, nan_in=("unet",)))
    recipe = _recipe(models, tmp_path, select={"all": ["a", "n", "b"]}, extra_models={"n": str(nan)},
                     skip_nan=True)
    recorder = Recorder(schedule, seed)
    _cpu_then_cuda(recipe, [tmp_path / "out.safetensors"], SMALL, recorder)
    assert len(recorder.backends) > 2  # restarts: one backend per pass, each closed once


def test_huge_finite_values_are_not_nan(tmp_path):
    """A copy of a bf16 model holding 3e38 (finite) is not reported as NaN/Inf, on either
    backend (a sum in fp32 overflowed and blamed the model)."""
    from safetensors.torch import load_file, save_file

    src = write_checkpoint(tmp_path / "src.safetensors", SynthSpec(seed=3, scale=64, dtype="BF16"))
    tensors = load_file(str(src))
    huge = [k for k, v in tensors.items() if k.startswith("first_stage_model.") and v.is_floating_point()]
    for k in huge:
        tensors[k] = torch.full_like(tensors[k], 3e38)
    save_file(tensors, str(tmp_path / "big.safetensors"))
    text = recipe_text({"a": str(tmp_path / "big.safetensors")}, {"one": ["a"]},
                       [sdxl_output(str(tmp_path / "o.safetensors"), "one", dtype="bf16")])
    recipe = parse_recipe(text, tmp_path)
    for factory in (None, Recorder("lazy")):
        execute(build_plan(recipe), tuning=SMALL, backend_factory=factory)
        out = load_file(str(tmp_path / "o.safetensors"))
        assert all(torch.equal(out[k], tensors[k]) for k in huge)


def test_cancel_closes_once_and_leaves_nothing(models, tmp_path):
    cancel = threading.Event()
    recorder = Recorder("lazy")

    def on_event(e):
        if e.type == "progress" and e.stage == "merging" and e.bytes_done > 0:
            cancel.set()

    tuning = Tuning(buffer_bytes=128 << 10, sub_elems=4096, progress_interval=0.0)
    with pytest.raises(MergeCancelled):
        execute(build_plan(_recipe(models, tmp_path)), on_event=on_event, cancel=cancel, tuning=tuning,
                backend_factory=recorder)
    assert list(tmp_path.iterdir()) == []
    assert recorder.closes == [1] and recorder.rewritten == []


def test_out_of_memory_while_computing_is_a_clear_error_and_the_cause_survives_cleanup(models, tmp_path):
    recorder = Recorder("lazy", fail_run=40)
    original = CudaRuntimeDouble.synchronize

    def sticky(self):  # a device that also fails at cleanup (a sticky error)
        original(self)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (sticky)")

    events: list = []
    CudaRuntimeDouble.synchronize = sticky
    try:
        with pytest.raises(MergeError) as info:
            execute(build_plan(_recipe(models, tmp_path)), on_event=events.append, tuning=SMALL,
                    backend_factory=recorder)
    finally:
        CudaRuntimeDouble.synchronize = original
    message = str(info.value)
    assert "not enough free memory" in message and "GB free of" in message and "needed" in message
    assert "Close other programs that use the GPU" in message and 'device = "cpu"' in message
    assert "illegal memory access" not in message
    assert events[-1].type == "failed" and events[-1].message == message
    assert list(tmp_path.iterdir()) == []
    assert recorder.closes == [1]


def test_out_of_memory_at_start_is_a_clear_error_and_frees_what_it_had(models, tmp_path):
    recorder = Recorder("lazy", oom_after_bytes=300 << 10)  # room for one device buffer of two
    with pytest.raises(MergeError, match="not enough free memory.*allocating its buffers"):
        execute(build_plan(_recipe(models, tmp_path)), tuning=SMALL, backend_factory=recorder)
    assert list(tmp_path.iterdir()) == [] and recorder.backends == []
    # too little free memory: refused before any allocation, with the figures
    rt = CudaRuntimeDouble("lazy", free=1 << 20, total=8 << 30)
    plan = build_plan(_recipe(models, tmp_path))
    with pytest.raises(MergeError, match=r"0\.00 GB free of 8\.59 GB, about 0\.\d\d GB needed") as info:
        CudaBackend(plan, torch.device("cpu"), 256 << 10, build_items(plan, 256 << 10), runtime=rt)
    assert "checked before the merge started" in str(info.value)
    assert not any(e[0] == "alloc" for e in rt.log)


def test_a_failed_pinned_allocation_still_closes_the_backend(models, tmp_path):
    recorder = Recorder("lazy", fail_pinned=6)  # 3 flag buffers in the constructor, then the pipeline's
    with pytest.raises(MergeError, match="cannot pin .* MB more of host memory.*device = \"cpu\""):
        execute(build_plan(_recipe(models, tmp_path)), tuning=SMALL, backend_factory=recorder)
    assert recorder.closes == [1] and list(tmp_path.iterdir()) == []


class _Kill(BaseException):
    """Ends a merge the way kill -9 does for its files: no cleanup runs (it is none of the
    exceptions the run handles), so the partial files and their progress marks stay."""


@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_on_the_other_backend_gives_identical_bytes(models, tmp_path, first, then):
    recipe = _recipe(models, tmp_path)
    target = tmp_path / "out.safetensors"
    execute(build_plan(recipe), tuning=SMALL)
    reference = sha256(target)
    target.unlink()
    tuning = Tuning(buffer_bytes=128 << 10, sub_elems=4096, progress_interval=0.0, sync_bytes=64 << 10,
                    sync_seconds=0.0)

    def on_event(e):
        if e.type == "progress" and sidecar_path(target).exists() and e.tensors_done > 50:
            raise _Kill()

    factory = {"cuda": Recorder("random", 11), "cpu": None}
    with pytest.raises(_Kill):
        execute(build_plan(recipe), on_event=on_event, tuning=tuning, backend_factory=factory[first])
    assert sidecar_path(target).exists() and not target.exists()
    events: list = []
    execute(build_plan(recipe), on_event=events.append, resume=True, tuning=SMALL, backend_factory=factory[then])
    started = next(e for e in events if e.type == "started")
    assert started.resumed_tensors > 0
    assert sha256(target) == reference

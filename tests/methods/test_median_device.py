"""The geometric median on a CUDA device (``engine.methods.median_device``), checked where no GPU
exists: its kernels' source compiled for this CPU (``cuda_host_kernels``) gives the bits of the
CPU route's numba kernels, one accumulator for one accumulator; a CUDA merge over the runtime's
test double holds the points on the "device" and writes the CPU merge's bytes, for both routes
and the three held types; a key that does not fit the device's budget, or kernels that cannot
be compiled, take the CPU route with the same bytes; NaN follows the policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_double import ON_THE_CARD, CudaRuntimeDouble, runtime
from cuda_host_kernels import available, compile_kernels
from merge_support import method_table, recipe_text, sdxl_output

from engine.kernels.gram import LANES, gram_add
from engine.kernels.median_gram import center
from engine.kernels.weiszfeld import iterate_only, step
from engine.merge import run as merge_run
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.methods import median, median_device
from engine.methods.median_device import KERNELS, SOURCE
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

# the double runs the kernels' source compiled for this CPU (g++); on a card (bench/gpu_check.sh) NVRTC's
needs_kernels = pytest.mark.skipif(not available() and not ON_THE_CARD,
                                   reason="g++ is needed to run the CUDA kernels' source on the CPU")

SMALL = Tuning(buffer_bytes=256 << 10, sub_elems=4096, read_buffers=3, out_buffers=2)
TYPES = {"f16": np.uint16, "f32": np.float32, "f64": np.float64}


@pytest.fixture(scope="module", params=["host", "card"])
def kernels(request) -> tuple[dict, str]:
    """The kernels and the device their tensors live on: the source compiled for this CPU, or
    by NVRTC for the card (``ASTOLFO_TEST_CUDA=real``, bench/gpu_check.sh)."""
    if request.param == "host":
        if not available():
            pytest.skip("g++ is needed to run the CUDA kernels' source on the CPU")
        return compile_kernels(SOURCE, KERNELS), "cpu"
    if not ON_THE_CARD:
        pytest.skip("needs a CUDA card and ASTOLFO_TEST_CUDA=real")
    from engine.merge.backends.cuda import CudaRuntime

    return CudaRuntime(torch.device("cuda", torch.cuda.current_device())).compile(SOURCE, KERNELS), "cuda"


def _points(kind: str, count: int, n: int, seed: int = 0) -> np.ndarray:
    """Points near each other and far from 0 (as deltas are not, as models are), every value
    finite: fp16 as its bits, with zeros, signed zeros and subnormals among them."""
    rng = np.random.default_rng(seed)
    x = 0.3 + rng.standard_normal((count, n)) * 0.02
    x[:, ::97] = 0.0
    x[:, 5::101] = -0.0
    x[:, 7::103] = 3e-6  # an fp16 subnormal
    if kind == "f16":
        return x.astype(np.float16).view(np.uint16)
    return x.astype(TYPES[kind])


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16) if a.dtype == np.uint16 else a).contiguous()


def _launch(kernels: tuple[dict, str], name: str, threads: int, args: list, out: int) -> np.ndarray:
    """Kernel ``name`` over ``threads`` threads with ``args`` on the kernels' device, and a
    result of ``out`` fp64 values appended; the result's bits."""
    found, device = kernels
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    got = torch.empty(out, dtype=torch.float64, device=device)
    found[name](grid=(-(-threads // 256), 1, 1), block=(256, 1, 1), args=moved + [got])
    return got.cpu().numpy().view(np.int64)


@pytest.mark.parametrize("kind", list(TYPES))
def test_the_iterate_kernel_is_the_cpu_routes_iterate(kernels, kind):
    count, n = 7, 1003
    held = _points(kind, count, n)
    coef = np.random.default_rng(1).random(count) * 3
    total = float(coef.sum())
    want = np.empty(n)
    iterate_only(held, 0, n, coef, total, want)
    got = _launch(kernels, f"iterate_{kind}", n, [_tensor(held), count, n, torch.from_numpy(coef), total], n)
    assert got.tolist() == want.view(np.int64).tolist()


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("count", [3, 9])
def test_the_distance_lanes_are_the_cpu_routes_lanes_span_by_span(kernels, kind, count):
    n, span = 1003, 96  # spans of a multiple of 8 elements, the last one short
    held = _points(kind, count, n, seed=count)
    coef = np.random.default_rng(2).random(count)
    total = float(coef.sum())
    m = np.empty(n)
    spans = [(a, min(n, a + span)) for a in range(0, n, span)]
    want = np.zeros((len(spans), count, LANES))
    for s, (a, b) in enumerate(spans):
        step(held, a, a, b - a, coef, total, m[a:b], want[s])
    got = _launch(kernels, f"distances_{kind}", want.size, [_tensor(held), count, n, torch.from_numpy(m), span],
                  want.size)
    assert got.tolist() == want.reshape(-1).view(np.int64).tolist()


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("count", [2, 5])
def test_the_gram_lanes_are_the_cpu_routes_lanes_of_the_centred_points(kernels, kind, count):
    n, span = 1003, 96
    held = _points(kind, count, n, seed=10 + count)
    wide = held.view(np.float16).astype(np.float64) if kind == "f16" else held.astype(np.float64)
    ia, ib = np.triu_indices(count)
    spans = [(a, min(n, a + span)) for a in range(0, n, span)]
    want = np.zeros((len(spans), len(ia), LANES))
    for s, (a, b) in enumerate(spans):
        pts = np.ascontiguousarray(wide[:, a:b])
        center(pts)
        lanes = np.zeros((count, count, LANES))
        gram_add(lanes, pts, a)
        want[s] = lanes[ia, ib]
    mean = torch.from_numpy(_launch(kernels, f"center_{kind}", n, [_tensor(held), count, n], n).view(np.float64))
    got = _launch(kernels, f"gram_{kind}", want.size,
                  [_tensor(held), count, n, mean, span, torch.from_numpy(ia.astype(np.int32)),
                   torch.from_numpy(ib.astype(np.int32)), len(ia)], want.size)
    assert got.tolist() == want.reshape(-1).view(np.int64).tolist()


# --------------------------------------------------------------------------- whole merges


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base ``o``, fp16 fine-tunes a-d, an fp32 one ``f`` (its deltas from the fp16 base are
    often not exact in fp32: such keys are held in fp64), ``n`` with NaN in its VAE."""
    folder = tmp_path_factory.mktemp("median-device-models")
    for i, mid in enumerate("oabcd"):
        write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=151 + i, scale=96))
    write_checkpoint(folder / "f.safetensors", SynthSpec(seed=160, scale=96, dtype="F32"))
    write_checkpoint(folder / "n.safetensors", SynthSpec(seed=161, scale=96, nan_in=("vae",)))
    return folder


def _run(models: Path, tmp_path: Path, method: dict, name: str, select=("a", "b", "c", "d"), weights=None,
         memory: str | None = None, **settings) -> dict:
    ids = {m: str(models / f"{m}.safetensors") for m in "oabcdfn"}
    text = recipe_text(ids, {"all": list(select)}, [sdxl_output(str(tmp_path / f"{name}.safetensors"), "all")],
                       weights, **settings)
    if memory is not None:
        text = f'memory = "{memory}"\n' + text
    plan = build_plan(parse_recipe(text + method_table("all", method), tmp_path))
    result = execute(plan, tuning=SMALL)
    from safetensors.torch import load_file

    out = load_file(str(plan.outputs[0].path))
    return {"tensors": {k: v.view(-1).view(torch.uint8).numpy().tobytes() for k, v in out.items()},
            "warnings": [w.replace(name, "@") for w in result.warnings]}


def _cuda(monkeypatch, **settings) -> list:
    """Every pass on the CUDA backend over the test double (with ``settings``), or the card
    (``ASTOLFO_TEST_CUDA=real``); returns the held types of the keys whose points went to the
    device."""
    from engine.merge.backends.cuda import CudaBackend

    held = []
    real = median_device.DeviceMedian.hold

    def hold(self, fill, spans, count, n, dtype, check_cancel):
        got = real(self, fill, spans, count, n, dtype, check_cancel)
        held.append((np.dtype(dtype).name, got is not None))
        return got

    monkeypatch.setattr(median_device.DeviceMedian, "hold", hold)
    seeds = iter(range(1, 1000))
    monkeypatch.setattr(merge_run, "open_backend", lambda plan, device, tuning, items: CudaBackend(
        plan, device, tuning.buffer_bytes, items,
        runtime=CudaRuntimeDouble("random", next(seeds), **settings) if settings else runtime("random", next(seeds))))
    return held


CASES = {
    "geometric_median, fp16 points": ({"method": "geometric_median"}, ("a", "b", "c", "d"), {"uint16"}),
    "tgmd with weights, fp32 points": ({"method": "tgmd", "base": "o", "maxiter": 20}, ("a", "b", "c", "d"),
                                       {"float32"}),
    "dgmla with an fp32 model, fp64 points": ({"method": "dgmla", "base": "o", "maxiter": 20},
                                              ("a", "b", "f", "d"), {"float64"}),
}


@needs_kernels
@pytest.mark.parametrize("route", ["gram", "sweeps"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_cuda_merge_holds_the_points_on_the_device_and_writes_the_cpu_bytes(models, tmp_path, monkeypatch,
                                                                              case, route):
    method, select, types = CASES[case]
    if route == "sweeps":
        monkeypatch.setattr(median, "GRAM_MAX", 2)
    weights = {"a": 1.0, "b": 2.5, "c": 0.5, "d": 1.5, "f": 0.75} if "weights" in case else None
    cpu = _run(models, tmp_path, method, "cpu", select, weights)
    held = _cuda(monkeypatch)
    cuda = _run(models, tmp_path, method, "cuda", select, weights)
    assert cuda == cpu
    assert types <= {kind for kind, ok in held if ok}  # (a key whose values are not exact in one type: the next)


@needs_kernels
def test_keys_past_the_devices_budget_and_missing_kernels_take_the_cpu_route(models, tmp_path, monkeypatch):
    from engine.recipe import sizes

    budget = sizes.memory_budget
    monkeypatch.setattr(sizes, "memory_budget", lambda text: 64 << 10 if text == "1MB" else budget(text))
    method = {"method": "tgmd", "base": "o", "maxiter": 20}
    cpu = _run(models, tmp_path, method, "cpu")
    routes = []
    real = median._on_device

    def on_device(*args):
        found = real(*args)
        routes.append(found is not None)
        return found

    monkeypatch.setattr(median, "_on_device", on_device)
    _cuda(monkeypatch)
    assert _run(models, tmp_path, method, "small", memory="1MB") == cpu
    assert True in routes and False in routes  # the small keys on the device, the large ones not
    routes.clear()
    held = _cuda(monkeypatch, no_compile=True)
    assert _run(models, tmp_path, method, "nokernels") == cpu
    assert held == [] and routes and not any(routes)


@needs_kernels
def test_nan_in_a_model_follows_the_policy_as_on_the_cpu(models, tmp_path, monkeypatch):
    method = {"method": "tgmd", "base": "o", "maxiter": 20}
    cpu = _run(models, tmp_path, method, "cpu", ("a", "b", "n", "d"), skip_nan=True)
    _cuda(monkeypatch)
    cuda = _run(models, tmp_path, method, "cuda", ("a", "b", "n", "d"), skip_nan=True)
    assert cuda["tensors"] == cpu["tensors"]
    left_out = [[w for w in run["warnings"] if "left out of this key" in w] for run in (cpu, cuda)]
    assert left_out[0] and left_out[0] == left_out[1]  # (the second plan also warns of what the first merge found)

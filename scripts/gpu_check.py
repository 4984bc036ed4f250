#!/usr/bin/env python3
"""One prepared check of astolfo's CUDA engine: run it once on a GPU host.

    python scripts/gpu_check.py --out DIR

It writes DIR/gpu_check.json and prints a short table last. Nothing to install beyond the
project, no network. Expected to take 1-3 minutes on one H100/H200 with 16 cores (an estimate:
it has not run on a GPU yet); it needs ~7 GB of real disk for the sparse-rate output.
Every check compares against the CPU backend of the same build:

  kernel_cpu       CPU kernel vs an independent fp64 reference (mul, then add; one rounding)
  kernel_bytes     CUDA kernel bytes == CPU kernel bytes: fp16/bf16/fp32 sources and outputs,
                   copies, N in {2, 3, 7, 40}, uniform / exact-integer / inexact weights,
                   near-ties, subnormals, huge finite values; and the same finite flags
  merge_sha        end-to-end merges of synthetic SDXL models with deviations (three output
                   dtypes, inexact weights; and 40 models): SHA256 on CUDA with the default
                   and with tiny buffers == the CPU's
  nan_policy       a NaN model: the same error on CUDA and CPU; skip_nan: the same bytes
  cancel           cancel mid-merge: no partial files, GPU memory back at its baseline
  kill9_resume     kill -9 of a CUDA merge, then resume on CUDA and on the CPU: the CPU's bytes
  oom              too little free memory: the clear MergeError, nothing left; a real
                   torch.OutOfMemoryError inside the backend becomes that message too
  nvml_card        the card NVML reports is torch's card (same UUID)
  sparse_rate      GB/s of a merge of full-size SDXL files that are holes (read from the page
                   cache, no disk): the pipeline's own speed, CPU and CUDA
  compare          compare's CUDA pass: its Gram matrices vs the CPU pass's (to fp64 rounding,
                   with and without a reference, mixed dtypes, 1 MiB buffers), the same bits on
                   a rerun, the same findings; and its GB/s over the sparse full-size files

On a machine without CUDA the GPU checks are reported "not run (no CUDA)" and the CPU parts
still run (kernel_cpu, and sparse_rate on the CPU with smaller files): the summary says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASS, FAIL, NOT_RUN = "pass", "FAIL", "not run"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json (created)")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder (default: a temporary folder, removed at the end); the sparse-rate "
                         "output needs ~7 GB of real disk")
    ap.add_argument("--sparse-models", type=int, default=4, help="full-size sparse SDXL files for the rate (4)")
    ap.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def recipe_text(models: dict[str, str], select: dict[str, list[str]], outputs: list[dict], weights=None,
                **settings) -> str:
    def toml(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(toml(x) for x in v) + "]"
        return repr(v)

    lines = [f"name = {toml(settings.pop('name', 'gpu-check'))}"]
    lines += [f"{k} = {toml(v)}" for k, v in settings.items()]
    lines += ["[models]"] + [f"{m} = {toml(p)}" for m, p in models.items()]
    lines += ["[select]"] + [f"{n} = {toml(ids)}" for n, ids in select.items()]
    if weights:
        lines += ["[weights]"] + [f"{m} = {w!r}" for m, w in weights.items()]
    for out in outputs:
        lines += ["[[output]]"] + [f"{k} = {toml(v)}" for k, v in out.items()]
    return "\n".join(lines) + "\n"


def sdxl_output(path, sel="all", **over) -> dict:
    return {"path": str(path), "unet": sel, "te0": sel, "te1": sel, "vae": sel, **over}


def plan_of(text: str, folder: Path, device: str):
    """The plan of a recipe that says ``device = "auto"``, run on ``device``: the recipe (and so
    the output's metadata and the resume fingerprint) is the same whatever runs it, so whole
    files can be compared across devices, as a job resumed on another machine would be."""
    from engine.plan.planner import build_plan
    from engine.recipe.toml_file import parse_recipe

    plan = build_plan(parse_recipe(text, folder))
    plan.device = device
    return plan


def merge(text: str, folder: Path, device: str, tuning=None, **kw):
    from engine.merge.run import execute

    events: list = []
    result = execute(plan_of(text, folder, device), on_event=events.append, tuning=tuning, **kw)
    return result, events


def shas(paths) -> list[str]:
    return [sha256(Path(p)) for p in paths]


# --------------------------------------------------------------------------- kernel cases


def kernel_cases():
    """(name, source dtype, output dtype, sources (CPU tensors), weights)."""
    import torch

    from engine.plan.build import _exact_factors

    g = torch.Generator().manual_seed(20261201)
    n = 1 << 16
    torch_dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    st = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
    weight_sets = {
        "uniform": lambda k: [1.0] * k,
        "decimal": lambda k: list(_exact_factors(tuple(((0.3, 1.7, 5.0, 0.25)[i % 4], "F32") for i in range(k)))),
        "inexact": lambda k: [(0.12345678912345678, 0.7, 1.987654321)[i % 3] for i in range(k)],
    }
    for src in ("fp16", "bf16", "fp32"):
        dt = torch_dt[src]
        for data in ("normal", "near_ties", "subnormal", "huge"):
            for count in (2, 3, 7, 40):
                if data == "normal":
                    xs = [(torch.randn(n, generator=g) * 0.05).to(dt) for _ in range(count)]
                elif data == "near_ties":  # neighbours one ulp apart: means on or next to ties
                    base = (torch.randn(n, generator=g) * 0.05).to(dt)
                    up = torch.nextafter(base, torch.full_like(base, float("inf")))
                    xs = [base if i % 2 == 0 else up for i in range(count)]
                elif data == "subnormal":
                    tiny = torch.finfo(dt).tiny
                    xs = [(torch.rand(n, generator=g) * tiny * 4).to(dt) for _ in range(count)]
                else:
                    big = torch.finfo(dt).max
                    xs = [(torch.rand(n, generator=g) * 0.5 + 0.5).mul(big).to(dt) for _ in range(count)]
                for wname, wfn in weight_sets.items():
                    weights = wfn(count)
                    if wname == "decimal":
                        weights = list(_exact_factors(tuple(((0.3, 1.7, 5.0, 0.25)[i % 4], st[src])
                                                            for i in range(count))))
                    for out in ("fp16", "bf16", "fp32"):
                        yield f"{src}>{out} N={count} {data} {wname}", torch_dt[out], xs, weights


def kernel_on(device, xs, weights, out_dtype, copy=False):
    import torch

    from engine.merge.arithmetic import Kernel

    k = Kernel(device, xs[0].numel())
    views = [x.to(device) for x in xs]
    out = torch.empty(xs[0].numel(), dtype=out_dtype, device=device)
    flag = k.copy(views[0], [out], True) if copy else k.mean(views, weights, [out])
    return out.cpu(), bool(flag)


def check_kernel_cpu(ctx) -> dict:
    """The CPU kernel against numpy: a*w0 + b*w1 + ... in fp64 (each op rounded on its own, as
    the kernel promises on every device), / sum(w), one rounding to fp32 (numpy's fp64->fp32
    is a correct rounding); fp16 through numpy's correctly rounded fp64->fp16."""
    import numpy as np
    import torch

    checked = wrong = 0
    for name, out_dtype, xs, weights in kernel_cases():
        if out_dtype == torch.bfloat16:
            continue  # numpy has no bf16: the CUDA comparison covers it
        got, _ = kernel_on(torch.device("cpu"), xs, weights, out_dtype)
        acc = xs[0].to(torch.float64).numpy()
        if weights[0] != 1.0:
            acc = acc * weights[0]
        for x, w in zip(xs[1:], weights[1:]):
            v = x.to(torch.float64).numpy()
            acc = acc + (v * w if w != 1.0 else v)
        total = math.fsum(weights)
        with np.errstate(over="ignore"):  # huge means overflow fp16, on both sides alike
            ref = (acc / total if total != 1.0 else acc).astype(np.float32 if out_dtype == torch.float32
                                                                  else np.float16)
        checked += 1
        if not np.array_equal(got.numpy().view(np.uint8), ref.view(np.uint8)):
            wrong += 1
            if wrong <= 3:
                ctx["notes"].append(f"kernel_cpu: {name} differs from the reference")
    if wrong:
        return {"status": FAIL, "detail": f"{wrong} of {checked} cases differ from the fp64 reference"}
    return {"status": PASS, "detail": f"{checked} cases equal the reference (bf16 outputs: see kernel_bytes)"}


def check_kernel_bytes(ctx) -> dict:
    import torch

    cuda = torch.device("cuda", 0)
    checked, bad = 0, []
    for name, out_dtype, xs, weights in kernel_cases():
        cpu, fc = kernel_on(torch.device("cpu"), xs, weights, out_dtype)
        gpu, fg = kernel_on(cuda, xs, weights, out_dtype)
        checked += 1
        if fc != fg or not torch.equal(cpu.view(torch.uint8), gpu.view(torch.uint8)):
            bad.append(name)
    for src in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = (torch.randn(1 << 16) * 0.05).to(src)
        x[5] = torch.finfo(src).max
        for out in (torch.float16, torch.bfloat16, torch.float32):
            cpu, fc = kernel_on(torch.device("cpu"), [x], [1.0], out, copy=True)
            gpu, fg = kernel_on(cuda, [x], [1.0], out, copy=True)
            checked += 1
            if fc != fg or not torch.equal(cpu.view(torch.uint8), gpu.view(torch.uint8)):
                bad.append(f"copy {src}>{out}")
    if bad:
        return {"status": FAIL, "detail": f"{len(bad)} of {checked} cases differ: {', '.join(bad[:5])}"}
    return {"status": PASS, "detail": f"{checked} cases byte-identical (values and finite flags)"}


# --------------------------------------------------------------------------- merges


def synth_models(folder: Path) -> dict[str, str]:
    from engine.synth.checkpoints import SynthSpec, write_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    devs = [(), ("pruned_te0_last_layer",), ("nai_clip_keys",), ("position_ids_int64",), ("ema_keys",),
            ("missing_model_prefix",), ("position_ids_corrupted",)]
    models = {}
    for i, d in enumerate(devs):
        path = folder / f"d{i}.safetensors"
        if not path.exists():
            write_checkpoint(path, SynthSpec(seed=i + 1, scale=16, deviations=d,
                                             dtype=("F16", "BF16", "F32")[i % 3]))
        models[f"d{i}"] = str(path)
    return models


def check_merge_sha(ctx) -> dict:
    from engine.merge.tuning import Tuning
    from engine.synth.checkpoints import SynthSpec, write_checkpoint

    work = ctx["work"] / "merge_sha"
    models = synth_models(ctx["work"] / "models")
    outs = [work / "o16.safetensors", work / "obf.safetensors", work / "o32.safetensors"]
    text = recipe_text(models, {"all": list(models)},
                       [sdxl_output(outs[0]), sdxl_output(outs[1], dtype="bf16"), sdxl_output(outs[2], dtype="fp32")],
                       {m: (0.12345678912345678, 0.7, 1.987654321, 0.3)[i % 4] for i, m in enumerate(models)})
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, device, tuning in (("cpu", "cpu", None), ("cuda", "cuda", None),
                                  ("cuda tiny buffers", "cuda", Tuning(buffer_bytes=1 << 20, read_buffers=2,
                                                                       out_buffers=2))):
        merge(text, work, device, tuning)
        runs[label] = shas(outs)
    many = ctx["work"] / "many"
    many.mkdir(parents=True, exist_ok=True)
    forty = {}
    for i in range(40):
        p = many / f"m{i:02d}.safetensors"
        if not p.exists():
            write_checkpoint(p, SynthSpec(seed=100 + i, scale=64))
        forty[f"m{i:02d}"] = str(p)
    text40 = recipe_text(forty, {"all": list(forty)}, [sdxl_output(many / "o.safetensors")])
    for device in ("cpu", "cuda"):
        merge(text40, many, device)
        runs.setdefault("40 models", []).append(sha256(many / "o.safetensors"))
    same = runs["cpu"] == runs["cuda"] == runs["cuda tiny buffers"] and len(set(runs["40 models"])) == 1
    ctx["details"]["merge_sha"] = runs
    return {"status": PASS if same else FAIL,
            "detail": "7 models with deviations x 3 output dtypes, and 40 models: SHA256 "
                      + ("identical on CPU, CUDA, CUDA with 1 MiB buffers" if same else f"differ: {runs}")}


def check_nan_policy(ctx) -> dict:
    from engine.merge.errors import MergeError
    from engine.synth.checkpoints import SynthSpec, write_checkpoint

    work = ctx["work"] / "nan"
    work.mkdir(parents=True, exist_ok=True)
    models = dict(list(synth_models(ctx["work"] / "models").items())[:2])
    nan = write_checkpoint(work / "nan.safetensors", SynthSpec(seed=9, scale=16, nan_in=("unet",)))
    models["n"] = str(nan)
    out = work / "o.safetensors"
    from engine.merge.run import execute

    errors = {}
    # both plans first: once a merge has hashed the NaN model, the catalog knows, and the plan
    # itself refuses it (a different message, by design)
    text = recipe_text(models, {"all": list(models)}, [sdxl_output(out)])
    plans = {device: plan_of(text, work, device) for device in ("cpu", "cuda")}
    for device, plan in plans.items():
        try:
            execute(plan)
            errors[device] = "no error"
        except MergeError as e:
            errors[device] = str(e)
    skipped = {}
    for device in ("cpu", "cuda"):
        merge(recipe_text(models, {"all": list(models)}, [sdxl_output(out)], skip_nan=True), work, device)
        skipped[device] = sha256(out)
    ok = errors["cpu"] == errors["cuda"] != "no error" and skipped["cpu"] == skipped["cuda"]
    return {"status": PASS if ok else FAIL,
            "detail": "stop: same message; skip_nan: same SHA256" if ok else f"stop: {errors}; skip_nan: {skipped}"}


def check_cancel(ctx) -> dict:
    import torch

    from engine.merge.errors import MergeCancelled
    from engine.merge.tuning import Tuning

    work = ctx["work"] / "cancel"
    work.mkdir(parents=True, exist_ok=True)
    models = synth_models(ctx["work"] / "models")
    text = recipe_text(models, {"all": list(models)}, [sdxl_output(work / "o.safetensors")])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_alloc, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    cancel = threading.Event()

    def on_event(e):
        if e.type == "progress" and e.stage == "merging" and e.bytes_done > 0:
            cancel.set()

    from engine.merge.run import execute

    try:
        execute(plan_of(text, work, "cuda"), on_event=on_event, cancel=cancel,
                tuning=Tuning(buffer_bytes=4 << 20, progress_interval=0.0))
        return {"status": FAIL, "detail": "the merge was not cancelled"}
    except MergeCancelled:
        pass
    torch.cuda.synchronize()
    alloc = torch.cuda.memory_allocated()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    left = sorted(p.name for p in work.iterdir())
    ok = not left and alloc == base_alloc and reserved == base_reserved
    return {"status": PASS if ok else FAIL,
            "detail": f"files left {left}; allocated {alloc} (baseline {base_alloc}), reserved after "
                      f"empty_cache {reserved} (baseline {base_reserved})"}


SLOW_MERGE = """
import sys, time
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import load_recipe
def on(e):
    time.sleep(0.01)
execute(build_plan(load_recipe(sys.argv[1])), on_event=on,
        tuning=Tuning(buffer_bytes=1 << 20, progress_interval=0.0, sync_bytes=1 << 20, sync_seconds=0.05))
"""


def check_kill9_resume(ctx) -> dict:
    from engine.merge.output import sidecar_path

    work = ctx["work"] / "kill9"
    work.mkdir(parents=True, exist_ok=True)
    models = synth_models(ctx["work"] / "models")
    out = work / "o.safetensors"
    body = recipe_text(models, {"all": list(models)}, [sdxl_output(out)])
    merge(body, work, "cpu")
    reference = sha256(out)
    out.unlink()
    results = {}
    for then in ("cuda", "cpu"):
        recipe = work / "r.toml"
        recipe.write_text(body)  # device = "auto": CUDA on this machine
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(recipe)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + 120
        while not sidecar_path(out).exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        if proc.poll() is not None:
            return {"status": FAIL, "detail": f"the CUDA merge ended before the kill: {proc.stderr.read()[-400:]}"}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, events = merge(body, work, then, resume=True)
        started = next(e for e in events if e.type == "started")
        results[f"cuda -> {then}"] = (started.resumed_tensors, sha256(out) == reference)
        out.unlink()
    ok = all(n > 0 and same for n, same in results.values())
    return {"status": PASS if ok else FAIL,
            "detail": "; ".join(f"{k}: resumed after {n} tensors, {'same' if s else 'DIFFERENT'} bytes"
                                for k, (n, s) in results.items())}


def check_oom(ctx) -> dict:
    import torch

    from engine.merge.backends import cuda as cuda_backend
    from engine.merge.errors import MergeError
    from engine.merge.pipeline import open_backend

    work = ctx["work"] / "oom"
    work.mkdir(parents=True, exist_ok=True)
    models = synth_models(ctx["work"] / "models")
    text = recipe_text(models, {"all": list(models)}, [sdxl_output(work / "o.safetensors")])
    found = {}
    torch.cuda.empty_cache()
    hog = None
    for leave in (8, 12, 16, 24):  # MB left free; a block right at the limit may not be granted
        free, _ = torch.cuda.mem_get_info()
        try:
            hog = torch.empty(max(0, free - (leave << 20)), dtype=torch.uint8, device="cuda")
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    if hog is None:
        return {"status": FAIL, "detail": "could not fill the card to leave a few MB free"}
    ctx["details"]["oom_free_bytes"] = torch.cuda.mem_get_info()[0]
    try:
        try:
            merge(text, work, "cuda")
            found["little free memory"] = "no error"
        except MergeError as e:
            found["little free memory"] = str(e)

        # the backend's own check passes (a lie about free memory): the allocation itself fails
        def lying_factory(plan, device, tuning, items):
            real = cuda_backend.CudaRuntime.mem_get_info
            cuda_backend.CudaRuntime.mem_get_info = lambda self: (1 << 40, 1 << 40)
            try:
                return open_backend(plan, device, tuning, items)
            finally:
                cuda_backend.CudaRuntime.mem_get_info = real

        from engine.merge.tuning import Tuning

        try:
            merge(text, work, "cuda", Tuning(buffer_bytes=64 << 20), backend_factory=lying_factory)
            found["torch OutOfMemoryError"] = "no error"
        except MergeError as e:
            found["torch OutOfMemoryError"] = str(e)
    finally:
        del hog
        torch.cuda.empty_cache()
    left = sorted(p.name for p in work.iterdir())
    ok = not left and all("not enough free memory" in m and 'device = "cpu"' in m for m in found.values())
    return {"status": PASS if ok else FAIL, "detail": f"{found}; files left {left}"}


def check_nvml_card(ctx) -> dict:
    import torch

    from engine.merge.devices import MemoryMonitor, torch_uuid

    device = torch.device("cuda", 0)
    monitor = MemoryMonitor(device)
    try:
        if monitor.source != "nvml":
            return {"status": FAIL, "detail": "NVML did not identify the card (no driver answer, or no UUID match)"}
        nvml_uuid = monitor._nvml.nvmlDeviceGetUUID(monitor._handle)
        nvml_uuid = nvml_uuid.decode() if isinstance(nvml_uuid, bytes) else str(nvml_uuid)
        uuid = torch_uuid(device) or ""
        sample = monitor.sample()
        total = torch.cuda.get_device_properties(device).total_memory
    finally:
        monitor.close()
    same = nvml_uuid.endswith(uuid.removeprefix("GPU-").removeprefix("MIG-")) and uuid != ""
    close = sample.card_total and abs(sample.card_total - total) <= 0.05 * total
    return {"status": PASS if same and close else FAIL,
            "detail": f"torch {uuid}, NVML {nvml_uuid}; totals NVML {sample.card_total} torch {total}; "
                      f"card used {sample.card_used}, process peak {sample.process_peak}"}


# --------------------------------------------------------------------------- sparse files


def sparse_models(folder: Path, count: int, scale: int) -> dict[str, str]:
    """SDXL files of the real size (``scale`` 1) whose data are holes: reads come from the page
    cache as zeros, with no disk involved."""
    from engine.checkpoint.architectures import get_architecture, scaled_shape
    from engine.checkpoint.format import TensorPlan, build_header, canonical_order

    arch = get_architecture("sdxl")
    plans = canonical_order(TensorPlan(k, "F16", scaled_shape(t.shape, scale) if k != arch.position_ids_key
                                       else t.shape) for k, t in arch.tensors.items())
    folder.mkdir(parents=True, exist_ok=True)
    models = {}
    for i in range(count):
        path = folder / f"s{i}.safetensors"
        header = build_header(plans, {"modelspec.architecture": arch.modelspec, "modelspec.title": f"sparse {i}"})
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(p.nbytes for p in plans))
        models[f"s{i}"] = str(path)
    return models


def check_sparse_rate(ctx) -> dict:
    has_cuda = ctx["cuda"]
    count, scale = (ctx["sparse_models"], 1) if has_cuda else (2, 4)
    work = ctx["work"] / "sparse"
    models = sparse_models(work, count, scale)
    out = work / "o.safetensors"
    text = recipe_text(models, {"all": list(models)}, [sdxl_output(out)])
    rates = {}
    for device in (["cpu", "cuda"] if has_cuda else ["cpu"]):
        if device == "cpu" and has_cuda:  # the CPU over fewer files: the rate, not a race
            text_dev = recipe_text(dict(list(models.items())[:2]), {"all": list(models)[:2]}, [sdxl_output(out)])
        else:
            text_dev = text
        _, events = merge(text_dev, work, device)
        done = next(e for e in events if e.type == "finished")
        rates[device] = {"gbps": done.gbps, "bytes_read": done.bytes_read, "seconds": done.elapsed_s,
                         "process_mem_peak": done.process_mem_peak}
        out.unlink()
    ctx["details"]["sparse_rate"] = rates
    size = "full size" if scale == 1 else f"1/{scale * scale} size"
    return {"status": PASS, "detail": "; ".join(f"{d}: {r['gbps']:.2f} GB/s over {r['bytes_read'] / 1e9:.1f} GB"
                                                for d, r in rates.items()) + f" ({size} sparse SDXL files)"}


def check_compare(ctx) -> dict:
    import numpy as np

    from engine.compare.findings import Thresholds
    from engine.compare.gather import Source, gather
    from engine.compare.result import build_result
    from engine.library.diagnose import inspect_file

    def sources_of(models):
        reports = [inspect_file(p, model_id=m) for m, p in models.items()]
        return [Source(r.model_id, Path(r.path), r.key_map) for r in reports]

    sources = sources_of(synth_models(ctx["work"] / "models"))
    worst, same_bits, same_findings = 0.0, True, True
    for with_ref in (False, True):
        srcs = list(sources)
        ref = srcs.pop(0) if with_ref else None
        cpu = gather(srcs, ref, device="cpu")
        runs = [gather(srcs, ref, device="cuda"), gather(srcs, ref, device="cuda", budget_bytes=1 << 20),
                gather(srcs, ref, device="cuda")]
        for comp, blocks in cpu.grams.items():
            for block, g in blocks.items():
                scale = np.sqrt(np.outer(np.diag(g), np.diag(g))) + 1e-300
                for run in runs[:2]:
                    worst = max(worst, float(np.max(np.abs(run.grams[comp][block] - g) / scale)))
                same_bits &= runs[0].grams[comp][block].tobytes() == runs[2].grams[comp][block].tobytes()
        ids, ref_id = [s.id for s in srcs], ref.id if ref else None
        codes = [[(f["code"], f["component"], f["block"], f["models"]) for f in
                  build_result(x, ids, ref_id, Thresholds(), [])["findings"]] for x in (cpu, runs[0])]
        same_findings &= codes[0] == codes[1]
    has_cuda = ctx["cuda"]
    rates = {}
    if has_cuda:
        sparse = sources_of(sparse_models(ctx["work"] / "sparse", ctx["sparse_models"], 1))
        for device, srcs in (("cuda", sparse), ("cpu", sparse[:2])):
            t0 = time.monotonic()
            gather(srcs, None, device=device)
            seconds = time.monotonic() - t0
            size = sum(Path(x.path).stat().st_size for x in srcs)
            rates[device] = {"gbps": size / seconds / 1e9, "bytes": size, "seconds": seconds}
    ctx["details"]["compare"] = {"worst_relative_difference": worst, "rerun_same_bits": same_bits,
                                 "same_findings": same_findings, "rates": rates}
    ok = worst <= 1e-12 and same_bits and same_findings
    rate = "; ".join(f"{d}: {r['gbps']:.2f} GB/s over {r['bytes'] / 1e9:.1f} GB" for d, r in rates.items())
    return {"status": PASS if ok else FAIL,
            "detail": f"Gram vs CPU: worst {worst:.1e} of the diagonal's scale; rerun "
                      f"{'same bits' if same_bits else 'DIFFERENT bits'}; findings "
                      f"{'the same' if same_findings else 'DIFFER'}" + (f"; {rate} (sparse full size)" if rate else "")}


CHECKS = [
    ("kernel_cpu", False, check_kernel_cpu),
    ("kernel_bytes", True, check_kernel_bytes),
    ("merge_sha", True, check_merge_sha),
    ("nan_policy", True, check_nan_policy),
    ("cancel", True, check_cancel),
    ("kill9_resume", True, check_kill9_resume),
    ("oom", True, check_oom),
    ("nvml_card", True, check_nvml_card),
    ("sparse_rate", False, check_sparse_rate),
    ("compare", True, check_compare),
]


def machine(has_cuda: bool) -> dict:
    import torch

    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cuda": torch.version.cuda, "gpu": None}
    if has_cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "total_memory": props.total_memory, "uuid": str(getattr(props, "uuid", "")),
                       "capability": f"{props.major}.{props.minor}"}
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="astolfo-gpu-check-"))
    # a private catalog and state: the check never touches the user's
    for var in ("ASTOLFO_CACHE_DIR", "ASTOLFO_CONFIG_DIR", "ASTOLFO_DATA_DIR", "ASTOLFO_STATE_DIR"):
        os.environ[var] = str(work / "astolfo-home" / var.lower())
    sys.path.insert(0, str(ROOT))
    import torch

    has_cuda = torch.cuda.is_available()
    only = {s for s in args.only.split(",") if s}
    ctx = {"work": work, "cuda": has_cuda, "sparse_models": args.sparse_models, "notes": [], "details": {}}
    results = {}
    t_all = time.monotonic()
    try:
        for name, needs_gpu, fn in CHECKS:
            if only and name not in only:
                continue
            if needs_gpu and not has_cuda:
                results[name] = {"status": NOT_RUN, "detail": "no CUDA device on this machine", "seconds": 0.0}
                continue
            t0 = time.monotonic()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                r = fn(ctx)
            except Exception as e:
                r = {"status": FAIL, "detail": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-2000:]}
            r["seconds"] = round(time.monotonic() - t0, 1)
            results[name] = r
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "machine": machine(has_cuda),
        "gpu_parts_run": has_cuda,
        "note": None if has_cuda else "no CUDA here: only the CPU parts ran; the GPU checks are still to run",
        "seconds": round(time.monotonic() - t_all, 1),
        "checks": results, "details": ctx["details"], "notes": ctx["notes"],
    }
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    width = max(len(n) for n in results) if results else 5
    print()
    print(f"{'check':<{width}}  {'result':<8} {'s':>6}  detail")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['status']:<8} {r['seconds']:>6}  {r['detail'][:150]}")
    gpu = summary["machine"]["gpu"]
    print(f"\n{gpu['name'] if gpu else 'no GPU'}; summary in {args.out / 'gpu_check.json'}")
    if not has_cuda:
        print("NOTE: no CUDA on this machine: the GPU checks were NOT run.")
    return 1 if any(r["status"] == FAIL for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

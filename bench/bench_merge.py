"""Merge benchmark: astolfo against a plain safetensors loop, sd-mecha's n_average and the I/O
floor, side by side in one run, on synthetic SDXL files with the real key set.

Runs (each engine in its own process; wall time from start to exit, peak RSS from wait4):

- cold: page cache dropped before each engine (``sync; echo 3 > /proc/sys/vm/drop_caches``,
  needs root; without it the run says so). Floor = ``cat`` of the inputs + ``dd`` writing the
  output's size with ``conv=fdatasync``.
- cached: smaller files (they must fit in RAM) read once before each engine, so the work is
  CPU-bound.
- rss: astolfo's peak RSS for N = 4, 8, 16 models (smaller scale).

The plain loop is the issue's baseline: ``safe_open`` each file, fp32 add, divide, ``save_file``,
then ``sync``. sd-mecha (``pip install sd-mecha``; not a project dependency) merges with
``n_average`` on the CPU in fp32 and is followed by ``sync`` too. astolfo fsyncs its output
itself. Source hashes (provenance) are computed once before timing and served from the catalog.

Usage: ``python bench/bench_merge.py [--scale 1] [--n 3] [--quick] [--engines ...]``; the table
is printed and written to the "## merge" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import BENCHMARKS_MD, Rows, child_path, cpu_name, memory_gib, write_section  # noqa: E402 (bench/ is on sys.path when run as a script)

from engine.checkpoint.architectures import get_architecture, scaled_shape
from engine.checkpoint.format import TensorPlan, canonical_order
from engine.checkpoint.writer import StreamingWriter

POOL_ELEMS = 80 << 20  # random fp16 values that every synthetic tensor is cut from

ASTOLFO = """
import json, os, resource, sys, threading, time
# as a detached job's runner does before it imports the merge's modules: the CPU kernels start
# loading now, beside torch's import (engine.jobs.runner._read_recipe_and_start_kernels)
# (a baseline checkout from before the fused kernels has neither the warm-up nor freeze_imports)
method = json.loads(os.environ.get("BENCH_METHOD") or "{}")
try:
    from engine.kernels import warm
except ImportError:
    warm = None
if warm is not None:
    warm.start_for(os.environ.get("BENCH_DEVICE", "cpu"), methods=bool(method))
from pathlib import Path
from engine.recipe.toml_file import parse_recipe
from engine.plan.planner import build_plan
from engine.merge.run import execute
try:
    from engine.long_lived import freeze_imports
except ImportError:
    freeze_imports = None
if freeze_imports is not None:
    freeze_imports()  # as the astolfo command and a detached job do once their modules are imported
out, paths = sys.argv[1], sys.argv[2:]
ids = [f"m{i:02d}" for i in range(len(paths))]
# bench_methods: BENCH_METHOD (JSON) is the selection's [methods] table; with BENCH_BASE_FIRST the
# first file is the base only, outside the selection; BENCH_MEMORY is the recipe's memory budget;
# BENCH_GRAM_MAX overrides the medians' GRAM_MAX (0: the sweeps route at any N)
if os.environ.get("BENCH_GRAM_MAX"):
    import engine.methods.median
    engine.methods.median.GRAM_MAX = int(os.environ["BENCH_GRAM_MAX"])
chosen = ids[1:] if os.environ.get("BENCH_BASE_FIRST") else ids
lines = ['name = "bench"', f'device = "{os.environ.get("BENCH_DEVICE", "cpu")}"']
lines += [f'memory = "{os.environ["BENCH_MEMORY"]}"'] if os.environ.get("BENCH_MEMORY") else []
lines += ["[models]"] + [f'{i} = "{p}"' for i, p in zip(ids, paths)]
lines += ["[select]", "all = [" + ", ".join(f'"{i}"' for i in chosen) + "]"]
lines += ["[methods.all]" if method else ""] + [f"{k} = {json.dumps(v)}" for k, v in method.items()]
lines += ["[[output]]", f'path = "{out}"'] + [f'{c} = "all"' for c in ("unet", "te0", "te1", "vae")]
# CPU seconds of the workers' own reads from the page cache (engine.merge.slice_reads; absent
# from a baseline checkout older than it), which the thread sampling counts as "compute"
own_reads = [0.0]
try:
    from engine.merge.slice_reads import SliceReads
    _read = SliceReads.read
    def _timed_read(self, *a):
        t = time.thread_time()
        try:
            return _read(self, *a)
        finally:
            own_reads[0] += time.thread_time() - t
    SliceReads.read = _timed_read
except ImportError:
    pass
# CPU seconds of each merge thread, sampled from /proc (threads are gone when the merge returns)
cpu, marks, stop = {}, {}, threading.Event()
def sample():
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.wait(0.02):
        for t in threading.enumerate():
            try:
                f = open(f"/proc/self/task/{t.native_id}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, TypeError):
                continue
            cpu[t.name] = max(cpu.get(t.name, 0.0), (int(f[11]) + int(f[12])) / tick)
threading.Thread(target=sample, daemon=True).start()
def on_event(e):
    if e.type == "stage" and e.stage not in marks:
        r = resource.getrusage(resource.RUSAGE_SELF)
        marks[e.stage] = (time.monotonic(), time.thread_time(), r.ru_utime + r.ru_stime)
result = execute(build_plan(parse_recipe("\\n".join(lines) + "\\n", Path(out).parent)), on_event=on_event)
stop.set()
role = lambda n: "read" if n.startswith("merge-read") else "write" if n == "merge-write" else \\
    "compute" if n.startswith("merge-cpu") else None
(t0, main0, all0), (t1, main1, all1) = marks["merging"], marks["finishing"]
stats = {"merge_s": t1 - t0, "bytes_read": result.bytes_read, "cpu": {"main": main1 - main0, "all": all1 - all0},
         "worker_reads": own_reads[0]}
for name, sec in cpu.items():
    if role(name):
        stats["cpu"][role(name)] = stats["cpu"].get(role(name), 0.0) + sec
if os.environ.get("BENCH_STATS_FILE"):
    Path(os.environ["BENCH_STATS_FILE"]).write_text(json.dumps(stats))
"""

PLAIN = """
import os, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
out, paths = sys.argv[1], sys.argv[2:]
files = [safe_open(p, framework="pt") for p in paths]
result = {}
for key in files[0].keys():
    acc = files[0].get_tensor(key).to(torch.float32)
    for f in files[1:]:
        acc += f.get_tensor(key).to(torch.float32)
    acc /= len(files)
    result[key] = acc.to(torch.float16)
save_file(result, out)
os.sync()
"""

MECHA = """
import os, sys, torch, sd_mecha
out, paths = sys.argv[1], sys.argv[2:]
recipe = sd_mecha.n_average(*[sd_mecha.model(p) for p in paths])
sd_mecha.merge(recipe, output=out, merge_device=os.environ.get("BENCH_DEVICE", "cpu"), merge_dtype=torch.float32,
               output_dtype=torch.float16)
os.sync()
"""

# Each engine's process reports its own peak RSS (VmHWM) at exit: rusage from wait4 would also
# count the bench process's memory, copied into the child before it executes Python.
PEAK_RSS = """
import atexit, os
def _report_peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                with open(os.environ["BENCH_RSS_FILE"], "w") as out:
                    out.write(str(int(line.split()[1]) * 1024))
atexit.register(_report_peak)
"""

SCRIPTS = {"astolfo": ASTOLFO, "astolfo-torch": ASTOLFO, "astolfo-buffered": ASTOLFO, "astolfo-cuda": ASTOLFO,
           "astolfo-baseline": ASTOLFO, "plain": PLAIN, "sd-mecha": MECHA}
# astolfo-baseline: the same script on another checkout of the project (--baseline DIR, e.g. a
# `git worktree` of an earlier commit), so a change is measured against what came before in one run
BASELINE: Path | None = None
# astolfo-torch: astolfo with the torch kernel instead of the fused numba kernels (engine.kernels);
# astolfo-buffered: astolfo writing through the page cache instead of O_DIRECT (direct_io);
# astolfo-cuda: astolfo's recipe with device = "cuda", beside the --device run (bench/gpu_check.sh)
ENGINE_ENV = {"astolfo-torch": {"ASTOLFO_CPU_KERNELS": "torch"}, "astolfo-buffered": {"ASTOLFO_DIRECT_IO": "0"},
              "astolfo-cuda": {"BENCH_DEVICE": "cuda"}}


# --------------------------------------------------------------------------- data


def synth_files(folder: Path, n: int, scale: int, log) -> list[Path]:
    """``n`` synthetic SDXL fp16 files at ``scale`` (1 = full size), made fast: every tensor is a
    slice of one random pool at an offset that depends on the model and the key."""
    folder.mkdir(parents=True, exist_ok=True)
    arch = get_architecture("sdxl")
    plans = canonical_order(TensorPlan(k, "F16", scaled_shape(t.shape, scale) if k != arch.position_ids_key
                                       else t.shape) for k, t in arch.tensors.items())
    pool = None
    paths = []
    for i in range(n):
        path = folder / f"m{i:02d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        if pool is None:
            g = torch.Generator().manual_seed(1234)
            pool = (torch.randn(POOL_ELEMS, generator=g) * 0.05).to(torch.float16)
        t0 = time.monotonic()
        meta = {"modelspec.architecture": arch.modelspec, "modelspec.title": path.stem,
                "astolfo.synthetic_scale": str(scale)}
        writer = StreamingWriter(path, plans, meta)
        writer.open()
        try:
            for p in plans:
                numel = p.nbytes // 2
                if p.key == arch.position_ids_key:
                    data = torch.arange(numel, dtype=torch.float16)
                else:
                    start = zlib.crc32(f"{i}:{p.key}".encode()) % (POOL_ELEMS - numel + 1)
                    data = pool[start:start + numel]
                writer.write(p.key, data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        log(f"  wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - t0:.1f} s")
    return paths


def prehash(paths: list[Path], log) -> None:
    """Provenance hashes into the catalog (untimed), as a scan of the folder would have done."""
    from engine.hashes.catalog import Catalog

    with Catalog() as catalog:
        for p in paths:
            if catalog.get(p) is None:
                t0 = time.monotonic()
                catalog.hash_file(p)
                log(f"  hashed {p.name} in {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- running


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def run_engine(name: str, out: Path, paths: list[Path], env: dict) -> tuple[float, int, bool, str, dict]:
    """(wall seconds, peak RSS bytes, ok, error tail, astolfo's stats) of one engine in its own
    process. The stats: the merge stage's seconds (first read to the last result handed to the
    writer, the final fsync excluded), bytes read, and CPU seconds of the read, compute and
    write threads."""
    out.unlink(missing_ok=True)
    rss_file = out.with_name(out.name + ".rss")
    stats_file = out.with_name(out.name + ".stats")
    rss_file.unlink(missing_ok=True)
    stats_file.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        child_env = dict(env, BENCH_RSS_FILE=str(rss_file), BENCH_STATS_FILE=str(stats_file),
                         **ENGINE_ENV.get(name, {}))
        root = ROOT
        if name == "astolfo-baseline":
            root = BASELINE
            child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BASELINE), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS + SCRIPTS[name], str(out), *map(str, paths)],
                                stdout=subprocess.DEVNULL, stderr=err, env=child_env, cwd=root)
        proc.wait()
        wall = time.monotonic() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace")[-600:]
    try:
        rss = int(rss_file.read_text())
        rss_file.unlink()
    except (OSError, ValueError):
        rss = 0
    try:
        stats = json.loads(stats_file.read_text())
        stats_file.unlink()
    except (OSError, ValueError):
        stats = {}
    ok = proc.returncode == 0 and out.exists()
    return wall, rss, ok, tail, stats


def where_time_goes(run: str, stats: dict, size: int) -> str:
    """One line: where astolfo's merge stage spent its CPU, and whether the CPU was the limit."""
    cpu, stage = stats["cpu"], stats["merge_s"]
    cpu = _split_worker_reads(stats)
    parts = ", ".join(f"{k} {cpu.get(k, 0.0):.1f} s ({cpu.get(k, 0.0) / max(cpu['all'], 1e-9):.0%})"
                      for k in ("read", "compute", "write", "main"))
    if stats.get("worker_reads"):
        parts += (f" (the workers read their own sources from the page cache: {stats['worker_reads']:.1f} s of their "
                  f"CPU is those reads, counted under read here, the rest the kernels and their Python)")
    cores = os.cpu_count() or 1
    used = cpu["all"] / stage
    verdict = ("the CPU was the limit" if used > 0.85 * cores else
               f"it used {used:.2f} of {cores} cores: the rest of the time it waited (on the disk, or on the other "
               f"programs sharing the cores; load average {os.getloadavg()[0]:.1f} at the end)")
    return (f"- Where astolfo's merge stage went ({run}): {cpu['all']:.1f} CPU s for {gb(size)} of input in "
            f"{stage:.1f} s ({cpu['all'] / (size / 1e9):.2f} CPU s per GB): {parts}; {verdict}.")


def _split_worker_reads(stats: dict) -> dict:
    """The stage's CPU seconds by role, the workers' own reads moved from compute to read."""
    cpu = dict(stats["cpu"])
    own = min(stats.get("worker_reads", 0.0), cpu.get("compute", 0.0))
    cpu["read"] = cpu.get("read", 0.0) + own
    cpu["compute"] = cpu.get("compute", 0.0) - own
    return cpu


def merge_cells(stats: dict) -> list[str]:
    """The merge stage's input rate and where its CPU time went."""
    if not stats.get("merge_s"):
        return ["", ""]
    cpu = _split_worker_reads(stats)
    where = " / ".join(f"{cpu.get(k, 0.0):.1f}" for k in ("read", "compute", "write", "main", "all"))
    return [f"{stats['bytes_read'] / stats['merge_s'] / 1e9:.2f} ({stats['merge_s']:.1f} s)", where]


def floor(paths: list[Path], out_bytes: int, scratch: Path) -> tuple[float, float]:
    """Seconds to ``cat`` the inputs and to write ``out_bytes`` with dd conv=fdatasync."""
    t0 = time.monotonic()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    t_read = time.monotonic() - t0
    return t_read, write_floor(out_bytes, scratch)


def write_floor(out_bytes: int, scratch: Path) -> float:
    """Seconds for dd to write ``out_bytes`` to the disk of ``scratch``, fdatasync included."""
    target = scratch / "dd.out"
    mb = max(1, out_bytes // (1 << 20))
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mb}", "conv=fdatasync"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    t_write = time.monotonic() - t0
    target.unlink(missing_ok=True)
    return t_write


def machine() -> str:
    cpu = cpu_name()
    mem = memory_gib()
    return (f"{cpu}{_cpu_detail()}, {os.cpu_count()} vCPU, {mem:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def _cpu_detail() -> str:
    """lscpu's model number and vector extensions, and LLVM's name for the core (the generic
    "Intel Xeon Processor" of a VM says little)."""
    detail = []
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                 check=True).stdout.splitlines() if ":" in line)
        flags = info.get("Flags", "").split()
        detail.append(f"family {info.get('CPU family', '?').strip()} model {info.get('Model', '?').strip()}")
        detail.append("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    try:
        from llvmlite import binding

        detail.append(f"LLVM core {binding.get_host_cpu_name()}")
    except ImportError:
        pass
    return f" ({', '.join(detail)})" if detail else ""


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=1, help="cold-run file scale (1 = full-size SDXL, 6.9 GB)")
    ap.add_argument("--n", type=int, default=3, help="models in the cold and cached runs")
    ap.add_argument("--cached-scale", type=int, default=2, help="scale of the page-cache run (must fit in RAM)")
    ap.add_argument("--rss-scale", type=int, default=4, help="scale of the N = 4, 8, 16 RSS sweep")
    ap.add_argument("--rss-n", default="4,8,16")
    ap.add_argument("--engines", default="astolfo,astolfo-torch,plain,sd-mecha",
                    help="comma list: astolfo, astolfo-torch (the torch kernel), astolfo-buffered "
                         "(writes through the page cache), plain, sd-mecha")
    ap.add_argument("--cold-engines", default="", help="engines of the cold run (default: --engines); the plain "
                    "loop holds every tensor: ~23 GB of RAM at full size")
    ap.add_argument("--runs", default="kernel,copy,cold,cached,rss",
                    help="comma list: kernel, copy (one thread's pread from the page cache), cold, cached, rss")
    ap.add_argument("--device", default="cpu", help="merge device for astolfo and sd-mecha: cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="small files (scale 16/16/32): checks the script")
    ap.add_argument("--data", type=Path, default=ROOT / "bench/.data/merge", help="folder for synthetic files")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files afterwards")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--baseline", type=Path, help="another checkout of the project (a git worktree of an earlier "
                    "commit): adds the engine astolfo-baseline, astolfo's script run on that code")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each engine in the cached run, in turn (A B A B "
                    "...); each row is the run with the median time, the notes give every run's rate")
    ap.add_argument("--section", default="merge",
                    help='the docs/benchmarks.md section written ("## <section>"): a run of some of the runs can '
                         "go to its own section and leave the full run's in place")
    args = ap.parse_args(argv)
    if args.quick:
        args.scale, args.cached_scale, args.rss_scale = 16, 16, 32
    engines = [e for e in args.engines.split(",") if e]
    runs = [r for r in args.runs.split(",") if r]
    global BASELINE
    if args.baseline:
        BASELINE = args.baseline.resolve()
        if "astolfo-baseline" not in engines:
            engines.insert(engines.index("astolfo") + 1 if "astolfo" in engines else 0, "astolfo-baseline")
    elif "astolfo-baseline" in engines:
        ap.error("astolfo-baseline needs --baseline DIR")
    if "sd-mecha" in engines and importlib.util.find_spec("sd_mecha") is None:
        print("sd-mecha is not installed (pip install sd-mecha); skipping it", file=sys.stderr)
        engines.remove("sd-mecha")

    args.data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ASTOLFO_CACHE_DIR=str(args.data / "cache"), PYTHONPATH=child_path(),
               BENCH_DEVICE=args.device)
    os.environ["ASTOLFO_CACHE_DIR"] = env["ASTOLFO_CACHE_DIR"]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[list[str]] = Rows()
    notes: list[str] = []
    out_dir = args.data / "out"
    out_dir.mkdir(exist_ok=True)
    dropped = True
    load_before = os.getloadavg()[0]

    kernel_table = ""
    if "kernel" in runs:
        log("kernel alone: one thread, 3 sources x 131072 elements")
        krows = kernel_rows()
        kernel_table = _kernel_table(krows)
        fused16 = next(r for r in krows if r[0].endswith("F16 -> F16") and r[1].startswith("fused"))
        torch16 = next(r for r in krows if r[0].endswith("F16 -> F16") and r[1].startswith("torch"))
        notes.append(f"- Kernel cost (3 fp16 sources -> fp16, one thread): fused {fused16[3]} ns per output element "
                     f"({fused16[4]} G source elements/s), torch Kernel {torch16[3]} ns ({torch16[4]} G/s).")

    if "copy" in runs:
        log(f"copy: one thread's pread of {args.n} cached files at scale {args.cached_scale}")
        paths = synth_files(args.data / f"s{args.cached_scale}", args.n, args.cached_scale, log)
        notes.append(copy_note(paths))

    if "cold" in runs:
        log(f"cold run: {args.n} models at scale {args.scale}")
        paths = synth_files(args.data / f"s{args.scale}", args.n, args.scale, log)
        prehash(paths, log)
        size = sum(p.stat().st_size for p in paths)
        out_bytes = paths[0].stat().st_size
        dropped = drop_caches()
        t_read, t_write = floor(paths, out_bytes, out_dir)
        base = t_read + t_write
        rows.append(["cold", "I/O floor (cat + dd)", f"{base:.1f}", f"{size / t_read / 1e9:.2f}", "", "", "1.00", "",
                     "-", f"cat {t_read:.1f} s ({size / t_read / 1e9:.2f} GB/s) + dd {t_write:.1f} s"])
        results = {}
        for name in [e for e in args.cold_engines.split(",") if e] or engines:
            drop_caches()
            log(f"  {name} ...")
            wall, rss, ok, tail, stats = run_engine(name, out_dir / f"{name}.safetensors", paths, env)
            if ok:
                results[name] = wall  # a failed run has no speed to compare
            rows.append(["cold", _engine_label(name), f"{wall:.1f}", f"{size / wall / 1e9:.2f}", *merge_cells(stats),
                         f"{wall / base:.2f}", "", gb(rss),
                         "" if ok else "FAILED: " + tail.strip().splitlines()[-1] if tail.strip() else "FAILED"])
            (out_dir / f"{name}.safetensors").unlink(missing_ok=True)
        _ratios(rows, {_engine_label(k): v for k, v in results.items()}, "cold")
        if not dropped:
            notes.append("/proc/sys/vm/drop_caches could not be written (not root?): the cold run is NOT cold.")
        if "plain" in engines and args.cold_engines and "plain" not in args.cold_engines:
            notes.append(f"- The plain loop is left out of the cold run: it holds every tensor (~23 GB of RAM at full "
                         f"size) and this machine has {memory_gib():.0f} GiB.")
        if not args.keep and args.scale <= 2:
            shutil.rmtree(args.data / f"s{args.scale}", ignore_errors=True)

    if "cached" in runs:
        log(f"cached run: {args.n} models at scale {args.cached_scale}")
        paths = synth_files(args.data / f"s{args.cached_scale}", args.n, args.cached_scale, log)
        prehash(paths, log)
        size = sum(p.stat().st_size for p in paths)
        out_bytes = paths[0].stat().st_size
        t_write = write_floor(out_bytes, out_dir)
        rows.append(["cached", "write floor (dd, fdatasync)", f"{t_write:.1f}", "", "", "", "", "", "-",
                     f"the output's {gb(out_bytes)} at {out_bytes / t_write / 1e9:.2f} GB/s"])
        targets = [("cached", out_dir)]
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 3 * out_bytes:
            targets.append(("cached, output in RAM", Path(tempfile.mkdtemp(prefix="astolfo-bench-", dir=shm))))
        for run, folder in targets:
            done: dict[str, list] = {name: [] for name in engines}
            for rep in range(max(1, args.repeat)):
                for name in engines:
                    warm(paths)
                    warm(paths)
                    log(f"  {name} ({run}, {rep + 1} of {args.repeat}) ...")
                    done[name].append(run_engine(name, folder / f"{name}.safetensors", paths, env))
                    (folder / f"{name}.safetensors").unlink(missing_ok=True)
            results = {}
            for name in engines:
                wall, rss, ok, tail, stats = _median_run(done[name])
                if ok:
                    results[name] = wall
                rows.append([run, _engine_label(name), f"{wall:.1f}", f"{size / wall / 1e9:.2f}", *merge_cells(stats),
                             "", "", gb(rss), ("" if ok else "FAILED: " + tail[-200:]) + _spread(done[name], size)])
                if name == "astolfo" and stats.get("merge_s"):
                    notes.append(where_time_goes(run, stats, size))
            _ratios(rows, {_engine_label(k): v for k, v in results.items()}, run)
            if folder != out_dir:
                shutil.rmtree(folder, ignore_errors=True)

    if "rss" in runs:
        ns = [int(x) for x in args.rss_n.split(",") if x]
        log(f"rss sweep: N = {ns} at scale {args.rss_scale}")
        paths = synth_files(args.data / f"s{args.rss_scale}", max(ns), args.rss_scale, log)
        prehash(paths, log)
        for n in ns:
            wall, rss, ok, tail, stats = run_engine("astolfo", out_dir / "astolfo.safetensors", paths[:n], env)
            size = sum(p.stat().st_size for p in paths[:n])
            rows.append([f"rss N={n}", "astolfo", f"{wall:.1f}", f"{size / wall / 1e9:.2f}", *merge_cells(stats), "",
                         "", gb(rss),
                         "" if ok else "FAILED: " + tail[-200:]])
            (out_dir / "astolfo.safetensors").unlink(missing_ok=True)

    shutil.rmtree(out_dir, ignore_errors=True)
    table = "\n\n".join(t for t in (_table(rows) if rows else "", kernel_table) if t)
    print(table)
    command = " ".join(["python bench/bench_merge.py", *(shlex.quote(a) for a in sys.argv[1:])])
    made = {"cold": (f"cold run: {args.n} synthetic SDXL fp16 files at scale {args.scale}"
                     f" ({'full size, 6.9 GB each' if args.scale == 1 else f'1/{args.scale} per large dimension'}), "
                     "page cache " + ("dropped before each engine" if dropped else
                                      "NOT dropped (drop_caches not writable)")),
            "cached": f"cached run: {args.n} files at scale {args.cached_scale}",
            "rss": f"RSS sweep: scale {args.rss_scale}",
            "copy": f"copy: one thread's reads of {args.n} cached files at scale {args.cached_scale}"}
    header = (f"`{command}`. Machine: {machine()}; 1-minute load "
              f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the machine is shared). "
              + _sentence("; ".join(text for run, text in made.items() if run in runs))
              + (f". Engines: {', '.join(engines)}"
                 f"{'; cold run: ' + args.cold_engines if args.cold_engines and 'cold' in runs else ''}"
                 f"{_mecha_version() if 'sd-mecha' in engines else ''}; merge device {_device_name(args.device)}"
                 f"{'; astolfo-cuda on ' + _device_name('cuda') if 'astolfo-cuda' in engines else ''}"
                 if rows else "") + ".")
    if not args.no_doc:
        _write_doc(header, table, notes + ([_doc_notes()] if rows else []), args.section)
    for n in notes:
        print(n, file=sys.stderr)
    return 0


def _median_run(runs: list) -> tuple:
    """Of one engine's runs (run_engine's tuples), the one with the median merge stage (astolfo)
    or wall time (the others); failed runs count only when none succeeded."""
    good = [r for r in runs if r[2]] or runs
    good.sort(key=lambda r: r[4].get("merge_s") or r[0])
    return good[(len(good) - 1) // 2]


def _spread(runs: list, size: int) -> str:
    """Every run's rate, when there were several: the stage's GB/s for astolfo, else input GB/s."""
    if len(runs) < 2:
        return ""
    rates = sorted((r[4]["bytes_read"] / r[4]["merge_s"] if r[4].get("merge_s") else size / r[0]) / 1e9 for r in runs)
    return f"{len(runs)} runs, the median shown; every run: {', '.join(f'{x:.2f}' for x in rates)} GB/s"


def _engine_label(name: str) -> str:
    if name != "astolfo-baseline" or BASELINE is None:
        return name
    try:
        rev = subprocess.run(["git", "-C", str(BASELINE), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = BASELINE.name
    return f"astolfo at {rev}"


def copy_note(paths: list[Path]) -> str:
    """One thread's ``pread`` of the cached files into one buffer reused for every read, by the
    buffer's size (best of 3 passes each): what the copy out of the page cache costs when the
    destination stays in the CPU's cache and when it does not (the reader threads' 64 MB items)."""
    import numpy as np

    warm(paths)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    rates = []
    try:
        for size in (1 << 20, 4 << 20, 16 << 20, 64 << 20):
            buf = np.empty(size, np.uint8)
            view = memoryview(buf)
            best = math.inf
            for _ in range(3):
                t0, total = time.perf_counter(), 0
                for fd in fds:
                    end = os.fstat(fd).st_size
                    for off in range(0, end - size, size):
                        total += os.preadv(fd, [view], off)
                best = min(best, (time.perf_counter() - t0) / total)
            rates.append(f"{size >> 20} MB {1 / best / 1e9:.1f} GB/s")
    finally:
        for fd in fds:
            os.close(fd)
    return ("- Copying from the page cache (one thread's pread of the cached files into one buffer reused for every "
            "read, by the buffer's size; L3 cache " + _l3() + "): " + ", ".join(rates) + ".")


def _l3() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("L3 cache"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown"


def kernel_rows(n: int = 131072, sources: int = 3) -> list[list[str]]:
    """Each kernel on one thread (the merge's workers each run one): the weighted mean of
    ``sources`` slices of ``n`` elements with integer weights, best of 15 interleaved repeats
    of 20 calls."""
    import numpy as np

    from engine.kernels import mean as fused
    from engine.merge.arithmetic import Kernel

    torch.set_num_threads(1)
    rows = []
    cases = [("F16", "F16"), ("BF16", "BF16"), ("F32", "F16"), ("F16", "F32")]
    dt = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    factors = [3.0, 17.0, 50.0, 1.0, 2.0, 5.0, 7.0, 11.0][:sources]
    for src, dst in cases:
        g = torch.Generator().manual_seed(7)
        views = [(torch.randn(n, generator=g) * 0.05).to(dt[src]) for _ in range(sources)]
        out = torch.empty(n, dtype=dt[dst])
        k = Kernel(torch.device("cpu"), n)
        raw = torch.cat([v.view(torch.uint8) for v in views]).numpy()
        size = views[0].element_size()
        in_views = (raw.view(np.uint16) if size == 2 else np.empty(0, np.uint16),
                    raw.view(np.float32) if size == 4 else np.empty(0, np.float32), np.empty(0, np.float64))
        out_raw = out.view(torch.uint8).numpy()
        out_views = (out_raw.view(np.uint16) if dst in ("F16", "BF16") else np.empty(0, np.uint16),
                     out_raw.view(np.float32) if dst == "F32" else np.empty(0, np.float32), np.empty(0, np.float64))
        kinds = np.full(sources, fused.KIND[src], np.int64)
        offsets = np.arange(sources, dtype=np.int64) * n
        weights, total = np.array(factors), math.fsum(factors)
        okind, ooff = np.array([fused.KIND[dst]], np.int64), np.zeros(1, np.int64)

        def run_fused():
            fused.weighted_mean(*in_views, kinds, offsets, weights, total, n, *out_views, okind, ooff, True)

        def run_torch():
            k.mean(views, factors, [out])

        timing = {"torch Kernel": math.inf, "fused (numba)": math.inf}
        fns = {"torch Kernel": run_torch, "fused (numba)": run_fused}
        for fn in fns.values():
            fn()
        for _ in range(15):  # interleaved, best of 15: the least disturbed by other programs
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                timing[name] = min(timing[name], (time.perf_counter() - t0) / 20)
        for name, best in timing.items():
            rows.append([f"{sources} x {src} -> {dst}", name, f"{best * 1e3:.3f}", f"{best / n * 1e9:.2f}",
                         f"{sources * n / best / 1e9:.2f}", ""])
        rows[-1][5] = f"{timing['torch Kernel'] / timing['fused (numba)']:.1f}x"
    return rows


def _kernel_table(rows: list[list[str]]) -> str:
    head = ["kernel alone (one thread)", "kernel", "ms per call", "ns per output element", "G source elements/s",
            "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(0)})"
    return device


def _mecha_version() -> str:
    try:
        from importlib.metadata import version

        return f" (sd-mecha {version('sd-mecha')})"
    except Exception:
        return ""


def _ratios(rows: list[list[str]], results: dict[str, float], run: str) -> None:
    """Fill the "astolfo is Nx faster" column of ``run``'s rows."""
    mine = results.get("astolfo")
    if not mine:
        return
    for row in rows:
        if row[0] == run and row[1] in results:
            row[7] = f"{results[row[1]] / mine:.2f}x"


def _table(rows: list[list[str]]) -> str:
    head = ["run", "engine", "wall s", "input GB/s", "merge GB/s (stage s)",
            "CPU s read / compute / write / main / all", "vs floor", "time / astolfo's", "peak RSS", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _doc_notes() -> str:
    return textwrap.dedent("""\
        - "input GB/s": source bytes over wall time (process start to exit). "merge GB/s": the bytes
          astolfo read over its merge stage (first read to the last result handed to the writer; the
          final fsync and rename excluded), the stage's seconds in brackets. "CPU s read / compute /
          write / main / all": CPU seconds during that stage of astolfo's reader, compute (worker)
          and writer threads (sampled from /proc, whole run), of the main thread that hands out
          items and collects results, and of the whole process (getrusage): "all" near cores x
          stage seconds means the merge is CPU-bound. From the page cache the workers read their
          own sources, a few MB at a time (engine.merge.backends.cpu_stretches): those reads are
          timed in the workers (thread CPU time) and counted under "read", not "compute".
        - "astolfo at <commit>" (--baseline): the same script run on an earlier checkout of the
          project, in the same run. With --repeat the engines run in turn that many times and each
          row is an engine's run with the median merge stage (wall time for the others), every
          run's rate in its notes.
        - "vs floor": wall time over the I/O floor measured in the same run (cat of the inputs, then
          dd writing the output's size with conv=fdatasync). "time / astolfo's": how many times
          longer an engine took than astolfo in the same run. astolfo-torch is astolfo with the
          torch kernel (ASTOLFO_CPU_KERNELS=torch) instead of the fused numba kernels;
          astolfo-buffered is astolfo reading and writing through the page cache
          (ASTOLFO_DIRECT_IO=0) instead of O_DIRECT: the engine's I/O as it was before.
        - astolfo writes its output with O_DIRECT (engine.checkpoint.direct_io) and, when the
          merge's files are too big to stay cached (more than half the RAM: the cold run),
          reads its sources with O_DIRECT too (engine.merge.direct_reads).
        - "cached, output in RAM": the same merge writing its output to /dev/shm (tmpfs), so the
          disk's write speed is out of the way: what the read and compute side can do. tmpfs
          keeps its files in page-cache memory, so here every engine pays for the pages.
        - Kernel alone: one thread, 3 slices of 131072 elements, integer weights 3, 17, 50, best of
          15 interleaved repeats of 20 calls; "G source elements/s" counts every source element read.
        - Each engine runs in its own process; wall time includes Python and torch start-up; peak RSS
          is the process's maximum resident set (mmap'd file pages count for the plain loop).
        - astolfo's provenance hashes come from the catalog (hashed once before timing, as a scan does).
        - The plain loop and sd-mecha run `sync` after writing; astolfo fsyncs its output and renames it.""")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _write_doc(header: str, table: str, notes: list[str], section: str = "merge") -> None:
    write_section(BENCHMARKS_MD, f"## {section}\n\n{header}\n\n{table}\n\n" + "\n".join(notes) + "\n")


if __name__ == "__main__":
    sys.exit(main())

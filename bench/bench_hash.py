"""Hashing throughput: ``engine.hashes.hasher.hash_file`` against ``cat FILE > /dev/null`` (the rate the
file can be read) and against SHA256 alone (hashlib over the file: the floor for any tool that
reports a SHA256), on the same files in the same run.

Files are synthetic checkpoints big enough to time (SDXL fp16 at 1/3 scale, SD 1.5 fp32 at 1/3
scale, ~1.2 GB together), kept in a cache folder between runs. Each measurement is repeated and
the median taken, with the runs of the three contenders interleaved, because the machine may be
shared. "cold" drops the page cache before every run (needs root; skipped otherwise).

    .venv/bin/python bench/bench_hash.py [--repeat 5] [--dir /tmp/astolfo-bench-hash] [--no-cold]
                                         [--jobs 1,2,4] [--sweep-only]

``--jobs`` sweeps the number of files hashed at once (``engine.hashes.parallel``; the files are
hashed several times over so that every job has a file): aggregate GB/s per number of jobs,
page cache warm. The default sweep is 1, the default jobs of this machine, and twice that.

Prints tables and writes the "## hashing" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import cpu_name, memory_gib, write_section  # noqa: E402 (bench/ is on sys.path when run as a script)

from engine.hashes.hasher import hash_file
from engine.hashes.parallel import HashPool, default_jobs
from engine.library.diagnose import inspect_file
from engine.synth.checkpoints import SynthSpec, write_checkpoint

SECTION = "## hashing"
FILES = {
    "sdxl-fp16-s3.safetensors": SynthSpec(arch="sdxl", scale=3, seed=1, dtype="F16"),
    "sd15-fp32-s3.safetensors": SynthSpec(arch="sd15", scale=3, seed=2, dtype="F32"),
}


def make_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, spec in FILES.items():
        path = folder / name
        if not path.exists():
            print(f"writing {path} ...", file=sys.stderr)
            write_checkpoint(path, spec)
        out.append(path)
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def time_cat(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run(f"cat '{path}' > /dev/null", shell=True, check=True)
    return time.perf_counter() - t


def time_sha256(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    return time.perf_counter() - t


def time_two_sha256(path: Path) -> float:
    """SHA256 and AutoV3 are two SHA256 streams over the same bytes: this is their floor, two
    threads each hashing the whole file (sharing the page cache)."""
    t = time.perf_counter()
    threads = [threading.Thread(target=time_sha256, args=(path,)) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def time_hash_file(path: Path, report, cpu: list[float]) -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    hash_file(path, report)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return wall


def measure(path: Path, repeat: int, cold: bool) -> dict[str, float]:
    report = inspect_file(path)
    runs: dict[str, list[float]] = {"cat": [], "sha256": [], "two_sha256": [], "hash_file": []}
    cpu: list[float] = []
    contenders = {
        "cat": lambda: time_cat(path),
        "sha256": lambda: time_sha256(path),
        "two_sha256": lambda: time_two_sha256(path),
        "hash_file": lambda: time_hash_file(path, report, cpu),
    }
    if not cold:
        time_cat(path)  # warm the page cache
    for _ in range(repeat):
        for name, fn in contenders.items():
            if cold:
                drop_caches()
            runs[name].append(fn())
    out = {name: statistics.median(ts) for name, ts in runs.items()}
    out["hash_file_cpu"] = statistics.median(cpu)
    return out


def sweep(files: list[Path], jobs_list: list[int], repeat: int) -> list[tuple[int, int, float]]:
    """(jobs, bytes, median seconds) of hashing ``max(jobs_list)`` passes over ``files`` with each
    number of jobs, page cache warm, runs interleaved."""
    reports = {p: inspect_file(p) for p in files}
    work = [p for _ in range(max(jobs_list)) for p in files]
    size = sum(p.stat().st_size for p in work)
    for p in files:
        time_cat(p)
    times: dict[int, list[float]] = {j: [] for j in jobs_list}
    for _ in range(repeat):
        for j in jobs_list:
            items = [(p, reports[p]) for p in work]
            pool = HashPool(lambda it, prog, c: hash_file(it[0], it[1], on_progress=prog, cancel=c),
                            {id(it): it[0].stat().st_size for it in items}, j)
            t = time.perf_counter()
            pool.run(items)
            times[j].append(time.perf_counter() - t)
    return [(j, size, statistics.median(times[j])) for j in jobs_list]


def machine() -> str:
    cpu = cpu_name()
    mem = memory_gib()
    sha_ni = ""
    try:
        sha_ni = ", SHA-NI" if " sha_ni" in Path("/proc/cpuinfo").read_text() else ", no SHA-NI"
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.node() or 'this machine'}: {cpu} ({os.cpu_count()} CPUs, {cores} usable{sha_ni}), "
            f"{mem:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/astolfo-bench-hash"))
    parser.add_argument("--no-cold", action="store_true", help="skip the dropped-page-cache runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--jobs", default="", help="comma-separated jobs to sweep (default: 1, default, 2 x default)")
    parser.add_argument("--sweep-only", action="store_true", help="only the --jobs sweep (implies --no-write)")
    args = parser.parse_args()

    files = make_files(args.dir)
    d = default_jobs()
    jobs_list = sorted({int(j) for j in args.jobs.split(",") if j}) if args.jobs else sorted({1, d, 2 * d})
    rates = sweep(files, jobs_list, args.repeat)
    base = next((t for j, _, t in rates if j == 1), rates[0][2])
    sweep_lines = ["| jobs | GB hashed | GB/s | vs 1 job |", "|---:|---:|---:|---:|"]
    sweep_lines += [f"| {j}{' (default)' if j == d else ''} | {n / 1e9:.2f} | {n / t / 1e9:.2f} | {base / t:.2f}x |"
                    for j, n, t in rates]
    sweep_table = "\n".join(sweep_lines)
    print(sweep_table)
    if args.sweep_only:
        return 0
    modes = ["warm"]
    if not args.no_cold:
        if drop_caches():
            modes.append("cold")
        else:
            print("cannot drop the page cache (not root?): cold runs skipped", file=sys.stderr)
    load_before = os.getloadavg()[0]
    rows = []
    for path in files:
        size = path.stat().st_size
        for mode in modes:
            t = measure(path, args.repeat, mode == "cold")
            rows.append((path.name, size, mode, t))
            print(f"{path.name} {mode}: " + ", ".join(f"{k} {size / t[k] / 1e9:.2f} GB/s"
                                                     for k in ("cat", "sha256", "two_sha256", "hash_file")),
                  file=sys.stderr)
    load_after = os.getloadavg()[0]

    header = (
        "| file | size | page cache | cat GB/s | SHA256 alone GB/s | 2 x SHA256 GB/s | hash_file GB/s "
        "| hash_file / cat | hash_file / 2 x SHA256 | hash_file CPU s per GB |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, size, mode, t in rows:
        rate = {k: size / v / 1e9 for k, v in t.items()}
        lines.append(
            f"| {name} | {size / 1e9:.2f} GB | {mode} | {rate['cat']:.2f} | {rate['sha256']:.2f} | "
            f"{rate['two_sha256']:.2f} | {rate['hash_file']:.2f} | {rate['hash_file'] / rate['cat']:.0%} "
            f"| {rate['hash_file'] / rate['two_sha256']:.0%} | {t['hash_file_cpu'] / (size / 1e9):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    disk_bound = [
        f"{name} {mode}: `cat` {size / t['cat'] / 1e9:.2f} GB/s, `hash_file` {t['cat'] / t['hash_file']:.0%} of it"
        for name, size, mode, t in rows
        if t["cat"] > t["two_sha256"]
    ]
    if disk_bound:
        verdict = "Runs where the read was slower than two SHA256 streams (disk-bound): " + "; ".join(disk_bound) + "."
    else:
        verdict = "No run here was disk-bound: `cat` always read faster than two SHA256 streams could hash."

    text = "\n".join(
        [
            SECTION,
            "",
            "`bench/bench_hash.py`: one `hash_file` pass (SHA256, AutoV1, AutoV3, per-component exact and fp16",
            "BLAKE3 hashes, NaN/Inf counts, toolkit metric) against `cat FILE > /dev/null`, against SHA256",
            "alone (`hashlib.file_digest`) and against two SHA256 of the file on two threads (the floor for",
            "SHA256 + AutoV3, which hash nearly the same bytes twice), same synthetic files, same run. Medians of",
            f"{args.repeat} interleaved runs: the machine is shared with other engineers' test runs (1-minute",
            f"load average {load_before:.1f} before, {load_after:.1f} after). \"cold\" drops the page cache "
            "before each run.",
            "",
            f"Machine: {machine()}.",
            "",
            table,
            "",
            "SHA256 and AutoV3 are two SHA256 streams over nearly every byte. SHA256 is sequential, so each",
            "stream is bound to one core (hashlib with SHA-NI: the \"SHA256 alone\" column); with two cores",
            "the \"2 x SHA256\" column is the ceiling for any single pass that reports both, and `hash_file`",
            "adds its per-tensor work (BLAKE3 per tensor, NaN/Inf check, fp16 conversion, metric) on a third",
            "thread, about 0.3 CPU s per GB beyond the two SHA256. The issue's target, 80% of the rate `cat`",
            "reads, is out of reach on any machine whose disk reads faster than one core computes SHA256:",
            "here `cat` reads several GB/s (more from the page cache) against ~2 GB/s for one SHA256 stream.",
            "Where the disk is the slower side (SATA SSD, HDD) and three cores are free, the pass should run at",
            "the disk's rate; the line below says whether any run here was in that regime.",
            "",
            verdict,
            "",
            f"Files hashed at once (`--jobs`; default here {d}: one per three usable cores), the files above",
            f"hashed {max(jobs_list)} times over, page cache warm, medians of {args.repeat} runs:",
            "",
            sweep_table,
            "",
        ]
    )
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

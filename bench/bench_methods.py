"""Merge-methods benchmark: astolfo's methods against its own weighted mean and against sd-mecha
1.1.8's equivalents, side by side in one run, on synthetic SDXL fp16 files with the real key set.

The issues' targets (this 2-core machine):
- methods (issue 12): ``ties_soup``, ``dare`` and ``add_difference`` within 1.3x of astolfo's
  mean; ``ties`` (trim 0.2) and ``model_stock`` within 3x; at least 3x faster than sd-mecha's
  equivalent; peak RSS under 3 GB and flat from N = 4 to 16.
- geometric median (issue 13): at least 5x faster than sd-mecha at N = 16; peak RSS under the
  memory budget + 2 GB; the re-read mode (forced by a small budget) within 3x of the in-memory
  mode with the files in the page cache. Up to ``GRAM_MAX`` models the medians iterate on the
  points' Gram matrix (no memory modes); the sweeps and their two modes are timed as well, with
  ``GRAM_MAX`` set to 0.

Inputs: one base file plus N models (the base is outside the selection; the mean averages the
same N models). The page cache is warmed before each run (the files fit in RAM), so the figures
are the engines' own cost, not the disk's; with ``--cold`` it is dropped before each run instead
(full-size files, the issue's N = 3 cold case). Each engine runs in its own process; wall time from
start to exit (interpreter and imports included), peak RSS from the process's VmHWM.

sd-mecha's equivalents, with the same parameters (all weights 1):
- mean: ``n_average``;
- ties_soup (trim 1, count vote): ``add_difference(base, ties_sum(*deltas, k=1.0))`` (what its
  ``add_difference_ties`` wrapper builds; the wrapper itself fails in 1.1.8 on merge spaces it has
  not resolved yet, so the merge method ``linear.add_difference`` adds every delta to the base);
- ties (trim 0.2, sum vote): ``add_difference(base, ties_sum(*deltas, k=0.2, vote_sgn=True))``;
- ties_soup + drop 0.1 (TIES-SOUP with DROP) and della: ``ties_sum_with_dropout(*deltas,
  probability=0.1, k=1.0, vote_sgn=False, apply_stock=True[, della_eps=-0.1])`` (apply_stock=True
  is its plain disjoint mean; its default multiplies by a model-stock factor);
- dare: ``dropout(base, *models, probability=0.1, alpha=1.0)`` (its DARE, n-supermario);
- model_stock: ``add_difference(base, model_stock(*deltas))``;
- geometric_median: ``geometric_median(*models)``; tgmd: ``add_difference(base,
  ties_sum_with_dropout(*deltas, probability=0.1, rescale=False, k=1.0, vote_sgn=True,
  apply_median=True))``.
add_difference has no N-model form in sd-mecha (its add_difference takes one delta): "-".

Usage: ``python bench/bench_methods.py [--scale 4] [--n 8,16] [--methods ...] [--quick]
[--section NAME]``; the table is printed and written to the "## methods" section of
docs/benchmarks.md (or "## NAME"). The synthetic
files are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_merge  # noqa: E402 (bench/ is on sys.path when run as a script)
from bench_merge import drop_caches, gb, machine, prehash, run_engine, synth_files, warm  # noqa: E402
from common import BENCHMARKS_MD, Rows, child_path, markdown_table, write_section  # noqa: E402

MECHA_METHOD = """
import os, sys, torch, sd_mecha
from sd_mecha import *  # the merge methods by name, for the expression below
# its N-model methods return deltas; the wrapper sd_mecha.add_difference compares merge spaces
# that 1.1.8 has not resolved yet (AttributeError), so the merge method itself adds them to the base
from sd_mecha.extensions.builtin.merge_methods.linear import add_difference
out, paths = sys.argv[1], sys.argv[2:]
base = sd_mecha.model(paths[0])
models = [sd_mecha.model(p) for p in paths[1:]]
deltas = [sd_mecha.subtract(m, base) for m in models]
recipe = eval(os.environ["BENCH_MECHA"])
sd_mecha.merge(recipe, output=out, merge_device=os.environ.get("BENCH_DEVICE", "cpu"), merge_dtype=torch.float32,
               output_dtype=torch.float16)
os.sync()
"""
bench_merge.SCRIPTS["sd-mecha-method"] = MECHA_METHOD

DROP = {"drop": 0.1, "seed": 0}
# name: (astolfo's [methods] table or None for the mean, sd-mecha's recipe expression or None, target vs mean)
METHODS: dict[str, tuple[dict | None, str | None, float | None]] = {
    "mean": (None, "n_average(*models)", None),
    "add_difference": ({"method": "add_difference", "base": "m00"}, None, 1.3),
    "ties_soup": ({"method": "ties_soup", "base": "m00"}, "add_difference(base, ties_sum(*deltas, k=1.0))", 1.3),
    "dare": ({"method": "dare", "base": "m00", **DROP},
             "dropout(base, *models, probability=0.1, alpha=1.0, seed=0)", 1.3),
    "ties_soup+drop": ({"method": "ties_soup", "base": "m00", **DROP},
                       "add_difference(base, ties_sum_with_dropout(*deltas, probability=0.1, k=1.0, vote_sgn=False, "
                       "apply_stock=True, seed=0))", None),
    "ties": ({"method": "ties", "base": "m00"},
             "add_difference(base, ties_sum(*deltas, k=0.2, vote_sgn=True))", 3.0),
    "della": ({"method": "della", "base": "m00", "drop_eps": -0.1, **DROP},
              "add_difference(base, ties_sum_with_dropout(*deltas, probability=0.1, della_eps=-0.1, k=1.0, "
              "vote_sgn=False, apply_stock=True, seed=0))", None),
    "model_stock": ({"method": "model_stock", "base": "m00"}, "add_difference(base, model_stock(*deltas))", 3.0),
    "geometric_median": ({"method": "geometric_median"}, "geometric_median(*models)", None),
    "tgmd": ({"method": "tgmd", "base": "m00"},
             "add_difference(base, ties_sum_with_dropout(*deltas, probability=0.1, rescale=False, k=1.0, "
             "vote_sgn=True, apply_median=True, seed=0))", None),
}
MEDIANS = ("geometric_median", "tgmd")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4, help="file scale (1 = full-size SDXL, 6.9 GB; 4: 0.43 GB)")
    ap.add_argument("--n", default="8,16", help="comma list of model counts (the base file comes on top)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list: " + ", ".join(METHODS))
    ap.add_argument("--mecha-n", default="8,16", help="model counts at which sd-mecha runs too")
    ap.add_argument("--mecha-methods", default="", help="methods sd-mecha runs (default: every one it has)")
    ap.add_argument("--small-memory", default="64MB", help="the budget that forces a median's re-read mode")
    ap.add_argument("--device", default="cpu", help="merge device for astolfo and sd-mecha: cpu or cuda")
    ap.add_argument("--cold", action="store_true",
                    help="page cache dropped before each run instead of warmed (full-size files do not fit it)")
    ap.add_argument("--quick", action="store_true", help="small files (scale 32), N = 4: checks the script")
    ap.add_argument("--data", type=Path, default=ROOT / "bench/.data/methods", help="folder for synthetic files")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files afterwards")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--section", default="methods",
                    help='the docs/benchmarks.md section written ("## <section>"): a run of a few methods '
                         "can go to its own section and leave the full run's in place")
    args = ap.parse_args(argv)
    if args.quick:
        args.scale, args.n, args.mecha_n = 32, "4", "4"
    ns = [int(x) for x in args.n.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s): {', '.join(unknown)}")
    mecha_ns = {int(x) for x in args.mecha_n.split(",") if x}
    mecha_methods = {m for m in args.mecha_methods.split(",") if m} or set(methods)
    if importlib.util.find_spec("sd_mecha") is None:
        print("sd-mecha is not installed (pip install sd-mecha==1.1.8); running astolfo alone", file=sys.stderr)
        mecha_ns = set()

    args.data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ASTOLFO_CACHE_DIR=str(args.data / "cache"), PYTHONPATH=child_path(),
               BENCH_DEVICE=args.device, BENCH_BASE_FIRST="1")
    os.environ["ASTOLFO_CACHE_DIR"] = env["ASTOLFO_CACHE_DIR"]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()[0]
    folder = args.data / f"s{args.scale}"
    out_dir = args.data / "out"
    out_dir.mkdir(exist_ok=True)
    paths = synth_files(folder, max(ns) + 1, args.scale, log)
    prehash(paths, log)
    rows: list[list[str]] = Rows()
    notes: list[str] = []
    cold: list[bool] = []  # whether each cold run's drop_caches worked

    def one(engine: str, n: int, extra: dict) -> tuple[float, int, str, dict]:
        run_paths = paths[: n + 1]
        if args.cold:
            cold.append(drop_caches())
        else:
            warm(run_paths)
            warm(run_paths)
        out = out_dir / f"{engine}.safetensors"
        wall, rss, ok, tail, stats = run_engine(engine, out, run_paths, dict(env, **extra))
        out.unlink(missing_ok=True)
        err = "" if ok else "FAILED: " + ((tail.strip().splitlines() or [""])[-1])[:160]
        return wall, rss, err, stats

    for n in ns:
        size = sum(p.stat().st_size for p in paths[1: n + 1])
        mean_wall = None
        for name in methods:
            table, mecha, target = METHODS[name]
            variants = [("astolfo", {})]
            if name in MEDIANS:  # the default route (the Gram matrix up to GRAM_MAX models), the sweeps' two modes
                sweeps = {"BENCH_GRAM_MAX": "0"}
                variants = [("astolfo", {}), ("astolfo, sweeps", sweeps),
                            (f"astolfo, sweeps, memory {args.small_memory}",
                             {**sweeps, "BENCH_MEMORY": args.small_memory})]
            in_memory = None
            fastest = None
            for label, extra in variants:
                log(f"  N={n} {name}: {label} ...")
                wall, rss, err, stats = one("astolfo", n, {"BENCH_METHOD": json.dumps(table or {}), **extra})
                if name == "mean" and not err:
                    mean_wall = wall
                vs_mean = f"{wall / mean_wall:.2f}x" if mean_wall and name != "mean" else ""
                goal = (f"target <= {target}x: {'met' if wall / mean_wall <= target else 'NOT met'}"
                        if target and mean_wall else "")
                if "BENCH_MEMORY" in extra and in_memory:
                    goal = f"{wall / in_memory:.2f}x the sweeps' in-memory mode (target <= 3x)"
                if extra and "BENCH_MEMORY" not in extra:
                    in_memory = wall
                if not extra:
                    fastest = wall
                stage = (f"{size / stats['merge_s'] / 1e9:.2f} ({stats['merge_s']:.1f} s)"
                         if stats.get("merge_s") else "")
                rows.append([f"N={n}", name, label, f"{wall:.1f}", stage, vs_mean, "", gb(rss), err or goal])
            if mecha and n in mecha_ns and name in mecha_methods:
                log(f"  N={n} {name}: sd-mecha ...")
                wall, rss, err, _ = one("sd-mecha-method", n, {"BENCH_MECHA": mecha})
                faster = f"{wall / fastest:.2f}x" if fastest and not err else ""
                rows.append([f"N={n}", name, "sd-mecha", f"{wall:.1f}", "",
                             f"{wall / mean_wall:.2f}x" if mean_wall and not err else "", faster, gb(rss), err])

    each = paths[1].stat().st_size
    shutil.rmtree(out_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    table = _table(rows)
    print(table)
    command = " ".join(["python bench/bench_methods.py", *(shlex.quote(a) for a in sys.argv[1:])])
    header = (f"`{command}`. Machine: {machine()}; 1-minute "
              f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the machine is shared). "
              f"Synthetic SDXL fp16 files at scale {args.scale} ({gb(each)} each): a base plus N models, "
              + ("the page cache dropped before each run (cold)" if args.cold else
                 "the page cache warm (the files read twice before each run)")
              + f"; merge device {args.device}"
              f"{_mecha_version() if mecha_ns else '; sd-mecha not installed'}.")
    notes += [
        "- \"wall s\": process start to exit (Python start-up and imports included). \"merge GB/s\": the N models' "
        "bytes over astolfo's merge stage (first read to the last result handed to the writer); methods that need "
        "a per-tensor statistic (trim < 1, DELLA, model stock) read each source twice, the medians once per "
        "iteration in the re-read mode.",
        "- \"vs mean\": wall time over astolfo's weighted mean of the same N models in the same run. \"sd-mecha / "
        "astolfo\": sd-mecha's wall time over astolfo's for the same method and parameters (the issue's target: "
        ">= 3x for the methods, >= 5x for the medians at N = 16).",
        "- sd-mecha's equivalents are listed in bench/bench_methods.py's docstring; it stacks the N tensors of "
        "each key (fp32 here), so its peak RSS grows with N.",
    ]
    if args.cold and not all(cold):
        notes.insert(0, "- /proc/sys/vm/drop_caches could not be written (not root?): the cold runs are NOT cold.")
    if not args.no_doc:
        write_section(BENCHMARKS_MD, f"## {args.section}\n\n{header}\n\n{table}\n\n" + "\n".join(notes) + "\n")
    return 0


def _mecha_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"; sd-mecha {version('sd-mecha')}"
    except PackageNotFoundError:
        return ""


def _table(rows: list[list[str]]) -> str:
    head = ["N", "method", "engine", "wall s", "merge GB/s (stage s)", "vs mean", "sd-mecha / astolfo",
            "peak RSS", "notes"]
    return markdown_table(head, rows)


if __name__ == "__main__":
    sys.exit(main())

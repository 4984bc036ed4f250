"""Whether this checkout's merge writes the same tensor bytes as another checkout's.

The check a change to the merge's arithmetic owes (issue 10: "the tensor data of every output is
byte-identical to the engine's as this issue starts"): synthetic SDXL checkpoints stored in fp16,
bf16 and fp32, one recipe with uneven weights and three outputs (fp16, bf16, fp32; selections
that mix storage dtypes), merged once by each checkout in its own process, then every tensor's
dtype, shape and bytes compared. Metadata is not compared (it may change for other reasons).

    git worktree add -f /tmp/base <commit> --detach
    python bench/same_bytes.py --baseline /tmp/base [--scales 64,8]

Exit status 0 when every output's tensors match, 1 when one differs, 2 when a merge failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from engine.synth.checkpoints import SynthSpec, write_checkpoint  # noqa: E402

RUN = """
import sys
from pathlib import Path
from engine.recipe.toml_file import parse_recipe
from engine.plan.planner import build_plan
from engine.merge.run import execute
recipe = Path(sys.argv[1])
execute(build_plan(parse_recipe(recipe.read_text(), recipe.parent)))
"""

MODELS = {"a0": ("F16", 1), "a1": ("F16", 2), "a2": ("F16", 3), "b0": ("BF16", 4), "b1": ("BF16", 5),
          "c0": ("F32", 6), "c1": ("F32", 7)}
WEIGHTS = {"a0": 3.0, "a1": 17.0, "a2": 50.0, "b0": 0.3, "b1": 1.7, "c0": 2.5, "c1": 0.1}
SELECT = {"all": ["a0", "a1", "a2"], "mixed": ["a0", "b0", "c0", "b1"], "odd": ["a1", "c1", "b1"]}
OUTPUTS = [("o-f16", "all", None), ("o-bf16", "mixed", "bf16"), ("o-f32", "odd", "fp32")]


def recipe(models: dict[str, Path], out_dir: str) -> str:
    lines = ['name = "same-bytes"', "[models]"] + [f'{m} = "{p}"' for m, p in models.items()]
    lines += ["[select]"] + [f"{n} = {json.dumps(ids)}" for n, ids in SELECT.items()]
    lines += ["[weights]"] + [f"{m} = {w!r}" for m, w in WEIGHTS.items()]
    for name, sel, dtype in OUTPUTS:
        lines += ["[[output]]", f'path = "{out_dir}/{name}.safetensors"']
        lines += [f'dtype = "{dtype}"'] if dtype else []
        lines += [f'{c} = "{sel}"' for c in ("unet", "te0", "te1", "vae")]
    return "\n".join(lines) + "\n"


def merge(checkout: Path, recipe_path: Path, home: Path) -> str:
    """Run the recipe with ``checkout``'s engine; the error's tail, or "" when it succeeded."""
    env = dict(os.environ, PYTHONPATH=str(checkout), HOME=str(home))
    proc = subprocess.run([sys.executable, "-c", RUN, str(recipe_path)], cwd=checkout, env=env,
                          capture_output=True, text=True)
    return "" if proc.returncode == 0 else (proc.stderr or proc.stdout)[-800:]


def tensor_digests(path: Path) -> dict[str, tuple[str, tuple, str]]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key).contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out[key] = (str(t.dtype), tuple(t.shape), hashlib.sha256(data).hexdigest())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="another checkout of the project")
    ap.add_argument("--scales", default="64,8", help="comma list of synthetic file scales (1 = full size)")
    args = ap.parse_args()
    base = args.baseline.resolve()
    worst = 0
    print("| scale | output | tensors | differ |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="same-bytes-") as tmp:
        tmp = Path(tmp)
        for scale in map(int, args.scales.split(",")):
            folder = tmp / f"s{scale}"
            folder.mkdir()
            models = {}
            for mid, (dtype, seed) in MODELS.items():
                models[mid] = folder / f"{mid}.safetensors"
                write_checkpoint(models[mid], SynthSpec(seed=seed, scale=scale, dtype=dtype))
            for tag, checkout in (("this", ROOT), ("base", base)):
                (folder / tag).mkdir()
                path = folder / f"{tag}.toml"
                path.write_text(recipe(models, tag))
                err = merge(checkout, path, tmp / f"home-{tag}")
                if err:
                    print(f"merge with {checkout} failed at scale {scale}:\n{err}", file=sys.stderr)
                    return 2
            for name, _, _ in OUTPUTS:
                a, b = (tensor_digests(folder / tag / f"{name}.safetensors") for tag in ("this", "base"))
                differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                worst = max(worst, 1 if differ else 0)
                shown = ", ".join(differ[:3]) + (" ..." if len(differ) > 3 else "")
                print(f"| {scale} | {name} | {len(a)} | {len(differ)}{' (' + shown + ')' if differ else ''} |")
    print("same bytes" if worst == 0 else "DIFFERENT bytes")
    return worst


if __name__ == "__main__":
    sys.exit(main())

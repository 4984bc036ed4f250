"""Helpers for the recipe, plan and merge tests: small synthetic checkpoints, recipe text, and
an fp64 reference mean computed independently of the engine (safetensors' own loader, plain
torch arithmetic)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.synth.checkpoints import SynthSpec, write_checkpoint

SCALE = 64  # ~2 MB per SDXL file: every key, small shapes


def make_models(folder: Path, count: int = 3, scale: int = SCALE, **spec) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"m{i}.safetensors"
        write_checkpoint(path, SynthSpec(seed=i + 1, scale=scale, **spec))
        paths.append(path)
    return paths


def recipe_text(models: dict[str, str], select: dict[str, list[str]], outputs: list[dict], weights=None,
                **settings) -> str:
    lines = [f'name = "{settings.pop("name", "test-mix")}"']
    for k, v in settings.items():
        lines.append(f"{k} = {_toml(v)}")
    lines.append("[models]")
    lines += [f'{mid} = "{path}"' for mid, path in models.items()]
    lines.append("[select]")
    lines += [f"{name} = {_toml(ids)}" for name, ids in select.items()]
    if weights:
        lines.append("[weights]")
        lines += [f"{mid} = {w!r}" for mid, w in weights.items()]
    for out in outputs:
        lines.append("[[output]]")
        lines += [f"{k} = {_toml(v)}" for k, v in out.items()]
    return "\n".join(lines) + "\n"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def sdxl_output(path: str, sel: str = "all", **over) -> dict:
    out = {"path": path, "unet": sel, "te0": sel, "te1": sel, "vae": sel}
    out.update(over)
    return out


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def reference_mean(tensors: list[torch.Tensor], weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """The weighted mean in fp64, rounded once to ``dtype``."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += t.to(torch.float64) * w
    return round_exact(acc / sum(weights), dtype)


def round_exact(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 ``x`` correctly rounded (to nearest, ties to even) to ``dtype``. torch converts
    fp64 to fp16/bf16 through fp32 (rounding twice), so for 16-bit types the result is chosen
    among the neighbours of torch's answer by exact fp64 distance."""
    if dtype in (torch.float32, torch.float64):
        return x.to(dtype)
    flat = x.reshape(-1)
    first = flat.to(dtype)
    bits = first.view(torch.int16).to(torch.int32)
    cands = torch.stack([first, (bits - 1).to(torch.int16).view(dtype), (bits + 1).to(torch.int16).view(dtype)])
    cand_bits = torch.stack([bits, bits - 1, bits + 1])
    dist = (cands.to(torch.float64) - flat).abs().nan_to_num(float("inf"))
    best = dist.min(0).values
    is_min = dist == best
    even = is_min & (cand_bits % 2 == 0)
    pick = torch.where(even.any(0), even.to(torch.int8).argmax(0), is_min.to(torch.int8).argmax(0))
    return cands.gather(0, pick.unsqueeze(0)).reshape(x.shape)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


ROOT = Path(__file__).resolve().parent.parent


def write_abc_recipe(folder: Path, models: Path, **settings) -> Path:
    """``folder/recipe.toml``: models a, b, c (``models``' m0..m2) averaged into every component
    of ``out/mix.safetensors``, with ``settings`` at the top."""
    text = recipe_text({m: str(models / f"m{i}.safetensors") for i, m in enumerate("abc")}, {"all": ["a", "b", "c"]},
                       [sdxl_output("out/mix.safetensors", "all")], **settings)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


def subprocess_env() -> dict:
    """The environment for a child Python that imports the project and the test helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def toml_value(v) -> str:
    """A method table's value as TOML (booleans, strings, numbers)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else repr(v)


def method_table(sel: str, method: dict) -> str:
    return f"[methods.{sel}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in method.items())


def drop_uniform(seed: int, path: Path, key: str, n: int):
    """The drop masks' uniforms of one model's tensor, from the definition's coordinates (seed,
    the file's SHA256, the key, the element index)."""
    from engine.kernels.hashing import key_hash, stream_key, uniform_numpy

    return torch.from_numpy(uniform_numpy(stream_key(seed, int(sha256(path)[:16], 16), key_hash(key)), 0, n))



def slow_some_medians(every: int = 40, pause: float = 0.3) -> None:
    """Make every ``every``-th key's geometric median pause once its first phase is named, so
    the merge (which computes medians a key ahead, on their own thread) waits for it and shows
    that phase in its progress. For tests that need a merge caught in the middle of a median."""
    import time as _time

    from engine.methods import median

    real, calls = median.geometric_median, [0]

    def slowed(*args, report, **rest):
        calls[0] += 1
        paused = []

        def named(detail):
            report(detail)
            if detail and not paused and calls[0] % every == 0:
                paused.append(True)
                _time.sleep(pause)

        return real(*args, report=named, **rest)

    median.geometric_median = slowed

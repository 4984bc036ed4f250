"""``astolfo merge`` and the GPU, in subprocesses on a machine without CUDA: a recipe asking
for CUDA is refused with exit code 2 naming CUDA; an out-of-memory error of the CUDA backend
(injected through the runtime test double) exits 1 with the clear message and leaves no file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_support import make_models, subprocess_env, write_abc_recipe

# The real CLI, with the engine's backend replaced by CudaBackend over the CPU test double of
# the CUDA runtime, whose 30th launch fails for lack of memory.
OOM_CLI = """
import sys
from cuda_double import CudaRuntimeDouble
from engine.merge import run as merge
from engine.merge.backends.cuda import CudaBackend
from astolfo_tui.commands import merge as command
from astolfo_tui.cli import main

def factory(plan, device, tuning, items):
    return CudaBackend(plan, device, tuning.buffer_bytes, items, runtime=CudaRuntimeDouble("lazy", fail_run=30))

real = merge.execute
def with_double(plan, **kw):
    kw["tuning"] = merge.Tuning(buffer_bytes=128 << 10, sub_elems=4096)
    return real(plan, backend_factory=factory, **kw)
command.execute = with_double
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cuda-cli-models")
    make_models(folder, 3)
    return folder




def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=subprocess_env(), timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_of_a_cuda_recipe_without_cuda_exits_2_naming_cuda(models, tmp_path):
    recipe = write_abc_recipe(tmp_path, models, device="cuda")
    for extra in (["--check"], []):
        result = _run(["-m", "astolfo_tui", "merge", str(recipe), *extra])
        assert result.returncode == 2, result.stderr
        problems = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        assert any(p.get("code") == "device" and "CUDA" in p["message"] for p in problems)
    assert not (tmp_path / "out").exists()


def test_out_of_memory_exits_1_with_the_advice_and_leaves_nothing(models, tmp_path):
    recipe = write_abc_recipe(tmp_path, models)
    result = _run(["-c", OOM_CLI, "merge", str(recipe), "--json"])
    assert result.returncode == 1, result.stderr
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["type"] == "failed"
    assert "not enough free memory" in last["message"] and 'device = "cpu"' in last["message"]
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / "out").iterdir())

"""Device choice and memory figures: what can be checked without a GPU (this machine has none):
device names are validated, ``auto`` falls back to the CPU, a recipe asking for CUDA where
there is none is refused before anything is read, and host memory is measured."""

from __future__ import annotations

import pytest
import torch
from merge_support import recipe_text, sdxl_output

from engine.merge.devices import MemoryMonitor, device_problem, host_rss, host_rss_peak, resolve_device
from engine.plan.planner import check_recipe
from engine.recipe.toml_file import parse_recipe


def test_device_names():
    assert device_problem("auto") is None and device_problem("cpu") is None
    for bad in ("gpu", "cuda:", "cuda:x", "tpu", "CUDA", ""):
        assert "not one of" in device_problem(bad)
    if torch.cuda.is_available():
        assert device_problem("cuda") is None
        assert "only" in device_problem(f"cuda:{torch.cuda.device_count()}")
        assert resolve_device("auto").type == "cuda"
    else:
        assert "no CUDA GPU" in device_problem("cuda") and "no CUDA GPU" in device_problem("cuda:0")
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_recipe_asking_for_cuda_is_refused_without_one(tmp_path):
    text = recipe_text({"a": "a.safetensors"}, {"all": ["a"]}, [sdxl_output("o.safetensors", "all")], device="cuda")
    problems = check_recipe(parse_recipe(text, tmp_path))
    assert any(p.code == "device" and "no CUDA GPU" in p.message for p in problems)


def test_host_memory_figures():
    rss = host_rss()
    assert rss is not None and rss > 10 << 20
    assert host_rss_peak() >= rss
    sample = MemoryMonitor(torch.device("cpu")).sample()
    assert (sample.card_used, sample.card_total, sample.process_peak) == (None, None, None)

"""A geometric median's element pass reads none of its models (engine.merge.layout,
engine.methods.streamed.element_models): its statistics computed the median from the files and
counted their NaN/Inf values, so the readers read the base alone, and a model only where another
output of the same key merges it otherwise; the items are no larger for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from merge_support import load, make_models, method_table, recipe_text, sdxl_output

from engine.merge import io
from engine.merge.layout import ALIGN, build_items
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.plan.model import METHOD
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe

VAE = "first_stage_model."


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("median-pass-models")
    make_models(folder, 4)
    return folder


def _plan(models: Path, tmp_path: Path, method: dict, name: str = "out"):
    """Output 1 merges every component by ``method`` over b, c, d; output 2 the same, but its VAE
    is the plain mean of b and c."""
    ids = {m: str(models / f"m{i}.safetensors") for i, m in enumerate("abcd")}
    text = recipe_text(ids, {"all": ["b", "c", "d"], "plain": ["b", "c"]},
                       [sdxl_output(str(tmp_path / f"{name}1.safetensors"), "all"),
                        sdxl_output(str(tmp_path / f"{name}2.safetensors"), "all", vae="plain")])
    return build_plan(parse_recipe(text + method_table("all", method), tmp_path))


@pytest.mark.parametrize("method", [{"method": "tgmd", "base": "a"}, {"method": "geometric_median"}])
def test_the_base_and_the_models_another_output_merges_are_read_the_rest_not(models, tmp_path, method):
    plan = _plan(models, tmp_path, method)
    name = {f.model_id: i for i, f in enumerate(plan.files)}
    seen_unread = 0
    for item in build_items(plan, 64 << 10):
        assert item.read_bytes == sum((s.nbytes + ALIGN - 1) // ALIGN * ALIGN
                                      for seg in item.segments for s in seg.sources if s.read)
        for seg in item.segments:
            key = plan.steps[seg.step].key
            if not any(plan.nodes[ns.node].kind == METHOD for ns in seg.nodes):
                continue
            for s in seg.sources:
                plain = key.startswith(VAE) and s.file in (name["b"], name["c"])
                want = s.file == name.get("a") or plain
                assert s.read == want, (key, plan.files[s.file].model_id)
                assert (s.buf_offset >= 0) == want
                seen_unread += not s.read
    assert seen_unread > 0


def test_the_readers_never_read_an_unread_model(models, tmp_path, monkeypatch):
    """The merge's readers read no byte of a median's models (the statistics do, through
    their own reads), and the outputs are those of the whole method."""
    plan = _plan(models, tmp_path, {"method": "tgmd", "base": "a"})
    unread = {}
    for item in build_items(plan, 64 << 10):
        for seg in item.segments:
            for s in seg.sources:
                if not s.read:
                    unread.setdefault(str(plan.files[s.file].path), []).append((s.file_offset, s.nbytes))
    hits: list[tuple[str, int]] = []
    real = io.pread_exact

    def pread(fd, view, offset, path):
        file = os.path.realpath(f"/proc/self/fd/{fd}")
        for start, size in unread.get(file, []):
            if start < offset + len(view) and offset < start + size:
                hits.append((file, offset))
        return real(fd, view, offset, path)

    monkeypatch.setattr(io, "pread_exact", pread)
    execute(plan, tuning=Tuning(buffer_bytes=64 << 10))
    assert unread and hits == []
    monkeypatch.setattr(io, "pread_exact", real)
    again = _plan(models, tmp_path, {"method": "tgmd", "base": "a"}, name="again")
    execute(again, tuning=Tuning(buffer_bytes=8 << 20))
    for n in (1, 2):
        got, want = load(tmp_path / f"out{n}.safetensors"), load(tmp_path / f"again{n}.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

"""Planning: every problem of a recipe is reported at once, and a good recipe becomes a plan
whose nodes are shared between outputs and whose steps read each source tensor once."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from merge_support import make_models, recipe_text, sdxl_output

from engine.hashes.catalog import Catalog
from engine.library.report import Severity
from engine.plan.model import ARANGE, COPY, MEAN, PlanError
from engine.plan.planner import build_plan, check_recipe
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, truncate, write_checkpoint, write_lora


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plan-models")
    make_models(folder, 3)
    return folder


def _codes(problems, severity=Severity.ERROR):
    return sorted(p.code for p in problems if p.severity == severity)


def test_good_recipe_plans_shared_nodes_and_single_reads(models, tmp_path):
    text = recipe_text(
        {"a": str(models / "m0.safetensors"), "b": str(models / "m1.safetensors"), "c": str(models / "m2.safetensors")},
        {"te": ["a", "b", "c"], "unet": ["a", "b"], "nsfw": ["b", "c"], "vae": ["c"]},
        [sdxl_output(str(tmp_path / "base.safetensors"), "te", unet="unet", vae="vae"),
         sdxl_output(str(tmp_path / "nsfw.safetensors"), "te", unet="nsfw", vae="vae")],
    )
    recipe = parse_recipe(text, tmp_path)
    assert [p for p in check_recipe(recipe) if p.severity >= Severity.WARNING] == []
    plan = build_plan(recipe)
    assert plan.arch.id == "sdxl" and [f.model_id for f in plan.files] == ["a", "b", "c"]
    base, nsfw = plan.outputs
    assert len(base.tensors) == len(nsfw.tensors) == 2515
    # te and vae nodes are shared; the unet nodes differ
    shared = set(base.nodes) & set(nsfw.nodes)
    te_vae = [k for k in plan.arch.tensors if not k.startswith("model.diffusion_model.")]
    assert len(shared) == len(te_vae)
    kinds = {plan.nodes[n].kind for n in base.nodes}
    assert kinds == {MEAN, COPY, ARANGE}
    # every distinct stored tensor is read exactly once
    reads = [(s.file, s.key) for step in plan.steps for s in step.sources]
    assert len(reads) == len(set(reads))
    expected = sum(os.path.getsize(models / f"m{i}.safetensors") for i in range(3))
    assert plan.bytes_to_read < expected  # vae read from one model only
    vae_bytes = sum(s.nbytes for step in plan.steps for s in step.sources if s.key.startswith("first_stage_model."))
    unet_bytes = sum(s.nbytes for step in plan.steps for s in step.sources
                     if s.key.startswith("model.diffusion_model.") and s.file == 1)
    assert vae_bytes > 0 and unet_bytes > 0
    # unet of model b feeds both unet selections but is read once
    assert sum(1 for step in plan.steps for s in step.sources
               if s.key == "model.diffusion_model.out.2.weight" and s.file == 1) == 1
    # each output's writes come in its own canonical order
    for out in plan.outputs:
        assert [t.key for t in out.tensors] == sorted(t.key for t in out.tensors)


def test_every_problem_listed_at_once(models, tmp_path):
    (tmp_path / "sub").mkdir()
    lora = write_lora(tmp_path / "lora.safetensors")
    broken = tmp_path / "broken.safetensors"
    shutil.copy(models / "m0.safetensors", broken)
    truncate(broken, 0.5)
    novae = write_checkpoint(tmp_path / "novae.safetensors", SynthSpec(seed=9, scale=64, drop_components=("vae",)))
    sd15 = write_checkpoint(tmp_path / "sd15.safetensors", SynthSpec(arch="sd15", seed=3, scale=64))
    small = write_checkpoint(tmp_path / "small.safetensors", SynthSpec(seed=4, scale=128))
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("x")
    text = recipe_text(
        {"a": str(models / "m0.safetensors"), "lora": str(lora), "broken": str(broken), "novae": str(novae),
         "sd15": str(sd15), "small": str(small), "gone": "missing.safetensors", "a2": str(models / "m1.safetensors")},
        {"all": ["a", "lora", "broken", "sd15", "small", "gone", "ghost"], "v": ["novae"], "dup": ["a", "a"],
         "empty": [], "unused": ["a2"]},
        [sdxl_output(str(models / "m1.safetensors"), "all", vae="v"),
         {"path": str(tmp_path / "twice.safetensors"), "unet": "dup", "te0": "nosuch"},
         {"path": str(tmp_path / "twice.safetensors"), "unet": "empty", "dtype": "fp8"},
         {"path": str(not_a_folder / "out.safetensors"), "te": "dup"}],
        weights={"a": 0.0, "nobody": 1.0},
        dtype="fp64", device="tpu",
    )
    problems = check_recipe(parse_recipe(text, tmp_path))
    errors = _codes(problems)
    for code in ("bad_dtype", "device", "unknown_model", "duplicate_model", "empty_selection", "bad_weight",
                 "unknown_weight", "unknown_selection", "unreadable", "output_is_input", "output_duplicate",
                 "output_unwritable"):
        assert code in errors, (code, errors)
    assert errors.count("bad_dtype") == 2
    messages = "\n".join(p.message for p in problems)
    assert "LoRA" in messages and "lora" in messages
    assert "missing.safetensors" in messages and "broken" in messages
    assert "ghost" in messages
    assert "plain-file is not a folder" in messages
    with pytest.raises(PlanError) as info:
        build_plan(parse_recipe(text, tmp_path))
    assert len([p for p in info.value.problems if p.severity >= Severity.ERROR]) == len(
        [p for p in problems if p.severity >= Severity.ERROR])


def test_model_level_problems(models, tmp_path):
    novae = write_checkpoint(tmp_path / "novae.safetensors", SynthSpec(seed=9, scale=64, drop_components=("vae",)))
    sd15 = write_checkpoint(tmp_path / "sd15.safetensors", SynthSpec(arch="sd15", seed=3, scale=64))
    small = write_checkpoint(tmp_path / "small.safetensors", SynthSpec(seed=4, scale=128))
    text = recipe_text(
        {"a": str(models / "m0.safetensors"), "b": str(models / "m1.safetensors"), "novae": str(novae),
         "sd15": str(sd15), "small": str(small)},
        {"all": ["a", "b", "sd15", "small"], "v": ["novae"]},
        [sdxl_output(str(tmp_path / "o.safetensors"), "all", vae="v", te="all")],
    )
    problems = check_recipe(parse_recipe(text, tmp_path))
    errors = _codes(problems)
    assert "arch_mismatch" in errors and "scale_mismatch" in errors
    assert "component_unusable" in errors and "unknown_component" in errors
    assert any("novae" in p.message and "vae" in p.message for p in problems if p.code == "component_unusable")


def test_missing_keys_warn_and_strict_refuses(models, tmp_path):
    pruned = write_checkpoint(tmp_path / "pruned.safetensors",
                              SynthSpec(seed=7, scale=64, deviations=("pruned_te0_last_layer",)))
    ids = {"a": str(models / "m0.safetensors"), "p": str(pruned)}
    out = [sdxl_output(str(tmp_path / "o.safetensors"), "all")]
    lax = parse_recipe(recipe_text(ids, {"all": ["a", "p"]}, out), tmp_path)
    problems = check_recipe(lax)
    missing = [p for p in problems if p.code == "key_missing"]
    assert len(missing) == 1 and missing[0].severity == Severity.WARNING and missing[0].model_id == "p"
    assert "te0" in missing[0].message and "16" in missing[0].message
    build_plan(lax)
    strict = parse_recipe(recipe_text(ids, {"all": ["a", "p"]}, out, strict=True), tmp_path)
    with pytest.raises(PlanError, match="strict"):
        build_plan(strict)


def test_shape_mismatch_inside_a_selection(models, tmp_path):
    # same architecture and scale label, but one tensor reshaped
    import torch

    from engine.checkpoint.writer import write_file
    from engine.synth.checkpoints import make_state_dict

    sd = make_state_dict(SynthSpec(seed=5, scale=64))
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.zeros(sd[key].numel()).half()
    odd = write_file(tmp_path / "odd.safetensors", sd, {"astolfo.synthetic_scale": "64"})
    text = recipe_text({"a": str(models / "m0.safetensors"), "odd": str(odd)}, {"all": ["a", "odd"]},
                       [sdxl_output(str(tmp_path / "o.safetensors"), "all")])
    problems = check_recipe(parse_recipe(text, tmp_path))
    assert any(p.code in ("shape_mismatch", "component_unusable") and p.severity == Severity.ERROR
               for p in problems)


def test_pins_and_nan_counts_from_the_catalog(models, tmp_path):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=8, scale=64, nan_in=("unet",)))
    with Catalog() as catalog:
        good = catalog.hash_file(models / "m0.safetensors")
        catalog.hash_file(nan)
    wrong = "0" * 64
    text = recipe_text({"a": str(models / "m0.safetensors"), "n": str(nan), "c": str(models / "m2.safetensors")},
                       {"all": ["a", "n", "c"]}, [sdxl_output(str(tmp_path / "o.safetensors"), "all")])
    text = text.replace(f'a = "{models / "m0.safetensors"}"',
                        f'a = {{ path = "{models / "m0.safetensors"}", sha256 = "{good.autov2}" }}')
    text = text.replace(f'c = "{models / "m2.safetensors"}"',
                        f'c = {{ path = "{models / "m2.safetensors"}", sha256 = "{wrong}" }}')
    problems = check_recipe(parse_recipe(text, tmp_path))
    by_code = {p.code: p for p in problems}
    assert "pin_mismatch" not in by_code or by_code["pin_mismatch"].model_id != "a"
    assert by_code["pin_unverified"].model_id == "c"  # m2 is not in the catalog yet
    assert by_code["nan"].severity == Severity.ERROR and by_code["nan"].model_id == "n"
    with Catalog() as catalog:
        catalog.hash_file(models / "m2.safetensors")
    problems = check_recipe(parse_recipe(text, tmp_path))
    assert [p.model_id for p in problems if p.code == "pin_mismatch"] == ["c"]
    lenient = check_recipe(parse_recipe(text.replace('name = "test-mix"', 'name = "test-mix"\nskip_nan = true'),
                                        tmp_path))
    assert [p.severity for p in lenient if p.code == "nan"] == [Severity.WARNING]


def test_not_enough_disk(models, tmp_path, monkeypatch):
    text = recipe_text({"a": str(models / "m0.safetensors"), "b": str(models / "m1.safetensors")},
                       {"all": ["a", "b"]}, [sdxl_output(str(tmp_path / "o.safetensors"), "all")])
    import engine.plan.checks as checks

    real = shutil.disk_usage

    def tiny(path):  # the file system reports 1 MB free
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1_000_000, 1_000_000)

    monkeypatch.setattr(checks.shutil, "disk_usage", tiny)
    problems = check_recipe(parse_recipe(text, tmp_path))
    assert [p.code for p in problems if p.severity == Severity.ERROR] == ["disk_full"]


def test_each_header_is_parsed_once_and_the_plan_matches_a_fresh_read(models, tmp_path, monkeypatch):
    """The planner builds the plan from the headers its inspection parsed (one parse a file);
    with reports the caller already had, the builder reads the headers itself."""
    from engine.checkpoint import format as fmt
    from engine.library.diagnose import inspect_file

    paths = {m: str(models / f"m{i}.safetensors") for i, m in enumerate("abc")}
    text = recipe_text(paths, {"all": list("abc")}, [sdxl_output(str(tmp_path / "o.safetensors"), "all")])
    recipe = parse_recipe(text, tmp_path)
    parsed = []
    real = fmt.parse_header
    monkeypatch.setattr(fmt, "parse_header", lambda raw, size, path="<memory>": (parsed.append(path),
                                                                                real(raw, size, path))[1])
    plan = build_plan(recipe)
    assert sorted(map(str, parsed)) == sorted(paths.values())
    reports = {m: inspect_file(p, m) for m, p in paths.items()}
    parsed.clear()
    again = build_plan(recipe, reports)
    assert sorted(map(str, parsed)) == sorted(paths.values())  # read by the builder this time
    assert again.nodes == plan.nodes and again.files == plan.files

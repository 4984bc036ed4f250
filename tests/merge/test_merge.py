"""The merge against an fp64 reference computed here, independently of the engine: uniform
and weighted means, several outputs, one-model selections, every dtype in and out, missing
keys, NaN handling, integer tensors and position_ids, byte-identical reruns, metadata, cancel."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from merge_support import load, make_models, recipe_text, reference_mean, sdxl_output, sha256

from engine.checkpoint.format import DTYPES, read_header
from engine.checkpoint.writer import partial_path
from engine.merge import events as ev
from engine.merge.output import sidecar_path
from engine.merge.run import MergeCancelled, MergeError, execute
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import BASE_SEED, SynthSpec, write_checkpoint

POS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Small buffers: big tensors are cut into many chunks and items hold many small tensors.
SMALL = Tuning(buffer_bytes=256 << 10, sub_elems=4096, read_buffers=3, out_buffers=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merge-models")
    make_models(folder, 3)
    return folder


def _recipe(models: Path, tmp_path: Path, select=None, outputs=None, weights=None, **settings):
    ids = {"a": str(models / "m0.safetensors"), "b": str(models / "m1.safetensors"),
           "c": str(models / "m2.safetensors")}
    ids.update(settings.pop("extra_models", {}))
    select = select or {"all": ["a", "b", "c"]}
    outputs = outputs or [sdxl_output(str(tmp_path / "out.safetensors"), "all")]
    return parse_recipe(recipe_text(ids, select, outputs, weights, **settings), tmp_path)


def _merge(recipe, tuning=SMALL, **kw):
    events: list = []
    result = execute(build_plan(recipe), on_event=events.append, tuning=tuning, **kw)
    return result, events


def _check_mean(out: dict, sources: list[dict], weights: list[float], dtype: torch.dtype, prefix: str = "") -> int:
    """Every key of ``out`` under ``prefix`` (position_ids aside) equals the reference mean; all
    keys are checked in one concatenated tensor, then the first wrong key is named."""
    keys = [k for k in out if k.startswith(prefix) and k != POS]
    for k in keys:
        assert out[k].dtype == dtype, k
    if not keys:
        return 0
    got = torch.cat([out[k].reshape(-1) for k in keys])
    ref = reference_mean([torch.cat([s[k].reshape(-1) for k in keys]) for s in sources], weights, dtype)
    if not torch.equal(got, ref):
        wrong = next(k for k in keys
                     if not torch.equal(out[k], reference_mean([s[k] for s in sources], weights, dtype)))
        raise AssertionError(f"{wrong} differs from the fp64 reference")
    return len(keys)


def test_uniform_mean_equals_fp64_reference(models, tmp_path):
    result, events = _merge(_recipe(models, tmp_path))
    out = load(tmp_path / "out.safetensors")
    srcs = [load(models / f"m{i}.safetensors") for i in range(3)]
    assert len(out) == 2515
    assert _check_mean(out, srcs, [1, 1, 1], torch.float16) == 2514
    assert torch.equal(out[POS], torch.arange(77, dtype=torch.float16).reshape(1, 77))
    assert result.bytes_read == sum(s.nbytes for s in load_sizes(models))
    assert not partial_path(tmp_path / "out.safetensors").exists()
    assert not sidecar_path(tmp_path / "out.safetensors").exists()


def load_sizes(models: Path):
    """Every tensor of the three models except position_ids (never read)."""
    out = []
    for i in range(3):
        for key, t in load(models / f"m{i}.safetensors").items():
            if key != POS:
                out.append(t)
    return out


@pytest.mark.parametrize("weights", [{"b": 2.0}, {"a": 1 + 2**-20, "b": 3.0, "c": 0.5 + 2**-30}])
def test_weighted_mean_equals_fp64_reference(models, tmp_path, weights):
    """Products of fp16 values and these weights are exact in fp64, so the reference is exact."""
    _merge(_recipe(models, tmp_path, weights=weights))
    out = load(tmp_path / "out.safetensors")
    srcs = [load(models / f"m{i}.safetensors") for i in range(3)]
    w = [weights.get(m, 1.0) for m in "abc"]
    assert _check_mean(out, srcs, w, torch.float16) == 2514


def test_decimal_weights_mean_what_they_say(models, tmp_path):
    """0.3, 1.7 and 5 are taken as the decimals written: the same mean as integer weights 3, 17,
    50 (exact in fp64), not the mean under the binary doubles nearest 0.3 and 1.7, which differ
    at the many elements where 3a + 17b + 50c lands on an fp16 tie."""
    plan = build_plan(_recipe(models, tmp_path, weights={"a": 0.3, "b": 1.7, "c": 5.0}))
    assert {n.factors for n in plan.nodes if n.kind == "mean"} == {(3.0, 17.0, 50.0)}
    execute(plan, tuning=SMALL)
    out = load(tmp_path / "out.safetensors")
    srcs = [load(models / f"m{i}.safetensors") for i in range(3)]
    assert _check_mean(out, srcs, [3, 17, 50], torch.float16) == 2514


def test_several_outputs_share_reads_and_one_model_selections_copy_bytes(models, tmp_path):
    outputs = [
        sdxl_output(str(tmp_path / "base.safetensors"), "te", unet="unet", vae="vae"),
        sdxl_output(str(tmp_path / "nsfw.safetensors"), "te", unet="nsfw", vae="vae"),
    ]
    recipe = _recipe(models, tmp_path, select={"te": ["a", "b", "c"], "unet": ["a", "b"], "nsfw": ["b", "c"],
                                               "vae": ["c"]}, outputs=outputs)
    plan = build_plan(recipe)
    result = execute(plan, tuning=SMALL)
    assert result.bytes_read == plan.bytes_to_read  # nothing read twice
    srcs = [load(models / f"m{i}.safetensors") for i in range(3)]
    base, nsfw = load(tmp_path / "base.safetensors"), load(tmp_path / "nsfw.safetensors")
    assert _check_mean(base, srcs[:2], [1, 1], torch.float16, "model.diffusion_model.") == 1680
    assert _check_mean(nsfw, srcs[1:], [1, 1], torch.float16, "model.diffusion_model.") == 1680
    for out in (base, nsfw):
        assert _check_mean(out, srcs, [1, 1, 1], torch.float16, "conditioner.") == 196 + 390
    # one-model selection: the component's bytes are copied exactly
    header = read_header(tmp_path / "base.safetensors")
    with open(tmp_path / "base.safetensors", "rb") as f, open(models / "m2.safetensors", "rb") as g:
        src_header = read_header(models / "m2.safetensors")
        for key in (k for k in header.tensors if k.startswith("first_stage_model.")):
            a, b = header.tensors[key], src_header.tensors[key]
            f.seek(header.data_start + a.begin)
            g.seek(src_header.data_start + b.begin)
            assert f.read(a.nbytes) == g.read(b.nbytes), key


@pytest.mark.parametrize("src", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("dst", ["fp16", "bf16", "fp32"])
def test_every_dtype_in_and_out(tmp_path, src, dst):
    folder = tmp_path / "models"
    make_models(folder, 2, scale=128, dtype=src)
    text = recipe_text({"a": str(folder / "m0.safetensors"), "b": str(folder / "m1.safetensors")},
                       {"all": ["a", "b"], "one": ["a"]},
                       [sdxl_output(str(tmp_path / "out.safetensors"), "all", vae="one")], dtype=dst)
    _merge(parse_recipe(text, tmp_path))
    out = load(tmp_path / "out.safetensors")
    srcs = [load(folder / f"m{i}.safetensors") for i in range(2)]
    assert _check_mean(out, srcs, [1, 1], TORCH[dst], "model.") > 0
    assert _check_mean(out, srcs, [1, 1], TORCH[dst], "conditioner.") > 0
    for key in (k for k in out if k.startswith("first_stage_model.")):  # one model: converted once
        expected = reference_mean([srcs[0][key]], [1.0], TORCH[dst])
        assert torch.equal(out[key], expected), key


def test_mixed_source_dtypes_and_fp64_accumulation(tmp_path):
    folder = tmp_path / "models"
    write_checkpoint(folder / "h.safetensors", SynthSpec(seed=1, scale=128, dtype="F16"))
    write_checkpoint(folder / "f.safetensors", SynthSpec(seed=2, scale=128, dtype="F32"))
    write_checkpoint(folder / "b.safetensors", SynthSpec(seed=3, scale=128, dtype="BF16"))
    text = recipe_text({k: str(folder / f"{k}.safetensors") for k in "hfb"}, {"all": ["h", "f", "b"]},
                       [sdxl_output(str(tmp_path / "out.safetensors"), "all")], weights={"f": 0.1})
    _merge(parse_recipe(text, tmp_path))
    out = load(tmp_path / "out.safetensors")
    srcs = [load(folder / f"{k}.safetensors") for k in "hfb"]
    assert _check_mean(out, srcs, [10, 1, 10], torch.float16) == 2514  # 0.1 taken as 1/10


def test_missing_keys_average_over_the_models_that_have_them(models, tmp_path):
    pruned = write_checkpoint(tmp_path / "pruned.safetensors",
                              SynthSpec(seed=7, scale=64, deviations=("pruned_te0_last_layer", "position_ids_missing")))
    recipe = _recipe(models, tmp_path, select={"all": ["a", "p"]}, extra_models={"p": str(pruned)})
    _, events = _merge(recipe)
    warnings = [e for e in events if e.type == "warning" and e.code == "key_missing"]
    assert len(warnings) == 1 and warnings[0].model_id == "p"
    out = load(tmp_path / "out.safetensors")
    a, p = load(models / "m0.safetensors"), load(pruned)
    layer11 = [k for k in out if ".encoder.layers.11." in k and k.startswith("conditioner.embedders.0.")]
    assert len(layer11) == 16
    for key in layer11:  # only model a has them: its values, unchanged
        assert torch.equal(out[key], a[key])
    common = {k: v for k, v in out.items() if k in p}
    assert _check_mean(common, [a, p], [1, 1], torch.float16) == len(common) - (POS in common)
    assert torch.equal(out[POS], torch.arange(77, dtype=torch.float16).reshape(1, 77))


def test_nan_stops_naming_model_and_key_and_leaves_nothing(models, tmp_path):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=8, scale=64, nan_in=("te1",)))
    recipe = _recipe(models, tmp_path, select={"all": ["a", "n", "b"]}, extra_models={"n": str(nan)})
    events: list = []
    with pytest.raises(MergeError) as info:
        execute(build_plan(recipe), on_event=events.append, tuning=SMALL)
    assert info.value.model_id == "n" and info.value.key.startswith("conditioner.embedders.1.")
    assert "nan.safetensors" in str(info.value) and info.value.key in str(info.value)
    assert events[-1].type == "failed" and events[-1].model_id == "n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_skip_nan_leaves_the_source_out_of_affected_keys(models, tmp_path):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=8, scale=64, nan_in=("unet",)))
    recipe = _recipe(models, tmp_path, select={"all": ["a", "n", "b"]}, extra_models={"n": str(nan)},
                     skip_nan=True)
    # Small chunks: the Inf sits in the last chunk of large tensors, so earlier chunks already
    # went out with the bad model in them and the merge must redo those keys without it.
    _, events = _merge(recipe)
    skipped = [e for e in events if e.type == "warning" and e.code == "nan_skipped"]
    n = load(nan)
    bad_keys = {k for k, v in n.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()}
    assert len(bad_keys) > 100
    assert len(skipped) == 11 and {e.key for e in skipped[:10]} <= bad_keys  # then one count
    assert f"left out of {len(bad_keys)} keys" in skipped[-1].message
    out = load(tmp_path / "out.safetensors")
    a, b = load(models / "m0.safetensors"), load(models / "m1.safetensors")
    for key in bad_keys:
        assert torch.equal(out[key], reference_mean([a[key], b[key]], [1, 1], torch.float16)), key
    rest = {k: v for k, v in out.items() if k not in bad_keys}
    assert _check_mean(rest, [a, n, b], [1, 1, 1], torch.float16) == len(rest) - 1
    # the same result as a run with big buffers (no restart needed)
    first = sha256(tmp_path / "out.safetensors")
    _merge(recipe, tuning=Tuning())
    assert sha256(tmp_path / "out.safetensors") == first


def test_sd15_integer_tensors_buffers_and_position_ids(tmp_path):
    folder = tmp_path / "models"
    write_checkpoint(folder / "a.safetensors", SynthSpec(arch="sd15", seed=1, scale=32))
    write_checkpoint(folder / "b.safetensors",
                     SynthSpec(arch="sd15", seed=2, scale=32, deviations=("position_ids_corrupted",)))
    text = recipe_text({"a": str(folder / "a.safetensors"), "b": str(folder / "b.safetensors")},
                       {"all": ["b", "a"]},
                       [{"path": str(tmp_path / "out.safetensors"), "unet": "all", "te": "all", "vae": "all"}])
    _merge(parse_recipe(text, tmp_path))
    out = load(tmp_path / "out.safetensors")
    a, b = load(folder / "a.safetensors"), load(folder / "b.safetensors")
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    # b (first of the selection) stores position_ids as F32 with merge drift: written as exact arange
    assert out[pos].dtype == torch.float32 and torch.equal(out[pos], torch.arange(77.0).reshape(1, 77))
    assert out["model_ema.num_updates"].dtype == torch.int32
    assert torch.equal(out["model_ema.num_updates"], b["model_ema.num_updates"])
    for key in ("betas", "alphas_cumprod", "model_ema.decay"):  # from the first unet model, unchanged
        assert torch.equal(out[key], b[key])
    weights = [k for k in out if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
               and k != pos]
    assert _check_mean({k: out[k] for k in weights}, [b, a], [1, 1], torch.float16) == len(weights)


def test_renamed_keys_merge_under_standard_names_and_extras(models, tmp_path):
    odd = write_checkpoint(tmp_path / "odd.safetensors", SynthSpec(
        seed=11, scale=64, deviations=("missing_model_prefix", "nai_clip_keys", "junk_keys", "ema_keys")))
    recipe = _recipe(models, tmp_path, select={"all": ["o", "a"]}, extra_models={"o": str(odd)})
    plan = build_plan(recipe)
    assert [p.model_id for p in plan.problems if p.code == "ema_copied"] == ["o"]
    execute(plan, tuning=SMALL)
    out = load(tmp_path / "out.safetensors")
    a = load(models / "m0.safetensors")
    o = {k: v for k, v in load(odd).items()}
    extras = [k for k in o if k.startswith(("junk.", "model_ema.", "lora_te_"))]
    assert len(extras) > 60  # every key outside the components, from the first unet model
    for key in extras:
        assert torch.equal(out[key], o[key]), key
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(out[key], reference_mean([o["diffusion_model.out.2.weight"], a[key]], [1, 1], torch.float16))
    te = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    nai = te.replace(".transformer.text_model.", ".transformer.")
    assert torch.equal(out[te], reference_mean([o[nai], a[te]], [1, 1], torch.float16))


def test_reruns_are_byte_identical_whatever_the_buffers(models, tmp_path):
    recipe = _recipe(models, tmp_path, weights={"c": 3.0})
    _merge(recipe, tuning=Tuning())
    first = sha256(tmp_path / "out.safetensors")
    _merge(recipe, tuning=SMALL)
    assert sha256(tmp_path / "out.safetensors") == first
    _merge(recipe, tuning=Tuning(buffer_bytes=1 << 20, workers=1, readers=3, sub_elems=1000))
    assert sha256(tmp_path / "out.safetensors") == first


def test_results_written_straight_from_the_output_buffers_keep_their_bytes(models, tmp_path, monkeypatch):
    """Results laid out on their file's block grid go to the disk from the output buffer (lent
    O_DIRECT writes, 1 KiB and up here, as the test's files are small): the outputs, one fp16
    and one fp32 sharing nodes, equal the fp64 reference and a merge that copies every byte."""
    from engine.checkpoint import direct_io
    from engine.merge import layout

    monkeypatch.setattr(layout, "LENT_MIN", 1024)
    monkeypatch.setattr(direct_io, "LENT_MIN", 1024)
    lent = []
    real_close = direct_io.DirectAppendFile.close

    def close(self):
        lent.append(self.lent_bytes)
        real_close(self)

    monkeypatch.setattr(direct_io.DirectAppendFile, "close", close)
    outputs = [sdxl_output(str(tmp_path / "a.safetensors"), "all"),
               sdxl_output(str(tmp_path / "b.safetensors"), "all", dtype="fp32")]
    recipe = _recipe(models, tmp_path, outputs=outputs, weights={"c": 3.0})
    for tuning in (SMALL, Tuning()):
        _merge(recipe, tuning=tuning)
        sources = [load(models / f"m{i}.safetensors") for i in range(3)]
        _check_mean(load(tmp_path / "a.safetensors"), sources, [1.0, 1.0, 3.0], torch.float16)
        _check_mean(load(tmp_path / "b.safetensors"), sources, [1.0, 1.0, 3.0], torch.float32)
        hashes = [sha256(tmp_path / n) for n in ("a.safetensors", "b.safetensors")]
        assert sum(lent) > 0, "no result was written from the output buffer"
        lent.clear()
        monkeypatch.setenv("ASTOLFO_DIRECT_IO", "0")
        _merge(recipe, tuning=tuning)
        monkeypatch.delenv("ASTOLFO_DIRECT_IO")
        assert [sha256(tmp_path / n) for n in ("a.safetensors", "b.safetensors")] == hashes


def test_metadata(models, tmp_path):
    recipe = _recipe(models, tmp_path, weights={"b": 2.0}, date="2024-05-01")
    recipe.metadata["modelspec.author"] = "tester"
    _merge(recipe)
    meta = read_header(tmp_path / "out.safetensors").metadata
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.title"] == "out" and meta["modelspec.date"] == "2024-05-01"
    assert meta["modelspec.author"] == "tester"
    stored = parse_recipe(meta["astolfo.recipe"], tmp_path)  # file names and hashes, no folders
    assert (stored.select, stored.weights, stored.date) == (recipe.select, recipe.weights, recipe.date)
    assert str(tmp_path) not in meta["astolfo.recipe"]
    digests = {m: hashlib.sha256((models / f"m{i}.safetensors").read_bytes()).hexdigest() for i, m in enumerate("abc")}
    sources = json.loads(meta["astolfo.sources"])
    assert [(s["id"], s["sha256"], s["autov2"]) for s in sources] == [(m, d, d[:10]) for m, d in digests.items()]
    a1111 = json.loads(meta["sd_merge_models"])
    assert set(a1111) == set(digests.values())
    assert a1111[digests["a"]]["name"] == "m0" and len(a1111[digests["a"]]["legacy_hash"]) == 8
    merge_recipe = json.loads(meta["sd_merge_recipe"])
    weights = {m["id"]: m["weight"] for m in merge_recipe["components"]["unet"]["models"]}
    assert weights == {"a": 0.25, "b": 0.5, "c": 0.25}


def test_pinned_hash_checked_before_anything_is_written(models, tmp_path):
    text = recipe_text({"a": str(models / "m0.safetensors"), "b": str(models / "m1.safetensors")},
                       {"all": ["a", "b"]}, [sdxl_output(str(tmp_path / "out.safetensors"), "all")])
    text = text.replace(f'b = "{models / "m1.safetensors"}"',
                        f'b = {{ path = "{models / "m1.safetensors"}", sha256 = "0123456789" }}')
    with pytest.raises(MergeError, match="pins 0123456789"):
        execute(build_plan(parse_recipe(text, tmp_path)), tuning=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_cancel_leaves_nothing_and_events_are_json(models, tmp_path):
    cancel = threading.Event()
    events: list = []

    def on_event(e):
        events.append(e)
        if e.type == "progress" and e.bytes_done > 0:
            cancel.set()

    tuning = Tuning(buffer_bytes=256 << 10, sub_elems=4096, progress_interval=0.0)
    with pytest.raises(MergeCancelled):
        execute(build_plan(_recipe(models, tmp_path)), on_event=on_event, cancel=cancel, tuning=tuning)
    assert events[-1].type == "cancelled"
    assert list(tmp_path.iterdir()) == []
    for e in events:
        d = json.loads(json.dumps(ev.event_to_dict(e)))
        assert ev.event_from_dict(d) == e


def test_progress_events_are_bounded_and_complete(models, tmp_path):
    _, events = _merge(_recipe(models, tmp_path), tuning=Tuning(buffer_bytes=64 << 10, sub_elems=4096))
    types = [e.type for e in events]
    start = types.index("started")
    assert all(getattr(e, "stage", None) == "hashing" for e in events[:start])  # fresh hash cache
    assert types[-1] == "finished" and "output_done" in types
    progress = [e for e in events if e.type == "progress"]
    elapsed = events[-1].elapsed_s
    assert len(progress) <= 10 * elapsed + 5
    last = progress[-1]
    assert last.tensors_done == last.tensors_total == 2515 and last.bytes_done == last.bytes_total
    assert last.host_rss and last.outputs[0].tensors_done == 2515


def test_output_may_not_replace_an_input(models, tmp_path):
    from engine.plan.model import PlanError

    with pytest.raises(PlanError, match="inputs are never overwritten"):
        build_plan(_recipe(models, tmp_path, outputs=[sdxl_output(str(models / "m1.safetensors"), "all")]))


def test_shared_text_encoders_stay_identical(tmp_path):
    """Models whose te0 is SDXL base's give exactly that te0 back (mean of equal values)."""
    folder = tmp_path / "models"
    for i in range(3):
        write_checkpoint(folder / f"m{i}.safetensors", SynthSpec(seed=i, scale=64, component_seeds={"te0": BASE_SEED}))
    text = recipe_text({f"m{i}": str(folder / f"m{i}.safetensors") for i in range(3)}, {"all": ["m0", "m1", "m2"]},
                       [sdxl_output(str(tmp_path / "out.safetensors"), "all")])
    _merge(parse_recipe(text, tmp_path))
    out, m0 = load(tmp_path / "out.safetensors"), load(folder / "m0.safetensors")
    for key in (k for k in out if k.startswith("conditioner.embedders.0.")):
        assert torch.equal(out[key], m0[key]), key


def test_round_to_odd_narrowing_is_correct_rounding():
    import numpy as np

    from engine.merge.arithmetic import Kernel

    x = torch.randn(1 << 16, dtype=torch.float64) * torch.logspace(-6, 2, 1 << 16, dtype=torch.float64)
    kernel = Kernel(torch.device("cpu"), 1 << 16)
    out = torch.empty(1 << 16, dtype=torch.float16)
    kernel.narrow(x, out)
    assert torch.equal(out, torch.from_numpy(x.numpy().astype(np.float16)))
    assert DTYPES["F16"].torch_dtype == out.dtype


def test_outputs_of_different_dtypes_share_one_pass(models, tmp_path):
    """fp16 and fp32 outputs order a few tensors differently (position_ids keeps the sources'
    F16 in both, so it sorts last in the fp32 file): one output parks it until its turn."""
    outputs = [sdxl_output(str(tmp_path / "half.safetensors"), "all"),
               sdxl_output(str(tmp_path / "full.safetensors"), "all", dtype="fp32")]
    plan = build_plan(_recipe(models, tmp_path, outputs=outputs))
    half, full = plan.outputs
    assert [t.key for t in half.tensors] != [t.key for t in full.tensors]
    assert full.tensors[-1].key == POS
    result = execute(plan, tuning=SMALL)
    assert result.bytes_read == plan.bytes_to_read
    srcs = [load(models / f"m{i}.safetensors") for i in range(3)]
    assert _check_mean(load(tmp_path / "half.safetensors"), srcs, [1, 1, 1], torch.float16) == 2514
    assert _check_mean(load(tmp_path / "full.safetensors"), srcs, [1, 1, 1], torch.float32) == 2514
    assert load(tmp_path / "full.safetensors")[POS].dtype == torch.float16


def test_resume_of_a_changed_recipe_starts_afresh(models, tmp_path):
    recipe = _recipe(models, tmp_path)
    target = tmp_path / "out.safetensors"
    stop = threading.Event()

    def on_event(e):  # interrupt once some progress is durable
        if e.type == "progress" and sidecar_path(target).exists():
            raise KeyboardInterrupt

    tuning = Tuning(buffer_bytes=128 << 10, sub_elems=4096, progress_interval=0.0, sync_bytes=64 << 10)
    with pytest.raises(MergeCancelled):
        execute(build_plan(recipe), on_event=on_event, cancel=stop, tuning=tuning)
    assert not partial_path(target).exists()  # a cancelled merge leaves nothing

    # leave a partial and a progress mark as a kill -9 would, then change the weights
    from engine.merge.output import OutputStream

    plan = build_plan(recipe)
    execute(plan, tuning=SMALL)
    reference = sha256(target)
    target.unlink()
    stream = OutputStream(target, plan.outputs[0].tensors, {"x": "y"}, "stale-fingerprint")
    stream.open()
    stream.put(0, memoryview(bytes(plan.outputs[0].tensors[0].nbytes)), True)
    stream.checkpoint()
    stream.close()
    events: list = []
    execute(build_plan(recipe), on_event=events.append, resume=True, tuning=SMALL)
    assert any(e.type == "warning" and e.code == "resume_fresh" for e in events)
    assert sha256(target) == reference


def test_skip_nan_cannot_skip_the_only_source(models, tmp_path):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=8, scale=64, nan_in=("vae",)))
    recipe = _recipe(models, tmp_path, select={"all": ["a", "b"], "v": ["n"]}, extra_models={"n": str(nan)},
                     outputs=[sdxl_output(str(tmp_path / "out.safetensors"), "all", vae="v")], skip_nan=True)
    with pytest.raises(MergeError, match="no other model of the selection has this tensor"):
        execute(build_plan(recipe), tuning=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]

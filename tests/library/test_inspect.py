"""inspect_file on real synthetic files: every deviation gives its named finding, nothing raises."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checkpoint.architectures import get_architecture
from engine.checkpoint.format import read_header
from engine.checkpoint.writer import write_file
from engine.library.diagnose import inspect_file
from engine.library.report import (
    ABSENT,
    CHECKPOINT,
    DIFFUSERS,
    LORA,
    PARTIAL,
    PICKLE,
    PRESENT,
    UNKNOWN,
    UNREADABLE,
    Severity,
)
from engine.synth import checkpoints as synth
from engine.synth.checkpoints import SynthSpec, make_state_dict

SDXL = get_architecture("sdxl")
SD15 = get_architecture("sd15")
TE0_IDS = SDXL.position_ids_key


def codes(report, component="any"):
    return {
        f.code for f in report.all_findings if component == "any" or f.component == component
    }


def finding(report, code):
    matches = [f for f in report.all_findings if f.code == code]
    assert matches, f"no {code!r} finding in {[f.code for f in report.all_findings]}"
    return matches[0]


# --------------------------------------------------------------------------- clean files


def test_clean_sdxl_is_recognised_with_every_component_present(synth_models):
    report = inspect_file(synth_models["clean"], "m01")
    assert report.kind == CHECKPOINT
    assert report.model_id == "m01"
    assert report.arch == "sdxl" and report.scale == 32
    assert report.arch_label == "SDXL 1.0 (1/32 scale)"
    assert list(report.components) == ["unet", "te0", "te1", "vae"]
    for comp in report.components.values():
        assert comp.state == PRESENT and comp.mergeable
        assert comp.keys_found == comp.keys_expected > 0
    assert report.components["unet"].keys_expected == 1680
    assert report.severity == Severity.OK
    assert report.key_map == {k: k for k in SDXL.tensors}
    assert report.dtypes == {"F16": len(SDXL.tensors)}
    assert report.extra_keys == [] and report.extra_bytes == 0
    assert report.metadata_summary["architecture"] == "stable-diffusion-xl-v1-base"
    assert report.file_size == Path(synth_models["clean"]).stat().st_size
    json.dumps(report.to_dict())


def test_sd15_is_recognised_with_its_own_components(synth_models):
    report = inspect_file(synth_models["sd15"])
    assert report.kind == CHECKPOINT and report.arch == "sd15"
    assert report.arch_label == "SD 1.5 (1/32 scale)"
    assert list(report.components) == ["unet", "te", "vae"]
    assert all(c.state == PRESENT for c in report.components.values())
    assert report.severity < Severity.WARNING
    # its DDPM buffers and model_ema counters belong to the architecture: not extras
    assert report.extra_keys == []
    assert "betas" in report.key_map
    assert "position_ids_float" not in codes(report)  # stored I64, as the reference does


@pytest.mark.parametrize("scale", [16, 64])
def test_scale_is_inferred_from_shapes_when_metadata_does_not_say(tmp_path, scale):
    path = write_file(tmp_path / "plain.safetensors", make_state_dict(SynthSpec(scale=scale, seed=1)))
    report = inspect_file(path)
    assert report.arch == "sdxl" and report.scale == scale
    assert report.arch_label == f"SDXL 1.0 (1/{scale} scale)"
    assert "shape_mismatch" not in codes(report)


# --------------------------------------------------------------------------- each deviation

# deviation -> (code, component, severity); None: no finding expected
DEVIATION_FINDINGS = {
    "position_ids_missing": ("position_ids_missing", "te0", Severity.WARNING),
    "position_ids_corrupted": ("position_ids_corrupted", "te0", Severity.WARNING),
    "position_ids_int64": None,
    "pruned_te0_last_layer": ("pruned_last_layer", "te0", Severity.WARNING),
    "pruned_te1_last_layer": ("pruned_last_layer", "te1", Severity.WARNING),
    "nai_clip_keys": ("nai_clip_keys", "te0", Severity.OK),
    "ema_keys": ("ema_keys", None, Severity.OK),
    "extra_model_prefix": ("extra_model_prefix", None, Severity.OK),
    "missing_model_prefix": ("missing_model_prefix", "unet", Severity.OK),
    "scaled_fp8": ("scaled_fp8", "unet", Severity.ERROR),
    "junk_keys": ("extra_keys", None, Severity.OK),
    "json_metadata": ("json_metadata", None, Severity.OK),
}


def test_every_synth_deviation_has_an_expected_finding():
    assert set(DEVIATION_FINDINGS) == set(synth.DEVIATIONS)


@pytest.mark.parametrize("deviation", sorted(DEVIATION_FINDINGS))
def test_each_deviation_gives_its_finding(synth_models, deviation):
    report = inspect_file(synth_models[deviation])
    assert report.kind == CHECKPOINT and report.arch == "sdxl" and report.scale == 32
    expected = DEVIATION_FINDINGS[deviation]
    if expected is None:
        assert report.severity == Severity.OK, [f.message for f in report.all_findings]
        return
    code, component, severity = expected
    f = finding(report, code)
    assert f.component == component
    assert f.severity == severity
    assert f.message and "\n" not in f.message


def test_missing_position_ids_is_a_warning_and_te0_stays_mergeable(synth_models):
    report = inspect_file(synth_models["position_ids_missing"])
    te0 = report.components["te0"]
    assert te0.state == PRESENT and te0.mergeable
    assert TE0_IDS not in report.key_map
    assert "arange(77)" in finding(report, "position_ids_missing").message


def test_corrupted_position_ids_list_the_wrong_values(synth_models):
    message = finding(inspect_file(synth_models["position_ids_corrupted"]), "position_ids_corrupted").message
    assert "76 of 77" in message
    assert "[76] = 75.9975" in message and "reads as 75" in message


def test_position_ids_with_one_wrong_value_names_that_index(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    ids = torch.arange(77, dtype=torch.float16).reshape(1, 77)
    ids[0, 40] = 39.0
    sd[TE0_IDS] = ids
    report = inspect_file(write_file(tmp_path / "one.safetensors", sd))
    message = finding(report, "position_ids_corrupted").message
    assert "1 of 77" in message and "[40] = 39" in message
    assert report.components["te0"].mergeable


def test_sdxl_position_ids_as_float_are_fine_but_sd15_float_is_flagged(synth_models, tmp_path):
    assert codes(inspect_file(synth_models["clean"])) == set()  # F16, as SDXL base stores them
    sd = make_state_dict(SynthSpec(arch="sd15", seed=1))
    sd[SD15.position_ids_key] = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    report = inspect_file(write_file(tmp_path / "sd15f.safetensors", sd))
    f = finding(report, "position_ids_float")
    assert f.component == "te" and f.severity == Severity.WARNING and "I64" in f.message
    assert "position_ids_corrupted" not in codes(report)


def test_sd15_with_drifted_float_position_ids_gets_both_findings(synth_models):
    report = inspect_file(synth_models["sd15_corrupted_ids"])
    assert {"position_ids_float", "position_ids_corrupted"} <= codes(report, "te")


def test_position_ids_of_the_wrong_shape_are_reported(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    sd[TE0_IDS] = torch.arange(76, dtype=torch.float16).reshape(1, 76)
    report = inspect_file(write_file(tmp_path / "short.safetensors", sd))
    assert "[1, 76]" in finding(report, "position_ids_corrupted").message


@pytest.mark.parametrize(
    "name, cid, layer, found",
    [("pruned_te0_last_layer", "te0", "encoder.layers.11", 180), ("pruned_te1_last_layer", "te1", "resblocks.31", 378)],
)
def test_pruned_last_layer_makes_the_encoder_partial_but_mergeable(synth_models, name, cid, layer, found):
    report = inspect_file(synth_models[name])
    comp = report.components[cid]
    assert comp.state == PARTIAL and comp.keys_found == found
    assert comp.mergeable
    message = finding(report, "pruned_last_layer").message
    assert layer in message and f"{found} of {comp.keys_expected}" in message
    others = [c for c in report.components.values() if c.id != cid]
    assert all(c.state == PRESENT for c in others)


def test_nai_keys_are_mapped_to_their_standard_names(synth_models):
    report = inspect_file(synth_models["nai_clip_keys"])
    assert report.components["te0"].state == PRESENT
    assert len(report.key_map) == len(SDXL.tensors)
    canonical = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert report.key_map[canonical] == "conditioner.embedders.0.transformer.encoder.layers.0.mlp.fc1.weight"
    stored = set(read_header(synth_models["nai_clip_keys"]).tensors)
    assert set(report.key_map.values()) == stored


@pytest.mark.parametrize("deviation", ["extra_model_prefix", "missing_model_prefix"])
def test_prefix_deviations_map_every_key(synth_models, deviation):
    report = inspect_file(synth_models[deviation])
    assert all(c.state == PRESENT for c in report.components.values())
    assert set(report.key_map) == set(SDXL.tensors)
    stored = set(read_header(synth_models[deviation]).tensors)
    assert set(report.key_map.values()) == stored
    unet_key = "model.diffusion_model.out.0.weight"
    expected = {"extra_model_prefix": "model." + unet_key, "missing_model_prefix": unet_key[len("model.") :]}
    assert report.key_map[unet_key] == expected[deviation]


def test_ema_keys_are_extra_with_their_size(synth_models):
    report = inspect_file(synth_models["ema_keys"])
    assert report.extra_keys and all(k.startswith("model_ema.") for k in report.extra_keys)
    header = read_header(synth_models["ema_keys"])
    assert report.extra_bytes == sum(header.tensors[k].nbytes for k in report.extra_keys)
    assert f"{len(report.extra_keys)} EMA tensors" in finding(report, "ema_keys").message
    assert report.severity == Severity.OK


def test_junk_keys_are_named(synth_models):
    report = inspect_file(synth_models["junk_keys"])
    assert set(report.extra_keys) == {"junk.optimizer_state", "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"}
    assert report.kind == CHECKPOINT  # one LoRA-looking key does not make it a LoRA


def test_ddpm_buffers_in_an_sdxl_file_are_extras(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    sd["betas"] = torch.zeros(1000)
    sd["alphas_cumprod"] = torch.zeros(1000)
    report = inspect_file(write_file(tmp_path / "ddpm.safetensors", sd))
    f = finding(report, "ddpm_buffers")
    assert "2 noise-schedule buffers" in f.message and "8.0 kB" in f.message


def test_scaled_fp8_is_an_error_for_every_fp8_component(synth_models):
    report = inspect_file(synth_models["scaled_fp8"])
    assert codes(report, "unet") >= {"scaled_fp8"}
    for comp in report.components.values():
        assert not comp.mergeable
        assert "scale_weight" in comp.problem
    assert "scaled_fp8" in report.extra_keys


def test_plain_fp8_is_a_warning(synth_models):
    report = inspect_file(synth_models["fp8"])
    f = finding(report, "fp8_storage")
    assert f.severity == Severity.WARNING and "F8_E4M3" in f.message
    assert all(c.mergeable for c in report.components.values())


@pytest.mark.parametrize("name, dtype", [("fp32", "F32"), ("bf16", "BF16")])
def test_wider_storage_is_reported_not_an_error(synth_models, name, dtype):
    report = inspect_file(synth_models[name])
    assert report.main_dtype == dtype
    f = finding(report, "storage_dtype")
    assert f.severity == Severity.OK and dtype in f.message
    assert report.components["unet"].dtypes == {dtype: 1680}


def test_json_metadata_is_summarised(synth_models):
    report = inspect_file(synth_models["json_metadata"])
    assert "ss_tag_frequency" in finding(report, "json_metadata").message
    assert report.metadata_summary["trainer"].startswith("kohya")
    assert report.metadata["ss_tag_frequency"].startswith("{")


def test_missing_component_is_absent_and_the_rest_still_merges(synth_models):
    report = inspect_file(synth_models["no_vae"])
    vae = report.components["vae"]
    assert vae.state == ABSENT and vae.keys_found == 0 and not vae.mergeable
    f = finding(report, "component_missing")
    assert f.component == "vae" and f.severity == Severity.ERROR and "first_stage_model." in f.message
    assert all(report.components[c].mergeable for c in ("unet", "te0", "te1"))


def test_broken_te0_does_not_stop_the_unet(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    key = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    sd[key] = torch.zeros(10, 10, dtype=torch.float16)
    report = inspect_file(write_file(tmp_path / "bad_te0.safetensors", sd))
    f = finding(report, "shape_mismatch")
    assert f.component == "te0" and key in f.message and "[10, 10]" in f.message
    assert not report.components["te0"].mergeable
    assert all(report.components[c].mergeable for c in ("unet", "te1", "vae"))


def test_missing_unet_keys_are_an_error_naming_them(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    gone = [k for k in sd if k.startswith("model.diffusion_model.output_blocks.8.")]
    for k in gone:
        del sd[k]
    report = inspect_file(write_file(tmp_path / "holes.safetensors", sd))
    unet = report.components["unet"]
    assert unet.state == PARTIAL and unet.keys_found == 1680 - len(gone)
    f = finding(report, "keys_missing")
    assert f.severity == Severity.ERROR and f"{len(gone)} of 1680" in f.message and "output_blocks.8." in f.message


def test_integer_weights_are_an_error(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    key = "first_stage_model.decoder.conv_in.weight"
    sd[key] = torch.zeros(sd[key].shape, dtype=torch.int8)
    report = inspect_file(write_file(tmp_path / "int8.safetensors", sd))
    assert finding(report, "integer_weights").component == "vae"


def test_modelspec_naming_another_architecture_is_a_warning(tmp_path):
    spec = SynthSpec(seed=1, metadata={"modelspec.architecture": "stable-diffusion-v1"})
    report = inspect_file(synth.write_checkpoint(tmp_path / "liar.safetensors", spec))
    assert finding(report, "modelspec_mismatch").severity == Severity.WARNING


def test_unknown_keys_inside_a_component_are_listed(tmp_path):
    sd = make_state_dict(SynthSpec(seed=1))
    sd["model.diffusion_model.extra_head.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    report = inspect_file(write_file(tmp_path / "extra.safetensors", sd))
    f = finding(report, "unknown_keys")
    assert f.component == "unet" and "extra_head" in f.message
    assert "model.diffusion_model.extra_head.weight" in report.extra_keys


def test_vae_only_file_counts_as_sdxl_not_sd15(tmp_path):
    sd = {k: v for k, v in make_state_dict(SynthSpec(seed=1)).items() if k.startswith("first_stage_model.")}
    report = inspect_file(write_file(tmp_path / "vae.safetensors", sd))
    assert report.arch == "sdxl"
    assert report.components["vae"].state == PRESENT
    assert report.components["unet"].state == ABSENT


# --------------------------------------------------------------------------- other kinds of file


@pytest.mark.parametrize("name, kind_word", [("lora", "LoRA"), ("lycoris", "LyCORIS")])
def test_lora_files_are_not_checkpoints(synth_models, name, kind_word):
    report = inspect_file(synth_models[name])
    assert report.kind == LORA and report.arch is None and report.components == {}
    f = finding(report, "lora_file")
    assert f.severity == Severity.ERROR and kind_word in f.message and "not a checkpoint" in f.message


def test_diffusers_file(synth_models):
    report = inspect_file(synth_models["diffusers"])
    assert report.kind == DIFFUSERS
    assert "diffusers" in finding(report, "diffusers_format").message


def test_truncated_file_is_unreadable_with_the_reason(synth_models):
    report = inspect_file(synth_models["truncated"])
    assert report.kind == UNREADABLE
    f = finding(report, "unreadable")
    assert f.severity == Severity.ERROR and "truncated" in f.message


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "too short"),
        (b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", "not an object"),
        (b"\xff" * 64, "larger than"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ", "not valid JSON"),
    ],
)
def test_malformed_files_are_unreadable_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    report = inspect_file(path)
    assert report.kind == UNREADABLE and reason in finding(report, "unreadable").message


def test_missing_path_and_folder_are_reported_not_raised(tmp_path):
    assert inspect_file(tmp_path / "nope.safetensors").kind == UNREADABLE
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert inspect_file(folder).kind == UNREADABLE


def test_file_without_tensors(tmp_path):
    report = inspect_file(write_file(tmp_path / "empty.safetensors", {}))
    assert report.kind == UNKNOWN and "no_tensors" in codes(report)


def test_unknown_architecture(tmp_path):
    path = write_file(tmp_path / "other.safetensors", {"encoder.weight": torch.zeros(3), "head.bias": torch.zeros(2)})
    report = inspect_file(path)
    assert report.kind == UNKNOWN
    assert "'encoder.weight'" in finding(report, "unknown_architecture").message


class _Marker:
    """Unpickling this creates the file at ``path`` (as a hostile pickle could do anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "model.bin", "renamed.safetensors"])
def test_pickles_are_never_unpickled(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Marker(marker)}, protocol=2))
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is live: loading it would create the marker
        pickle.load(f).get("state_dict").close()
    marker.unlink()

    report = inspect_file(path)
    assert report.kind == PICKLE
    f = finding(report, "pickle_file")
    assert f.severity == Severity.ERROR and "never unpickles" in f.message and "safetensors" in f.message
    assert not marker.exists()


def test_torch_zip_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Marker(marker)}, path)
    marker.unlink(missing_ok=True)  # torch.save's own pickling does not run __reduce__'s callable; be sure anyway
    report = inspect_file(path)
    assert report.kind == PICKLE and not marker.exists()


def test_safetensors_named_ckpt_is_read_as_safetensors(synth_models, tmp_path):
    path = tmp_path / "renamed.ckpt"
    shutil.copy(synth_models["clean"], path)
    report = inspect_file(path)
    assert report.kind == CHECKPOINT and "safetensors_renamed" in codes(report)


# --------------------------------------------------------------------------- reads little


def _bytes_read_by_process() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.parametrize("name", ["clean", "position_ids_corrupted", "nai_clip_keys"])
def test_inspection_reads_only_the_header_and_position_ids(synth_models, name):
    before = _bytes_read_by_process()
    if before is None:
        pytest.skip("needs /proc/self/io")
    header = read_header(synth_models[name])
    baseline = _bytes_read_by_process() - before  # one header read
    before = _bytes_read_by_process()
    inspect_file(synth_models[name])
    used = _bytes_read_by_process() - before
    assert used <= baseline + 4096, (used, baseline, header.file_size)
    assert used < header.file_size / 10


# --------------------------------------------------------------------------- never raises

_KEY_PARTS = [
    "model.diffusion_model.",
    "diffusion_model.",
    "model.model.diffusion_model.",
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.1.model.",
    "cond_stage_model.transformer.text_model.",
    "first_stage_model.",
    "model_ema.",
    "lora_unet_",
    "down_blocks.",
    "",
]
_SOME_KEYS = list(SDXL.tensors)[::97] + list(SD15.tensors)[::61] + [TE0_IDS, SD15.position_ids_key, "scaled_fp8"]


@st.composite
def _state_dicts(draw):
    n = draw(st.integers(0, 12))
    sd = {}
    for _ in range(n):
        if draw(st.booleans()):
            key = draw(st.sampled_from(_SOME_KEYS))
        else:
            key = draw(st.sampled_from(_KEY_PARTS)) + draw(st.text("abc.0123_", max_size=12))
        if not key:
            continue
        dtype = draw(st.sampled_from([torch.float16, torch.float32, torch.int64, torch.float8_e4m3fn, torch.bool]))
        shape = tuple(draw(st.lists(st.integers(0, 80), max_size=3)))
        sd[key] = torch.zeros(shape, dtype=dtype)
    return sd


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=_state_dicts(), meta=st.dictionaries(st.text(max_size=20), st.text(max_size=30), max_size=3))
def test_inspect_never_raises_on_odd_but_valid_files(tmp_path, sd, meta):
    path = write_file(tmp_path / "odd.safetensors", sd, meta)
    report = inspect_file(path)
    assert report.kind in (CHECKPOINT, LORA, DIFFUSERS, UNKNOWN)
    json.dumps(report.to_dict())
    for canonical, stored in report.key_map.items():
        assert stored in sd

"""engine.hashes.hasher against independent computations on the same bytes: hashlib for file hashes,
the safetensors library + blake3 for component hashes, numpy for the toolkit metric."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct
import threading

import blake3
import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.checkpoint.architectures import get_architecture
from engine.checkpoint.format import read_header
from engine.checkpoint.writer import write_file
from engine.hashes.hasher import hash_file
from engine.hashes.model import (
    CLIP_METRIC,
    VAE_METRIC,
    HashCancelled,
    HashError,
    add_nonfinite_findings,
    metric_string,
    nonfinite_findings,
)
from engine.library.diagnose import inspect_file
from engine.library.report import Severity
from engine.synth.checkpoints import (
    BASE_SEED,
    SynthSpec,
    make_state_dict,
    truncate,
    write_checkpoint,
    write_garbage,
    write_lora,
)

# --------------------------------------------------------------------------- independent versions


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_DTYPE_NAME = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def _combine(records) -> str:
    """The documented component hash: BLAKE3 of a tag, then per tensor sorted by relative key:
    u32 key length, key, u8 dtype length, dtype, u8 ndim, i64 dims, 32-byte BLAKE3 of bytes."""
    h = blake3.blake3(b"astolfo-component-v1\0")
    for key, dtype, shape, data in sorted(records):
        kb = key.encode()
        h.update(struct.pack("<I", len(kb)) + kb + bytes([len(dtype)]) + dtype.encode())
        h.update(bytes([len(shape)]) + b"".join(struct.pack("<q", d) for d in shape))
        h.update(blake3.blake3(data).digest())
    return h.hexdigest()


def _independent_component(path, arch_id: str, cid: str) -> tuple[str, str]:
    arch = get_architecture(arch_id)
    prefix = arch.components[cid].prefix
    exact, fp16 = [], []
    for key, t in _tensors(path).items():
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix) :]
        if cid == "te0":
            rel = rel.removeprefix("transformer.")
        exact.append((rel, _DTYPE_NAME[t.dtype], tuple(t.shape), _raw(t)))
        if key not in arch.buffers:
            fp16.append((rel, "F16", tuple(t.shape), _raw(t.to(torch.float16))))
    return _combine(exact), _combine(fp16)


def _toolkit_metric(path, prefix: str, select, ref: float, k: int) -> str:
    """The model-toolkit definition, written out: per tensor sum(sigmoid(t.half().float()) - 0.5)
    over the selected keys, n = int(|sum/ref - 1| * k), folded by a loop."""
    total = 0.0
    for key, t in _tensors(path).items():
        if key.startswith(prefix) and select(key):
            x = t.to(torch.float16).to(torch.float32).numpy().astype(np.float64)
            total += float(np.sum(1.0 / (1.0 + np.exp(-x)) - 0.5))
    n = int(abs(total / ref - 1) * k)
    while n >= 10000:
        n -= 5000
    return f"{n:04}"


# --------------------------------------------------------------------------- file hashes


def test_file_hashes_equal_hashlib(tmp_path):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    data = path.read_bytes()
    assert len(data) > 0x110000
    header_len = struct.unpack("<Q", data[:8])[0]
    h = hash_file(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.autov2 == h.sha256[:10]
    assert h.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert h.autov3 == hashlib.sha256(data[8 + header_len :]).hexdigest()
    assert h.autov3_short == h.autov3[:12]
    assert h.size == len(data)
    assert h.arch == "sdxl"


def test_small_file_autov1_is_of_what_is_there(tmp_path):
    path = write_lora(tmp_path / "lora.safetensors")
    data = path.read_bytes()
    h = hash_file(path)
    assert h.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]  # empty range
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.components == {}  # a LoRA has no checkpoint components


@pytest.mark.parametrize("make", ["garbage", "truncated"])
def test_unreadable_safetensors_still_get_file_hashes(tmp_path, make):
    if make == "garbage":
        path = write_garbage(tmp_path / "bad.safetensors")
    else:
        path = truncate(write_checkpoint(tmp_path / "cut.safetensors", SynthSpec()))
    data = path.read_bytes()
    h = hash_file(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.autov3 is None
    assert h.components == {}


def test_missing_file_raises_hash_error_naming_it(tmp_path):
    with pytest.raises(HashError, match="nope.safetensors"):
        hash_file(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- component hashes


@pytest.mark.parametrize("arch_id", ["sdxl", "sd15"])
def test_component_hashes_equal_independent_computation(tmp_path, arch_id):
    dtype = "F16" if arch_id == "sdxl" else "F32"
    path = write_checkpoint(tmp_path / "m.safetensors", SynthSpec(arch=arch_id, seed=3, dtype=dtype))
    h = hash_file(path)
    assert set(h.components) == set(get_architecture(arch_id).components)
    for cid, comp in h.components.items():
        exact, fp16 = _independent_component(path, arch_id, cid)
        assert comp.exact == exact, cid
        assert comp.fp16 == fp16, cid
        assert comp.exact_short == exact[:8]
        assert comp.tensors == len(get_architecture(arch_id).components[cid].keys)


def test_hashes_do_not_depend_on_chunking(tmp_path):
    """Odd chunk sizes split tensors at many places, header included."""
    path = write_checkpoint(tmp_path / "m.safetensors", SynthSpec(arch="sd15", scale=64, dtype="F32", nan_in=("vae",)))
    whole = hash_file(path)
    for chunk_bytes in (4099, 65536 + 3):
        other = hash_file(path, chunk_bytes=chunk_bytes)
        assert (other.sha256, other.autov1, other.autov3) == (whole.sha256, whole.autov1, whole.autov3)
        for cid, comp in whole.components.items():
            # sigmoid's vector and scalar code paths differ in the last bit: only the raw
            # metric sum may move, far below what its 4 digits show
            assert dataclasses.replace(other.components[cid], metric_sum=comp.metric_sum) == comp
            if comp.metric_sum is not None:
                assert other.components[cid].metric_sum == pytest.approx(comp.metric_sum, rel=1e-5)


def test_identical_components_in_different_files_hash_equal(tmp_path):
    shared = {"te0": BASE_SEED, "te1": BASE_SEED}
    a = hash_file(write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1, component_seeds=shared)))
    b = hash_file(write_checkpoint(tmp_path / "b.safetensors", SynthSpec(seed=2, component_seeds=shared)))
    for cid in ("te0", "te1"):
        assert a.components[cid].exact == b.components[cid].exact
        assert a.components[cid].fp16 == b.components[cid].fp16
    for cid in ("unet", "vae"):
        assert a.components[cid].exact != b.components[cid].exact
        assert a.components[cid].fp16 != b.components[cid].fp16
    assert a.sha256 != b.sha256


def test_one_changed_value_changes_only_its_component(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    b = shutil.copy(a, tmp_path / "b.safetensors")
    header = read_header(b)
    info = header.tensors["conditioner.embedders.1.model.transformer.resblocks.5.mlp.c_fc.weight"]
    with open(b, "r+b") as f:  # flip the lowest mantissa bit of one fp16 value
        f.seek(header.data_start + info.begin + 20)
        lo = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([lo ^ 1]))
    ha, hb = hash_file(a), hash_file(b)
    assert ha.components["te1"].exact != hb.components["te1"].exact
    assert ha.components["te1"].fp16 != hb.components["te1"].fp16
    for cid in ("unet", "te0", "vae"):
        assert ha.components[cid] == hb.components[cid]
    assert ha.sha256 != hb.sha256 and ha.autov3 != hb.autov3


def test_fp32_and_fp16_copies_match_only_in_fp16_hash(tmp_path):
    h16 = hash_file(write_checkpoint(tmp_path / "h.safetensors", SynthSpec(seed=5, dtype="F16")))
    h32 = hash_file(write_checkpoint(tmp_path / "f.safetensors", SynthSpec(seed=5, dtype="F32")))
    for cid in ("unet", "te0", "te1", "vae"):
        assert h16.components[cid].fp16 == h32.components[cid].fp16, cid
        assert h16.components[cid].exact != h32.components[cid].exact, cid


def test_fp16_hash_ignores_position_ids_buffer(tmp_path):
    """kohya saves omit position_ids; the weights are the same, so the fp16 hash matches."""
    full = hash_file(write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=5)))
    spec = SynthSpec(seed=5, deviations=("position_ids_missing",))
    pruned = hash_file(write_checkpoint(tmp_path / "b.safetensors", spec))
    assert full.components["te0"].fp16 == pruned.components["te0"].fp16
    assert full.components["te0"].exact != pruned.components["te0"].exact


def test_sdxl_te0_and_sd15_te_with_the_same_weights_match(tmp_path):
    """SDXL te0 is SD1's CLIP: the same weights give the same fp16 hash and toolkit metric."""
    xl = write_checkpoint(tmp_path / "xl.safetensors", SynthSpec(seed=7))
    te0 = {k: t for k, t in _tensors(xl).items() if k.startswith("conditioner.embedders.0.")}
    sd1 = make_state_dict(SynthSpec(arch="sd15", scale=32, seed=8, dtype="F16"))
    for key, t in te0.items():
        sd1_key = "cond_stage_model.transformer." + key.removeprefix("conditioner.embedders.0.transformer.")
        assert sd1_key in sd1
        if not key.endswith("position_ids"):
            sd1[sd1_key] = t
    sd1_path = write_file(tmp_path / "sd1.safetensors", sd1)
    hx, h1 = hash_file(xl), hash_file(sd1_path)
    assert h1.arch == "sd15"
    assert hx.components["te0"].fp16 == h1.components["te"].fp16
    assert hx.components["te0"].exact != h1.components["te"].exact  # position_ids F16 vs I64
    assert hx.components["te0"].metric == h1.components["te"].metric is not None


def test_renamed_keys_hash_like_standard_ones(tmp_path):
    """A file with an extra 'model.' prefix holds the same tensors under other names."""
    a = hash_file(write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=9)))
    spec = SynthSpec(seed=9, deviations=("extra_model_prefix",))
    b = hash_file(write_checkpoint(tmp_path / "b.safetensors", spec))
    for cid in ("unet", "te0", "te1", "vae"):
        assert a.components[cid].exact == b.components[cid].exact, cid


def test_report_passed_in_is_used(tmp_path):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(seed=1))
    report = inspect_file(path, "m1")
    assert hash_file(path, report) == hash_file(path)


# --------------------------------------------------------------------------- NaN / Inf


def test_nan_and_inf_are_counted_and_named(tmp_path):
    path = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=2, nan_in=("te1",)))
    expected_nan = expected_inf = 0
    for key, t in _tensors(path).items():
        if key.startswith("conditioner.embedders.1."):
            expected_nan += int(torch.isnan(t).sum())
            expected_inf += int(torch.isinf(t).sum())
    assert expected_nan > 0 and expected_inf > 0
    h = hash_file(path)
    assert (h.components["te1"].nan_count, h.components["te1"].inf_count) == (expected_nan, expected_inf)
    for cid in ("unet", "te0", "vae"):
        assert h.components[cid].nonfinite == 0
    findings = nonfinite_findings(h)
    assert len(findings) == 1
    f = findings[0]
    assert f.severity == Severity.ERROR and f.component == "te1"
    assert f"{expected_nan:,} NaN" in f.message and f"{expected_inf:,} Inf" in f.message


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_nan_counted_in_other_dtypes(tmp_path, dtype):
    path = write_checkpoint(
        tmp_path / "nan.safetensors", SynthSpec(arch="sd15", scale=64, dtype=dtype, nan_in=("vae",))
    )
    expected = sum(int(torch.isnan(t).sum()) for k, t in _tensors(path).items() if k.startswith("first_stage_model."))
    assert hash_file(path).components["vae"].nan_count == expected > 0


def test_nonfinite_findings_merge_into_the_report_once(tmp_path):
    path = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=2, nan_in=("vae",)))
    report = inspect_file(path, "m1")
    assert report.components["vae"].mergeable
    h = hash_file(path, report)
    add_nonfinite_findings(report, h)
    add_nonfinite_findings(report, h)
    assert [f.code for f in report.components["vae"].findings].count("nonfinite_values") == 1
    assert not report.components["vae"].mergeable
    assert "NaN" in report.components["vae"].problem
    assert report.components["unet"].mergeable


def test_clean_file_has_no_findings(tmp_path):
    assert nonfinite_findings(hash_file(write_checkpoint(tmp_path / "a.safetensors", SynthSpec()))) == []


# --------------------------------------------------------------------------- toolkit metric


def test_metric_string_follows_the_toolkit_definition():
    assert metric_string(CLIP_METRIC.ref, CLIP_METRIC) == "0000"
    assert metric_string(VAE_METRIC.ref, VAE_METRIC) == "0000"
    assert metric_string(VAE_METRIC.ref * 1.01235, VAE_METRIC) == "0123"
    assert metric_string(0.0, VAE_METRIC) is None  # the toolkit prints "----"
    assert metric_string(float("nan"), VAE_METRIC) is None
    for total in (1.0, -5.0, 123456.0, 1e9):  # folding by subtraction, as the toolkit loops
        n = int(abs(total / VAE_METRIC.ref - 1) * VAE_METRIC.k)
        while n >= 10000:
            n -= 5000
        assert metric_string(total, VAE_METRIC) == f"{n:04}"


@pytest.mark.parametrize("arch_id, dtype, te", [("sd15", "F32", "te"), ("sdxl", "F16", "te0"), ("sdxl", "BF16", "te0")])
def test_metric_matches_independent_implementation(tmp_path, arch_id, dtype, te):
    path = write_checkpoint(tmp_path / "m.safetensors", SynthSpec(arch=arch_id, seed=11, dtype=dtype))
    h = hash_file(path)
    arch = get_architecture(arch_id)
    clip = _toolkit_metric(
        path, arch.components[te].prefix, lambda k: "mlp." in k and ".23." not in k, -2097.8596, 1_000_000
    )
    vae = _toolkit_metric(path, "first_stage_model.", lambda k: "encoder." in k or "decoder." in k, 17870.7051, 10_000)
    assert h.components[te].metric == clip
    assert h.components["vae"].metric == vae
    assert h.components["unet"].metric is None
    assert all(h.components[c].metric is None for c in ("te1",) if c in h.components)


# --------------------------------------------------------------------------- progress and cancel


def test_progress_reaches_the_file_size(tmp_path):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(scale=16))
    seen = []
    hash_file(path, on_progress=lambda done, total: seen.append((done, total)), chunk_bytes=1 << 20)
    size = path.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cancel_raises_and_stops_every_thread(tmp_path):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(scale=16))
    cancel = threading.Event()
    before = threading.active_count()

    def progress(done, total):
        if done > 0:
            cancel.set()

    with pytest.raises(HashCancelled, match="a.safetensors"):
        hash_file(path, on_progress=progress, cancel=cancel, chunk_bytes=1 << 20)
    assert threading.active_count() == before


def test_file_changing_size_while_hashing_is_an_error(tmp_path):
    path = write_checkpoint(tmp_path / "a.safetensors", SynthSpec(scale=16))

    def progress(done, total):
        if done > 0:
            truncate(path, 0.5)

    with pytest.raises(HashError, match="a.safetensors"):
        hash_file(path, on_progress=progress, chunk_bytes=1 << 20)


def test_to_dict_round_trip(tmp_path):
    h = hash_file(write_checkpoint(tmp_path / "a.safetensors", SynthSpec(nan_in=("vae",))))
    from engine.hashes.model import FileHashes

    assert FileHashes.from_dict(h.to_dict()) == h
    assert h.to_dict()["autov2"] == h.autov2

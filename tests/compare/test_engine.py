"""The comparison engine on synthetic models with known relations: every relation found with
the right code and models, numbers against an fp64 reference, the block split, the cache,
cancel, and broken files left out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.compare.blocks import UNET_BLOCKS, unet_block
from engine.compare.events import CacheHit, CompareCancelled, CompareError, LeftOut, Progress
from engine.compare.run import compare
from engine.library.scan import scan
from engine.synth.checkpoints import truncate

from .support import ARCH, build_models, cosine_matrix, dtype_variants, reference_deltas

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare-models")
    return folder, build_models(folder)


def ids_of(folder) -> dict[str, str]:
    """file stem -> model id given by the scan"""
    return {r.path.stem: r.model_id for r in scan([folder])}


def comp_findings(result, component, block=None):
    return [(f["code"], f["models"]) for f in result["findings"]
            if f["component"] == component and f["block"] == block]


def test_every_relation_found_against_the_base(models):
    folder, paths = models
    ids = ids_of(folder)
    n = {stem.split("_", 1)[1]: i for stem, i in ids.items()}
    res = compare(scan([folder]), reference=ids["a00_base"], use_cache=False)
    assert res["reference"] == ids["a00_base"]
    for comp in ("unet", "te0", "te1"):
        found = comp_findings(res, comp)
        assert ("identical", [n["ft_c"], n["clone_c"]]) in found
        assert ("combination", [n["mix_ab"], n["ft_a"], n["ft_b"]]) in found
        assert ("outlier", [n["big"]]) in found
        assert ("family", sorted([n["ft_a"], n["ft_b"], n["mix_ab"]])) in found
        # nothing else is called an outlier, a mix or a near duplicate
        assert {tuple(m) for c, m in found if c == "outlier"} == {(n["big"],)}
        assert [m for c, m in found if c == "combination"] == [[n["mix_ab"], n["ft_a"], n["ft_b"]]]
        assert not [m for c, m in found if c == "near_duplicate"]
    assert ("unchanged", [n["te0_base"]]) in comp_findings(res, "te0")
    assert not [m for c, m in comp_findings(res, "unet") if c == "unchanged"]
    vae = comp_findings(res, "vae")
    assert ("unchanged", [i for s, i in sorted(ids.items()) if s not in ("a00_base", "a05_clone_c")]) in vae
    mix = next(f for f in res["findings"] if f["code"] == "combination" and f["component"] == "unet")
    assert mix["weights"] == pytest.approx([0.5, 0.5], abs=1e-6)
    assert mix["residual"] < 1e-3
    assert res["left_out"] == []


def test_numbers_match_an_fp64_reference(models):
    folder, paths = models
    ids = ids_of(folder)
    res = compare(scan([folder]), reference=ids["a00_base"], use_cache=False)
    for comp in ("unet", "te0", "te1"):
        deltas = reference_deltas(paths, "a00_base", comp)
        entry = res["components"][comp]
        assert entry["models"] == [ids[s] for s in deltas]
        want = cosine_matrix(deltas)
        got = entry["cosine"]
        for i, row in enumerate(want):
            for j, c in enumerate(row):
                if got[i][j] is None:  # a zero delta: no direction
                    names = list(deltas)
                    assert 0.0 in (float(deltas[names[i]].norm()), float(deltas[names[j]].norm()))
                else:
                    assert abs(got[i][j] - c) < 1e-6
        for name, value in zip(deltas, entry["norm"]):
            assert value == pytest.approx(float(deltas[name].norm()), rel=1e-9)
        # consensus: cosine to the mean delta; influence: how far the mean moves without it
        import torch

        stack = torch.stack(list(deltas.values()))
        mean = stack.mean(0)
        for k, name in enumerate(deltas):
            d = deltas[name]
            if float(d.norm()) > 0:
                want_c = float(torch.dot(d, mean) / (d.norm() * mean.norm()))
                assert abs(entry["consensus"][k] - want_c) < 1e-6
            others = torch.cat([stack[:k], stack[k + 1:]]).mean(0)
            from safetensors.torch import load_file

            sd = load_file(str(paths["a00_base"]))
            keys = [x for x in ARCH.tensors if ARCH.component_of(x) == comp and x != ARCH.position_ids_key]
            ref = torch.cat([sd[x].double().flatten() for x in keys])
            want_inf = float((mean - others).norm() / (ref + mean).norm())
            assert entry["influence"][k] == pytest.approx(want_inf, rel=1e-6)


def test_against_the_mean_of_the_models(models):
    folder, paths = models
    ids = ids_of(folder)
    reports = [r for r in scan([folder]) if r.path.stem != "a00_base"]
    sub = {k: v for k, v in paths.items() if k != "a00_base"}
    res = compare(reports, use_cache=False)
    assert res["reference"] is None
    deltas = reference_deltas(sub, None, "te1")
    want = cosine_matrix(deltas)
    got = res["components"]["te1"]["cosine"]
    assert all(abs(got[i][j] - want[i][j]) < 1e-6 for i in range(len(want)) for j in range(len(want)))
    found = comp_findings(res, "unet")
    assert ("identical", [ids["a03_ft_c"], ids["a05_clone_c"]]) in found
    assert ("combination", [ids["a04_mix_ab"], ids["a01_ft_a"], ids["a02_ft_b"]]) in found
    assert ("outlier", [ids["a06_big"]]) in found
    assert all(c is None for c in res["components"]["unet"]["consensus"])  # the mean delta is zero


def test_every_block_gets_its_keys():
    keys = [k for k in ARCH.tensors if ARCH.component_of(k) == "unet"]
    blocks = {k: unet_block(k) for k in keys}
    assert None not in blocks.values()
    assert set(blocks.values()) == set(UNET_BLOCKS)
    p = "model.diffusion_model."
    assert blocks[p + "time_embed.0.weight"] == "BASE"
    assert blocks[p + "label_emb.0.0.weight"] == "BASE"
    assert blocks[p + "input_blocks.0.0.weight"] == "IN00"
    assert blocks[p + "input_blocks.8.0.in_layers.0.weight"] == "IN08"
    assert blocks[p + "middle_block.1.proj_in.weight"] == "M00"
    assert blocks[p + "output_blocks.0.0.in_layers.0.weight"] == "OUT00"
    assert blocks[p + "output_blocks.8.0.out_layers.3.weight"] == "OUT08"
    assert blocks[p + "out.2.weight"] == "OUT08"
    assert unet_block("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight") is None


def test_block_numbers_match_an_fp64_reference(models):
    folder, paths = models
    ids = ids_of(folder)
    res = compare(scan([folder]), reference=ids["a00_base"], use_cache=False)
    blocks = res["components"]["unet"]["blocks"]
    assert list(blocks) == list(UNET_BLOCKS)
    total = [0.0] * len(res["components"]["unet"]["norm"])
    for block in UNET_BLOCKS:
        deltas = reference_deltas(paths, "a00_base", "unet", unet_block, block)
        want = cosine_matrix(deltas)
        got = blocks[block]["cosine"]
        assert all(abs(got[i][j] - want[i][j]) < 1e-6 for i in range(len(want)) for j in range(len(want)))
        for k, v in enumerate(blocks[block]["norm"]):
            total[k] += v * v
    for k, v in enumerate(res["components"]["unet"]["norm"]):
        assert v * v == pytest.approx(total[k], rel=1e-12)


def test_reruns_are_bit_identical_and_cached(models):
    folder, _ = models
    ids = ids_of(folder)
    events: list = []
    first = compare(scan([folder]), reference=ids["a00_base"], on_event=events.append)
    assert any(isinstance(e, Progress) for e in events)
    assert not any(isinstance(e, CacheHit) for e in events)
    again = compare(scan([folder]), reference=ids["a00_base"], use_cache=False, budget_bytes=1 << 16)
    assert again["components"] == first["components"]  # other chunk sizes, the same bits
    events.clear()
    cached = compare(scan([folder]), reference=ids["a00_base"], on_event=events.append)
    assert [type(e) for e in events] == [CacheHit]
    assert cached["components"] == first["components"] and cached["findings"] == first["findings"]
    # another reference is another result
    events.clear()
    compare(scan([folder]), reference=ids["a01_ft_a"], on_event=events.append)
    assert not any(isinstance(e, CacheHit) for e in events)


def test_cached_rerun_imports_no_torch(models, tmp_path):
    folder, _ = models
    code = (
        "import sys\n"
        "from engine.library.scan import scan\n"
        "from engine.compare.run import compare\n"
        f"r = compare(scan([{str(folder)!r}]), reference='{ids_of(folder)['a00_base']}')\n"
        "print('torch' in sys.modules, 'numba' in sys.modules)\n"
    )
    env = {"ASTOLFO_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["False", "False"]


def test_cancel_mid_run_stores_nothing(models):
    folder, _ = models
    ids = ids_of(folder)
    cancel = threading.Event()
    seen = []

    def on_event(e):
        if isinstance(e, Progress):
            seen.append(e)
            if len(seen) == 3:
                cancel.set()

    with pytest.raises(CompareCancelled):
        compare(scan([folder]), reference=ids["a00_base"], cancel=cancel, on_event=on_event)
    assert len(seen) == 3
    events: list = []
    compare(scan([folder]), reference=ids["a00_base"], on_event=events.append)
    assert not any(isinstance(e, CacheHit) for e in events)


def test_a_truncated_file_is_left_out_and_the_rest_compared(models, tmp_path):
    folder, paths = models
    for stem, p in paths.items():
        shutil.copy(p, tmp_path / p.name)
    truncate(tmp_path / "a03_ft_c.safetensors")
    (tmp_path / "a08_garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}  ")
    ids = ids_of(tmp_path)
    events: list = []
    res = compare(scan([tmp_path]), reference=ids["a00_base"], on_event=events.append)
    left = {x["id"]: x for x in res["left_out"]}
    assert set(left) == {ids["a03_ft_c"], ids["a08_garbage"]}
    assert left[ids["a03_ft_c"]]["path"].endswith("a03_ft_c.safetensors") and left[ids["a03_ft_c"]]["reason"]
    assert {e.model_id for e in events if isinstance(e, LeftOut)} == set(left)
    assert ids["a03_ft_c"] not in res["components"]["unet"]["models"]
    assert ("combination", [ids["a04_mix_ab"], ids["a01_ft_a"], ids["a02_ft_b"]]) in comp_findings(res, "unet")


def test_a_file_that_fails_mid_read_is_left_out(models, tmp_path, monkeypatch):
    folder, paths = models
    for p in paths.values():
        shutil.copy(p, tmp_path / p.name)
    reports = scan([tmp_path])
    ids = {r.path.stem: r.model_id for r in reports}
    truncate(tmp_path / "a02_ft_b.safetensors", 0.9)  # after the scan: found while reading
    res = compare(reports, reference=ids["a00_base"], use_cache=False)
    assert [x["id"] for x in res["left_out"]] == [ids["a02_ft_b"]]
    assert ids["a02_ft_b"] not in res["components"]["te0"]["models"]
    assert ("identical", [ids["a03_ft_c"], ids["a05_clone_c"]]) in comp_findings(res, "unet")


def test_nothing_to_compare(models, tmp_path):
    folder, paths = models
    shutil.copy(paths["a01_ft_a"], tmp_path / "only.safetensors")
    with pytest.raises(CompareError):
        compare(scan([tmp_path]), use_cache=False)
    with pytest.raises(CompareError):
        compare(scan([tmp_path]), reference="no-such-model", use_cache=False)


@pytest.mark.parametrize("use_cache", [True, False])  # ruled out by the hashes, or by the Gram matrix
def test_nan_values_leave_the_model_out_of_that_component(models, tmp_path, use_cache):
    import json

    from safetensors.torch import load_file

    from engine.checkpoint.writer import write_file

    folder, paths = models
    for stem in ("a00_base", "a01_ft_a", "a02_ft_b", "a03_ft_c", "a04_mix_ab"):
        shutil.copy(paths[stem], tmp_path / f"{stem}.safetensors")
    sd = load_file(str(paths["a03_ft_c"]))
    key = next(k for k in sd if k.startswith("conditioner.embedders.1.") and k.endswith(".weight"))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    write_file(tmp_path / "a03_ft_c.safetensors", sd, {})
    ids = ids_of(tmp_path)
    res = compare(scan([tmp_path]), reference=ids["a00_base"], use_cache=use_cache)
    json.loads(json.dumps(res, allow_nan=False))  # valid JSON: no NaN anywhere
    assert ids["a03_ft_c"] not in res["components"]["te1"]["models"]
    assert ids["a03_ft_c"] in res["components"]["te0"]["models"]
    assert [(x["id"], x["component"]) for x in res["left_out"]] == [(ids["a03_ft_c"], "te1")]
    assert ("combination", [ids["a04_mix_ab"], ids["a01_ft_a"], ids["a02_ft_b"]]) in comp_findings(res, "te1")


def test_the_dendrogram_and_the_families_come_from_one_linkage():
    """Two tight pairs and a loner: the tree joins each pair first, the dendrogram's leaves
    keep pairs together, and the families are the pairs (cut at 1 - 0.3)."""
    from astolfo_tui.compare_png import tree_segments
    from engine.compare.findings import _families, cosine_distances, linkage

    cos = [[1.0, 0.9, 0.1, 0.0, 0.1], [0.9, 1.0, 0.0, 0.1, 0.0], [0.1, 0.0, 1.0, 0.1, 0.8],
           [0.0, 0.1, 0.1, 1.0, 0.0], [0.1, 0.0, 0.8, 0.0, 1.0]]
    merges = linkage(cosine_distances(cos, list(range(5))))
    assert [(a, b) for a, b, _h, _n in merges[:2]] == [(0, 1), (2, 4)]
    assert merges[0][2] == pytest.approx(0.1) and merges[1][2] == pytest.approx(0.2)
    assert [h for _a, _b, h, _n in merges] == sorted(h for _a, _b, h, _n in merges)  # monotone
    assert merges[-1][3] == 5
    order, lines = tree_segments(merges, 5)
    assert sorted(order) == list(range(5)) and len(lines) == 4
    assert abs(order.index(0) - order.index(1)) == 1 and abs(order.index(2) - order.index(4)) == 1
    assert _families(list(range(5)), cos, 0.3) == [{0, 1}, {2, 4}]


def test_identical_from_the_catalog_hashes_when_known(models, tmp_path):
    """With the catalog, the clone's UNet is identical by its component hash; without it, by
    the zero distance of the deltas."""
    folder, _paths = models
    ids = ids_of(folder)
    pair = [ids["a03_ft_c"], ids["a05_clone_c"]]

    def identical(res, comp):
        return next(f for f in res["findings"] if f["code"] == "identical" and f["component"] == comp
                    and f["block"] is None)

    hashed = compare(scan([folder]), reference=ids["a00_base"], catalog_path=tmp_path / "catalog.sqlite3")
    assert identical(hashed, "unet")["models"] == pair and identical(hashed, "unet")["basis"] == "hashes"
    plain = compare(scan([folder]), reference=ids["a00_base"], use_cache=False)
    assert identical(plain, "unet")["models"] == pair and identical(plain, "unet")["basis"] == "distance"


def test_equal_hashes_make_models_identical_whatever_the_rounding():
    """Two deltas a hair apart in the Gram matrix (summation order, another reader) are still
    one component when their hashes are equal; an unknown hash falls back on the distance."""
    import numpy as np

    from engine.compare.findings import Thresholds, group_findings
    from engine.compare.stats import group_stats

    x = np.array([[1.0, 0.0, 0.0], [1.0, 1e-6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # reference last: 0
    stats = group_stats(x @ x.T)
    models = ["a", "b", "c"]
    codes = lambda found: [(f["code"], f["models"], f.get("basis")) for f in found if f["code"] == "identical"]  # noqa: E731
    assert codes(group_findings(stats, models, Thresholds())) == []
    assert codes(group_findings(stats, models, Thresholds(), ["h1", "h1", "h2"])) == [("identical", ["a", "b"],
                                                                                      "hashes")]
    assert codes(group_findings(stats, models, Thresholds(), ["h1", None, "h2"])) == []


def _sources(paths):
    from engine.compare.gather import Source
    from engine.library.diagnose import inspect_file

    reports = [inspect_file(p, model_id=f"m{i:02d}") for i, p in enumerate(paths)]
    return [Source(r.model_id, Path(r.path), r.key_map) for r in reports]


def _same_grams(a, b) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(np.array_equal(a[c][k].view(np.int64), b[c][k].view(np.int64)) for k in a[c])
        for c in a)


@pytest.mark.parametrize("with_reference", [False, True])
def test_the_pass_has_the_same_bits_on_any_number_of_threads_and_buffer(models, monkeypatch, with_reference):
    """Each chunk's reads, deltas and Gram pairs are split across threads; the matrices must
    not change by a bit with the thread count or the chunk size."""
    from engine.compare import cpu_pass
    from engine.compare import gather as gather_module

    folder, paths = models
    sources = _sources([paths[n] for n in sorted(paths)])
    ref = sources.pop(0) if with_reference else None
    whole = gather_module.gather(sources, ref, threads=1)
    monkeypatch.setattr(cpu_pass, "_SPLIT", 0)  # split every chunk, however small
    for threads, budget in ((2, cpu_pass.DEFAULT_BUDGET), (3, 1 << 17), (8, 200_000)):
        split = gather_module.gather(sources, ref, threads=threads, budget_bytes=budget)
        assert _same_grams(whole.grams, split.grams), (threads, budget)
        assert split.members == whole.members


def test_every_stored_dtype_is_widened_exactly_in_the_pass(models, tmp_path):
    """Models stored as fp16, bf16, fp32, fp64 and fp8 (widened by torch, then read by the
    kernel as fp64) give the bits of the same values stored as fp64, with and without a
    reference: the kernel's widening and the rows' offsets in the read buffer are exact."""
    from engine.compare.gather import gather

    folder, paths = models
    stored, wide = dtype_variants(paths, tmp_path)
    for with_reference in (False, True):
        a, b = _sources(stored), _sources(wide)
        ra, rb = (a.pop(0), b.pop(0)) if with_reference else (None, None)
        assert _same_grams(gather(a, ra, threads=2).grams, gather(b, rb, threads=2).grams)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_stored_values_become_the_same_fp64_as_torch_gives(dtype):
    """The deltas kernel's widening against torch's, every value exact: normals, subnormals,
    signed zeros, the largest values, infinities, NaN (a zero reference subtracted keeps each)."""
    import numpy as np
    import torch

    from engine.checkpoint.format import DTYPES
    from engine.compare.buffers import ReadBuffers, row_layout
    from engine.kernels.deltas import deltas

    tdt = DTYPES[dtype].torch_dtype
    info = torch.finfo(tdt)
    special = [0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 2, info.max, -info.max, 1.0, -3.5,
               float("inf"), float("-inf"), float("nan")]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4093, generator=g, dtype=torch.float64)
    values = torch.cat([torch.tensor(special, dtype=torch.float64), noise])
    stored = values.to(tdt)
    m = len(values)
    buffers = ReadBuffers(2, m + 5)
    buffers.raw[0, : m * stored.element_size()] = stored.view(torch.uint8).numpy()
    buffers.raw[1].view(np.float64)[:m] = 0.0
    kinds, offs = row_layout([dtype, "F64"], m + 5)
    xs = np.full((2, m + 5), 7.0)
    deltas(xs, kinds, offs, buffers.in16, buffers.in32, buffers.in64, 1, True, 0, m)
    expected = stored.to(torch.float64).numpy()
    assert np.array_equal(xs[0, :m], expected, equal_nan=True)
    assert np.array_equal(np.signbit(xs[0, :m]), np.signbit(expected))


def test_fp8_values_become_the_same_fp64_as_torch_gives():
    """fp8 is widened by torch (``to_float64``), every value exact."""
    import numpy as np
    import torch

    from engine.compare.gather import to_float64

    info = torch.finfo(torch.float8_e4m3fn)
    special = [0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 2, info.max, -info.max, 1.0, -3.5]
    values = torch.cat([torch.tensor(special, dtype=torch.float64),
                        torch.randn(4093, generator=torch.Generator().manual_seed(3), dtype=torch.float64)])
    stored = values.to(torch.float8_e4m3fn)
    out = to_float64(stored.view(torch.uint8).numpy().copy(), "F8_E4M3")
    expected = stored.to(torch.float64).numpy()
    assert np.array_equal(out, expected) and np.array_equal(np.signbit(out), np.signbit(expected))

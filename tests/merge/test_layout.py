"""engine.merge.layout: items cover every element of every step exactly once, fit their
buffers, keep 64-byte alignment (or, for results lent to their file, its block grid), and map
each output tensor to the step that writes it."""

from __future__ import annotations

import pytest
from merge_support import make_models, recipe_text, sdxl_output

from engine.checkpoint.direct_io import BLOCK
from engine.checkpoint.format import DTYPES, build_header
from engine.merge import layout
from engine.merge.layout import ALIGN, build_items, node_dtypes, output_positions, step_of_tensors, step_writes
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layout")
    paths = make_models(folder / "models", 3)
    models = {f"m{i}": str(p) for i, p in enumerate(paths)}
    text = recipe_text(models, {"all": list(models), "one": ["m0"]},
                       [sdxl_output(str(folder / "a.safetensors")),
                        sdxl_output(str(folder / "b.safetensors"), unet="one", dtype="fp32")])
    return build_plan(parse_recipe(text, folder))


@pytest.mark.parametrize("buffer_bytes", [4096, 64 << 10, 1 << 20, 64 << 20])
def test_items_cover_every_element_once_and_fit_their_buffers(plan, buffer_bytes):
    items = build_items(plan, buffer_bytes)
    covered: dict[int, list[tuple[int, int]]] = {}
    for i, item in enumerate(items):
        assert item.index == i
        assert item.read_bytes <= buffer_bytes or len(item.segments) == 1
        assert item.out_bytes <= buffer_bytes or len(item.segments) == 1
        for seg in item.segments:
            covered.setdefault(seg.step, []).append((seg.start, seg.stop))
            for s in seg.sources:
                assert s.buf_offset % ALIGN == 0 and s.buf_offset + s.nbytes <= item.read_bytes
                assert s.nbytes == seg.numel * DTYPES[s.dtype].itemsize
            for ns in seg.nodes:
                assert all(off % ALIGN == 0 for off in ns.outs.values())
    for si, step in enumerate(plan.steps):
        numel = plan.nodes[step.nodes[0]].numel
        ranges = sorted(covered[si])
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"step {si} has gaps or overlaps"


def test_slices_point_at_the_right_file_bytes(plan):
    for item in build_items(plan, 8192):
        for seg in item.segments:
            step = plan.steps[seg.step]
            by_key = {(s.file, s.key): s for s in step.sources}
            for s in seg.sources:
                src = by_key[(s.file, s.key)]
                assert s.file_offset == src.offset + seg.start * DTYPES[s.dtype].itemsize


def test_a_later_start_step_skips_the_earlier_steps(plan):
    start = len(plan.steps) // 2
    items = build_items(plan, 1 << 20, start)
    assert min(seg.step for it in items for seg in it.segments) == start


def test_every_output_tensor_is_written_by_exactly_one_step(plan):
    writes = step_writes(plan)
    steps = step_of_tensors(plan)
    dtypes = node_dtypes(plan)
    seen = set()
    for si, ws in enumerate(writes):
        for w in ws:
            assert steps[w.output][w.tensor] == si
            assert w.dtype in dtypes[w.node]
            seen.add((w.output, w.tensor))
    assert seen == {(o.index, t) for o in plan.outputs for t in range(len(o.tensors))}


def test_a_node_written_in_two_dtypes_gets_both_widest_first(plan):
    dtypes = node_dtypes(plan)
    multi = [ds for ds in dtypes.values() if len(ds) > 1]
    assert multi, "the fp32 output shares nodes with the fp16 one"
    assert all(DTYPES[ds[0]].itemsize >= DTYPES[ds[1]].itemsize for ds in multi)


def _positions(plan) -> dict:
    """(node, dtype) -> file offset of its tensor in the first output that writes it, as the
    merge's streams compute it (header, then the tensors in order)."""
    starts = []
    for o in plan.outputs:
        at = [len(build_header(o.tensors, o.metadata))]
        for t in o.tensors:
            at.append(at[-1] + t.nbytes)
        starts.append(at)
    return output_positions(step_writes(plan), lambda o, t: starts[o][t])


@pytest.mark.parametrize("buffer_bytes", [8192, 64 << 10, 1 << 20])
def test_results_laid_out_on_their_files_block_grid_fit_and_do_not_overlap(plan, buffer_bytes, monkeypatch):
    monkeypatch.setattr(layout, "LENT_MIN", 1024)  # the test's files are small: lend from 1 KiB
    positions = _positions(plan)
    items = build_items(plan, buffer_bytes, positions=positions)
    lent = 0
    covered: dict[int, int] = {}
    for item in items:
        slots = []
        for seg in item.segments:
            covered[seg.step] = covered.get(seg.step, 0) + seg.numel
            for ns in seg.nodes:
                for d, off in ns.outs.items():
                    size = DTYPES[d].itemsize
                    n = seg.numel * size
                    slots.append((off, off + n))
                    assert off % size == 0, "a slot must be a view of its dtype"
                    if n >= 1024 and (off - positions[(ns.node, d)] - seg.start * size) % BLOCK == 0:
                        lent += 1
                    elif n < 1024:
                        assert off % ALIGN == 0
        slots.sort()
        assert all(a[1] <= b[0] for a, b in zip(slots, slots[1:])), "output slots overlap"
        assert slots[-1][1] <= buffer_bytes or len(item.segments) == 1
    assert lent > 0 or buffer_bytes < 4 * BLOCK  # (in 8 KiB buffers, chunks stay under 1 KiB)
    assert all(covered[si] == plan.nodes[step.nodes[0]].numel for si, step in enumerate(plan.steps))


def test_every_lendable_slot_is_on_the_grid_when_buffers_have_room(plan, monkeypatch):
    monkeypatch.setattr(layout, "LENT_MIN", 1024)
    positions = _positions(plan)
    for item in build_items(plan, 1 << 20, positions=positions):
        for seg in item.segments:
            for ns in seg.nodes:
                d = next(iter(ns.outs))  # the widest: the one each output's first write takes
                size = DTYPES[d].itemsize
                pos = positions[(ns.node, d)]
                if seg.numel * size >= 1024 and pos % size == 0:
                    assert (ns.outs[d] - pos - seg.start * size) % BLOCK == 0

"""engine.merge.output: tensors reach the partial file in order whatever order their parts
arrive in, progress marks say what is durable, a mark of another plan is never believed, and
abort leaves nothing while commit leaves only the finished file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.checkpoint.format import TensorPlan
from engine.checkpoint.writer import partial_path
from engine.merge.output import OutputStream, read_progress, remove_progress, sidecar_path

PLANS = [TensorPlan("a", "F32", (4,)), TensorPlan("b", "F16", (3,)), TensorPlan("c", "F32", (2,))]
DATA = {"a": np.arange(4, dtype=np.float32), "b": np.array([1, 2, 3], dtype=np.float16),
        "c": np.array([-1, 5], dtype=np.float32)}


def _bytes(key: str) -> memoryview:
    return memoryview(DATA[key].tobytes())


def _stream(tmp_path, fingerprint="fp-1"):
    return OutputStream(tmp_path / "out.safetensors", PLANS, {"k": "v"}, fingerprint, drop_cache=False)


def test_parts_in_any_order_make_the_same_file(tmp_path):
    s = _stream(tmp_path)
    s.open()
    s.put(2, _bytes("c"), last=True)  # parked until a and b are written
    a = _bytes("a")
    s.put(0, a[:8], last=False)
    s.put(1, _bytes("b"), last=True)  # parked: a is not whole yet
    s.put(0, a[8:], last=True)
    assert s.tensors_done == 3
    path = s.commit()
    loaded = load_file(path)
    for key, value in DATA.items():
        assert np.array_equal(loaded[key], value)
    assert not partial_path(path).exists() and not sidecar_path(path).exists()


def test_a_checkpoint_records_durable_tensors_for_this_plan_only(tmp_path):
    s = _stream(tmp_path)
    s.open()
    s.put(0, _bytes("a"), last=True)
    s.checkpoint()
    target = tmp_path / "out.safetensors"
    assert json.loads(sidecar_path(target).read_text())["tensors_written"] == 1
    assert read_progress(target, "fp-1") == 1
    assert read_progress(target, "another-plan") is None
    s.close()
    resumed = _stream(tmp_path)
    resumed.open(resume_tensors=1)
    resumed.put(0, _bytes("a"), last=True)  # below the resume point: ignored
    resumed.put(1, _bytes("b"), last=True)
    resumed.put(2, _bytes("c"), last=True)
    loaded = load_file(resumed.commit())
    assert np.array_equal(loaded["c"], DATA["c"])


def test_abort_removes_the_partial_and_its_mark(tmp_path):
    s = _stream(tmp_path)
    s.open()
    s.put(0, _bytes("a"), last=True)
    s.checkpoint()
    s.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_of_the_wrong_size_is_refused(tmp_path):
    s = _stream(tmp_path)
    s.open()
    with pytest.raises(ValueError, match="header promised"):
        s.put(0, _bytes("a")[:12], last=True)
    s.abort()


def test_unusable_marks_are_not_believed(tmp_path):
    target = tmp_path / "out.safetensors"
    sidecar_path(target).write_text("{not json")
    assert read_progress(target, "fp-1") is None
    sidecar_path(target).write_text(json.dumps({"version": 1, "fingerprint": "fp-1", "tensors_written": 2}))
    assert read_progress(target, "fp-1") is None  # no partial file beside it
    partial_path(target).write_bytes(b"x")
    assert read_progress(target, "fp-1") == 2
    remove_progress(target)
    assert list(tmp_path.iterdir()) == []

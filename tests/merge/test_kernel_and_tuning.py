"""The kernel's device-independent arithmetic (finite checks that cannot overflow, products
multiplied then added, never fused) and the per-device tuning (cores from the affinity mask,
pinned memory capped to RAM, device buffers fitted to the card's free memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.merge import devices
from engine.merge.arithmetic import Kernel, all_finite
from engine.merge.backends.cuda import DEPTH, SCRATCH_BYTES_PER_ELEM, SLOTS
from engine.merge.tuning import MiB, Tuning

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_check_does_not_overflow_on_huge_finite_values(dtype):
    big = torch.full((100_000,), 3e38, dtype=dtype)
    k = Kernel(CPU, big.numel())
    assert bool(k.copy(big, [torch.empty_like(big)], True)) and k.finite(big)
    big[77] = float("nan")
    assert not bool(k.copy(big, [torch.empty_like(big)], True)) and not k.finite(big)
    big[77] = float("-inf")
    assert not k.finite(big)


def test_finite_check_of_fp8_and_integers():
    assert bool(all_finite(torch.full((8,), 448.0).to(torch.float8_e4m3fn)))
    assert bool(all_finite(torch.arange(10, dtype=torch.int64)))


def test_inexact_weights_are_multiplied_then_added_as_two_roundings():
    """The result is exactly numpy's a*w0 + b*w1 + c*w2 (each op rounded on its own), which any
    device computes alike; torch's add_(x, alpha=w) may fuse into an FMA instead."""
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(50_000, generator=g, dtype=torch.float32) for _ in range(3)]
    weights = [0.12345678912345678, 0.7, 1.987654321]
    out = torch.empty(50_000, dtype=torch.float32)
    Kernel(CPU, 50_000).mean(views, weights, [out])
    acc = views[0].numpy().astype(np.float64) * weights[0]
    for v, w in zip(views[1:], weights[1:]):
        acc = acc + v.numpy().astype(np.float64) * w
    expected = (acc / sum(weights)).astype(np.float32)
    assert np.array_equal(out.numpy(), expected)


def test_scratch_views_are_never_short():
    k = Kernel(CPU, 4, {"acc": 2})
    assert k.buf("acc", torch.float64, 2).numel() == 2
    assert k.buf("acc", torch.float64, 10).numel() == 10  # grown, never cut


def test_cpu_tuning_reads_on_two_threads_where_there_are_two_cores():
    assert Tuning.for_device(CPU, cores=1) == Tuning()
    two = Tuning.for_device(CPU, cores=2)
    assert (two.readers, two.read_buffers) == (2, 6)
    assert Tuning.for_device(CPU, cores=16) == two


def test_readers_follow_the_affinity_mask_not_the_machine(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)
    assert devices.host_cores() == 2
    gpu = torch.device("cuda", 0)
    ram = (512 << 30, 400 << 30)
    assert Tuning.for_device(gpu, ram=ram, gpu_free=80 << 30).readers == 2
    assert Tuning.for_device(gpu, cores=16, ram=ram, gpu_free=80 << 30).readers == 8


@pytest.mark.parametrize("total,available", [(8 << 30, 8 << 30), (16 << 30, 1 << 30), (512 << 30, 400 << 30)])
def test_pinned_memory_is_capped_to_a_share_of_ram(total, available):
    t = Tuning.for_device(torch.device("cuda", 0), cores=16, ram=(total, available), gpu_free=80 << 30)
    pinned = (t.read_buffers + t.out_buffers + 2 * (DEPTH - 1)) * t.buffer_bytes
    assert pinned <= min(total // 8, available // 2)
    assert t.buffer_bytes % MiB == 0 and t.buffer_bytes <= 128 * MiB
    if total == 512 << 30:
        assert t.buffer_bytes == 128 * MiB


def test_device_buffers_fit_the_cards_free_memory():
    free = 1 << 30
    t = Tuning.for_device(torch.device("cuda", 0), cores=16, ram=(512 << 30, 400 << 30), gpu_free=free)
    worst = 2 * SLOTS * t.buffer_bytes + SCRATCH_BYTES_PER_ELEM * t.buffer_bytes / 4
    assert worst <= 0.8 * free < 2 * SLOTS * 128 * MiB + SCRATCH_BYTES_PER_ELEM * 32 * MiB

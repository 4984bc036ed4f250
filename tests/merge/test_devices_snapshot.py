"""The dashboard's machine figures: host RAM always (Linux), GPU only where NVML answers."""

from engine.merge import devices


def test_host_memory_is_plausible():
    total, available = devices.host_memory()
    assert total and available is not None and 0 < available <= total


def test_gpu_snapshot_is_none_for_cpu_and_sane_otherwise():
    assert devices.gpu_snapshot("cpu") is None
    assert devices.gpu_snapshot("") is None
    snap = devices.gpu_snapshot("cuda:0 (whatever the event says)")
    if snap is not None:  # a machine with an NVIDIA driver and nvidia-ml-py
        assert snap.index == 0 and snap.name
        assert snap.total and 0 <= snap.used <= snap.total
        assert snap.util is None or 0 <= snap.util <= 100

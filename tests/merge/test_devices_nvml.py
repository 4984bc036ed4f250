"""GPU memory figures against a FAKE NVML module (a test double of ``pynvml``; this machine has
no GPU): the card is found by torch's UUID, MIG instances included, never by an index that
``CUDA_VISIBLE_DEVICES`` or CUDA's own ordering makes point at another card; v2 memory figures
are preferred, v1 is the fallback; without NVML the card's figures come from
``torch.cuda.mem_get_info`` and the process peak from ``max_memory_reserved``."""

from __future__ import annotations

import pytest
import torch

from engine.merge import devices
from engine.merge.devices import MemoryMonitor, gpu_snapshot, nvml_handle

GB = 1 << 30


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, used: int, total: int):
        self.used, self.total, self.free = used, total, total - used


class FakeNvml:
    """A test double of the ``pynvml`` module: cards in NVML's (PCI) order, each with a UUID,
    v1 memory (counting reserved memory as used) and v2 memory (without it), and MIG instances
    with their own UUID and memory."""

    nvmlMemory_v2 = 0x02000028

    def __init__(self, cards: list[dict], v2: bool = True, init_error: bool = False):
        self.cards = cards
        self.init_error = init_error
        self.inits = self.shutdowns = 0
        self.lookups: list[str] = []
        if not v2:
            self.nvmlMemory_v2 = None  # an old pynvml without the v2 structure

    def nvmlInit(self):
        if self.init_error:
            raise NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.lookups.append(f"index {index}")
        if not 0 <= index < len(self.cards):
            raise NVMLError("Invalid Argument")
        return self.cards[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.lookups.append(uuid)
        for card in self.cards:
            if card["uuid"] == uuid:
                return card
            for mig in card.get("migs", []):
                if mig["uuid"] == uuid:
                    return mig
        raise NVMLError("Not Found")

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version:
            if handle.get("no_v2"):
                raise NVMLError("Function Not Found")
            return _Memory(handle["used"], handle["total"])
        return _Memory(handle["used"] + handle.get("reserved", 0), handle["total"])

    def nvmlDeviceGetName(self, handle):
        return handle["name"].encode()

    def nvmlDeviceGetUtilizationRates(self, handle):
        class U:
            gpu = handle.get("util", 0)
        return U()


def _cards():
    return [
        {"uuid": "GPU-aaaaaaaa-0000", "name": "card A", "used": 1 * GB, "reserved": GB // 2, "total": 80 * GB},
        {"uuid": "GPU-bbbbbbbb-1111", "name": "card B", "used": 7 * GB, "reserved": GB // 2, "total": 80 * GB,
         "util": 55, "migs": [{"uuid": "MIG-cccccccc-2222", "name": "B mig 1g", "used": 2 * GB, "total": 10 * GB}]},
    ]


def test_the_card_is_found_by_torchs_uuid_whatever_the_index():
    nvml = FakeNvml(_cards())
    # torch (depending on its version) gives the UUID bare: it is tried as a GPU, then a MIG
    assert nvml_handle(nvml, "bbbbbbbb-1111", {"CUDA_VISIBLE_DEVICES": "1"}, 0)["name"] == "card B"
    assert nvml_handle(nvml, "GPU-bbbbbbbb-1111", {}, 0)["name"] == "card B"
    assert "index 0" not in nvml.lookups


def test_a_mig_instance_is_found_by_its_own_uuid():
    nvml = FakeNvml(_cards())
    handle = nvml_handle(nvml, "cccccccc-2222", {"CUDA_VISIBLE_DEVICES": "MIG-cccccccc-2222"}, 0)
    assert handle["name"] == "B mig 1g"
    assert devices._nvml_memory(nvml, handle) == (2 * GB, 10 * GB)  # the instance, not the card
    assert nvml_handle(nvml, "MIG-cccccccc-2222", {}, 0)["name"] == "B mig 1g"


def test_never_an_index_when_cuda_visible_devices_is_set_or_the_orders_may_differ():
    nvml = FakeNvml(_cards())
    assert nvml_handle(nvml, "deadbeef-9999", {"CUDA_VISIBLE_DEVICES": "1"}, 0) is None
    assert nvml_handle(nvml, None, {"CUDA_VISIBLE_DEVICES": "0"}, 0) is None
    assert nvml_handle(nvml, None, {}, 0) is None  # two cards, CUDA's order is fastest first
    assert not any(x.startswith("index") for x in nvml.lookups)
    assert nvml_handle(nvml, None, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, 1)["name"] == "card B"
    one = FakeNvml(_cards()[:1])
    assert nvml_handle(one, None, {}, 0)["name"] == "card A"


def test_v2_memory_first_then_v1():
    card = _cards()[1]
    assert devices._nvml_memory(FakeNvml(_cards()), card) == (7 * GB, 80 * GB)
    v1_only = FakeNvml(_cards(), v2=False)
    assert devices._nvml_memory(v1_only, card) == (7 * GB + GB // 2, 80 * GB)
    old_driver = dict(card, no_v2=True)
    assert devices._nvml_memory(FakeNvml(_cards()), old_driver) == (7 * GB + GB // 2, 80 * GB)


@pytest.fixture
def torch_gpu(monkeypatch):
    """torch's view of one CUDA device, faked (a test double: this machine has none)."""
    state = {"uuid": "bbbbbbbb-1111", "free": 70 * GB, "total": 80 * GB, "reserved_peak": 5 * GB,
             "allocated_peak": 3 * GB}
    monkeypatch.setattr(devices, "torch_uuid", lambda device: state["uuid"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["reserved_peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["allocated_peak"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    return state


def test_monitor_reports_the_cards_figures_and_the_process_peak_apart(torch_gpu):
    nvml = FakeNvml(_cards())
    monitor = MemoryMonitor(torch.device("cuda", 0), pynvml=nvml)
    assert monitor.source == "nvml"
    sample = monitor.sample()
    assert (sample.card_used, sample.card_total) == (7 * GB, 80 * GB)  # card B, v2
    assert sample.process_peak == 5 * GB  # reserved, not allocated
    monitor.close()
    assert nvml.shutdowns == 1


def test_monitor_without_the_card_in_nvml_uses_torch_and_never_another_card(torch_gpu):
    torch_gpu["uuid"] = "deadbeef-9999"  # NVML does not know it (a container without it)
    nvml = FakeNvml(_cards())
    monitor = MemoryMonitor(torch.device("cuda", 0), pynvml=nvml)
    assert monitor.source == "torch" and nvml.shutdowns == 1
    sample = monitor.sample()
    assert (sample.card_used, sample.card_total, sample.process_peak) == (10 * GB, 80 * GB, 5 * GB)


def test_monitor_without_a_driver_uses_torch(torch_gpu):
    monitor = MemoryMonitor(torch.device("cuda", 0), pynvml=FakeNvml(_cards(), init_error=True))
    assert monitor.source == "torch"
    torch_gpu["free"] = 20 * GB
    sample = monitor.sample()
    # the card's use (all processes) can exceed this process's peak: they are not one figure
    assert (sample.card_used, sample.card_total, sample.process_peak) == (60 * GB, 80 * GB, 5 * GB)


def test_dashboard_snapshot_finds_the_jobs_card_by_uuid(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    nvml = FakeNvml(_cards())
    snap = gpu_snapshot("cuda:0 (card B)", "GPU-bbbbbbbb-1111", pynvml=nvml)
    assert (snap.name, snap.used, snap.total, snap.util) == ("card B", 7 * GB, 80 * GB, 55)
    assert gpu_snapshot("cuda:0 (card B)", None, pynvml=nvml) is None  # no index under CVD
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_snapshot("cuda:0", None, pynvml=FakeNvml(_cards()[:1])).name == "card A"

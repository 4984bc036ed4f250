"""Where the merge runs and how much memory it uses: device names, host cores and RSS, GPU memory.

Two GPU figures, never mixed: the *card's* used/total (all processes, as ``nvidia-smi`` shows)
and *this process's* peak (``torch.cuda.max_memory_reserved``: what torch's allocator held at
most). The card's figures come from NVML (``nvidia-ml-py``, a default dependency) when a driver
answers, else from ``torch.cuda.mem_get_info`` (which needs no NVML). Drivers >= 515 count
reserved memory as "used" unless asked for the v2 structure, so v2 is tried first.

NVML numbers cards in PCI order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers them
fastest first, among the visible ones. So the card is found by torch's device UUID (a MIG
instance by its MIG UUID), and by index only where both orders provably agree; otherwise the
torch figures are used, never another card's.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be used on this machine, or None (torch is imported only to probe a
    ``cuda`` device: checking a CPU recipe must not pay its import)."""
    if not isinstance(spec, str) or not _DEVICE_RE.match(spec):
        return f"device {spec!r} is not one of auto, cpu, cuda, cuda:N"
    if spec.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"device {spec!r} asked for, but no CUDA GPU is available to torch here"
        if ":" in spec:
            index = int(spec.split(":")[1])
            if index >= torch.cuda.device_count():
                return f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
    return None


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first CUDA GPU when torch sees one, else the CPU."""
    import torch
    problem = device_problem(spec)
    if problem:
        raise ValueError(problem)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(spec)


def describe(device: torch.device) -> str:
    """A human name: ``cpu (2 threads)`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    import torch
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def host_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container or ``taskset`` may
    allow fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def gpu_free_bytes(device: torch.device) -> int | None:
    """Free memory of the card of ``device`` now (all processes), or None where unknown."""
    import torch
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:
        return None


def host_rss() -> int | None:
    """Resident set size of this process in bytes (Linux /proc; None where unknown)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def host_rss_peak() -> int:
    """Peak resident set size of this process so far, in bytes. (The kernel updates its high-water
    mark lazily, so the current RSS can be above it for a while.)"""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return max(peak, host_rss() or 0)


@dataclass
class DeviceMemory:
    card_used: int | None  # the whole card, every process
    card_total: int | None
    process_peak: int | None  # this process: the most torch's allocator reserved


class MemoryMonitor:
    """Device memory figures for progress events. For the CPU everything is None (host RSS is
    reported separately). ``pynvml`` may be given (tests pass a fake NVML module)."""

    def __init__(self, device: torch.device, pynvml=None):
        self.device = device
        self._nvml = None
        self._handle = None
        if device.type == "cuda":
            self._open_nvml(pynvml)

    def _open_nvml(self, pynvml=None) -> None:
        if pynvml is None:
            try:
                import pynvml  # type: ignore[import-not-found]
            except ImportError:
                return
        try:
            pynvml.nvmlInit()
        except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: the torch figures
            return
        try:
            index = self.device.index if self.device.index is not None else 0
            self._handle = nvml_handle(pynvml, torch_uuid(self.device), os.environ, index)
        except Exception:
            self._handle = None
        if self._handle is None:
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass
            return
        self._nvml = pynvml

    @property
    def source(self) -> str:
        if self.device.type != "cuda":
            return "none"
        return "nvml" if self._nvml else "torch"

    def sample(self) -> DeviceMemory:
        import torch
        if self.device.type != "cuda":
            return DeviceMemory(None, None, None)
        peak = int(torch.cuda.max_memory_reserved(self.device))
        if self._nvml is not None:
            used, total = _nvml_memory(self._nvml, self._handle)
            if used is not None:
                return DeviceMemory(used, total, peak)
        free, total = torch.cuda.mem_get_info(self.device)
        return DeviceMemory(int(total - free), int(total), peak)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def torch_uuid(device: torch.device) -> str | None:
    """torch's UUID of the CUDA device (``GPU-...``, or ``MIG-...`` on a MIG instance, or bare
    hex groups, depending on the torch version), or None where torch has none."""
    import torch
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:
        return None
    return str(uuid) if uuid else None


def _uuid_forms(uuid: str) -> list[str]:
    """The names NVML may know the card by: as given when prefixed, else as a GPU or a MIG
    instance (torch drops the prefix; CUDA reports a MIG instance's own UUID)."""
    text = uuid.strip()
    if text.startswith(("GPU-", "MIG-")):
        return [text]
    return [f"GPU-{text}", f"MIG-{text}"]


def nvml_handle(pynvml, uuid: str | None, env, index: int | None = None):
    """The NVML handle of the card torch calls ``uuid`` (``index`` in CUDA's numbering), or
    None. By UUID first; by index only when ``CUDA_VISIBLE_DEVICES`` is unset and the numbering
    of NVML (PCI order) is CUDA's too: one card, or ``CUDA_DEVICE_ORDER=PCI_BUS_ID``."""
    if uuid:
        for name in _uuid_forms(uuid):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(name)
            except Exception:
                continue
    if index is None or env.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    try:
        one_card = pynvml.nvmlDeviceGetCount() == 1
    except Exception:
        return None
    if not (one_card or env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"):
        return None
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def _nvml_memory(pynvml, handle) -> tuple[int | None, int | None]:
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            return int(info.used), int(info.total)
        except Exception:
            pass
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)
    except Exception:
        return None, None


# --------------------------------------------------------------------------- dashboards


@dataclass
class GpuSnapshot:
    """A card as NVML sees it now (all processes): for a dashboard watching a merge that runs in
    another process (a detached job)."""

    index: int
    name: str
    used: int | None
    total: int | None
    util: int | None  # percent busy over the driver's last sample period


_nvml_state: dict = {}


def _nvml():
    """pynvml, initialised once per process; None without the package or a driver."""
    if "module" not in _nvml_state:
        _nvml_state["module"] = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            _nvml_state["module"] = pynvml
        except Exception:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            pass
    return _nvml_state["module"]


def gpu_snapshot(device: str = "cuda:0", uuid: str | None = None, pynvml=None) -> GpuSnapshot | None:
    """Memory used/total and utilisation of the card named like ``cuda:1`` or
    ``cuda:1 (NVIDIA H100 ...)`` (the form progress events carry), from NVML; None where there
    is no NVML, no driver or no such card. ``uuid`` (the ``started`` event's ``device_uuid``)
    finds the card whatever the merge process's ``CUDA_VISIBLE_DEVICES`` was; without it the
    index is trusted only where ``nvml_handle`` says so. Creates no CUDA context."""
    match = re.match(r"^cuda(?::(\d+))?", device or "")
    if not match:
        return None
    pynvml = pynvml or _nvml()
    if pynvml is None:
        return None
    index = int(match.group(1) or 0)
    try:
        handle = nvml_handle(pynvml, uuid, os.environ, index)
        if handle is None:
            return None
        name = pynvml.nvmlDeviceGetName(handle)
        used, total = _nvml_memory(pynvml, handle)
        try:
            util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            util = None
    except Exception:
        return None
    return GpuSnapshot(index, name.decode() if isinstance(name, bytes) else str(name), used, total, util)


def host_memory() -> tuple[int | None, int | None]:
    """This machine's RAM: (total, available) in bytes from /proc/meminfo; (None, None) where
    unknown."""
    fields = {}
    try:
        with open("/proc/meminfo", "r", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None, None
    return fields.get("MemTotal"), fields.get("MemAvailable")

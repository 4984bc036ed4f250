"""Where the merge runs and how much memory it uses: device names, host RSS, GPU memory.

GPU memory comes from NVML (``nvidia-ml-py``, the optional ``gpu`` extra) when it is present: it
sees the whole card, as ``nvidia-smi`` does, and needs no CUDA context. Drivers >= 515 count
reserved memory as "used" unless asked for the v2 structure, so v2 is tried first. Without NVML
the figures come from torch's allocator (this process only).
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
    used: int | None
    total: int | None
    peak: int | None


class MemoryMonitor:
    """Device memory figures for progress events. For the CPU everything is None (host RSS is
    reported separately)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._nvml = None
        self._handle = None
        self._peak = 0
        if device.type == "cuda":
            self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, self.device)
            self._nvml = pynvml
        except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: fall back to torch
            self._nvml = None
            self._handle = None

    @property
    def source(self) -> str:
        if self.device.type != "cuda":
            return "none"
        return "nvml" if self._nvml else "torch"

    def sample(self) -> DeviceMemory:
        import torch
        if self.device.type != "cuda":
            return DeviceMemory(None, None, None)
        if self._nvml is not None:
            used, total = _nvml_memory(self._nvml, self._handle)
            if used is not None:
                self._peak = max(self._peak, used)
                return DeviceMemory(used, total, self._peak)
        used = torch.cuda.memory_reserved(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return DeviceMemory(used, total, torch.cuda.max_memory_allocated(self.device))

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of torch's CUDA device: matched by UUID (CUDA_VISIBLE_DEVICES reorders
    indices), else by index."""
    import torch
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
        except Exception:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


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


def gpu_snapshot(device: str = "cuda:0") -> GpuSnapshot | None:
    """Memory used/total and utilisation of the card named like ``cuda:1`` or
    ``cuda:1 (NVIDIA H100 ...)`` (the form progress events carry), from NVML; None where there
    is no NVML, no driver or no such card. Creates no CUDA context."""
    match = re.match(r"^cuda(?::(\d+))?", device or "")
    if not match:
        return None
    pynvml = _nvml()
    if pynvml is None:
        return None
    index = int(match.group(1) or 0)
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
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

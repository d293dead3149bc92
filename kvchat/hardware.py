"""The machine kvchat runs on, probed in one place: cores, free RAM, NVIDIA GPUs
(NVML, when a driver is present) and this process's resident memory.

The planner (kvchat.memory) stays pure and takes a Budget built here; the monitor
samples through the same NVML reader. No llama_cpp import here.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kvchat.memory import DEFAULT_MARGIN, Budget


@dataclass(frozen=True)
class GpuMemory:
    """Device memory summed over every NVIDIA GPU NVML sees (bytes)."""

    used: int
    total: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class HardwareSample:
    """One reading. `vram` is None without NVML; `memory_kind` says why."""

    rss_bytes: int
    vram: GpuMemory | None
    memory_kind: str  # "nvidia", "unified" (Apple silicon) or "cpu"
    taken_at: float


class NvmlReader:
    """A handle on NVML kept open between reads (init costs far more than a read)."""

    def __init__(self, nvml: ModuleType, handles: list[Any], names: tuple[str, ...]) -> None:
        self._nvml = nvml
        self._handles = handles
        self.names = names

    def read(self) -> GpuMemory | None:
        try:
            infos = [self._nvml.nvmlDeviceGetMemoryInfo(h) for h in self._handles]
        except Exception:  # the driver went away or a GPU fell off the bus
            return None
        return GpuMemory(sum(int(i.used) for i in infos), sum(int(i.total) for i in infos), self.names)

    def free_per_device(self) -> list[int]:
        """Free bytes on each GPU (raises what NVML raises)."""
        return [int(self._nvml.nvmlDeviceGetMemoryInfo(h).free) for h in self._handles]

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already shut down: nothing to release
            self._nvml.nvmlShutdown()


def _decode_name(raw: Any) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


def _no_nvidia_driver() -> bool:
    """True where we know for sure there is no NVIDIA driver (Linux without its /proc entry)."""
    return sys.platform == "linux" and not os.path.exists("/proc/driver/nvidia")


def open_nvml() -> NvmlReader | None:
    """NVML when an NVIDIA GPU and driver are present, else None (never raises)."""
    if _no_nvidia_driver():
        return None  # skip importing NVML and loading libnvidia-ml for nothing
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library, no driver, or no permission
        return None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        names = tuple(_decode_name(pynvml.nvmlDeviceGetName(h)) for h in handles)
    except Exception:
        count = 0
    if count == 0:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
        return None
    return NvmlReader(pynvml, handles, names)


def memory_kind(nvml: NvmlReader | None) -> str:
    """'nvidia' with NVML, 'unified' on Apple silicon, else 'cpu'."""
    if nvml is not None:
        return "nvidia"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "unified"
    return "cpu"


def physical_cores() -> int:
    """Physical cores (llama.cpp's threads spin: more than this only competes)."""
    import psutil

    return psutil.cpu_count(logical=False) or logical_cores()


def logical_cores() -> int:
    return os.cpu_count() or 1


class CpuLoadProbe:
    """Cores that *other* processes kept busy over a window (e.g. while a model loads).

    llama.cpp's worker threads spin while they wait for each other; with another
    process on one of their cores, decoding fell 25-fold on a 2-core machine. The
    1-minute load average lags and counts kvchat's own earlier runs, so this compares
    the machine's busy CPU time with this process's own over the window instead.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._started = time.monotonic()
        self._busy0 = self._machine_busy_s()
        self._own0 = self._own_s()

    @staticmethod
    def _machine_busy_s() -> float:
        import psutil

        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def _own_s(self) -> float:
        t = self._process.cpu_times()
        return float(t.user + t.system)

    def others_busy_cores(self) -> float:
        wall = time.monotonic() - self._started
        if wall < 0.05:  # too short to say anything
            return 0.0
        others = (self._machine_busy_s() - self._busy0) - (self._own_s() - self._own0)
        return max(0.0, others / wall)


def available_ram() -> int:
    """RAM available to a new allocation now (bytes)."""
    try:  # Linux: one small read, without importing psutil
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def free_vram() -> dict[str, int]:
    """Free bytes per NVIDIA GPU, named as llama.cpp names CUDA devices (CUDA0, ...)."""
    nvml = open_nvml()
    if nvml is None:
        return {}
    try:
        return {f"CUDA{i}": free for i, free in enumerate(nvml.free_per_device())}
    finally:
        nvml.close()


def detect_budget(margin: int = DEFAULT_MARGIN) -> Budget:
    """What a plan may use now: available RAM and free VRAM per GPU, minus `margin`."""
    vram = free_vram()
    return Budget(ram=available_ram(), vram=tuple(vram.values()), gpu_names=tuple(vram), margin=margin)


def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)



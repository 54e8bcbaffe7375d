"""GPU memory held by each process, from NVML (empty where there is no driver or no GPU)."""

from __future__ import annotations

from typing import Any


def gpu_memory_by_pid(nvml: Any = None) -> dict[int, int]:
    """pid → bytes of GPU memory over every visible device; {} when NVML is unavailable."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return {}
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return {}
    used: dict[int, int] = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in query(handle):
                    if proc.usedGpuMemory is not None:  # None: not reported (e.g. some containers)
                        used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory)
    except nvml.NVMLError:
        pass
    finally:
        nvml.nvmlShutdown()
    return used

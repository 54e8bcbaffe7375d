"""GPU memory held by each process, from NVML (empty where there is no driver or no GPU).

Every device the driver knows is read (NVML ignores CUDA_VISIBLE_DEVICES, which is right here: a
leftover process may hold any GPU). Each device and each kind of process list has its own try, so a
device that refuses one query (a MIG parent, a permission) does not hide the others.
"""

from __future__ import annotations

from typing import Any


def gpu_memory_by_pid(nvml: Any = None) -> dict[int, int]:
    """pid → bytes of GPU memory over every device; {} when NVML is unavailable."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return {}
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return {}
    used: dict[int, int] = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError:
                continue
            for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    processes = query(handle)
                except nvml.NVMLError:
                    continue
                for proc in processes:
                    if proc.usedGpuMemory is not None:  # None: not reported (e.g. some containers)
                        used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory)
    except nvml.NVMLError:  # the device count itself
        pass
    finally:
        nvml.nvmlShutdown()
    return used

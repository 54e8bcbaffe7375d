"""What the stall watch captures besides stacks: NCCL's flight recorder and the GPUs' state. Torch-free."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

NCCL_WAIT = 10.0  # seconds for the flight recorder's dumps after the pipes were written


def trigger_flight_recorder(folder: Path, ranks: list[int], dumps: Path, dest: Path) -> list[str]:
    """Write to each rank's flight-recorder pipe (NCCL only: it exists once a NCCL process group does),
    wait for the dumps, move them into `dest`. Returns the files moved."""
    triggered = []
    for rank in ranks:
        pipe = folder / f"nccl_pipe_{rank}.pipe"
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # no pipe (gloo, or the recorder is off), or no reader
        try:
            os.write(fd, b"1")
            triggered.append(rank)
        except OSError:
            pass
        finally:
            os.close(fd)
    moved: list[str] = []
    deadline = time.monotonic() + (NCCL_WAIT if triggered else 0)
    pending = {rank: dumps / f"nccl_trace_rank_{rank}" for rank in triggered}
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        for rank, path in list(pending.items()):
            if path.is_file() and time.time() - path.stat().st_mtime > 0.5:  # written and settled
                target = dest / path.name
                shutil.move(str(path), target)
                moved.append(str(target))
                del pending[rank]
    return moved


def nvml_state(nvml: Any = None) -> dict[str, Any]:
    """Each GPU's utilisation, memory, temperature, power and processes; `available: False` without NVML."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return {"available": False, "error": "pynvml is not installed"}
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    devices = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            device: dict[str, Any] = {"index": index}
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for key, read in (("name", lambda h: nvml.nvmlDeviceGetName(h)),
                              ("utilization_percent", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                              ("memory_used_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                              ("memory_total_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total),
                              ("temperature_c", lambda h: nvml.nvmlDeviceGetTemperature(h, 0)),
                              ("power_w", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
                              ("processes", lambda h: [{"pid": p.pid, "used_bytes": p.usedGpuMemory}
                                                       for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)])):
                try:
                    value = read(handle)
                    device[key] = value.decode() if isinstance(value, bytes) else value
                except Exception as exc:
                    device[key] = f"unavailable ({type(exc).__name__})"
            devices.append(device)
    except Exception as exc:
        return {"available": True, "error": f"{type(exc).__name__}: {exc}", "devices": devices}
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return {"available": True, "devices": devices}

"""Memory and system probes: per-step device memory without a sync, and a sampler thread for the rest.

Per step (training thread, host-side reads only):
- CUDA: `torch.cuda.memory_stats()` — allocated, reserved, active, peak since the last log point,
  allocation retries and OOMs. These are the caching allocator's host counters: no synchronize.
- Everywhere: this process's RSS from /proc/self/statm (a few µs).
In a background thread every `interval` seconds (psutil, NVML): DataLoader workers' RSS, CPU %,
host available memory, and, where NVML initialises, GPU used/total, utilisation, power, temperature.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psutil

log = logging.getLogger("runner.telemetry")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_rss() -> int:
    """Resident set size of this process in bytes, read cheaply from /proc."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return psutil.Process().memory_info().rss


class SystemSampler:
    """Samples psutil (and NVML when present) on a daemon thread; `latest` is a snapshot dict."""

    def __init__(self, interval: float, gpu_index: int | None) -> None:
        self.interval = interval
        self.latest: dict[str, float] = {}
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._nvml = _open_nvml(gpu_index) if gpu_index is not None else None
        self._thread = threading.Thread(target=self._run, name="system-sampler", daemon=True)

    @property
    def gpu_metrics(self) -> bool:
        return self._nvml is not None

    def start(self) -> "SystemSampler":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        values: dict[str, float] = {}
        try:
            children = self._process.children(recursive=True)
            workers_rss = 0
            for child in children:
                try:
                    workers_rss += child.memory_info().rss
                except psutil.Error:
                    continue
            values["workers_rss"] = float(workers_rss)
            values["workers"] = float(len(children))
            values["cpu_percent"] = self._process.cpu_percent(None)
            values["host_available"] = float(psutil.virtual_memory().available)
        except psutil.Error:
            pass
        if self._nvml is not None:
            values.update(self._nvml())
        self.latest = values


def _open_nvml(index: int) -> Any:
    """A function returning NVML readings for GPU `index`, or None (said once) when NVML is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound and friends
        log.info("GPU metrics off: NVML unavailable (%s); CUDA allocator stats stay on", type(exc).__name__)
        return None

    def read() -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out["gpu_used"], out["gpu_total"] = float(mem.used), float(mem.total)
            out["gpu_util"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            out["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            out["gpu_temp_c"] = float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        except pynvml.NVMLError:
            pass
        return out

    return read


class MemoryProbe:
    """Per-step memory readings for one device; `sample()` never synchronises the device."""

    CUDA_KEYS = {
        "allocated": "allocated_bytes.all.current",
        "reserved": "reserved_bytes.all.current",
        "active": "active_bytes.all.current",
        "peak": "allocated_bytes.all.peak",
        "alloc_retries": "num_alloc_retries",
        "ooms": "num_ooms",
    }

    def __init__(self, device: Any, system_every: float) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        gpu_index = (device.index or 0) if self.cuda else None
        self.system = SystemSampler(system_every, gpu_index).start()  # says once if NVML is unavailable

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {"rss": float(process_rss())}
        if self.cuda:
            import torch

            stats = torch.cuda.memory_stats(self.device)
            for key, stat in self.CUDA_KEYS.items():
                values[key] = float(stats.get(stat, 0))
        values.update(self.system.latest)
        return values

    def reset_peak(self) -> None:
        """Start a new 'peak since last log point' window."""
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def close(self) -> None:
        self.system.stop()

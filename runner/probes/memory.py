"""Memory and system probes: per-step device memory without a sync, and a sampler thread for the rest.

Per step (training thread, host-side reads only):
- CUDA: `torch.cuda.memory_stats()` — allocated, reserved, active, peak since the last log point,
  allocation retries and OOMs. These are the caching allocator's host counters: no synchronize.
- Everywhere: this process's RSS from /proc/self/statm (a few µs).
In a background thread every `interval` seconds (psutil, NVML): DataLoader workers' RSS, CPU %,
host available memory, and, where NVML initialises, GPU used/total, utilisation, power, temperature.

NVML numbers devices as the driver does and ignores CUDA_VISIBLE_DEVICES, so torch's device is found
in NVML by its UUID (MIG instances too), else by its PCI bus id, never by torch's index. Each reading
has its own try: one a device does not support (utilisation under MIG) leaves the others. NVML is
opened only on a CUDA run (a CPU run has no GPU to read, so it says nothing about NVML); when it
cannot be opened there, one line says that GPU metrics are off.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
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

    def __init__(self, interval: float, gpu: GpuIdentity | None, not_workers: frozenset[int] = frozenset()) -> None:
        self.interval, self.not_workers = interval, not_workers  # children that are no DataLoader workers
        self.latest: dict[str, float] = {}
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._nvml = open_nvml(gpu) if gpu is not None else None
        self._thread = threading.Thread(target=self._run, name="system-sampler", daemon=True)

    @property
    def gpu_metrics(self) -> bool:
        return self._nvml is not None

    def start(self) -> SystemSampler:
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
            children = [c for c in self._process.children(recursive=True) if c.pid not in self.not_workers]
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


@dataclass(frozen=True)
class GpuIdentity:
    """How NVML can find torch's device: its UUID (as CUDA prints it, no prefix) and PCI bus id."""

    uuid: str
    pci_bus_id: str  # "00000000:3b:00.0", NVML's form; "" when torch does not report it

    @classmethod
    def of(cls, index: int) -> GpuIdentity:
        """The identity of torch's CUDA device `index` (a visible index, after CUDA_VISIBLE_DEVICES)."""
        import torch

        props = torch.cuda.get_device_properties(index)
        pci = [getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]  # not in older torch
        bus_id = "" if None in pci else f"{pci[0]:08x}:{pci[1]:02x}:{pci[2]:02x}.0"
        uuid = str(props.uuid)  # torch prints the bare 8-4-4-4-12 form; NVML prefixes "GPU-" or "MIG-"
        return cls(uuid=uuid[4:] if uuid[:4] in ("GPU-", "MIG-") else uuid, pci_bus_id=bus_id)


READINGS: dict[str, Callable[[Any, Any], float]] = {
    "gpu_used": lambda nvml, h: float(nvml.nvmlDeviceGetMemoryInfo(h).used),
    "gpu_total": lambda nvml, h: float(nvml.nvmlDeviceGetMemoryInfo(h).total),
    "gpu_util": lambda nvml, h: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
    "gpu_power_w": lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
    "gpu_temp_c": lambda nvml, h: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
}


def nvml_handle(nvml: Any, gpu: GpuIdentity) -> Any:
    """NVML's handle for `gpu`: by UUID ("GPU-…", or "MIG-…" for a MIG instance), else by PCI bus id."""
    for key in (f"GPU-{gpu.uuid}", f"MIG-{gpu.uuid}"):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(key)
        except nvml.NVMLError:
            continue
    if not gpu.pci_bus_id:
        raise LookupError(f"no NVML device has UUID {gpu.uuid}")
    return nvml.nvmlDeviceGetHandleByPciBusId(gpu.pci_bus_id)


def open_nvml(gpu: GpuIdentity, nvml: Any = None) -> Callable[[], dict[str, float]] | None:
    """A function returning NVML readings for `gpu`, or None (said once) when NVML is absent or
    cannot find the device. `nvml` is the pynvml module (a stand-in in tests)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        handle = nvml_handle(nvml, gpu)
    except Exception as exc:
        log.info("GPU metrics off: NVML unavailable (%s: %s); CUDA allocator stats stay on",
                 type(exc).__name__, exc)
        return None

    def read() -> dict[str, float]:
        out: dict[str, float] = {}
        for name, reading in READINGS.items():
            try:
                out[name] = reading(nvml, handle)
            except nvml.NVMLError:  # not supported here (e.g. utilisation of a MIG instance)
                continue
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

    def __init__(self, device: Any, system_every: float, not_workers: frozenset[int] = frozenset()) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        gpu = None
        if self.cuda:
            import torch

            gpu = GpuIdentity.of(device.index if device.index is not None else torch.cuda.current_device())
        self.system = SystemSampler(system_every, gpu, not_workers).start()  # says once if NVML is unavailable

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

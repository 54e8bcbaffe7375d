"""NVML: torch's device found by UUID (MIG too) or PCI bus id, never by torch's index; one try per
reading; GPU memory per process with a failing device. A stand-in NVML module where no driver exists,
and the real path too (here: no driver, so nothing), plus the real mapping on a GPU."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from runner.probes.memory import GpuIdentity, MemoryProbe, nvml_handle, open_nvml
from runner.procs.gpu_memory import gpu_memory_by_pid

UUID = "58e9a9f2-1c1e-7c3b-9a55-0e5b4e1d2f10"


class NVMLError(Exception):
    pass


def fake_nvml(devices: dict[str, dict], unsupported: tuple[str, ...] = ()) -> types.SimpleNamespace:
    """Devices by NVML UUID ("GPU-…"/"MIG-…"), each with a PCI bus id and readings; `unsupported` readings
    raise as NVML_ERROR_NOT_SUPPORTED would."""
    by_pci = {d["pci"]: uuid for uuid, d in devices.items()}

    def by_uuid(uuid: str) -> str:
        if uuid not in devices:
            raise NVMLError("NVML_ERROR_NOT_FOUND")
        return uuid

    def by_bus(bus: str) -> str:
        if bus not in by_pci:
            raise NVMLError("NVML_ERROR_NOT_FOUND")
        return by_pci[bus]

    def reading(name: str, value):
        def read(handle, *_args):
            if name in unsupported:
                raise NVMLError("NVML_ERROR_NOT_SUPPORTED")
            return value(devices[handle])
        return read

    return types.SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetHandleByPciBusId=by_bus,
        nvmlDeviceGetMemoryInfo=reading("memory", lambda d: types.SimpleNamespace(used=d["used"], total=d["total"])),
        nvmlDeviceGetUtilizationRates=reading("util", lambda d: types.SimpleNamespace(gpu=d["util"])),
        nvmlDeviceGetPowerUsage=reading("power", lambda d: d["mw"]),
        nvmlDeviceGetTemperature=reading("temp", lambda d: d["temp"]))


DEVICES = {  # NVML's order: index 0 is another GPU; torch sees only the second (CUDA_VISIBLE_DEVICES=1)
    "GPU-00000000-0000-0000-0000-000000000000": {"pci": "00000000:17:00.0", "used": 1, "total": 80e9, "util": 99,
                                                  "mw": 650_000, "temp": 80},
    f"GPU-{UUID}": {"pci": "00000000:3b:00.0", "used": 5e9, "total": 141e9, "util": 42, "mw": 310_500, "temp": 51},
}


def test_the_visible_device_is_read_by_uuid_not_by_index() -> None:
    read = open_nvml(GpuIdentity(uuid=UUID, pci_bus_id="00000000:3b:00.0"), fake_nvml(DEVICES))
    assert read is not None
    assert read() == {"gpu_used": 5e9, "gpu_total": 141e9, "gpu_util": 42.0, "gpu_power_w": 310.5, "gpu_temp_c": 51.0}


def test_a_mig_instance_by_its_uuid_then_the_pci_bus_id() -> None:
    mig = {f"MIG-{UUID}": DEVICES[f"GPU-{UUID}"]}
    assert nvml_handle(fake_nvml(mig), GpuIdentity(UUID, "")) == f"MIG-{UUID}"
    unknown = GpuIdentity("ffffffff-0000-0000-0000-000000000000", "00000000:3b:00.0")
    assert nvml_handle(fake_nvml(DEVICES), unknown) == f"GPU-{UUID}"  # by PCI bus id


def test_an_unsupported_reading_keeps_the_others() -> None:
    read = open_nvml(GpuIdentity(UUID, ""), fake_nvml(DEVICES, unsupported=("util",)))
    assert read() == {"gpu_used": 5e9, "gpu_total": 141e9, "gpu_power_w": 310.5, "gpu_temp_c": 51.0}
    read = open_nvml(GpuIdentity(UUID, ""), fake_nvml(DEVICES, unsupported=("util", "power", "memory")))
    assert read() == {"gpu_temp_c": 51.0}


def test_gpu_metrics_off_is_said_once_when_nvml_cannot_find_or_open(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runner.telemetry")
    assert open_nvml(GpuIdentity("ffffffff-0000-0000-0000-000000000000", ""), fake_nvml(DEVICES)) is None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GPU metrics off: NVML unavailable")]
    assert len(lines) == 1 and "LookupError" in lines[0]


def test_a_cpu_run_does_not_open_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU in the run, so no GPU to read and nothing to say about NVML (decided in runner/probes/memory.py)."""
    opened = []
    monkeypatch.setattr("runner.probes.memory.open_nvml", lambda *a: opened.append(a))
    probe = MemoryProbe(torch.device("cpu"), 60.0)
    try:
        assert not probe.system.gpu_metrics and opened == []
        assert "rss" in probe.sample() and "allocated" not in probe.sample()
    finally:
        probe.close()


def _per_pid(failing_device: int | None = None, failing_query: str | None = None) -> types.SimpleNamespace:
    def handle(index: int) -> int:
        if index == failing_device:
            raise NVMLError("NVML_ERROR_NO_PERMISSION")
        return index

    def compute(index: int) -> list:
        if failing_query == "compute":
            raise NVMLError("NVML_ERROR_NOT_SUPPORTED")
        return [types.SimpleNamespace(pid=10 + index, usedGpuMemory=(index + 1) << 20),
                types.SimpleNamespace(pid=99, usedGpuMemory=None)]

    return types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                                 nvmlDeviceGetCount=lambda: 3, nvmlDeviceGetHandleByIndex=handle,
                                 nvmlDeviceGetComputeRunningProcesses=compute,
                                 nvmlDeviceGetGraphicsRunningProcesses=lambda h: [
                                     types.SimpleNamespace(pid=10, usedGpuMemory=1 << 20)])


def test_gpu_memory_by_pid_survives_a_device_or_a_query_that_fails() -> None:
    # pid 10: 1 MiB computing on device 0, plus 1 MiB of graphics on each device; pid 99 reports no size
    assert gpu_memory_by_pid(_per_pid()) == {10: 4 << 20, 11: 2 << 20, 12: 3 << 20}
    assert gpu_memory_by_pid(_per_pid(failing_device=1)) == {10: 3 << 20, 12: 3 << 20}
    assert gpu_memory_by_pid(_per_pid(failing_query="compute")) == {10: 3 << 20}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-driver path")
def test_without_a_driver_nothing_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runner.telemetry")
    assert gpu_memory_by_pid() == {}
    assert open_nvml(GpuIdentity(UUID, "")) is None  # the real pynvml
    assert any("GPU metrics off: NVML unavailable (NVMLError_LibraryNotFound" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_on_a_gpu_nvml_reads_torchs_device() -> None:
    import pynvml

    gpu = GpuIdentity.of(torch.cuda.current_device())
    pynvml.nvmlInit()
    handle = nvml_handle(pynvml, gpu)
    assert pynvml.nvmlDeviceGetUUID(handle).endswith(gpu.uuid)
    read = open_nvml(gpu)
    values = read()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    assert abs(values["gpu_total"] - total) < 0.1 * total and 0 <= values.get("gpu_util", 0) <= 100

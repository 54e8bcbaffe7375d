"""The CUDA memory paths: their logic on CPU (out-of-memory recognition, snapshot recording, auto-batch
trials and the 2^31-element bound, the live estimate under DataParallel's threads), and the real thing
on a GPU (measured vs estimate, a real OOM under a per-process budget, auto batch with trials that run
out of memory, fp16 under GradScaler), skipped without CUDA."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch

from runner.memory.report import format_bytes
from runner.models import build_model
from runner.train import checkpoint
from tests.support.memory import OOM_STEP
from tests.support.runs import run_runner


def test_is_out_of_memory_recognises_library_allocation_failures() -> None:
    from runner.memory.postmortem import is_out_of_memory

    yes = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
           RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
           RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
           RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
           torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")]
    no = [RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), RuntimeError("CUDA error: an illegal memory access"),
          ValueError("CUDA out of memory"),  # not an error torch raises for memory
          RuntimeError("CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"),  # host memory, not the device
          KeyboardInterrupt()]
    assert [is_out_of_memory(e) for e in yes] == [True] * len(yes)
    assert [is_out_of_memory(e) for e in no] == [False] * len(no)


def test_snapshot_recording_is_bounded_python_only_and_fits_torchs_signature(monkeypatch) -> None:
    import inspect

    from runner.memory import postmortem

    bound = inspect.signature(torch.cuda.memory._record_memory_history).bind(**postmortem.SNAPSHOT_ARGS)
    assert bound.arguments == {"enabled": "all", "context": "alloc", "stacks": "python", "max_entries": 20_000}
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append((a, k)))
    postmortem.record_history(torch.device("cuda", 1))
    assert calls == [((), postmortem.SNAPSHOT_ARGS)]  # no device: recording is process-wide
    postmortem.record_history(torch.device("cpu"))
    assert len(calls) == 1


def test_a_trial_that_runs_out_of_memory_in_a_library_does_not_fit() -> None:
    from runner.memory.auto_batch import measured_trial

    def raising(exc: BaseException):
        def run() -> int:
            raise exc
        return run

    from runner.memory.auto_batch import Trial

    assert measured_trial(8, lambda: 3 << 20) == Trial(8, True, f"peak {format_bytes(3 << 20)}")
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB. GPU 0"),
                RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")):
        trial = measured_trial(64, raising(exc))
        assert not trial.fits and trial.detail.startswith("out of memory: ")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        measured_trial(64, raising(RuntimeError("CUDA error: an illegal memory access was encountered")))


def test_auto_batch_stops_before_a_tensor_passes_2_to_the_31_elements() -> None:
    from runner.config import resolve
    from runner.memory.auto_batch import choose_batch_size, search_ceiling
    from runner.memory.estimate import largest_tensor_per_sample

    wide = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 1), torch.nn.Flatten())
    assert largest_tensor_per_sample(torch.nn.Conv2d(3, 8, 3, padding=1), (3, 10, 10)) == 8 * 100
    per_sample = 64 * 256 * 256
    assert largest_tensor_per_sample(wide, (1, 256, 256)) == per_sample
    assert search_ceiling(100, per_sample) == (125, "")
    ceiling, reason = search_ceiling(4096, per_sample)
    assert ceiling == (2**31 - 1) // per_sample == 511 and "a batch of 512 would make a tensor" in reason

    cfg = resolve(None, {"model": "cnn", "image_size": 256, "channels": 1, "memory_budget": "1TiB", "device": "cpu"})
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(64, 10))
    search = choose_batch_size(cfg, model, (1, 256, 256), torch.device("cpu"), 100_000)
    assert max(t.batch for t in search.trials) == 511 and search.largest == 511
    assert search.chosen == 511 * 4 // 5
    stopped = "the search stopped at 511: a batch of 512 would make a tensor of more than 2^31 elements"
    assert stopped in search.summary()


def test_live_estimate_counts_what_other_threads_save() -> None:
    """nn.DataParallel runs each replica's forward in a thread; saved-tensor hooks are per thread."""
    import threading

    from runner.config import resolve
    from runner.memory.live import LiveEstimate
    from runner.telemetry.events import Scalar

    torch.manual_seed(0)
    model = build_model("cnn", 3, 16, 10).train()
    inputs, targets = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    cfg = resolve(None, {"model": "cnn", "image_size": 16, "device": "cpu"})

    def activations(in_thread: bool) -> float:
        events: list = []
        live = LiveEstimate(cfg, model, (3, 16, 16), 4, "cpu", events.append, 0, 0)
        with live.measure(inputs, targets):
            if in_thread:  # as parallel_apply does
                thread = threading.Thread(target=lambda: outputs.append(model(inputs)))
                thread.start()
                thread.join()
                output = outputs[0]
            else:
                output = model(inputs)
            torch.nn.functional.cross_entropy(output, targets)
        return next(e.value for e in events if isinstance(e, Scalar) and e.tag == "memory/estimate_activations")

    outputs: list = []
    same_thread = activations(False)
    assert same_thread > 100_000
    assert activations(True) == same_thread

    seen = []  # the bare mechanism misses the other thread: what the module hooks are for
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        thread = threading.Thread(target=lambda: model(inputs))
        thread.start()
        thread.join()
    assert seen == []


# --- GPU only --------------------------------------------------------------------------------------

CUDA_OOM_MODEL = "scripts.gpu_checks.models:oom_at_step_3"  # allocates 1.5x the allowed memory at step 3


def _budget_env(gib: float) -> dict[str, str]:
    """A per-process cap the caching allocator enforces, so that OOM is certain and quick on any card."""
    total = torch.cuda.get_device_properties(0).total_memory
    return {"PYTORCH_CUDA_ALLOC_CONF": f"per_process_memory_fraction:{gib * 2**30 / total:.6f}"}


@pytest.mark.gpu
def test_measured_peak_is_printed_beside_the_estimate(cli) -> None:
    args = ["memory", "--model", "cnn", "--input-shape", "3,64,64", "--batch-size", "128", "--device", "cuda"]
    out = cli(*args, "--json")
    assert out.code == 0, out.stderr
    data = json.loads(out.stdout)
    measured = data["measured"]
    assert measured["peak"] > data["bytes"]["fp32"]["parameters"] + data["bytes"]["fp32"]["input_batch"]
    assert measured["estimate"] == data["bytes"]["fp32"]["total"]
    error = 100 * (measured["estimate"] - measured["peak"]) / measured["peak"]
    assert measured["error_percent"] == pytest.approx(error)
    assert abs(measured["error_percent"]) <= 15, measured  # the target
    table = cli(*args)
    assert "measured peak on cuda" in table.stdout and "%)" in table.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_real_cuda_oom_writes_summary_and_snapshot(tmp_path: Path) -> None:
    out = run_runner("train", "--model", CUDA_OOM_MODEL, "--image-size", "32", "--batch-size", "8", "--samples", "64",
                     "--steps", "6", "--log-every", "1", "--checkpoint-every", "100", "--memory-snapshot",
                     "--viz", "none", "--no-progress", "--no-graph", "--device", "cuda",
                     "--run-dir", str(tmp_path), "--name", "big", env=_budget_env(1))
    assert out.code == 1, out.stderr
    assert f"runner: error: out of memory at step {OOM_STEP}" in out.stderr and "Traceback" not in out.stderr
    folder = tmp_path / "big" / "oom"
    assert "PyTorch CUDA memory summary" in (folder / "memory_summary.txt").read_text()
    with open(folder / "memory_snapshot.pickle", "rb") as fh:
        snapshot = pickle.load(fh)
    assert "segments" in snapshot and "device_traces" in snapshot
    assert any(e["action"] == "oom" for trace in snapshot["device_traces"] for e in trace)  # history recorded
    frames = [f for trace in snapshot["device_traces"] for e in trace for f in e.get("frames", [])]
    assert frames and all("filename" in f for f in frames)  # python stacks
    assert checkpoint.load(tmp_path / "big" / "checkpoints" / "last.pt")["step"] == OOM_STEP - 1


@pytest.mark.gpu
def test_auto_batch_on_cuda_survives_out_of_memory_trials(cli, tmp_path: Path) -> None:
    # the trainer runs in this process: cap this process's allocator at 2 GiB for the search
    torch.cuda.set_per_process_memory_fraction(2 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        out = cli("train", "--model", "tinyunet", "--image-size", "256", "--samples", "4096", "--batch-size", "auto",
                  "--steps", "2", "--viz", "none", "--no-progress", "--device", "cuda", "--run-dir", str(tmp_path),
                  "--name", "gpu-auto")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert out.code == 0, out.stderr
    assert "does not fit (out of memory: " in out.stderr  # the search's out-of-memory path ran
    largest = int(re.search(r"largest that fits (\d+) ", out.stderr).group(1))
    assert int(re.search(r"using (\d+) \(", out.stderr).group(1)) == max(1, largest * 4 // 5)


@pytest.mark.gpu
def test_amp_on_cuda_runs_fp16_under_the_scaler(cli, tmp_path: Path) -> None:
    from runner.config import resolve
    from runner.telemetry.hub import Hub
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    cfg = resolve(None, {"model": "cnn", "image_size": 32, "batch_size": 8, "samples": 32, "steps": 3, "amp": True,
                         "device": "cuda", "viz": "none", "progress": False, "log_every": 1,
                         "run_dir": str(tmp_path), "name": "gpu-amp"})
    trainer = Trainer(cfg, make_strategy(cfg))
    dtypes: list[torch.dtype] = []
    trainer.raw_model.features[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        assert trainer.fit(Hub([])) == 0
    finally:
        trainer.close()
    assert dtypes == [torch.float16] * len(dtypes) and len(dtypes) >= 3
    scale = trainer.scaler.get_scale()
    assert scale == 2.0 ** round(math.log2(scale)) and scale <= 65536.0  # the initial scale, halved per skipped step

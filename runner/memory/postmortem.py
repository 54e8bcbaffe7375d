"""The out-of-memory post-mortem: what was held, what the estimate says, and what to do next.

- `is_out_of_memory`: whether an exception means "the device ran out of memory" (the caching
  allocator's error, and cuDNN/cuBLAS/CUDA allocation failures that surface as RuntimeError).
- `record_history`: with --memory-snapshot on CUDA, the allocator records its history from the start.
- `capture`: inside the `except` block, while the failed step's tensors are still alive — the error,
  `torch.cuda.memory_summary()`, allocator counters, and the snapshot pickle (pytorch.org/memory_viz).
- `unsafe_to_save`: whether the state in memory is the last good step's, so it may be checkpointed.
- `report`: writes `<run>/oom/` and returns the one-paragraph diagnosis as a RunnerError (exit 1).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runner.config import DENOISE_MODELS, TrainConfig
from runner.errors import RunnerError
from runner.memory.budget import cuda_capacity, memory_budget
from runner.memory.estimate import Breakdown, estimate
from runner.memory.report import LABELS, as_json, format_bytes, markdown

log = logging.getLogger("runner")

SNAPSHOT = "memory_snapshot.pickle"
# The allocator's ring buffer of alloc/free events: the last ~tens of steps of a typical model, a few
# KB each on the host. Python frames only (C++ frames cost far more per allocation), stacks of
# allocations only (the frees' stacks rarely explain an out-of-memory error).
SNAPSHOT_ARGS = {"enabled": "all", "context": "alloc", "stacks": "python", "max_entries": 20_000}

# Allocation failures that do not come out as torch.OutOfMemoryError: cuDNN 8 / 9, cuBLAS(Lt),
# cuSOLVER, cuFFT workspaces, and a plain cudaMalloc outside the caching allocator.
_OOM_MESSAGE = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUDNN_STATUS_ALLOC_FAILED|"
    r"CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED|CUBLAS_STATUS_ALLOC_FAILED|"
    r"CUSOLVER_STATUS_ALLOC_FAILED|CUFFT_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` means the device ran out of memory: torch.OutOfMemoryError, or a RuntimeError
    (torch.AcceleratorError included) whose message shows a library's device allocation failing."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and _OOM_MESSAGE.search(str(exc)) is not None


def record_history(device: torch.device) -> None:
    """Start recording CUDA allocator history for a snapshot at an out-of-memory error. Recording
    is process-wide (every CUDA device), so no device is passed."""
    if device.type != "cuda":
        log.warning("--memory-snapshot records the CUDA allocator; there is none on %s: no snapshot", device)
        return
    torch.cuda.memory._record_memory_history(**SNAPSHOT_ARGS)


@dataclass(frozen=True)
class Capture:
    """What was known at the moment of the error."""

    folder: Path
    error: str  # the message's first two sentences, on one line
    traceback: str
    summary: str | None  # torch.cuda.memory_summary()
    allocated: int
    reserved: int
    snapshot: Path | None


def capture(exc: BaseException, device: torch.device, folder: Path, snapshot: bool) -> Capture:
    """Call inside the except block; dumps the allocator snapshot now when asked (and on CUDA)."""
    words = " ".join(str(exc).split())
    error = ". ".join(words.split(". ")[:2]).rstrip(".") or type(exc).__name__
    summary, allocated, reserved, snapshot_path = None, 0, 0, None
    if device.type == "cuda":
        summary = torch.cuda.memory_summary(device)
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        if snapshot:
            folder.mkdir(parents=True, exist_ok=True)
            snapshot_path = folder / SNAPSHOT
            torch.cuda.memory._dump_snapshot(str(snapshot_path))
    return Capture(folder, error, "".join(traceback.format_exception(exc)), summary, allocated, reserved,
                   snapshot_path)


def unsafe_to_save(phase: str, world_size: int, nonfinite: bool) -> str | None:
    """Why the state in memory must not be checkpointed, or None when it is the last good step's."""
    if phase == "update":
        return "nothing saved: the error hit while the optimizer was updating, so the weights may be half-updated"
    if world_size > 1:
        return "nothing saved: the other ranks are mid-step"
    if nonfinite:
        return "nothing saved: the loss was NaN/inf since the last log point"
    return None


def capacity(cfg: TrainConfig, device: torch.device) -> tuple[int, str]:
    """The bytes a step may use here, and a phrase naming them."""
    if device.type == "cuda":
        return cuda_capacity(device)
    budget, _described = memory_budget(cfg)
    return budget, f"the {format_bytes(budget)} memory budget"


def report(failure: Capture, cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], batch: int,
           device: torch.device, step: int, saved: str) -> RunnerError:
    """Write the post-mortem files; return the diagnosis (one paragraph) as the error to raise."""
    folder = failure.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").write_text(failure.traceback)
    written = ["diagnosis.txt", "error.txt"]
    if failure.summary is not None:
        (folder / "memory_summary.txt").write_text(failure.summary)
        written.append("memory_summary.txt")
    if failure.snapshot is not None:
        written.append(f"{SNAPSHOT} (open it at pytorch.org/memory_viz)")
    sentences = [f"out of memory at step {step} (batch {batch} on {device}): {failure.error}."]
    try:
        breakdown: Breakdown | None = estimate(model, input_shape, batch, cfg.optimizer, cfg.resolved_task,
                                               device.type, cfg.amp, cfg.model, cfg.amp_dtype)
    except RunnerError as exc:
        breakdown = None
        sentences.append(f"No estimate: {exc}.")
    if breakdown is not None:
        (folder / "breakdown.md").write_text(markdown(breakdown) + "\n")
        (folder / "breakdown.json").write_text(json.dumps(as_json(breakdown), indent=2) + "\n")
        written[1:1] = ["breakdown.md", "breakdown.json"]
        total = breakdown.total()
        name, size = breakdown.biggest_part()
        sentences.append(f"The estimate for this step is {format_bytes(total)}; the biggest part is {LABELS[name]} "
                         f"at {format_bytes(size)} ({100 * size / max(total, 1):.0f}%).")
        sentences.append("Next: " + "; ".join(next_steps(breakdown, failure, cfg, device)) + ".")
    sentences.append(f"Checkpoint: {saved}.")
    sentences.append(f"Post-mortem in {folder}/: {', '.join(written)}.")
    paragraph = " ".join(sentences)
    (folder / "diagnosis.txt").write_text(paragraph + "\n")
    if cfg.debug:
        print(failure.traceback, file=sys.stderr, end="")
    return RunnerError(paragraph)


def next_steps(breakdown: Breakdown, failure: Capture, cfg: TrainConfig, device: torch.device) -> list[str]:
    """Concrete changes with their numbers: batch size, AMP, input size, optimizer, allocator settings."""
    usable, where = capacity(cfg, device)
    batch = breakdown.batch_size
    fit = breakdown.largest_batch(usable)
    keep = fit * 4 // 5
    steps = []
    if 1 <= keep < batch:
        steps.append(f"--batch-size {keep} (80% of the {fit:,} that fit in {where} by the estimate)")
    elif batch > 1:
        steps.append(f"--batch-size {batch // 2}, half (by the estimate {fit:,} fit in {where}, so memory outside "
                     "it is in use: other processes, fragmentation, workspaces)")
    steps.append("or --batch-size auto, or --oom retry to halve it and go on")
    if not cfg.amp:
        saving = breakdown.total("fp32") - breakdown.total("amp")
        if saving > 0:
            steps.append(f"--amp saves about {format_bytes(saving)}")
    smaller = _smaller_input(breakdown, cfg)
    if smaller:
        steps.append(smaller)
    if cfg.optimizer in ("adam", "adamw") and breakdown.optimizer_bytes > breakdown.parts()["activations"]:
        steps.append(f"--optimizer momentum saves about {format_bytes(breakdown.optimizer_bytes // 2)} "
                     "of optimizer state")
    gap = failure.reserved - failure.allocated
    if gap > max(failure.reserved // 5, 256 << 20):
        steps.append(f"{format_bytes(gap)} was reserved but unallocated: set "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation")
    return steps


def _smaller_input(breakdown: Breakdown, cfg: TrainConfig) -> str | None:
    """'--image-size N (from M) saves about X' when --image-size sets this input's side."""
    size = cfg.image_size
    shape = breakdown.input_shape
    if len(shape) != 3 or shape[1:] != (size, size) or cfg.data.split(":", 1)[0] in ("mnist", "cifar10"):
        return None
    new = size // 2
    if cfg.model in DENOISE_MODELS:
        new -= new % 8
    if new < 8:
        return None
    from runner.models import build_model

    try:
        with torch.device("meta"):
            small = build_model(cfg.model, shape[0], new, cfg.num_classes)
        smaller = estimate(small, (shape[0], new, new), breakdown.batch_size, cfg.optimizer, cfg.resolved_task,
                           breakdown.device_type, cfg.amp, cfg.model, cfg.amp_dtype)
    except Exception:
        return None
    saving = breakdown.total() - smaller.total()
    return f"--image-size {new} (from {size}) saves about {format_bytes(saving)}" if saving > 0 else None

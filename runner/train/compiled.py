"""--compile and --channels-last: the model as the loop will call it, and the compile paid up front.

torch.compile compiles at the first call; the loop would charge that to step 1 (forward and
backward, seconds against milliseconds). Here one forward and backward on a batch shaped like the
run's (the first sample repeated) compile it before the clock starts, the time reported apart as
`time/compile_s`. The warm-up leaves no trace: gradients are dropped and the buffers (BatchNorm's
running statistics) put back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from runner.errors import RunnerError
from runner.tasks import Task
from runner.train.stand_in import buffers_kept


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile(model)`; compilation itself happens at `warm_up`."""
    return torch.compile(model)  # type: ignore[return-value]


def warm_up(model: nn.Module, raw_model: nn.Module, task: Task, dataset: Dataset, batch_size: int,
            device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
            channels_last: bool) -> float:
    """Compile `model` with one forward and backward; the seconds it took. A toolchain that is
    missing or broken (no C++ compiler for inductor on CPU, no Triton on CUDA) is a one-line
    RunnerError with exit code 2."""
    inputs, targets = default_collate([dataset[0]] * batch_size)
    inputs, targets = inputs.to(device), targets.to(device)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    try:
        with buffers_kept(raw_model):
            with autocast():
                loss = task.loss(model(inputs), targets)
            loss.backward()
    except Exception as exc:  # inductor raises many kinds (BackendCompilerFailed, CalledProcessError, ...)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise RunnerError(f"--compile: torch.compile failed ({type(exc).__name__}: "
                          f"{lines[0][:200] if lines else 'no message'}); inductor needs a C++ compiler (g++) on "
                          "CPU and Triton on CUDA: install them or run without --compile", 2) from None
    for p in raw_model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # once, before training: the compile's kernels are done
    return time.perf_counter() - start

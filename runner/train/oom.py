"""What the loop does when a step runs out of device memory: go on with half the batch (--oom retry),
or stop with the post-mortem, checkpointing the last good step when the state in memory is that."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from runner.config import TrainConfig
from runner.errors import RunnerError
from runner.memory import postmortem


@dataclass(frozen=True)
class Retry:
    """Go on with `batch_size` from batch `resume_batch` (of the new size) of the same epoch."""

    batch_size: int
    resume_batch: int
    text: str


def plan_retry(cfg: TrainConfig, phase: str, batch_size: int, world_size: int, batches_done: int,
               step: int) -> Retry | None:
    """--oom retry halves the batch, unless the weights may be half-updated (the error hit in the
    optimizer step), the batch is 1, or other ranks are mid-step (DDP: they cannot follow)."""
    if cfg.oom != "retry" or batch_size <= 1 or phase == "update" or world_size > 1:
        return None
    new = batch_size // 2
    return Retry(new, batches_done * batch_size // new,
                 f"out of memory at step {step} with batch {batch_size}: going on with batch {new} (--oom retry)")


def stop(failure: postmortem.Capture, cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...],
         batch_size: int, device: torch.device, step: int, phase: str, world_size: int, nonfinite: bool,
         save: Callable[[], None], saved_text: str) -> RunnerError:
    """Checkpoint the last good step when that is what memory holds (`save`), write the post-mortem
    and return its diagnosis as the error to raise (exit 1)."""
    unsafe = postmortem.unsafe_to_save(phase, world_size, nonfinite)
    if unsafe is None:
        save()
    return postmortem.report(failure, cfg, model, input_shape, batch_size, device, step, saved=unsafe or saved_text)

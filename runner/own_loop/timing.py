"""Where the time of a step of someone else's loop goes, without their help: hooks that tell the run's
`StepClock` at which boundary of a step the loop is.

    model forward pre-hook         → forward (through h2d, so that CUDA's event set starts there)
    first output's gradient hook   → backward (autograd reached the model: the loss's own backward is tiny)
    end of that backward pass      → other (a callback queued on autograd's engine, after DDP's)
    optimizer step pre-hook        → optimizer (its device time includes the gradient norms)
    optimizer step post-hook       → telemetry (histograms, with the gradients), then other (zero_grad...)
    obs.step()                     → telemetry, then data_wait until the next forward

Data wait is the gap between steps (it includes the loop's own host→device copy, which cannot be told
apart from outside). On CUDA the step clock records an event at h2d, forward, backward, optimizer and
telemetry, in that order, once per step (the first telemetry closes the step's event set): the hooks
keep that order. A hook itself is a clock read; the gradient norms and histograms it calls for are
device work without a sync, as in `runner train`. Forwards without autograd (an evaluation under
no_grad) are not a step's and are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from runner.train.step_clock import StepClock


def _first_grad_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a model's output (a tensor, or one level of dict/tuple/list) that needs grad."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)


class StepTiming:
    """Forward, backward and optimizer hooks that move `clock` from part to part; `paused` stops them
    (runner's own forward passes: the graph trace)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clock: StepClock,
                 before_update: Callable[[], None], after_update: Callable[[], None]) -> None:
        self.clock, self.before_update, self.after_update = clock, before_update, after_update
        self.paused = False
        self.backward_seen = False  # this step's backward reached the model (its hook fired)
        self.handles = [model.register_forward_pre_hook(self._forward),
                        model.register_forward_hook(self._forward_done),
                        optimizer.register_step_pre_hook(self._optimizer),
                        optimizer.register_step_post_hook(self._optimizer_done)]

    def _forward(self, _module: nn.Module, _args: Any) -> None:
        if self.paused or not torch.is_grad_enabled():
            return
        self.backward_seen = False
        self.clock.enter("h2d")
        self.clock.enter("forward")

    def _forward_done(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self.paused or not torch.is_grad_enabled():
            return
        tensor = _first_grad_tensor(output)
        if tensor is not None:
            tensor.register_hook(self._backward)

    def _backward(self, _grad: torch.Tensor) -> None:
        self.backward_seen = True
        self.clock.enter("backward")
        torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        """Queue the end once more: callbacks queued during the pass after ours (DDP's wait for its last
        all-reduce) then run before it, and their time is the backward's."""
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self.clock.enter("other")

    def _optimizer(self, *_args: Any) -> None:
        if not self.backward_seen:  # a backward the output's hook missed: the parts keep their order
            self.clock.enter("backward")
            self.backward_seen = True
        self.clock.enter("optimizer")
        self.before_update()  # gradient norms, while the gradients are final (device work)

    def _optimizer_done(self, *_args: Any) -> None:
        self.clock.enter("telemetry")
        self.after_update()  # histograms: the gradients are gone once the loop zeroes them
        self.clock.enter("other")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

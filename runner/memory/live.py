"""The memory estimate on the dashboards, beside the measured memory (MemorySample, every step).

No extra forward pass: the activations are what autograd saves during the run's first step (counted
by saved-tensor hooks, exact for the real batch, precision and device); the other parts follow from
the model and optimizer. Saved-tensor hooks are thread-local and nn.DataParallel runs each replica's
forward in a thread of its own, so the hooks are also pushed from a forward pre-hook on the raw
module (replicas share its hook tables) in whichever thread runs it; only tensors on the run's
device are counted, the device whose memory the plots show (under DataParallel: replica 0's share).
The events carry the run's start step, so the estimate sits at the start
of the memory plots: Text `memory_estimate` (the table), scalars `memory/estimate_<part>` and
`memory/estimate_total`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from runner.config import TrainConfig
from runner.memory.estimate import Activations, SavedTensors, breakdown
from runner.memory.report import markdown
from runner.telemetry import tags
from runner.telemetry.events import Event, Scalar, Text

log = logging.getLogger("runner")


class LiveEstimate:
    """Measures one forward pass (`measure`), then emits the estimate through `emit`."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], batch: int,
                 device_type: str, emit: Callable[[Event], None], step: int, rank: int) -> None:
        self.cfg, self.model, self.input_shape, self.batch = cfg, model, input_shape, batch
        self.device_type, self.emit, self.step, self.rank = device_type, emit, step, rank

    @contextlib.contextmanager
    def measure(self, inputs: torch.Tensor, targets: torch.Tensor) -> Iterator[None]:
        """Wrap the step's forward and loss; on success, emit the estimate events."""
        skip = [*self.model.parameters(), *self.model.buffers(), inputs, targets]
        saved = SavedTensors(skip, hold=False)
        counter = _DeviceCounter(saved, inputs.device)
        with counter.on(self.model), torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack):
            yield
        try:
            events = self.events(saved.total)
        except Exception as exc:
            log.warning("no memory estimate for the dashboards: %s: %s", type(exc).__name__, exc)
            return
        for event in events:
            self.emit(event)

    def events(self, activation_bytes: int) -> list[Event]:
        cfg, step, rank = self.cfg, self.step, self.rank
        precision = "amp" if cfg.amp else "fp32"
        estimate = breakdown(self.model, self.input_shape, self.batch, cfg.optimizer, cfg.resolved_task,
                             self.device_type, cfg.amp, {precision: Activations(per_sample=0, fixed=activation_bytes)},
                             f"saved by autograd in step {step + 1}", cfg.model)
        events: list[Event] = [Text(tag=tags.MEMORY_ESTIMATE, step=step, rank=rank, text=markdown(estimate))]
        for part, value in estimate.parts().items():
            events.append(Scalar(tag=tags.estimate(part), step=step, rank=rank, value=float(value)))
        events.append(Scalar(tag=tags.ESTIMATE_TOTAL, step=step, rank=rank, value=float(estimate.total())))
        return events


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _DeviceCounter:
    """Counts what autograd saves on one device, from every thread that runs the module's forward."""

    def __init__(self, saved: SavedTensors, device: torch.device) -> None:
        self.saved, self.device = saved, device
        self.lock = threading.Lock()
        self.entered = threading.local()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            with self.lock:
                self.saved.pack(tensor)
        return tensor

    def _push(self, _module: nn.Module, _args: Any) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)
        hooks.__enter__()
        self.entered.__dict__.setdefault("stack", []).append(hooks)

    def _pop(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        stack = self.entered.__dict__.get("stack")
        if stack:  # always_call: also when the forward raised
            stack.pop().__exit__(None, None, None)

    @contextlib.contextmanager
    def on(self, module: nn.Module) -> Iterator[None]:
        """Push the hooks around every forward of `module` (and its DataParallel replicas) meanwhile."""
        handles = [module.register_forward_pre_hook(self._push),
                   module.register_forward_hook(self._pop, always_call=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

"""The memory estimate on the dashboards, beside the measured memory (MemorySample, every step).

No extra forward pass: the activations are what autograd saves during the run's first step (counted
by saved-tensor hooks, exact for the real batch, precision and device); the other parts follow from
the model and optimizer. The events carry the run's start step, so the estimate sits at the start
of the memory plots: Text `memory_estimate` (the table), scalars `memory/estimate_<part>` and
`memory/estimate_total`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from runner.config import TrainConfig
from runner.memory.estimate import Activations, SavedTensors, breakdown
from runner.memory.report import markdown
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
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            yield
        try:
            events = self.events(saved.total)
        except Exception as exc:  # noqa: BLE001 - an observation never takes training down
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
        events: list[Event] = [Text(tag="memory_estimate", step=step, rank=rank, text=markdown(estimate))]
        for part, value in estimate.parts().items():
            events.append(Scalar(tag=f"memory/estimate_{part}", step=step, rank=rank, value=float(value)))
        events.append(Scalar(tag="memory/estimate_total", step=step, rank=rank, value=float(estimate.total())))
        return events

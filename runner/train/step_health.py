"""Per step, on the device: the gradient norms, no update from a non-finite step, and the health window.

Every step measures the gradient norms (`grad_norms`) and decides on the device whether the step is
finite (its loss and its global gradient norm). A non-finite step's update is never applied: the
fused optimizers take a `found_inf` device flag, as GradScaler hands them for fp16, and skip the
update and their state's step count inside their kernel (weights and Adam moments stay exactly as
they were, measured). Under --on-nan stop the flag stays raised for the rest of the log window, so at
the stop the weights are those the first non-finite step saw: the step can be re-run on them with
hooks (`first_nonfinite`), with the batch it had (the window's batches are kept as references, up to
`KEEP_BYTES`), and the checkpoint written at the stop is the last finite state. No host sync: the
window's values are read with the log point's one `.tolist()` (`health_window`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator

import torch
from torch import nn

from runner.train.grad_norms import GradNormMeter, GradNorms
from runner.train.health_window import HealthWindow, input_psnr
from runner.train.step import Computed, Micro

# The batches of the log window are kept (references to the loader's host tensors, no copies) for the
# re-run of the first non-finite step, up to this many bytes of inputs: a window of a typical image
# batch fits; past it the oldest go, and the re-run falls back to the oldest batch still kept.
KEEP_BYTES = 64 * 1024**2


class StepHealth:
    """What the loop asks of each step's gradients and loss (see the module's docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 device: torch.device, task: str, on_nan: str) -> None:
        self.meter = GradNormMeter(model)
        self.window = HealthWindow(device, self.meter.names)
        self.optimizer, self.scaler, self.task, self.on_nan = optimizer, scaler, task, on_nan
        # GradScaler gates fp16 updates itself (and sets found_inf on the optimizer); otherwise the gate
        # needs a fused optimizer, whose kernel reads the flag
        self.gates = scaler is None and bool(optimizer.defaults.get("fused"))
        self.norms: GradNorms | None = None
        self.kept: deque[tuple[int, list[Micro]]] = deque()  # (step, its micro-batches) of the window
        self._kept_bytes = 0

    def measure(self, done: Computed) -> torch.Tensor:
        """After backward: the step's gradient norms; returns whether the step is finite (a device bool):
        its loss and global gradient norm, or under GradScaler its loss only (inf gradients are how
        GradScaler finds its scale too high: it skips that update and halves the scale itself)."""
        if self.scaler is None:
            self.norms = self.meter.measure()
            return done.finite & torch.isfinite(self.norms.total) if self.norms is not None else done.finite
        self.norms = self.meter.measure(self.scaler.scale(torch.ones((), device=done.loss.device)))
        return done.finite

    @contextlib.contextmanager
    def gate(self, finite: torch.Tensor) -> Iterator[None]:
        """Around the optimizer step: no update unless `finite` (and, under --on-nan stop, unless the
        whole window so far was)."""
        if not self.gates:
            yield
            return
        blocked = ~finite
        if self.on_nan == "stop":
            blocked = blocked | self.window.bad_so_far()
        self.optimizer.found_inf = blocked.float()  # type: ignore[attr-defined]  # read by the fused kernels
        try:
            yield
        finally:
            vars(self.optimizer).pop("found_inf", None)

    def record(self, step: int, done: Computed, finite: torch.Tensor, micros: list[Micro]) -> None:
        """After the update of `step`: its values into the window; its batches kept for a re-run."""
        psnr = input_psnr(done.inputs, done.targets) if self.task == "denoise" and done.samples else None
        self.window.add(step, done.loss if done.samples else None, finite, self.norms, psnr)
        if self.on_nan == "stop":
            self._keep(step, micros)

    def _keep(self, step: int, micros: list[Micro]) -> None:
        size = sum(m.batch.inputs.nbytes for m in micros if not m.stand_in and torch.is_tensor(m.batch.inputs))
        self.kept.append((step, micros))
        self._kept_bytes += size
        while len(self.kept) > 1 and self._kept_bytes > KEEP_BYTES:
            _, old = self.kept.popleft()
            self._kept_bytes -= sum(m.batch.inputs.nbytes for m in old
                                    if not m.stand_in and torch.is_tensor(m.batch.inputs))

    def new_window(self) -> None:
        """A log point passed without a stop: the kept batches are no longer needed."""
        self.kept.clear()
        self._kept_bytes = 0

    def for_rerun(self, first_bad: int) -> tuple[tuple[int, list[Micro]] | None, bool]:
        """What re-runs the first non-finite step `first_bad`: (step, its kept micro-batches), and
        whether the weights in memory are those it saw (the gate held every update since)."""
        if not self.kept:
            return None, self.gates
        if not self.gates:
            return self.kept[-1], False
        return next(((s, m) for s, m in self.kept if s == first_bad), self.kept[0]), True

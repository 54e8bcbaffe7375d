"""After a NaN/inf loss: re-run one step with hooks to name the module where it starts (a one-off
cost after the failure, none before).

Which step: under --on-nan skip the loss is checked at every step, before the optimizer step, so the
step is re-run exactly (its batch, the weights it saw). Under --on-nan stop the loss is only read at
the log point; no update from a non-finite step was applied meanwhile (`step_health`'s gate), so the
weights in memory are those the first non-finite step saw, and its batch was kept: it is re-run
exactly too, whatever --log-every. Only without the gate (fp16 under GradScaler) is the window's
last batch re-run on the last checkpoint's weights, or on the weights in memory while they are finite.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from runner.errors import RunnerError
from runner.telemetry import tags
from runner.telemetry.events import Finding
from runner.telemetry.hub import Hub
from runner.train import checkpoint
from runner.train.step import Micro

log = logging.getLogger("runner")


def locate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
           autocast: Callable[[], contextlib.AbstractContextManager], step: int, rank: int, weights: str) -> Finding:
    """Re-run (`inputs`, `targets`) through `model` (the user's module, not a wrapper: a lone rank must
    not enter a collective) with hooks; the Finding names the first module whose output is NaN/inf from
    finite inputs, or the first non-finite gradient. `weights` says which weights the re-run used."""
    from runner.diagnosis.nonfinite import locate_nonfinite, nonfinite_finding  # needed only after a failure

    finding = nonfinite_finding(locate_nonfinite(model, inputs, targets, loss_fn, autocast), step, rank)
    finding.evidence["weights"] = weights
    return finding


def last_good_weights(model: nn.Module, ckpt_path: Path) -> str | None:
    """Load the last checkpoint's weights into `model` for the re-run (the run stops after it). Returns
    what the weights are, or None when there is no checkpoint and the weights are already non-finite."""
    if ckpt_path.is_file():
        try:
            state = checkpoint.load(ckpt_path)
            model.load_state_dict(state["model"])
            return f"the weights of the last checkpoint (step {int(state['step'])})"
        except (RunnerError, RuntimeError) as exc:
            log.warning("cannot load %s to re-run the failed step: %s", ckpt_path, exc)
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return "the weights in memory (no checkpoint yet)"
    return None


def weights_lost(step: int, rank: int) -> Finding:
    """No finite weights to re-run the step on: say so, and how to find the module."""
    return Finding(tag=tags.FINDINGS, step=step, rank=rank, kind="first_nonfinite", severity="error",
                   message=(f"the loss became NaN/inf by step {step} and the weights had already turned non-finite "
                            "before the first checkpoint, so the step could not be re-run"),
                   evidence={"step": step}, advice="rerun with --on-nan skip to locate the module at the failing step")


class FirstNonfinite:
    """Looks once per run, on the writer, and emits the Finding; returns its message for the error."""

    def __init__(self, model: nn.Module, loss_fn: Callable, autocast: Callable[[], contextlib.AbstractContextManager],
                 ckpt_path: Path, rank: int) -> None:
        self.model, self.loss_fn, self.autocast, self.ckpt_path, self.rank = model, loss_fn, autocast, ckpt_path, rank
        self.located = False

    def _ready(self, hub: Hub) -> bool:
        if self.located or not hub.active:
            return False
        self.located = True
        # a SyncBatchNorm forward is a collective: a re-run on one rank would hang the others
        return not any(isinstance(m, nn.SyncBatchNorm) for m in self.model.modules())

    def at_step(self, hub: Hub, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> str:
        """--on-nan skip: re-run the failing step as it was (before its update)."""
        if not self._ready(hub):
            return ""
        finding = locate(self.model, inputs, targets, self.loss_fn, self.autocast, step, self.rank,
                         "the weights the step saw")
        hub.emit(finding)
        return finding.message

    def before_stop(self, hub: Hub, kept: tuple[int, list[Micro]] | None, device: torch.device, step: int,
                    first_bad: int, intact: bool) -> str:
        """--on-nan stop: re-run the first non-finite step (`first_bad`; 0: not known) with the batches
        `kept` for it. `intact`: the weights in memory are those it saw; else the last checkpoint's."""
        if kept is None or not self._ready(hub):
            return ""
        at, micros = kept
        if intact:
            weights = f"the weights step {first_bad or at} saw (no update from a non-finite step was applied)"
            if first_bad and at != first_bad:
                weights += f", with the batch of step {at} (the batch of step {first_bad} was no longer kept)"
        else:
            weights = last_good_weights(self.model, self.ckpt_path)
        if weights is None:
            finding = weights_lost(step, self.rank)
        else:
            finding = None
            for micro in (m for m in micros if not m.stand_in):
                finding = locate(self.model, micro.batch.inputs.to(device), micro.batch.targets.to(device),
                                 self.loss_fn, self.autocast, first_bad or step, self.rank, weights)
                if finding.evidence.get("where") != "not reproduced":
                    break
            if finding is None:
                return ""
        hub.emit(finding)
        return finding.message

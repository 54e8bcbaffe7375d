"""What the training-health findings need from every step, kept on the device between log points.

The log point's mean loss hides a spike inside its window, and gradient norms measured only at
histogram steps miss a blow-up between them. So each step adds, on the device and without a sync:
the window's largest and smallest finite loss (and the step of the largest), the global gradient
norm (mean, largest and smallest over finite steps), the largest per-parameter gradient norm and its index,
the step of the first non-finite loss or gradient, and for denoising the PSNR of the noisy input
itself (what the output must beat). The vector travels with the log window's one all-reduce and
`.tolist()`: each rank writes its values at its own offset of a zero vector, so the sum over ranks is
every rank's values, and maxima stay maxima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runner.telemetry import tags
from runner.train.grad_norms import GradNorms

FIELDS = ("loss_max", "loss_max_step", "loss_min", "grad_sum", "grad_steps", "grad_max", "layer_max",
          "layer_index", "psnr_in_sum", "psnr_in_count", "first_bad_step", "grad_min")
_START = {"loss_max": -math.inf, "loss_min": math.inf, "grad_min": math.inf}  # the rest start at 0


@dataclass(frozen=True)
class Health:
    """One log window's health values, over every rank."""

    scalars: dict[str, float]  # tag → value, for the log point
    layer: str  # the parameter with the window's largest gradient norm ("" without gradients)
    first_bad_step: int  # the first step with a non-finite loss or gradient norm (0: none)


class HealthWindow:
    """Device-side health values since the last log point (see the module's docstring)."""

    def __init__(self, device: torch.device, layer_names: list[str]) -> None:
        self.device, self.layer_names = device, layer_names
        self.values = torch.tensor([_START.get(f, 0.0) for f in FIELDS], device=device)
        self._start = self.values.clone()

    def bad_so_far(self) -> torch.Tensor:
        """Whether this window already had a non-finite step (a device bool)."""
        return self.values[FIELDS.index("first_bad_step")] > 0

    def first_bad_here(self) -> int:
        """This rank's first non-finite step of the window (a sync: on the way to a stop only)."""
        return int(self.values[FIELDS.index("first_bad_step")])

    def add(self, step: int, loss: torch.Tensor | None, finite: torch.Tensor, norms: GradNorms | None,
            psnr_input: torch.Tensor | None = None) -> None:
        """One step: its loss (None for a DDP stand-in step, whose 0 says nothing), whether its loss and
        gradient norm were finite (device bool), `psnr_input` the summed PSNR of the batch's noisy
        inputs (denoise) with its count."""
        v = self.values
        if loss is not None:
            loss = loss.detach().float().reshape(())
            ok = torch.isfinite(loss)
            bigger = ok & (loss > v[0])
            v[1] = torch.where(bigger, step, v[1])
            v[0] = torch.where(bigger, loss, v[0])
            v[2] = torch.where(ok & (loss < v[2]), loss, v[2])
        if norms is not None:
            total = norms.total.float()
            good = torch.isfinite(total)
            v[3] += torch.where(good, total, 0.0)
            v[4] += good.float()
            v[5] = torch.maximum(v[5], torch.where(good, total, 0.0))
            v[11] = torch.minimum(v[11], torch.where(good, total, math.inf))
            layer, index = norms.largest()
            larger = good & (layer > v[6])
            v[7] = torch.where(larger, index.float(), v[7])
            v[6] = torch.where(larger, layer, v[6])
        if psnr_input is not None:
            v[8] += psnr_input[0]
            v[9] += psnr_input[1]
        v[10] = torch.where((v[10] == 0) & ~finite, step, v[10])

    def for_reduce(self, rank: int, world: int) -> torch.Tensor:
        """This rank's values at its offset of a zero vector (summed over ranks: everyone's)."""
        out = torch.zeros(world * len(FIELDS), device=self.device)
        out[rank * len(FIELDS):(rank + 1) * len(FIELDS)] = self.values
        self.values.copy_(self._start)
        return out

    def read(self, values: list[float], world: int) -> Health:
        """The window's health from the reduced vector (host floats, after the log point's sync)."""
        n = len(FIELDS)
        ranks = [dict(zip(FIELDS, values[r * n:(r + 1) * n], strict=True)) for r in range(world)]
        top = max(ranks, key=lambda r: r["loss_max"])
        scalars: dict[str, float] = {}
        if math.isfinite(top["loss_max"]):
            scalars[tags.LOSS_MAX] = top["loss_max"]
            scalars[tags.LOSS_MAX_STEP] = top["loss_max_step"]
            scalars[tags.LOSS_MIN] = min(r["loss_min"] for r in ranks)
        first = ranks[0]  # gradient norms are the same on every rank (DDP all-reduces the gradients)
        layer = ""
        if first["grad_steps"]:
            scalars[tags.GRAD_GLOBAL] = first["grad_sum"] / first["grad_steps"]
            scalars[tags.GRAD_GLOBAL_MAX] = first["grad_max"]
            scalars[tags.GRAD_GLOBAL_MIN] = first["grad_min"]
            scalars[tags.GRAD_LAYER_MAX] = first["layer_max"]
            layer = self.layer_names[int(first["layer_index"])] if self.layer_names else ""
        count = sum(r["psnr_in_count"] for r in ranks)
        if count:
            scalars[tags.INPUT_PSNR] = sum(r["psnr_in_sum"] for r in ranks) / count
        bad = [int(r["first_bad_step"]) for r in ranks if r["first_bad_step"]]
        return Health(scalars, layer, min(bad, default=0))


def input_psnr(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Denoise: the PSNR (dB) of the noisy inputs against the clean targets, summed over the batch,
    and the batch size, as one device tensor [sum, count] (images in [0, 1], as the task's metric)."""
    noisy = inputs.detach().float().clamp(0, 1)
    mse = (noisy - targets.detach().float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    psnr = (-10.0 / math.log(10.0) * torch.log(mse)).sum()
    return torch.stack([psnr, torch.full_like(psnr, inputs.shape[0])])

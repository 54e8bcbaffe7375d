"""The gradient norms of one step, computed on the device: per parameter tensor, global, the largest.

Computed at every step (so a blow-up between log points is seen) and never read on the host here:
the log window accumulates them and the log point's one `.tolist()` reads them. The global norm is
also what gates the update on a non-finite step (`runner/train/update_gate.py`) and what clipping
needs, so a run with `--clip-grad-norm` computes it once: `measure` then `clip_`.

Cost: one `torch.linalg.vector_norm` per parameter tensor and one over their stack (measured on
CPU, 1 thread: 0.11 ms for 30 tensors, 3.2 ms for 1,200 32×32 tensors; `torch._foreach_norm` is
faster, 2.0 ms, but private).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GradNorms:
    """One step's gradient norms, all device tensors (no sync to make or keep them)."""

    total: torch.Tensor  # 0-dim: the L2 norm of every gradient as one vector (NaN/inf if any is)
    per_param: torch.Tensor  # (P,): the L2 norm of each parameter tensor's gradient (0 without one)

    def largest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest per-parameter norm and its index into `GradNormMeter.names` (device tensors)."""
        value, index = torch.max(self.per_param, dim=0)
        return value, index


class GradNormMeter:
    """Measures a model's gradient norms each step; built once, so the parameter order (and the index
    `GradNorms.largest` returns) is fixed for the run."""

    def __init__(self, model: nn.Module) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self._zero: torch.Tensor | None = None  # the norm of a parameter without a gradient this step

    def measure(self, scale: torch.Tensor | None = None) -> GradNorms | None:
        """The norms of the current `.grad`s; `scale` (GradScaler's, a device tensor) is divided out
        so that they are the true ones. None when no parameter has a gradient."""
        if not self.params:
            return None
        norms = []
        for p in self.params:
            if p.grad is None:
                if self._zero is None:
                    self._zero = torch.zeros((), device=p.device)
                norms.append(self._zero)
            else:
                norms.append(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32))
        per_param = torch.stack([n.to(norms[0].device) for n in norms])
        if scale is not None:
            per_param = per_param / scale.float()
        return GradNorms(total=torch.linalg.vector_norm(per_param), per_param=per_param)

    def clip_(self, max_norm: float, norms: GradNorms) -> None:
        """Scale the gradients so that their global norm is at most `max_norm`, from the norm already
        measured (no second pass over the gradients, no sync)."""
        torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norms.total)

"""Device-side statistics of the model: histograms and norms of weights and gradients, image grids.

Everything is computed on the device and copied to the host in one non-blocking copy; the sink
thread waits for it. The training thread never calls `.item()` or `.cpu()` here.
"""

from __future__ import annotations

import torch
from torch import nn

from runner.tasks import Grid
from runner.telemetry.events import Event, HostCopy, HostValue, Histogram, ImageGrid, Scalar

BINS = 64


def to_host(tensor: torch.Tensor) -> HostCopy:
    """Start a device→host copy without waiting; the returned HostCopy waits when read."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return HostCopy(tensor.cpu().clone())
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return HostCopy(host, done)


def _histogram_row(values: torch.Tensor, bins: int) -> torch.Tensor:
    """[min, max, count, sum, sum of squares, counts…] of a tensor, without leaving the device."""
    flat = values.detach().float().flatten()
    lo, hi = torch.aminmax(flat)
    unit = (flat - lo) / (hi - lo).clamp_min(1e-12)
    counts = torch.histc(unit, bins=bins, min=0.0, max=1.0)
    count = flat.new_full((), flat.numel())  # a fill kernel: new_tensor() would copy from the host
    head = torch.stack([lo, hi, count, flat.sum(), torch.dot(flat, flat)])
    return torch.cat([head, counts])


def parameter_stats(model: nn.Module, step: int, rank: int, bins: int = BINS) -> list[Event]:
    """Histograms (weights/…, grads/…), per-layer norms (norms/…) and the global gradient norm."""
    names, rows = [], []
    for name, param in model.named_parameters():
        if param.numel() == 0:
            continue
        names.append(f"weights/{name}")
        rows.append(_histogram_row(param, bins))
        if param.grad is not None:
            names.append(f"grads/{name}")
            rows.append(_histogram_row(param.grad, bins))
    if not rows:
        return []
    table = torch.stack(rows)
    is_grad = torch.tensor([n.startswith("grads/") for n in names], device=table.device)
    norms = torch.cat([table[:, 4].sqrt(), (table[:, 4] * is_grad).sum().sqrt().reshape(1)])
    hist_copy, norm_copy = to_host(table), to_host(norms)
    events: list[Event] = [Histogram(tag=n, step=step, rank=rank, data=hist_copy, row=i)
                           for i, n in enumerate(names)]
    events += [Scalar(tag=f"norms/{n}", step=step, rank=rank, value=HostValue(norm_copy, i))
               for i, n in enumerate(names)]
    if any(n.startswith("grads/") for n in names):
        events.append(Scalar(tag="train/grad_norm", step=step, rank=rank, value=HostValue(norm_copy, len(names))))
    return events


def grid_event(grid: Grid, step: int, rank: int, tag: str = "images/samples") -> ImageGrid:
    """Rows of images → one `make_grid` picture (C, H, W) in [0, 1], copied without a sync."""
    from torchvision.utils import make_grid

    per_row = grid.rows[0].shape[0]
    images = torch.cat([r.clamp(0, 1) for r in grid.rows])
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    picture = make_grid(images.float(), nrow=per_row, padding=2, pad_value=1.0)
    return ImageGrid(tag=tag, step=step, rank=rank, image=to_host(picture), caption=grid.caption)

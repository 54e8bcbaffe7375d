"""Device-side statistics of the model: histograms and norms of weights and gradients, image grids.

Everything is computed on the device and copied to the host in one non-blocking copy into pinned
memory; the sink thread waits for it. The training thread never calls `.item()` or `.cpu()` here,
and builds no device tensor from host values (that would be a copy and a sync too). What needs the
host values themselves (a caption from labels, whether the gradients were finite) is decided at the
next log point, after its one sync, when the copies have landed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from runner.tasks import Grid, label_caption
from runner.telemetry import tags
from runner.telemetry.events import Event, Histogram, HostCopy, HostValue, ImageGrid, Scalar

BINS = 64


def to_host(tensor: torch.Tensor) -> HostCopy:
    """Start a device→host copy without waiting; the returned HostCopy waits when read.

    The event is recorded on the stream of the tensor's device, where the copy runs (under
    DataParallel that need not be the current device)."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return HostCopy(tensor.cpu().clone())
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream = torch.cuda.current_stream(tensor.device)
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record(stream)
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
    weight_names, weight_rows, grad_names, grad_rows = [], [], [], []
    for name, param in model.named_parameters():
        if param.numel() == 0:
            continue
        weight_names.append(tags.weights(name))
        weight_rows.append(_histogram_row(param, bins))
        if param.grad is not None:
            grad_names.append(tags.grads(name))
            grad_rows.append(_histogram_row(param.grad, bins))
    names, rows = weight_names + grad_names, weight_rows + grad_rows
    if not rows:
        return []
    table = torch.stack(rows)
    norms = [table[:, 4].sqrt()]
    if grad_rows:  # the global gradient norm: the gradients' rows are the table's last ones
        norms.append(table[len(weight_rows):, 4].sum().sqrt().reshape(1))
    hist_copy, norm_copy = to_host(table), to_host(torch.cat(norms))
    events: list[Event] = [Histogram(tag=n, step=step, rank=rank, data=hist_copy, row=i)
                           for i, n in enumerate(names)]
    events += [Scalar(tag=tags.NORMS + n, step=step, rank=rank, value=HostValue(norm_copy, i))
               for i, n in enumerate(names)]
    if grad_rows:
        events.append(Scalar(tag=tags.GRAD_NORM, step=step, rank=rank, value=HostValue(norm_copy, len(names))))
    return events


def without_nonfinite_gradients(events: list[Event]) -> list[Event]:
    """`events` of `parameter_stats`, less the gradients' when their global norm is NaN/inf (a step
    whose update GradScaler skipped, or a NaN loss): an inf histogram says nothing and ruins the
    chart's scale. Reads the norm, so call it once the copy has landed (after a log point's sync)."""
    grad_norm = next((e for e in events if e.tag == tags.GRAD_NORM), None)
    if grad_norm is None or math.isfinite(float(grad_norm.value)):
        return events
    return [e for e in events if not e.tag.startswith((tags.GRADS, tags.NORMS_GRADS)) and e is not grad_norm]


def grid_event(grid: Grid, step: int, rank: int, tag: str = tags.IMAGES_SAMPLES) -> Callable[[], ImageGrid]:
    """Rows of images → one `make_grid` picture (C, H, W) in [0, 1], copied without a sync. Returns
    the event's maker: call it once the labels' copy has landed (after a log point's sync)."""
    from torchvision.utils import make_grid

    per_row = grid.rows[0].shape[0]
    images = torch.cat([r.clamp(0, 1) for r in grid.rows])
    if images.shape[1] not in (1, 3):
        images = images[:, :1]
    picture = to_host(make_grid(images.float(), nrow=per_row, padding=2, pad_value=1.0))
    labels = to_host(grid.labels) if grid.labels is not None else None
    prefix = grid.caption  # not the grid: its device tensors are freed now

    def event() -> ImageGrid:
        caption = label_caption(prefix, labels.get().tolist()) if labels is not None else prefix
        return ImageGrid(tag=tag, step=step, rank=rank, image=picture, caption=caption)

    return event

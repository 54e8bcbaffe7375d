"""Runner's observability for a training loop the caller keeps: `runner.observe(model, optimizer, ...)`."""

from __future__ import annotations

from typing import Any

from runner.own_loop.observer import Observer
from runner.own_loop.options import option_names, resolve, workload


def observe(model: Any, optimizer: Any, *, task: Any = None, steps: int = 0, **options: Any) -> Observer:
    """A context manager around an own loop: call `obs.step(loss=..., inputs=..., outputs=..., targets=...)`
    once per optimizer step.

    `task`: None (the loss only), "classify" or "denoise" (their metric and image grid), or an object
    with `metrics(output, target)` (per-batch sums) and optionally `grid(inputs, output, target)`.
    `steps`: the steps the loop will make, if known (progress, and a log point at the last one).
    `options`: `runner train`'s observability flags as keywords (`run_dir`, `name`, `viz`, `visdom_url`,
    `log_every`, `images_every`, `hist_every`, `memory_every`, ...), same defaults, same RUNNER_*
    environment variables (a keyword given here wins over the variable, as a flag does).
    """
    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    cfg = resolve(options, workload(model, optimizer, device_type, steps, task if isinstance(task, str) else ""))
    return Observer(model, optimizer, cfg, task)


__all__ = ["Observer", "observe", "option_names"]

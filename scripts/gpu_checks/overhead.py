"""What runner's telemetry costs a training step: runner's `fit` (default log cadence, every stream, both
sinks) against a bare PyTorch loop of the same workload, timed over steady-state steps only.

Both loops read the same synthetic set through a DataLoader with 4 workers and pinned memory, so
neither is bound by making data on the main thread. Only the updates in `window(steps)` are timed (an
optimizer step hook synchronizes the device twice per run, the same in both loops): the
first step's one-off costs (graph, first histograms and grid, cuDNN autotuning) and the final drain of
the sinks fall outside. Runs alternate which loop goes first, and the pairs are written to the output
file after each one, so a timeout keeps every finished pair.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

WORKERS = 4


def window(steps: int) -> tuple[int, int]:
    """The updates timed out of `steps`: the first and last sixth left out."""
    return steps // 6, steps - steps // 6


class Timer:
    """An optimizer step hook: wall time between the window's first and last update, device idle at both."""

    def __init__(self, device: torch.device, steps: int) -> None:
        self.device, self.window, self.updates, self.marks = device, window(steps), 0, []

    def __call__(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.updates += 1
        if self.updates in self.window:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())

    def per_step(self) -> float:
        if len(self.marks) != 2:
            raise RuntimeError(f"{self.updates} updates: the timing window {self.window} was not reached")
        return (self.marks[1] - self.marks[0]) / (self.window[1] - self.window[0])


def bare(device: str, size: int, batch: int, amp: bool, steps: int) -> float:
    """Seconds per steady-state step of the plain loop: Tiny-UNet denoising, Adam, autocast + GradScaler."""
    from runner.data import SyntheticDenoise
    from runner.models import build_model
    from runner.optim import amp_dtype, make_scaler

    torch.manual_seed(0)
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True  # as runner sets it on CUDA
    loader = torch.utils.data.DataLoader(SyntheticDenoise(512, 3, size, 0.2, seed=0), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=WORKERS, pin_memory=dev.type == "cuda",
                                         persistent_workers=True)
    model = build_model("tinyunet", 3, size, 10).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    timer = Timer(dev, steps)
    optimizer.register_step_post_hook(timer)
    scaler, dtype = make_scaler(dev.type, amp), amp_dtype(dev.type, amp)
    step = 0
    while step < steps:
        for noisy, clean in loader:
            noisy, clean = noisy.to(dev, non_blocking=True), clean.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                loss = F.mse_loss(model(noisy), clean)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            if step >= steps:
                break
    return timer.per_step()


def observed(device: str, size: int, batch: int, amp: bool, visdom_url: str, run_dir: Path, steps: int) -> float:
    """Seconds per steady-state step of runner's `fit`, every default stream, TensorBoard and Visdom."""
    from runner.config import resolve
    from runner.telemetry.hub import Hub
    from runner.train.loop import Trainer
    from runner.train.sinks import build_sinks
    from runner.train.strategy import make_strategy

    cfg = resolve(None, dict(model="tinyunet", data="synthetic", resume="never", progress=False, device=device,
                             steps=steps, image_size=size, batch_size=batch, amp=amp, workers=WORKERS,
                             run_dir=str(run_dir.parent), name=run_dir.name, checkpoint_every=1_000_000,
                             viz="both" if visdom_url else "tensorboard", visdom_url=visdom_url))
    trainer = Trainer(cfg, make_strategy(cfg))
    timer = Timer(trainer.device, steps)
    trainer.optimizer.register_step_post_hook(timer)
    hub = Hub(build_sinks(cfg, trainer.total_steps))
    try:
        trainer.fit(hub)
    finally:
        hub.close(timeout=30)
        trainer.close()
    return timer.per_step()


def measure(out: Path, device: str, size: int, batch: int, amp: bool, visdom_url: str, deadline: float,
            steps: int, pairs: int) -> None:
    """Alternating (bare, runner) pairs, at most `pairs`, until the next would pass `deadline`; `out` written
    at once and rewritten after each pair."""
    result: dict[str, Any] = {"window": window(steps), "steps": steps, "pairs": []}
    out.write_text(json.dumps(result))
    with tempfile.TemporaryDirectory() as tmp:
        bare(device, size, batch, amp, max(12, steps // 3))  # warm-up: kernels, allocator, autotuning, page cache
        index, last = 0, 0.0
        while index < pairs and time.monotonic() + last < deadline:
            began = time.monotonic()
            times: dict[str, float] = {}
            order = ("bare", "runner") if index % 2 == 0 else ("runner", "bare")
            for loop in order:
                times[loop] = (bare(device, size, batch, amp, steps) if loop == "bare" else
                               observed(device, size, batch, amp, visdom_url, Path(tmp) / f"r{index}", steps))
            result["pairs"].append((times["bare"], times["runner"]))
            out.write_text(json.dumps(result))
            last, index = time.monotonic() - began, index + 1

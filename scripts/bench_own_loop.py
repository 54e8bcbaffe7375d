"""scripts/bench_overhead.py's "own loop + runner.observe" row: the bare loop's very loop, observed.

The same workload and cadence as the other runner rows (--viz tensorboard, scalars and memory every
step, histograms and image grid every `every` steps, the graph once). Set-up is not timed, as for the
others (`__enter__`: registry, env.json, sinks); the graph trace is, since runner.observe traces the
model on the first batch, inside the loop.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import runner
from runner.data import SyntheticDenoise
from runner.models import UNet


def observed(run_dir: Path, steps: int, batch: int, size: int, samples: int,
             every: int) -> tuple[float, float, float, int]:
    """(total s, loop s, CPU s, dropped events) of the bare loop under runner.observe."""
    torch.manual_seed(0)
    data = SyntheticDenoise(samples, 3, size, 0.2, seed=0)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    model = UNet(3, (16, 32, 64, 128))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    obs = runner.observe(model, optimizer, task="denoise", steps=steps, run_dir=str(run_dir.parent), name=run_dir.name,
                         viz="tensorboard", log_every=1, images_every=every, hist_every=every, memory_every=1,
                         progress=False)
    obs.__enter__()  # set-up, not timed
    start, cpu = time.perf_counter(), time.process_time()
    try:
        step = 0
        while step < steps:
            for noisy, clean in loader:
                output = model(noisy)
                loss = F.mse_loss(output, clean)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                obs.step(loss=loss, inputs=noisy, outputs=output, targets=clean)
                step += 1
                if step >= steps:
                    break
        loop = time.perf_counter() - start
    finally:
        obs.__exit__(None, None, None)  # the final log point and draining the hub: timed
    return time.perf_counter() - start, loop, time.process_time() - cpu, obs.reporter.hub.dropped

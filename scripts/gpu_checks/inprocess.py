"""Checks that need runner's trainer in this process (run as `python -m scripts.gpu_checks.inprocess
KIND OUT.json [options]` by the acceptance, so a crash costs one check):

- `memory`: a short fp32 run whose MemorySample events are captured; beside each, the value of
  `torch.cuda.max_memory_allocated()` read by an optimizer step hook in the same process.
- `overhead`: runner (every stream, both sinks) against a bare loop of the same workload, in pairs,
  plus Lightning / Ignite rows where installed.

Both also run on CPU (tiny sizes), which is how the CPU tests keep this code from rotting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from runner.config import resolve
from runner.telemetry.events import Event, MemorySample, Sink


class Capture(Sink):
    """Keeps every MemorySample's values by step."""

    accepts = (MemorySample,)

    def __init__(self) -> None:
        self.samples: dict[int, dict[str, float]] = {}
        self.lock = threading.Lock()

    def write(self, event: Event) -> None:
        assert isinstance(event, MemorySample)
        with self.lock:
            self.samples[event.step] = dict(event.values)


def _config(run_dir: Path, name: str, **overrides: Any) -> Any:
    values = dict(model="tinyunet", data="synthetic", resume="never", progress=False, graph=False, workers=0,
                  run_dir=str(run_dir), name=name, checkpoint_every=1_000_000, images_every=1_000_000,
                  hist_every=1_000_000)
    values.update(overrides)
    return resolve(None, values)


def memory(device: str, steps: int, size: int, batch: int, log_every: int) -> dict[str, Any]:
    """The captured per-step series and the reference peak after each step's optimizer update."""
    from runner.telemetry.hub import Hub
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp), "memory", device=device, steps=steps, image_size=size, batch_size=batch,
                      log_every=log_every, viz="none", amp=False)
        trainer = Trainer(cfg, make_strategy(cfg))
        reference: list[float] = []
        cuda = trainer.device.type == "cuda"

        def after_update(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            reference.append(float(torch.cuda.max_memory_allocated(trainer.device)) if cuda else 0.0)

        trainer.optimizer.register_step_post_hook(after_update)
        capture = Capture()
        hub = Hub([capture])
        try:
            code = trainer.fit(hub)
        finally:
            hub.close(timeout=30)
            trainer.close()
    series: dict[str, dict[int, float]] = {}
    for step, values in capture.samples.items():
        for key, value in values.items():
            series.setdefault(f"memory/{key}", {})[step] = value
    return {"exit_code": code, "steps": steps, "series": series, "reference": reference}


# --- overhead ------------------------------------------------------------------------------------

def _bare(device: str, steps: int, size: int, batch: int, amp: bool) -> float:
    """The same workload as runner's: Tiny-UNet denoising synthetic images, Adam, AMP, no observation."""
    from runner.data import SyntheticDenoise
    from runner.models import build_model
    from runner.optim import amp_dtype, make_scaler

    torch.manual_seed(0)
    dev = torch.device(device)
    data = SyntheticDenoise(512, 3, size, 0.2, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         pin_memory=dev.type == "cuda")
    model = build_model("tinyunet", 3, size, 10).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler, dtype = make_scaler(dev.type, amp), amp_dtype(dev.type, amp)
    start, step = time.perf_counter(), 0
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
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def _runner(device: str, steps: int, size: int, batch: int, amp: bool, visdom_url: str, run_dir: Path) -> float:
    """runner's `fit` with every stream on (scalars and memory each step, images and histograms every
    20 steps) to TensorBoard and Visdom, plus draining the sinks."""
    from runner.telemetry.hub import Hub
    from runner.train.loop import Trainer
    from runner.train.sinks import build_sinks
    from runner.train.strategy import make_strategy

    cfg = _config(run_dir.parent, run_dir.name, device=device, steps=steps, image_size=size, batch_size=batch,
                  amp=amp, log_every=1, memory_every=1, images_every=20, hist_every=20, graph=True,
                  viz="both" if visdom_url else "tensorboard", visdom_url=visdom_url)
    trainer = Trainer(cfg, make_strategy(cfg))
    hub = Hub(build_sinks(cfg, trainer.total_steps))
    try:
        start = time.perf_counter()
        trainer.fit(hub)
        hub.close(timeout=60)
        return time.perf_counter() - start
    finally:
        hub.close(timeout=0)
        trainer.close()


def _lightning(device: str, steps: int, size: int, batch: int, amp: bool) -> float:
    import pytorch_lightning as pl

    from runner.data import SyntheticDenoise
    from runner.models import build_model

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model("tinyunet", 3, size, 10)

        def training_step(self, batch_: Any, _index: int) -> torch.Tensor:
            noisy, clean = batch_
            loss = F.mse_loss(self.model(noisy), clean)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    loader = torch.utils.data.DataLoader(SyntheticDenoise(512, 3, size, 0.2, seed=0), batch_size=batch,
                                         shuffle=True, drop_last=True, pin_memory=device == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=steps, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                             precision="16-mixed" if amp and device == "cuda" else "32-true",
                             log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp)
        start = time.perf_counter()
        trainer.fit(Module(), loader)
        return time.perf_counter() - start


def overhead(device: str, steps: int, size: int, batch: int, amp: bool, pairs: int, visdom_url: str,
             deadline: float) -> dict[str, Any]:
    """Alternating bare/runner runs (after one warm-up of each), and peers where installed."""
    peers = {"lightning": _lightning} if importlib.util.find_spec("pytorch_lightning") else {}
    out: dict[str, Any] = {"pairs": [], "peers": {name: [] for name in peers}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _bare(device, min(steps, 10), size, batch, amp)  # warm-up: cuDNN autotuning, allocator, kernels
        _runner(device, min(steps, 10), size, batch, amp, visdom_url, root / "warm")
        for index in range(pairs):
            if time.monotonic() > deadline:
                break
            bare = _bare(device, steps, size, batch, amp)
            out["pairs"].append((bare, _runner(device, steps, size, batch, amp, visdom_url, root / f"r{index}")))
            for name, run in peers.items():
                if time.monotonic() < deadline:
                    out["peers"][name].append((bare, run(device, steps, size, batch, amp)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("memory", "overhead"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--visdom-url", default="")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop starting new pairs after this")
    args = parser.parse_args()
    if args.kind == "memory":
        result = memory(args.device, args.steps, args.size, args.batch, args.log_every)
    else:
        result = overhead(args.device, args.steps, args.size, args.batch, args.amp, args.pairs, args.visdom_url,
                          time.monotonic() + args.seconds)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

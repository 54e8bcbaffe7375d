"""Checks that need runner's code in this process (run as `python -m scripts.gpu_checks.inprocess
KIND OUT.json [options]` by the acceptance, so a crash costs one check):

- `memory`: a short fp32 run whose MemorySample events are captured; beside each, the value of
  `torch.cuda.max_memory_allocated()` read by an optimizer step hook in the same process.
- `estimates`: the memory estimate against two real steps, with and without cudnn.benchmark.
- `overhead`: runner against a bare loop of the same workload (scripts/gpu_checks/overhead.py).

All also run on CPU (tiny sizes), which is how the CPU tests keep this code from rotting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

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


# --- estimate vs measured ----------------------------------------------------------------------------

def estimates(device: str, rows: list[tuple[str, int, int, str]], out: Path) -> None:
    """Per row (model, image side, batch, fp32|amp): the estimate's parts and total, and the peak of two
    real steps with cudnn.benchmark off and on (the difference: autotuning workspaces, which the estimate
    does not model). `out` is rewritten after each row, so a timeout keeps the rows measured."""
    from runner.config import TrainConfig
    from runner.memory.estimate import estimate
    from runner.memory.postmortem import is_out_of_memory
    from runner.memory.trial import measured_peak, release
    from runner.models import build_model

    dev = torch.device(device)
    result: dict[str, Any] = {"rows": []}
    for model_name, size, batch, precision in rows:
        row: dict[str, Any] = {"model": model_name, "precision": precision, "batch": batch, "size": size}
        amp, task, shape = precision == "amp", TrainConfig(model=model_name).resolved_task, (3, size, size)
        try:
            model = build_model(model_name, 3, size, 10)
            found = estimate(model, shape, batch, "adam", task, dev.type, amp, model_name)
            row.update(estimate=found.total(), parts=found.parts())
            if dev.type != "cuda":
                raise RuntimeError(f"no peak to measure on {device}: estimate only")
            for key, benchmark in (("peak", False), ("peak_benchmark", True)):
                row[key] = measured_peak(model, "adam", shape, batch, task, amp, dev, benchmark=benchmark)
                release(model, dev)
        except (RuntimeError, ValueError) as exc:
            kind = "out of memory" if is_out_of_memory(exc) else type(exc).__name__
            row.pop("peak", None)
            row["error"] = f"{kind}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        result["rows"].append(row)
        out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("memory", "estimates", "overhead"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=12, help="memory: steps; overhead: steps per run (timed: "
                                                                "the middle two thirds)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--rows", default="", help="estimates: MODEL,SIZE,BATCH,fp32|amp;... in order")
    parser.add_argument("--pairs", type=int, default=50, help="overhead: at most this many pairs")
    parser.add_argument("--visdom-url", default="")
    parser.add_argument("--seconds", type=float, default=120.0, help="overhead: start no pair that would end later")
    args = parser.parse_args()
    if args.kind == "memory":
        args.out.write_text(json.dumps(memory(args.device, args.steps, args.size, args.batch, args.log_every)))
    elif args.kind == "estimates":
        rows = [(m, int(s), int(b), p) for m, s, b, p in (r.split(",") for r in args.rows.split(";") if r)]
        estimates(args.device, rows, args.out)
    else:
        from scripts.gpu_checks import overhead

        overhead.measure(args.out, args.device, args.size, args.batch, args.amp, args.visdom_url,
                         time.monotonic() + args.seconds, args.steps, args.pairs)


if __name__ == "__main__":
    main()

"""What `runner train --strategy ddp --nproc N` costs over a bare torchrun DDP script, wall clock.

Not a test: run `.venv/bin/python scripts/bench_ddp.py` and read the table.

Both sides run the same workload end to end as a user would start it, process start-up to exit:
the same model (runner's registry), the same data (runner's synthetic set, same seed), per-rank
batch, optimizer (Adam), steps, DistributedSampler with set_epoch, DDP over gloo on CPU, and a final
checkpoint by rank 0. The bare side is a plain DDP script (written below) under
`python -m torch.distributed.run --standalone --nproc-per-node N` (`--nproc`, default 2). The runner
side is the CLI: the supervisor, torchrun, and in every rank the runner's loop with its observability —
rank 0 writes checkpoints (every 50 steps and at the end) and dashboard events, every rank samples its
memory each step, log points reduce metrics and gather memory and step times. Rows: `--viz none` (console only) and
`--viz tensorboard` (the default). Repetitions alternate bare/runner; a row's ratio is the median over
repetitions of runner's time over the bare time of the same repetition.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BARE = '''
import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from runner.data import SyntheticClassify
from runner.models import build_model

model_name, size, batch, samples, steps, out = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
dist.init_process_group("gloo")
torch.manual_seed(0)
dataset = SyntheticClassify(samples, 3, size, 10, seed=0)
model = DistributedDataParallel(build_model(model_name, 3, size, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)
step, epoch = 0, 0
while step < steps:
    sampler.set_epoch(epoch)
    for inputs, targets in loader:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step == steps:
            break
    epoch += 1
if dist.get_rank() == 0:
    torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, out)
dist.destroy_process_group()
os._exit(0)  # as runner's ranks end (runner/procs/rank_exit.py): gloo's threads abort 1 run in ~30 otherwise
'''


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (gloo processes on this machine)")
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        script = Path(tmp) / "bare_ddp.py"
        script.write_text(BARE)
        bare = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                str(script), args.model, str(args.image_size), str(args.batch_size), str(args.samples),
                str(args.steps), str(Path(tmp) / "bare.pt")]

        def runner(viz: str, rep: int) -> list[str]:
            return [sys.executable, "-m", "runner", "train", "--strategy", "ddp", "--nproc", str(args.nproc),
                    "--model", args.model, "--data", "synthetic", "--task", "classify",
                    "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                    "--samples", str(args.samples), "--steps", str(args.steps), "--optimizer", "adam",
                    "--lr", "1e-3", "--device", "cpu", "--viz", viz, "--no-progress", "--resume", "never",
                    "--run-dir", tmp, "--name", f"{viz}-{rep}"]

        rows: dict[str, list[float]] = {"bare torchrun DDP": [], "runner --viz none": [],
                                        "runner --viz tensorboard": []}
        for rep in range(args.repeats):
            rows["bare torchrun DDP"].append(timed(bare, env))
            rows["runner --viz none"].append(timed(runner("none", rep), env))
            rows["runner --viz tensorboard"].append(timed(runner("tensorboard", rep), env))
            print(f"repetition {rep + 1}/{args.repeats}: " +
                  ", ".join(f"{name} {times[-1]:.2f} s" for name, times in rows.items()), file=sys.stderr)

    base = rows["bare torchrun DDP"]
    print(f"\n{args.model} {args.image_size}×{args.image_size}, batch {args.batch_size}/rank × {args.nproc} ranks, "
          f"{args.steps} steps, gloo on CPU, {args.repeats} repetitions (median)\n")
    print("| launch | wall (s) | ratio to bare |")
    print("|---|---|---|")
    for name, times in rows.items():
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        print(f"| {name} | {statistics.median(times):.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()

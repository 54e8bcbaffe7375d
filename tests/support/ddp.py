"""Import-path models and datasets for the DDP tests, and rank programs run under real torchrun.

Models (`--model tests.support.ddp:NAME`): the tutorial MLP, plus a side effect the test reads (a dump, a
SIGKILL, an exception). Datasets (`--data tests.support.ddp:NAME`): one whose loading blocks on one rank.
Rank programs: `python -m torch.distributed.run ... -m tests.support.ddp PROGRAM OUT_DIR`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from runner.models import MLP
from tests.support.procs import FOREVER, mark

DUMP_DIR = "RUNNER_TEST_DUMP_DIR"  # dumping_mlp: where each rank saves its final parameters
KILL_STEP = "RUNNER_TEST_KILL_STEP"  # dying_mlp: the training step during which rank KILL_RANK dies
KILL_RANK = "RUNNER_TEST_KILL_RANK"
RAISE_STEP = "RUNNER_TEST_RAISE_STEP"  # raising_mlp: the training step in which rank 1 raises
BLOCK_RANK = "RUNNER_TEST_BLOCK_RANK"  # rank_blocking_dataset: the rank whose loading blocks for good
BLOCK_AFTER = "RUNNER_TEST_BLOCK_AFTER"  # ... after serving this many samples


def dumping_mlp(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The `mlp` model (same init for the same seed) that saves its parameters per rank at exit."""
    model = MLP(channels * image_size * image_size, num_classes)
    out = Path(os.environ[DUMP_DIR]) / f"rank{os.environ.get('RANK', '0')}.pt"
    atexit.register(lambda: torch.save(model.state_dict(), out))
    return model


class DyingMLP(MLP):
    """Kills its own process (SIGKILL, like an OOM kill) in training forward call KILL_STEP on rank
    KILL_RANK, on torchrun's first attempt only."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.calls = 0
        doomed = (os.environ.get("RANK") == os.environ.get(KILL_RANK, "1")
                  and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0")
        self.kill_at = int(os.environ[KILL_STEP]) if doomed else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training  # the graph trace (eval mode) does not count
        if self.kill_at and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def dying_mlp(channels: int, image_size: int, num_classes: int) -> nn.Module:
    return DyingMLP(channels * image_size * image_size, num_classes)


class RaisingMLP(MLP):
    """Raises a RuntimeError (a user's bug, an out-of-memory error) in training forward call
    RAISE_STEP on rank 1; rank 0 goes on into that step's collectives."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.calls = 0
        self.raise_at = int(os.environ[RAISE_STEP]) if os.environ.get("RANK") == "1" else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        if self.raise_at and self.calls == self.raise_at:
            raise RuntimeError(f"boom in step {self.calls}")
        return super().forward(x)


def raising_mlp(channels: int, image_size: int, num_classes: int) -> nn.Module:
    return RaisingMLP(channels * image_size * image_size, num_classes)


class RankBlockingDataset(Dataset):
    """Synthetic images; on rank BLOCK_RANK, after BLOCK_AFTER samples, `__getitem__` blocks for good
    (a hung network read), leaving a `blocked-<pid>` marker (tests.support.procs.mark) first."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = size, channels
        self.served = 0
        blocked = os.environ.get("RANK") == os.environ.get(BLOCK_RANK, "1")
        self.block_after = int(os.environ.get(BLOCK_AFTER, "16")) if blocked else -1

    def __len__(self) -> int:
        return 256

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.served += 1
        if self.block_after >= 0 and self.served > self.block_after:
            mark("blocked")
            while True:
                time.sleep(FOREVER)
        return torch.full((self.channels, self.size, self.size), float(index % 2)), index % 2


def rank_blocking_dataset(image_size: int, channels: int) -> RankBlockingDataset:
    return RankBlockingDataset(image_size, channels)


class HalfUnreadableDataset(Dataset):
    """Two-class images where every odd index is unreadable (an OSError, as PIL raises for a corrupt
    file): with batch size 1, a rank gets batches with no readable sample at all, others do not."""

    def __init__(self, size: int, channels: int, samples: int = 64) -> None:
        self.size, self.channels, self.samples = size, channels, samples
        self.targets = [(i // 2) % 2 for i in range(samples)]

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index % 2:
            raise OSError(f"sample {index}: cannot identify image file")
        label = self.targets[index]
        return torch.full((self.channels, self.size, self.size), float(label)), label


def half_unreadable_dataset(image_size: int, channels: int) -> HalfUnreadableDataset:
    return HalfUnreadableDataset(image_size, channels)


# --- rank programs ---------------------------------------------------------------------------

def _config(out: Path, **overrides: object):
    from runner.config import resolve

    values = {"model": "mlp", "image_size": 32, "batch_size": 4, "samples": 32, "steps": 4, "viz": "none",
              "progress": False, "run_dir": str(out), "name": "run", "strategy": "ddp"}
    values.update(overrides)
    return resolve(None, values)


def save_then_load(out: Path) -> dict[str, object]:
    """Rank 0 saves last.pt again and again; right after each save every rank loads it and checks it
    is the one just written (the barrier). Meanwhile a thread on rank 1 loads it nonstop: each load
    must find a whole file, old or new, never one half written (the atomic write)."""
    from runner.errors import RunnerError
    from runner.train import checkpoint
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    strategy = make_strategy(_config(out))
    torn: list[str] = []
    reads = [0]
    done = threading.Event()

    def read_nonstop(path: Path) -> None:
        while not done.is_set():
            try:
                checkpoint.load(path)
                reads[0] += 1
            except RunnerError as exc:
                torn.append(str(exc))

    try:
        trainer = Trainer(_config(out), strategy)
        reader = threading.Thread(target=read_nonstop, args=(trainer.ckpt_path,))
        for step in range(1, 21):
            trainer.step = step
            model = strategy.unwrap(trainer.model)
            with torch.no_grad():
                model.net[1].bias.fill_(float(step))
            trainer.save_checkpoint()
            state = checkpoint.load(trainer.ckpt_path)
            assert state["step"] == step, f"rank {strategy.rank} loaded step {state['step']} after saving {step}"
            assert torch.equal(state["model"]["net.1.bias"], model.net[1].bias.cpu())
            if step == 1 and strategy.rank == 1:
                reader.start()
            strategy.barrier()  # as a training step's collectives would: the next save waits for this load
        done.set()
        if reader.is_alive():
            reader.join()
        trainer.close()
        return {"loads": 20, "concurrent_reads": reads[0] > 0 if strategy.rank == 1 else None, "torn": torn[:3]}
    finally:
        strategy.close()


def teardown(out: Path) -> dict[str, object]:
    """A run that fails on every rank (NaN loss under --on-nan stop) still destroys the process group."""
    import torch.distributed as dist

    from runner.errors import RunnerError
    from runner.train.run import run_training

    try:
        run_training(_config(out, model="tests.support.models:nan_model", steps=10, log_every=2))
        error = ""
    except RunnerError as exc:
        error = str(exc)
    return {"error": error, "initialized_after": dist.is_initialized()}


PROGRAMS = {"save_then_load": save_then_load, "teardown": teardown}

if __name__ == "__main__":
    from runner.procs.rank_exit import exit_code_noted

    with exit_code_noted():
        program, out_dir = sys.argv[1], Path(sys.argv[2])
        result = PROGRAMS[program](out_dir)
        (out_dir / f"{program}.rank{os.environ['RANK']}.json").write_text(json.dumps(result))

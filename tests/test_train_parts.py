"""The parts issue 20 added to a training step, on their own: the validation split, the learning-rate
schedule against torch's own, accumulation against one big batch, clipping, exact DDP evaluation."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.optim import lr_scheduler

from runner.data import Batch, SyntheticClassify
from runner.data_split import hold_out, split_indices
from runner.tasks import ClassifyTask
from runner.train.evaluate import Evaluator
from runner.train.schedule import WARMUP_START_FACTOR, make_scheduler
from runner.train.step import Micro, StepRunner
from runner.train.step_clock import StepClock


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = [i % 4 for i in range(40)] + [0] * 20  # class 0 is three times as common
    train, val = split_indices(len(labels), 0.25, seed=3, labels=labels)
    assert (train, val) == split_indices(len(labels), 0.25, seed=3, labels=labels)  # same seed, same split
    assert split_indices(len(labels), 0.25, seed=4, labels=labels)[1] != val
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(labels)))
    held = [sum(labels[i] == c for i in val) for c in range(4)]
    assert held == [round(0.25 * 30), round(0.25 * 10), round(0.25 * 10), round(0.25 * 10)]
    dataset = SyntheticClassify(24, 1, 8, 3, seed=0)
    train_part, val_part = hold_out(dataset, 0.25, seed=0)
    assert len(train_part) + len(val_part) == 24 and sorted(val_part.targets) == [0, 0, 1, 1, 2, 2]


def _lrs(optimizer: torch.optim.Optimizer, scheduler: lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _sgd(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_schedule_matches_torch_step_for_step() -> None:
    ours = _sgd()
    theirs = _sgd()
    assert _lrs(ours, make_scheduler(ours, "cosine", 20, 0, 0.001), 20) == \
        _lrs(theirs, lr_scheduler.CosineAnnealingLR(theirs, T_max=20, eta_min=0.001), 20)
    ours, theirs = _sgd(), _sgd()
    warm = lr_scheduler.LinearLR(theirs, start_factor=WARMUP_START_FACTOR, total_iters=5)
    cosine = lr_scheduler.CosineAnnealingLR(theirs, T_max=15, eta_min=0.0)
    expected = _lrs(theirs, lr_scheduler.SequentialLR(theirs, [warm, cosine], milestones=[5]), 20)
    got = _lrs(ours, make_scheduler(ours, "cosine", 20, 5, 0.0), 20)
    assert got == expected and max(got) == pytest.approx(0.1) and got[0] == pytest.approx(0.001)


class Tiny(nn.Module):
    """Linear layers only (no BatchNorm): a batch's gradient is the mean of its samples'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _runner(model: nn.Module, clip: float = 0.0) -> StepRunner:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return StepRunner(model, model, ClassifyTask(), optimizer, None, contextlib.nullcontext, clip,
                      torch.device("cpu"), make_scheduler(optimizer, "constant", 10, 0, 0.0))


def _probe(_inputs: torch.Tensor, _targets: torch.Tensor) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def test_accumulating_two_batches_equals_one_batch_of_twice_the_size() -> None:
    g = torch.Generator().manual_seed(1)
    inputs, targets = torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    big, small = Tiny(), Tiny()
    one = _runner(big).compute([Micro(Batch(inputs, targets, 0))], StepClock(torch.device("cpu")), _probe)
    halves = [Micro(Batch(inputs[:4], targets[:4], 0)), Micro(Batch(inputs[4:], targets[4:], 0))]
    runner = _runner(small)
    two = runner.compute(halves, StepClock(torch.device("cpu")), _probe)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one.loss, two.loss)
    assert two.samples == 8 and float(two.loss_sum) == pytest.approx(8 * float(one.loss), rel=1e-5)
    assert two.metrics["accuracy"] == one.metrics["accuracy"]


def test_clipping_returns_the_pre_clip_norm_and_clips() -> None:
    model = Tiny()
    runner = _runner(model, clip=1e-3)
    inputs, targets = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    runner.compute([Micro(Batch(inputs, targets, 0))], StepClock(torch.device("cpu")), _probe)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    _, clip = runner.update()
    assert clip is not None
    norm, clipped = clip
    torch.testing.assert_close(norm, expected)
    assert bool(clipped)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(after) == pytest.approx(1e-3, rel=1e-3)  # the gradients were scaled to the limit


class _Ranks:
    """The strategy's collectives over a gloo group (or none): what Evaluator uses of a Strategy."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world_size, self.device, self.is_writer = rank, world, torch.device("cpu"), rank == 0

    def broadcast(self, obj: object) -> object:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


VAL_SAMPLES = 13  # not a multiple of the ranks: a padding sampler would count a sample twice


def _evaluate(rank: int, world: int, init: str, out: str) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dataset = SyntheticClassify(VAL_SAMPLES, 1, 4, 3, seed=0)
    evaluation = Evaluator(dataset, 4, _Ranks(rank, world), ClassifyTask(), contextlib.nullcontext).run(
        Tiny(), step=1, want_grid=False)
    if rank == 0:
        torch.save({"values": evaluation.values, "samples": evaluation.samples}, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_rank_evaluation_gives_the_sums_of_one_process(tmp_path: Path) -> None:
    _evaluate(0, 1, "", str(tmp_path / "one.pt"))
    mp.spawn(_evaluate, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["samples"] == two["samples"] == VAL_SAMPLES
    assert one["values"].keys() == two["values"].keys() == {"val/loss", "val/accuracy"}
    for tag, value in one["values"].items():
        assert math.isclose(value, two["values"][tag], rel_tol=1e-6), tag


class _Broken(nn.Module):
    """Fails at its first call, as torch.compile does when inductor finds no C++ compiler."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InvalidCxxCompiler: No working C compiler found in cpp_builder.py\nmore detail")


def test_a_compile_failure_is_a_one_line_error() -> None:
    from runner.errors import RunnerError
    from runner.train.compiled import warm_up

    dataset = SyntheticClassify(4, 1, 4, 3, seed=0)
    with pytest.raises(RunnerError) as failed:
        warm_up(_Broken(), _Broken(), ClassifyTask(), dataset, 2, torch.device("cpu"), contextlib.nullcontext, False)
    assert failed.value.code == 2 and "\n" not in str(failed.value)
    assert "InvalidCxxCompiler" in str(failed.value) and "without --compile" in str(failed.value)

"""Memory: the four-part estimate (`runner memory`), the live estimate events, --batch-size auto,
the out-of-memory post-mortem and --oom retry, and AMP on CPU. The CUDA paths: tests/test_gpu_memory.py."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runner.memory.auto_batch import largest_fitting
from runner.memory.estimate import estimate
from runner.memory.report import LABELS, format_bytes
from runner.models import build_model
from runner.train import checkpoint
from tests.support.memory import INDEX_LOG, OOM_STEP
from tests.support.runs import ROOT, run_runner

QUIET = ["--no-progress", "--image-size", "16", "--samples", "32"]


def _estimate_json(cli, *args: str) -> dict:
    out = cli("memory", *args, "--device", "cpu", "--json")
    assert out.code == 0, out.stderr
    return json.loads(out.stdout)


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


# --- runner memory -------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "count"), [("1,28,28", 101_770), ("3,32,32", 394_634)])
def test_mlp_counts_are_exact_and_the_parts_add_up(cli, shape: str, count: int) -> None:
    args = ["--model", "mlp", "--input-shape", shape, "--batch-size", "64", "--optimizer", "adam"]
    data = _estimate_json(cli, *args)
    assert data["parameters"] == data["trainable_parameters"] == count
    pixels = math.prod(int(d) for d in shape.split(","))
    for precision in ("fp32", "amp"):
        parts = data["bytes"][precision]
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
        assert parts["parameters"] == parts["gradients"] == 4 * count  # no buffers in the MLP
        assert parts["optimizer_state"] == 2 * 4 * count
        assert parts["input_batch"] == 64 * (4 * pixels + 8)  # fp32 images, int64 labels
    # fp32: autograd keeps the ReLU output (128) and the log-softmax (10) of each sample; the
    # flattened input is the input batch, counted once
    assert data["activations_per_sample"]["fp32"] == 4 * (128 + 10)

    table = cli("memory", *args, "--device", "cpu")
    assert table.code == 0, table.stderr
    assert f"{count:,} parameters" in table.stdout
    lines = table.stdout.splitlines()
    for name, label in [*LABELS.items(), ("total", "total")]:
        row = next(line for line in lines if line.startswith(f"│ {label}"))
        cells = [cell.strip() for cell in row.split("│")]
        expected = [format_bytes(data["bytes"][precision][name]) for precision in ("fp32", "amp")]
        assert cells[2:4] == expected, row


@pytest.mark.parametrize(("optimizer", "factor"), [("sgd", 0), ("momentum", 1), ("adam", 2), ("adamw", 2)])
def test_optimizer_state_is_a_multiple_of_the_parameters(cli, optimizer: str, factor: int) -> None:
    data = _estimate_json(cli, "--model", "cnn", "--input-shape", "3,32,32", "--optimizer", optimizer, "--amp")
    parts = data["bytes"]["amp"]
    assert data["selected"] == "amp"
    assert parts["optimizer_state"] == factor * parts["gradients"]
    assert parts["gradients"] == 4 * data["trainable_parameters"]
    assert parts["parameters"] > parts["gradients"]  # BatchNorm buffers
    assert parts["activations"] < data["bytes"]["fp32"]["activations"]  # AMP keeps 2-byte activations


def _saved_on_a_real_pass(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor, task: str,
                          amp: bool) -> int:
    """Independent count: unique data pointers autograd saves in a real CPU forward + loss."""
    from runner.tasks import make_task

    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), inputs, target]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        make_task(task).loss(model(inputs), target)
    return sum(seen.values())


@pytest.mark.parametrize(("name", "task"), [("cnn", "classify"), ("tinyunet", "denoise")])
@pytest.mark.parametrize("amp", [False, True])
def test_activations_scale_to_what_a_real_batch_saves(name: str, task: str, amp: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, 32, 10).train()
    breakdown = estimate(model, (3, 32, 32), 12, "adam", task, "cpu", amp)
    inputs = torch.rand(12, 3, 32, 32)
    target = torch.randint(0, 10, (12,)) if task == "classify" else torch.rand(12, 3, 32, 32)
    real = _saved_on_a_real_pass(model, inputs, target, task, amp)
    # exact in fp32; under bf16 the meta kernels keep BatchNorm's per-channel statistics in bf16
    # where the CPU kernel keeps fp32 (a few hundred bytes)
    assert breakdown.parts()["activations"] == pytest.approx(real, rel=0 if not amp else 1e-3)


def test_largest_fitting_doubles_then_bisects() -> None:
    for limit in (0, 1, 2, 3, 5, 64, 100, 1000, 5000):
        asked: list[int] = []

        def fits(batch: int, asked: list[int] = asked, limit: int = limit) -> bool:
            asked.append(batch)
            return batch <= limit

        assert largest_fitting(fits, 4096) == min(limit, 4096)
        assert len(asked) <= 2 * 12 + 1
        assert asked[: min(len(asked), 3)] == [1, 2, 4][: min(len(asked), 3)]


def test_memory_command_does_not_import_torch_at_import() -> None:
    code = "import sys, runner.cli, runner.memory.commands; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_memory_modules_do_not_import_the_trainer() -> None:
    """The loop imports the post-mortem; nothing under runner/memory may import the loop back."""
    code = ("import sys, runner.memory.auto_batch, runner.memory.live, runner.memory.postmortem, runner.memory.trial\n"
            "print(sorted(m for m in sys.modules if m.startswith('runner.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_input_shape_is_a_usage_error(cli) -> None:
    out = cli("memory", "--model", "mlp", "--input-shape", "1,x")
    assert out.code == 2 and "input-shape" in out.stderr and "Traceback" not in out.stderr


# --- live estimate and --batch-size auto (CPU budget) --------------------------------------------

def test_auto_batch_fits_a_small_budget_and_trains(cli, tmp_path: Path) -> None:
    budget = 8 << 20  # 8 MiB: the cnn's activations for the whole set (64 images of 32×32) need ~35 MiB
    one = _estimate_json(cli, "--model", "cnn", "--input-shape", "3,32,32", "--batch-size", "1")
    two = _estimate_json(cli, "--model", "cnn", "--input-shape", "3,32,32", "--batch-size", "2")
    per_sample = two["bytes"]["fp32"]["total"] - one["bytes"]["fp32"]["total"]
    static = one["bytes"]["fp32"]["total"] - per_sample

    def total(batch: int) -> int:
        return static + batch * per_sample

    assert one["activations_per_sample"]["fp32"] * 64 > budget
    largest = max(b for b in range(1, 65) if total(b) <= budget)

    out = cli("train", "--model", "cnn", "--image-size", "32", "--samples", "64", "--batch-size", "auto",
              "--memory-budget", "8MiB", "--steps", "3", "--log-every", "1", "--no-progress",
              "--run-dir", str(tmp_path), "--name", "auto")
    assert out.code == 0, out.stderr
    chosen = int(re.search(r"using (\d+) \(", out.stderr).group(1))
    assert f"largest that fits {largest} " in out.stderr
    # 80% of the largest batch, lowered until the estimate keeps 20% of the budget free
    assert chosen == min(largest * 4 // 5, max(b for b in range(1, 65) if total(b) <= 0.8 * budget))
    assert total(chosen) <= 0.8 * budget < total(chosen + 1)
    assert budget < total(largest + 1)
    assert "does not fit" in out.stderr  # the trials are printed

    acc = _events(tmp_path / "auto")
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3]
    assert acc.Scalars("memory/estimate_total")[0].step == 0
    assert acc.Scalars("memory/estimate_total")[0].value == pytest.approx(total(chosen), rel=1e-6)
    assert f"using {chosen}" in _text(acc, "auto_batch")[0]
    assert "optimizer state" in _text(acc, "memory_estimate")[0]
    assert checkpoint.load(tmp_path / "auto" / "checkpoints" / "last.pt")["step"] == 3


def test_auto_batch_below_one_sample_is_an_error(cli, tmp_path: Path) -> None:
    out = cli("train", "--model", "cnn", "--image-size", "32", "--batch-size", "auto", "--memory-budget", "1MiB",
              "--steps", "1", "--no-progress", "--viz", "none", "--run-dir", str(tmp_path), "--name", "tiny")
    assert out.code == 1
    assert "even a batch of 1 needs about" in out.stderr and "Traceback" not in out.stderr


# --- out of memory ---------------------------------------------------------------------------------

def _oom_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--model", "tests.support.memory:oom_at_step_3", "--batch-size", "4", "--steps", "10",
            "--log-every", "1", "--checkpoint-every", "100", "--run-dir", str(tmp_path), "--name", name,
            *QUIET, *extra]


@pytest.mark.slow
def test_oom_stops_with_a_post_mortem_and_keeps_the_step_before(cli, tmp_path: Path) -> None:
    out = run_runner(*_oom_args(tmp_path, "oom"))
    assert out.code == 1, out.stderr
    assert "Traceback" not in out.stderr
    error = next(line for line in out.stderr.splitlines() if line.startswith("runner: error: "))
    assert error.startswith(f"runner: error: out of memory at step {OOM_STEP} (batch 4 on cpu): "
                            "CUDA out of memory. Tried to allocate 2.00 GiB")
    folder = tmp_path / "oom" / "oom"
    assert sorted(p.name for p in folder.iterdir()) == ["breakdown.json", "breakdown.md", "diagnosis.txt",
                                                        "error.txt"]  # no CUDA: no summary, no snapshot
    assert "torch.OutOfMemoryError" in (folder / "error.txt").read_text()
    diagnosis = (folder / "diagnosis.txt").read_text().strip()
    assert error == f"runner: error: {diagnosis}" and "\n" not in diagnosis
    breakdown = json.loads((folder / "breakdown.json").read_text())
    parts = {k: v for k, v in breakdown["bytes"]["fp32"].items() if k != "total"}
    biggest = max(parts, key=parts.get)
    assert f"the biggest part is {LABELS[biggest]} at {format_bytes(parts[biggest])}" in diagnosis
    assert "--batch-size 2, half" in diagnosis and "--image-size 8 (from 16) saves about" in diagnosis
    assert f"holds step {OOM_STEP - 1}" in diagnosis

    # last.pt holds step K-1, exactly as a run that stopped there: weights and optimizer state
    state = checkpoint.load(tmp_path / "oom" / "checkpoints" / "last.pt")
    assert state["step"] == OOM_STEP - 1
    reference = cli(*_oom_args(tmp_path, "ref", "--steps", str(OOM_STEP - 1)))
    assert reference.code == 0, reference.stderr
    expected = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.pt")
    for key, value in expected["model"].items():
        assert torch.equal(state["model"][key], value), key
    for index, value in expected["optimizer"]["state"].items():
        assert torch.equal(state["optimizer"]["state"][index]["exp_avg"], value["exp_avg"])

    acc = _events(tmp_path / "oom")  # sinks flushed before the exit
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2]
    assert any(t.startswith("failed: out of memory at step 3") for t in _text(acc, "status"))


def test_oom_with_debug_shows_the_traceback(cli, tmp_path: Path) -> None:
    out = cli(*_oom_args(tmp_path, "dbg", "--viz", "none", "--debug"))
    assert out.code == 1
    assert "Traceback" in out.stderr and "torch.OutOfMemoryError" in out.stderr


def test_oom_retry_halves_the_batch_and_finishes(cli, tmp_path: Path) -> None:
    out = cli("train", "--model", "tests.support.memory:oom_above_batch_4", "--batch-size", "16", "--oom", "retry",
              "--steps", "6", "--log-every", "1", "--run-dir", str(tmp_path), "--name", "retry", *QUIET)
    assert out.code == 0, out.stderr
    assert not (tmp_path / "retry" / "oom").exists()
    assert checkpoint.load(tmp_path / "retry" / "checkpoints" / "last.pt")["step"] == 6
    acc = _events(tmp_path / "retry")
    assert _text(acc, "memory_oom") == [
        "out of memory at step 1 with batch 16: going on with batch 8 (--oom retry)",
        "out of memory at step 1 with batch 8: going on with batch 4 (--oom retry)",
    ]
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_oom_retry_mid_epoch_goes_on_from_the_same_sample(cli, tmp_path: Path, monkeypatch) -> None:
    """Out of memory at step 3 (batch 4, samples 8-11 of the epoch's order): the run goes on with
    batches of 2 from sample 8 of the same order."""
    served = tmp_path / "served.txt"
    monkeypatch.setenv(INDEX_LOG, str(served))
    out = cli(*_oom_args(tmp_path, "mid", "--oom", "retry", "--steps", "5",
                         "--data", "tests.support.memory:indexed_dataset"))
    assert out.code == 0, out.stderr
    acc = _events(tmp_path / "mid")
    assert _text(acc, "memory_oom") == ["out of memory at step 3 with batch 4: going on with batch 2 (--oom retry)"]
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    order = [int(line) for line in served.read_text().split()][-18:]  # 3 batches of 4, then 3 of 2
    assert len(set(order)) == 14  # samples 0-13 of the epoch's order, 8-11 served twice
    assert order[12:16] == order[8:12]



def test_cudnn_allocation_failure_gets_the_post_mortem(cli, tmp_path: Path) -> None:
    """cuDNN reports a failed workspace allocation as a RuntimeError, not torch.OutOfMemoryError."""
    out = cli("train", "--model", "tests.support.memory:cudnn_failure_at_step_3", "--batch-size", "4", "--steps", "10",
              "--log-every", "1", "--checkpoint-every", "100", "--viz", "none", "--run-dir", str(tmp_path),
              "--name", "cudnn", *QUIET)
    assert out.code == 1
    assert f"out of memory at step {OOM_STEP} (batch 4 on cpu): cuDNN error: " in out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / "cudnn" / "oom" / "diagnosis.txt").is_file()
    assert checkpoint.load(tmp_path / "cudnn" / "checkpoints" / "last.pt")["step"] == OOM_STEP - 1


def test_oom_in_the_optimizer_step_saves_nothing(cli, tmp_path: Path) -> None:
    """Out of memory while the optimizer updates: the weights may be half-updated, so no checkpoint."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    calls = []

    def fail_third_update(_optimizer, _args, _kwargs) -> None:
        calls.append(1)
        if len(calls) == OOM_STEP:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (injected in step)")

    handle = register_optimizer_step_pre_hook(fail_third_update)
    try:
        out = cli("train", "--model", "mlp", "--batch-size", "4", "--steps", "10", "--log-every", "1",
                  "--checkpoint-every", "100", "--viz", "none", "--run-dir", str(tmp_path), "--name", "upd", *QUIET)
    finally:
        handle.remove()
    assert out.code == 1 and "Traceback" not in out.stderr
    assert f"out of memory at step {OOM_STEP} " in out.stderr
    assert "nothing saved: the error hit while the optimizer was updating" in out.stderr
    assert not (tmp_path / "upd" / "checkpoints" / "last.pt").exists()


# --- AMP -------------------------------------------------------------------------------------------

def test_amp_on_cpu_trains_under_bfloat16_autocast(tmp_path: Path) -> None:
    from runner.config import resolve
    from runner.telemetry.hub import Hub
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    cfg = resolve(None, {"model": "cnn", "image_size": 16, "batch_size": 4, "samples": 16, "steps": 3, "amp": True,
                         "device": "cpu", "viz": "none", "progress": False, "run_dir": str(tmp_path), "name": "amp"})
    trainer = Trainer(cfg, make_strategy(cfg))
    dtypes: list[torch.dtype] = []
    trainer.raw_model.features[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        assert trainer.fit(Hub([])) == 0
    finally:
        trainer.close()
    assert trainer.scaler is None and dtypes == [torch.bfloat16] * 3
    assert math.isfinite(trainer.last_scalars["train/loss"])

"""The acceptance checks of the features built beside it (stall detection with NCCL's flight recorder,
evaluation under AMP, --compile, runner.observe): their judges fed recorded numbers, and (slow) their
runs on CPU, where only what needs CUDA may fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.gpu_checks import checks_features, judge_features, runs


def test_stall_judge_needs_the_capture_the_flight_recorder_and_a_finding() -> None:
    files = ["heartbeats.json", "nccl_trace_rank_0", "nvml.json", "stacks.json", "stacks.txt"]
    stacks = 'Thread 0x1 (most recent call first):\n  File "/w/scripts/gpu_checks/models.py", line 60 in forward\n'
    args = dict(exit_code=1, files=files, stacks=stacks, kinds=["stalled"], frame="gpu_checks/models.py")
    ok = judge_features.stall("s", **args)
    assert ok.status == "PASS" and "1 flight-recorder dumps" in ok.summary
    for change, reason in [({"exit_code": 0}, "expected 1"), ({"files": files[:1] + files[2:]}, "flight recorder"),
                           ({"stacks": "Thread 0x1\n"}, "stalled frame"),
                           ({"kinds": ["stall_recovered"]}, "no stalled"),
                           ({"files": ["nccl_trace_rank_0"]}, "no stacks.txt")]:
        result = judge_features.stall("s", **{**args, **change})
        assert result.status == "FAIL" and reason in result.reason, (change, result.reason)


def test_evaluation_judge_wants_every_evaluation_step_and_the_last() -> None:
    val = {"val/loss": {5: 0.3, 10: 0.2, 15: 0.1, 18: 0.1}, "val/psnr": {5: 20.0}}
    ok = judge_features.evaluation("v", val, 5, 18)
    assert ok.status == "PASS" and ok.summary.startswith("4 evaluations")
    assert "missing at steps [18]" in judge_features.evaluation("v", {"val/loss": {5: 0.3, 10: 0.2, 15: 0.1}},
                                                                  5, 18).reason
    assert "not finite at steps [10]" in judge_features.evaluation(
        "v", {"val/loss": {5: 0.3, 10: float("nan"), 15: 0.1, 18: 0.1}}, 5, 18).reason


def test_compile_and_own_loop_judges() -> None:
    loss = {4: 0.5, 8: 0.4, 12: 0.3}
    assert judge_features.compiled("c", [41.5], loss, [4, 8, 12]).summary == "compiled in 41.5 s, 3 log points"
    assert "was the model compiled" in judge_features.compiled("c", [], loss, [4, 8, 12]).reason
    assert "missing at steps [12]" in judge_features.compiled("c", [41.5], {4: 0.5, 8: 0.4}, [4, 8, 12]).reason
    wanted = ["train/loss", "time/step_ms", "memory/allocated"]
    assert judge_features.own_loop("o", [5, 10], [5, 10], wanted + ["x"], wanted).status == "PASS"
    assert "tags missing: ['memory/allocated']" in judge_features.own_loop("o", [5, 10], [5, 10], wanted[:2],
                                                                           wanted).reason


def _cpu(tmp_path: Path) -> runs.Context:
    return runs.Context(work=tmp_path / "work", gpus=0, total_memory=0, device="cpu", size=32, batch=4)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_feature_checks_run_on_cpu(tmp_path: Path) -> None:
    """The runs and read-back of the feature checks on CPU: evaluation (bf16 autocast), the own loop and
    --compile (inductor's C++ backend) pass; the stall is caught and captured, without the flight recorder
    NCCL alone writes."""
    ctx = _cpu(tmp_path)
    compiled = checks_features.compiled(ctx, 300)[0]
    assert compiled.status == "PASS", compiled.reason
    val = checks_features.evaluation(ctx, 300)[0]
    assert val.status == "PASS", val.reason
    own = checks_features.own_loop(ctx, 300)[0]
    assert own.status == "PASS", own.reason
    stalled = checks_features.stall(ctx, 300)[0]
    assert stalled.reason.startswith("exit 1: runner: error: stalled: no progress for 5 s"), stalled.reason
    assert stalled.reason.endswith("; no nccl_trace_rank_* (the flight recorder's dump)"), stalled.reason
    for other in ("expected 1", "no stacks.txt", "no heartbeats.json", "stalled frame", "no stalled/hang"):
        assert other not in stalled.reason

"""The GPU acceptance run without a GPU: every judge fed recorded numbers (a good run passes, each kind of
regression fails), recorded failures through every check (the run's own error reaches each verdict),
the plan's budgets and --only, the evidence archive's cap, the report files, --dry-run and the no-CUDA
exit, and --amp-dtype reaching the memory trial and estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from scripts.gpu_checks import archive, judge, plan, readback, rehearse, replay, runs, verdict
from scripts.gpu_checks.bundle import BUNDLE, SHELL_LINE
from tests.support.runs import ROOT

SCRIPT = ROOT / "scripts" / "gpu_acceptance.py"
GiB = 1 << 30
MiB = 1 << 20


# --- judging, with numbers as a good GPU run produces them -----------------------------------------

def _streams(**changes):
    args = dict(exit_code=0, scalars={"train/loss": [10, 20, 30, 40], "memory/peak": list(range(1, 41))},
                images=["images/samples"], histograms=["weights/conv.weight", "grads/conv.weight"], graph=True,
                visdom_types={"plot": 12, "image": 1, "text": 3}, steps=40, log_every=10,
                amp_scale=[65536.0, 32768.0, 32768.0, 32768.0])
    args.update(changes)
    return judge.streams("single GPU fp16", **args)


def test_streams_pass_and_each_regression_fails() -> None:
    assert _streams().status == "PASS"
    assert "amp scale 32768" in _streams().summary
    regressions = {
        "exit code 1": {"exit_code": 1},
        "train/loss missing at steps [30]": {"scalars": {"train/loss": [10, 20, 40]}},
        "no image grid": {"images": []},
        "histograms expected": {"histograms": ["weights/conv.weight"]},
        "no model graph": {"graph": False},
        "Visdom env lacks": {"visdom_types": {"plot": 12}},
        "no train/amp_scale": {"amp_scale": []},
        "scale out of range": {"amp_scale": [float("inf")]},
    }
    for reason, change in regressions.items():
        result = _streams(**change)
        assert result.status == "FAIL" and reason in result.reason, (change, result.reason)


def test_syncs_judge_counts_the_training_thread_only() -> None:
    report = {"steady_steps": 30, "steady_syncs": {"training_thread": 0, "other_threads": 7}, "steady_sites": {},
              "log_points": [{"step": 20, "syncs": 2}, {"step": 30, "syncs": 3}]}
    ok = judge.syncs("no added syncs", report)
    assert ok.status == "PASS" and "log points cost 2-3 syncs" in ok.summary and "(7 on sink threads)" in ok.summary
    bad = dict(report, steady_syncs={"training_thread": 4, "other_threads": 0},
               steady_sites={"runner/probes/tensor_stats.py:40": 4})
    result = judge.syncs("no added syncs", bad)
    assert result.status == "FAIL" and "tensor_stats.py:40 ×4" in result.reason
    assert judge.syncs("no added syncs", None).status == "FAIL"
    assert judge.syncs("no added syncs", dict(report, steady_steps=0)).status == "FAIL"


def test_memory_series_judge_compares_each_step_with_max_memory_allocated() -> None:
    steps = 4
    peaks = [100e6, 120e6, 110e6, 121e6]
    series = {"memory/allocated": {s: 50e6 for s in range(1, 5)}, "memory/reserved": {s: 200e6 for s in range(1, 5)},
              "memory/peak": dict(enumerate(peaks, start=1))}
    assert judge.memory_series("m", series, steps, peaks).status == "PASS"
    off = judge.memory_series("m", series, steps, [100e6, 120e6, 130e6, 121e6])  # step 3 off by 15 %
    assert off.status == "FAIL" and "step 3" in off.reason
    gap = judge.memory_series("m", {**series, "memory/peak": {1: 1e8, 2: 1.2e8, 4: 1.21e8}}, steps, peaks)
    assert gap.status == "FAIL" and "memory/peak missing at 1 steps" in gap.reason
    assert judge.memory_series("m", series, steps, peaks[:3]).status == "FAIL"


def test_nvml_judge_catches_implausible_readings_and_the_wrong_gpu() -> None:
    total = 150_000_000_000
    good = {"system/gpu_util": [0.0, 87.0], "system/gpu_power_w": [120.5, 410.0], "system/gpu_temp_c": [31.0, 45.0],
            "memory/gpu_used": [3e9, 9e9], "memory/gpu_total": [float(total)] * 2}
    assert judge.nvml("nvml", good, total).status == "PASS"
    assert "wrong GPU" in judge.nvml("nvml", good, 80_000_000_000).reason  # another card's size
    assert "never logged" in judge.nvml("nvml", {**good, "system/gpu_power_w": []}, total).reason
    assert "utilisation 0 %" in judge.nvml("nvml", {**good, "system/gpu_util": [0.0, 0.0]}, total).reason
    assert "temperature" in judge.nvml("nvml", {**good, "system/gpu_temp_c": [0.0]}, total).reason


def _row(model: str, precision: str, estimate: int, peak: int, bench: int) -> dict:
    return {"model": model, "precision": precision, "estimate": estimate, "peak": peak, "peak_benchmark": bench,
            "parts": {"parameters": 10 * MiB, "activations": estimate - 10 * MiB}}


def test_estimate_judge_explains_each_row_and_reports_the_workspace_apart() -> None:
    rows = [_row("tinyunet", "amp", 110 * MiB, 100 * MiB, 160 * MiB),
            _row("cnn", "fp32", 90 * MiB, 100 * MiB, 100 * MiB)]
    ok = judge.estimates("e", rows, 2)
    assert ok.status == "PASS" and ok.summary == "tinyunet amp +10.0%, cnn fp32 -10.0%"
    table = ok.table.splitlines()
    assert table[2].startswith("| tinyunet amp | 110.0 | 100.0 | +10.0% | 60.0 | activations 100.0 MiB |")
    assert "tinyunet amp" in table[2] and "cnn fp32" in table[3]  # the most important row first, as measured
    bad = judge.estimates("e", rows + [_row("resnet18", "amp", 60 * MiB, 100 * MiB, 100 * MiB)], 3)
    assert bad.status == "FAIL" and "resnet18 amp off by -40.0%" in bad.reason
    missing = judge.estimates("e", rows + [{"model": "mlp", "precision": "fp32", "error": "out of memory: x"}], 4)
    assert "mlp fp32: out of memory: x" in missing.reason and "3 of 4 rows measured" in missing.reason


def test_overhead_judge_takes_the_pairs_a_timed_out_helper_left() -> None:
    pairs = [(0.010, 0.01005), (0.010, 0.0102), (0.010, 0.0099)]
    ok = judge.overhead("o", pairs)
    assert ok.status == "PASS" and ok.summary == "runner 1.005× the bare loop (median of 3 pairs, bare 10.0 ms/step)"
    assert judge.overhead("o", [(0.01, 0.011)]).status == "FAIL"
    cut = judge.overhead("o", pairs[:2], "exit 124: (timed out after 80 s)")
    assert cut.status == "FAIL" and "median of 2 pairs" in cut.summary and "timed out after 80 s" in cut.reason
    none = judge.overhead("o", [], "exit 1: RuntimeError: CUDA error")
    assert none.status == "FAIL" and none.reason == "exit 1: RuntimeError: CUDA error"


def test_findings_of_a_healthy_run_hold_no_warning() -> None:
    records = [{"kind": "throughput", "severity": "info", "step": 10, "message": "fine"}]
    assert judge.findings(records, "") == []
    warned = records + [{"kind": "allocator_pressure", "severity": "warning", "step": 20, "message": "reserved 3×"}]
    assert judge.findings(warned, "") == ["finding warning allocator_pressure at step 20: reserved 3×"]
    assert judge.findings([], "no streams-fp16/findings.json") == ["findings: no streams-fp16/findings.json"]


def test_nccl_one_rank_and_profile_judges() -> None:
    assert judge.nccl_one("n", [2, 4, 6], 6, "").status == "PASS"
    assert "last logged step 4 of 6" in judge.nccl_one("n", [2, 4], 6, "").reason
    warned = judge.nccl_one("n", [2, 4, 6], 6, "[rank0]:[W] ProcessGroupNCCL.cpp:1496 Warning: destroy_process_group")
    assert warned.status == "FAIL" and "NCCL said (1 lines)" in warned.reason
    good = judge.profile("p", ["memory_snapshot.pickle", "trace.json"], {"kernel": 120, "cpu_op": 900}, 300, "")
    assert good.status == "PASS" and good.summary == "2 files, 120 GPU events, 300 allocations in the snapshot"
    cpu_only = judge.profile("p", ["trace.json"], {"cpu_op": 900}, 0, "")
    assert "no GPU kernels" in cpu_only.reason and "no allocations" in cpu_only.reason


def test_auto_batch_judge_needs_an_out_of_memory_trial_and_headroom() -> None:
    trials = [(1, True), (2, True), (4, True), (8, False), (6, True), (7, False)]
    ok = judge.auto_batch("a", 0, 6 * GiB, 4, 1024, trials, 4.2 * GiB)
    assert ok.status == "PASS" and "peak 70% of a 6.00 GiB budget" in ok.summary
    assert "never ran" in judge.auto_batch("a", 0, 6 * GiB, 4, 1024, [(b, True) for b in (1, 2, 4)], 1 * GiB).reason
    assert "over 80%" in judge.auto_batch("a", 0, 6 * GiB, 4, 1024, trials, 5 * GiB).reason
    assert "cap 2" in judge.auto_batch("a", 0, 6 * GiB, 4, 2, trials, 1 * GiB).reason


def test_oom_judges() -> None:
    files = ["breakdown.json", "breakdown.md", "diagnosis.txt", "error.txt", "memory_snapshot.pickle",
             "memory_summary.txt"]
    args = dict(exit_code=1, error_line="runner: error: out of memory at step 3 (batch 8 on cuda:0): CUDA out of",
                files=files, summary_text="|  PyTorch CUDA memory summary, device ID 0  |",
                snapshot_keys=["device_traces", "segments"], snapshot_ooms=1, last_step=2, oom_step=3, viewer_ok=True)
    assert judge.oom("o", **args).status == "PASS"
    for change, reason in [({"last_step": 3}, "last.pt at step 3"), ({"snapshot_ooms": 0}, "no oom event"),
                           ({"exit_code": 0}, "expected 1"), ({"files": files[:4]}, "no memory_snapshot.pickle"),
                           ({"viewer_ok": False}, "_memory_viz")]:
        assert reason in judge.oom("o", **{**args, **change}).reason
    notes = ["out of memory at step 1 with batch 256: going on with batch 128 (--oom retry)",
             "out of memory at step 1 with batch 128: going on with batch 64 (--oom retry)"]
    ok = judge.oom_retry("r", 0, notes, 256, [1, 2, 3, 4], 4)
    assert ok.status == "PASS" and ok.summary == "batch 256 → 128 → 64, finished 4 steps"
    assert "never ran out" in judge.oom_retry("r", 0, [], 256, [1, 2, 3, 4], 4).reason
    assert "unexpected note" in judge.oom_retry("r", 0, notes[1:], 256, [1, 2, 3, 4], 4).reason


def test_strategy_and_interrupt_judges() -> None:
    assert judge.data_parallel("dp", 0, 1, [0.2, 0.1], 5e6).status == "PASS"
    assert "replicas" in judge.data_parallel("dp", 0, 1, [0.2, 0.1], 0.0).reason
    skip = judge.nccl("n", 1, None, [], 0)
    assert skip.status == "SKIP" and "1 GPU visible" in skip.reason
    assert judge.nccl("n", 2, 0, [2, 4, 6], 6).status == "PASS"
    ok = judge.interrupt("c", True, [10, 11, 12], [], 1.3, 130, [999], 1e9, 1.05e9)
    assert ok.status == "PASS" and "all gone after 1.3 s" in ok.summary
    assert "alive" in judge.interrupt("c", True, [10, 11], [11], 5.0, 130, [], 1e9, 1e9).reason
    assert "NVML lists run processes [11]" in judge.interrupt("c", True, [10, 11], [], 1.0, 130, [11], 1e9, 1e9).reason
    assert "not returned" in judge.interrupt("c", True, [10], [], 1.0, 130, [], 1e9, 3e9).reason
    assert judge.interrupt("c", False, [], [], 0.0, None, None, None, None).status == "FAIL"


def test_verdicts_need_reasons_and_write_both_reports(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        verdict.Verdict("x", "FAIL", "1 2 3")
    results = [verdict.passed("a", "1 step"), verdict.skipped("b", "one GPU"), verdict.failed("c", "2", "broke | x")]
    results[0].table = "| row | n |\n|---|---|\n| r | 1 |"
    assert results[1].line() == "SKIP b: not run — one GPU [0 s]"
    assert verdict.exit_code(results) == 1 and verdict.exit_code(results[:2]) == 0
    verdict.write(tmp_path, results, {"torch": "2.14.1"})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["exit_code"] == 1 and [c["status"] for c in data["checks"]] == ["PASS", "SKIP", "FAIL"]
    md = (tmp_path / "report.md").read_text()
    assert "| c | FAIL | 2 | broke \\| x |" in md and "1 PASS, 1 FAIL, 1 SKIP" in md  # a pipe cannot split a row
    assert "## a\n\n| row | n |" in md


def test_amend_puts_the_runs_error_first_and_turns_a_pass_into_a_fail() -> None:
    ok = verdict.passed("a", "fine")
    assert verdict.amend(ok, []) is ok
    worse = verdict.amend(verdict.failed("a", "s", "judged"), ["exit 1: boom"], first=True)
    assert worse.status == "FAIL" and worse.reason == "exit 1: boom; judged"
    out = runs.Outcome(2, "", "Traceback\n  x\nrunner: error: bad flag\n")
    assert runs.explain(ok, out).reason == "exit 2: runner: error: bad flag"
    crash = runs.Outcome(1, "", "Traceback (most recent call last):\n  File x\n    y()\nRuntimeError: CUDA error: z\n")
    assert runs.explain(ok, crash).reason.endswith("RuntimeError: CUDA error: z")


# --- the plan: order, --only, budgets -----------------------------------------------------------

def test_only_selects_checks_in_table_order_and_refuses_unknown_ids() -> None:
    assert [c.ident for c in plan.select(["nccl1,fp16", "profile"])] == ["fp16", "nccl1", "profile"]
    assert plan.select([]) == plan.CHECKS
    with pytest.raises(ValueError, match="unknown check.*nope"):
        plan.select(["fp16,nope"])
    assert plan.CHECKS[0].ident == "fp16" and plan.CHECKS[1].ident == "estimates"  # most telling first


def test_the_budgets_leave_slack_in_a_ten_minute_command() -> None:
    """A check starts only if its budget ends before the deadline: with the bundle's install (~15 s) and the
    last archive, the run ends within 7 minutes; the four most telling checks fit a cold start."""
    assert plan.DEADLINE + 30 <= 7 * 60
    cold_import = 30
    assert cold_import + sum(c.budget for c in plan.CHECKS[:4]) <= plan.DEADLINE


def _context(tmp_path: Path, kind: str, url: str = "http://127.0.0.1:9") -> runs.Context:
    return runs.Context(work=tmp_path / "work", gpus=1, total_memory=80 * GiB, visdom_url=url,
                        python=[sys.executable, str(Path(replay.__file__)), kind])


def test_a_check_whose_budget_does_not_fit_is_skipped_with_the_rerun_line(tmp_path: Path) -> None:
    ctx = _context(tmp_path, "usage")
    chosen = plan.select(["fp16,nccl1"])
    deadline = time.monotonic() + 60  # fp16 needs 75 s, nccl1 55 s
    found = plan.run_checks(ctx, chosen, tmp_path / "out", {}, deadline, lambda _: "")
    assert found[0].status == "SKIP" and "rerun with --only fp16" in found[0].reason
    assert found[1].status == "FAIL" and replay.MARKERS["usage"] in found[1].reason
    assert ctx.started == 1  # the skipped check started nothing


def test_a_check_whose_need_is_missing_fails_without_running(tmp_path: Path) -> None:
    ctx = _context(tmp_path, "usage")
    why = "PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction not honoured"
    found = plan.run_checks(ctx, plan.select(["oom"]), tmp_path / "out", {}, time.monotonic() + 600,
                            lambda need: why if need == plan.NEEDS_FRACTION else "")
    assert (found[0].status, found[0].reason) == ("FAIL", why) and ctx.started == 0


def test_a_checks_own_crash_still_names_the_runs_error(tmp_path: Path) -> None:
    def broken(ctx: runs.Context, timeout: float) -> list[verdict.Verdict]:
        runs.runner(ctx, "x", ["train"], timeout)
        raise KeyError("measured")

    ctx = _context(tmp_path, "crash")
    found = plan.run_checks(ctx, [plan.Check("x", "broken", 30, "", broken)], tmp_path / "out", {},
                            time.monotonic() + 60, lambda _: "")
    assert found[0].reason.startswith("KeyError: 'measured'; the last run: exit 1: ")
    assert replay.MARKERS["crash"] in found[0].reason


@pytest.mark.parametrize("kind", sorted(replay.MARKERS))
def test_recorded_failures_reach_every_verdict(tmp_path: Path, kind: str) -> None:
    """A usage error, and a run that died before its Visdom env or TensorBoard events existed, through
    every check: each verdict leads with that error, not a read-back's; the reports and archive follow."""
    ctx = _context(tmp_path, kind)
    ctx.work.mkdir()
    (ctx.work / "visdom-server.log").write_text("server log\n")
    found = plan.run_checks(ctx, plan.CHECKS, tmp_path / "out", {"rehearsal": kind}, time.monotonic() + 600,
                            lambda _: "")
    rows = [(v.check, v.status, v.reason) for v in found]
    assert rehearse.verify(tmp_path / "out", kind, replay.MARKERS[kind], rows, ctx.started) == []
    streams = next(v for v in found if v.check == "single GPU fp16")
    assert streams.reason.startswith(f"exit {2 if kind == 'usage' else 1}: ")
    assert "Visdom env 'accept_streams-fp16' not readable" in streams.reason  # guarded, after the run's error
    assert ctx.started == len(plan.CHECKS) - 1  # all but nccl2, a SKIP with one GPU
    cmd = (ctx.logs / "01-streams-fp16.cmd").read_text()
    assert f"XDG_STATE_HOME={ctx.work / 'state'}" in cmd and "--run-dir" in cmd  # the registry in the work folder


def test_a_child_past_its_budget_ends_with_everything_it_started(tmp_path: Path) -> None:
    import psutil

    ctx = runs.Context(work=tmp_path, gpus=1, total_memory=GiB,
                       python=["bash", "-c", "(sleep 313.5 &); echo started >&2; sleep 313.5"])
    began = time.monotonic()
    out = runs.execute(ctx, "slow", [], timeout=2)
    assert out.code == 124 and out.stderr.startswith("started") and "timed out after 2 s" in out.stderr
    assert time.monotonic() - began < 10
    time.sleep(0.5)
    left = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "313.5"]]
    assert left == []  # the grandchild too: nothing holds the GPU into the next check


def test_guarded_readback_of_what_a_failed_run_never_wrote(tmp_path: Path) -> None:
    assert readback.board(tmp_path / "none").error.startswith("no TensorBoard event file")
    windows, error = readback.visdom_windows("http://127.0.0.1:9", "env")
    assert windows == {} and "Visdom env 'env' not readable" in error
    assert readback.findings(tmp_path) == ([], f"no {tmp_path.name}/findings.json")
    assert readback.profile(tmp_path / "profile").error.startswith("no files in")
    (tmp_path / "oom").mkdir()
    (tmp_path / "oom" / "memory_snapshot.pickle").write_bytes(b"\x80\x04cut")
    pm = readback.post_mortem(tmp_path / "oom")
    assert pm.snapshot_keys == ["unreadable (UnpicklingError)"] and not pm.viewer_ok


# --- the evidence archive ------------------------------------------------------------------------

def test_archive_stays_under_its_cap_most_telling_files_first(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "runs" / "r" / "checkpoints").mkdir(parents=True)
    (work / "runs" / "r" / "oom").mkdir()
    (work / "logs" / "01-r.stderr").write_text("x" * (archive.TEXT_TAIL + 10) + "THE END")
    (work / "runs" / "r" / "findings.json").write_text("[]")
    (work / "runs" / "r" / "oom" / "diagnosis.txt").write_text("out of memory")
    (work / "runs" / "r" / "checkpoints" / "last.pt").write_bytes(b"0" * 100)
    (work / "runs" / "r" / "profile").mkdir()
    (work / "runs" / "r" / "profile" / "trace.json").write_text("[" + "0," * (4 * MiB) + "0]")  # whole or not
    for i in range(3):  # incompressible and bulky: fills the cap
        (work / "runs" / "r" / f"events.out.tfevents.{i}").write_bytes(os.urandom(3 * MiB))
    target = tmp_path / archive.ARCHIVE
    size, left_out = archive.write(work, target, cap=6 * MiB)
    assert size <= 6 * MiB
    assert "runs/r/checkpoints/last.pt" in left_out and sum("tfevents" in f for f in left_out) == 2
    assert "runs/r/profile/trace.json" in left_out
    with tarfile.open(target) as tar:
        names = tar.getnames()
        stderr = tar.extractfile("logs/01-r.stderr").read()
        manifest = tar.extractfile("MANIFEST.txt").read().decode()
    assert {"runs/r/findings.json", "runs/r/oom/diagnosis.txt", "MANIFEST.txt"} <= set(names)
    assert stderr.endswith(b"THE END") and len(stderr) < archive.TEXT_TAIL + 100
    assert "left out           100  runs/r/checkpoints/last.pt" in manifest.splitlines()


# --- the script ------------------------------------------------------------------------------------

def test_dry_run_lists_every_check_and_the_shell_line_without_cuda() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr
    for check in plan.CHECKS:
        assert f"  - {check.ident}: {check.title} [{check.budget:.0f} s]" in out.stdout
    assert out.stdout.rstrip().endswith(SHELL_LINE)
    assert SHELL_LINE in (ROOT / "README.md").read_text()  # the documented line is the one printed
    assert f"--no-index --no-deps --no-compile --target \"$T/site\" {BUNDLE}/wheels/*.whl" in SHELL_LINE
    assert SHELL_LINE.endswith('--out "$OUT" ${ACCEPT:-}')
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "fp17"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "unknown check(s) fp17" in bad.stderr


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "needs CUDA" in out.stderr
    assert not (tmp_path / "report.json").exists()


def test_scripts_is_a_regular_package_and_the_oom_step_agrees() -> None:
    import scripts
    from scripts.gpu_checks import checks_memory, models

    assert Path(scripts.__file__) == ROOT / "scripts" / "__init__.py"  # not a namespace a site-packages one beats
    assert checks_memory.OOM_STEP == models.OOM_STEP


# --- --amp-dtype reaches the memory trial and the estimate -----------------------------------------

def _dtype_model():
    from torch import nn

    class Recorder(nn.Module):
        """Records the dtype its linear layer computes in: what autocast chose."""

        def __init__(self) -> None:
            super().__init__()
            self.fc, self.seen = nn.Linear(8, 4), []

        def forward(self, x):
            y = self.fc(x)
            self.seen.append(y.dtype)
            return y

    return Recorder()


@pytest.mark.parametrize("choice", ["bf16", "fp16"])
def test_the_memory_trial_trains_in_the_runs_amp_dtype(choice: str) -> None:
    import torch

    from runner.memory.trial import run_steps
    from runner.optim import amp_dtype, make_optimizer

    model = _dtype_model()
    optimizer = make_optimizer("adam", model.parameters(), 1e-3, 0.0)
    run_steps(model, optimizer, (8,), 4, "classify", True, torch.device("cpu"), steps=1, amp_choice=choice)
    assert model.seen == [amp_dtype("cpu", True, choice)]


def test_the_estimate_measures_under_the_runs_amp_dtype_for_cuda_without_a_gpu() -> None:
    import torch

    from runner.memory.estimate import estimate
    from runner.optim import make_scaler

    model = _dtype_model()
    found = estimate(model, (8,), 4, "adam", "classify", "cuda", True, "rec", amp_choice="bf16")
    assert found.amp_dtype == "bf16" and torch.bfloat16 in model.seen and torch.float16 not in model.seen
    model.seen.clear()
    estimate(model, (8,), 4, "adam", "classify", "cuda", True, "rec")  # auto on CUDA: fp16
    assert torch.float16 in model.seen and torch.bfloat16 not in model.seen
    assert make_scaler("cuda", True, "bf16") is None  # bf16 trials run without a GradScaler

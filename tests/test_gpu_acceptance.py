"""The GPU acceptance run without a GPU: every check's judging fed recorded numbers (a good run passes,
each kind of regression fails), the report files, --dry-run and the no-CUDA exit, the readback of a
real CPU run, the in-process helpers on CPU, and the bundle installing offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_checks import judge, readback, verdict
from scripts.gpu_checks.bundle import BUNDLE, LIMIT, SHELL_LINE
from tests.support.runs import ROOT

SCRIPT = ROOT / "scripts" / "gpu_acceptance.py"
GiB = 1 << 30


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


def test_estimate_judge_reports_each_error_and_holds_the_15_percent_target() -> None:
    rows = [{"model": "cnn", "precision": "fp32", "estimate": 1_100, "peak": 1_000},
            {"model": "cnn", "precision": "amp", "estimate": 900, "peak": 1_000}]
    ok = judge.estimates("e", rows)
    assert ok.status == "PASS" and ok.summary == "cnn fp32 +10.0%, cnn amp -10.0%"
    bad = judge.estimates("e", rows + [{"model": "tinyunet", "precision": "amp", "estimate": 600, "peak": 1_000}])
    assert bad.status == "FAIL" and "tinyunet amp off by -40.0%" in bad.reason
    assert judge.estimates("e", [{"model": "mlp", "precision": "fp32", "error": "out of memory"}]).status == "FAIL"


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


def test_overhead_judge_is_the_median_ratio_of_pairs() -> None:
    pairs = [(10.0, 10.05), (10.0, 10.2), (10.0, 9.9)]
    ok = judge.overhead("o", pairs, {"lightning": [(10.0, 12.0)]})
    assert ok.status == "PASS" and ok.summary.startswith("runner 1.005× the bare loop (median of 3 pairs)")
    assert "lightning 1.200×" in ok.summary
    assert judge.overhead("o", [(10.0, 11.0)], {}).status == "FAIL"
    assert judge.overhead("o", [], {}).status == "FAIL"


def test_verdicts_need_reasons_and_write_both_reports(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        verdict.Verdict("x", "FAIL", "1 2 3")
    results = [verdict.passed("a", "1 step"), verdict.skipped("b", "one GPU"), verdict.failed("c", "2", "broke")]
    assert results[1].line() == "SKIP b: not run — one GPU [0 s]"
    assert verdict.exit_code(results) == 1 and verdict.exit_code(results[:2]) == 0
    verdict.write(tmp_path, results, {"torch": "2.14.1"})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["exit_code"] == 1 and [c["status"] for c in data["checks"]] == ["PASS", "SKIP", "FAIL"]
    md = (tmp_path / "report.md").read_text()
    assert "| c | FAIL | 2 | broke |" in md and "1 PASS, 1 FAIL, 1 SKIP" in md


# --- the script ------------------------------------------------------------------------------------

def test_dry_run_lists_every_check_and_the_shell_line_without_cuda() -> None:
    from scripts.gpu_acceptance import CHECKS

    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr
    for name, *_ in CHECKS:
        assert f"  - {name} [" in out.stdout
    assert out.stdout.rstrip().endswith(SHELL_LINE)
    assert SHELL_LINE in (ROOT / "README.md").read_text()  # the documented line is the one printed
    assert f"--no-index --no-deps --no-compile --target \"$T/site\" {BUNDLE}/wheels/*.whl" in SHELL_LINE
    wanted = ["fp16", "syncs", "memory", "estimate", "auto", "OOM", "retry", "dp", "NCCL", "Ctrl+C", "bf16", "overhead"]
    assert all(word in out.stdout for word in wanted)


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "needs CUDA" in out.stderr
    assert not (tmp_path / "report.json").exists()


# --- readback and the in-process helpers on a real CPU run -----------------------------------------

@pytest.mark.slow
def test_readback_and_judging_of_a_real_cpu_run(tmp_path: Path) -> None:
    from tests.support.runs import run_runner

    out = run_runner("train", "--model", "cnn", "--image-size", "16", "--samples", "32", "--batch-size", "4",
                     "--steps", "4", "--log-every", "2", "--images-every", "2", "--hist-every", "2", "--no-progress",
                     "--device", "cpu", "--run-dir", str(tmp_path), "--name", "cpu")
    assert out.code == 0, out.stderr
    board = readback.board(tmp_path / "cpu")
    assert board.steps("train/loss") == [2, 4] and board.images and board.graph
    assert board.steps("memory/rss") == [1, 2, 3, 4]
    result = judge.streams("cpu", 0, {t: board.steps(t) for t in board.scalars}, board.images, board.histograms,
                           board.graph, {"plot": 3, "image": 1}, 4, 2, None)
    assert result.status == "PASS", result.reason


@pytest.mark.slow
def test_inprocess_memory_helper_runs_on_cpu(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    subprocess.run([sys.executable, "-m", "scripts.gpu_checks.inprocess", "memory", str(target), "--device", "cpu",
                    "--steps", "4", "--size", "16", "--batch", "4", "--log-every", "2"], check=True, cwd=ROOT,
                   timeout=300)
    data = json.loads(target.read_text())
    assert data["exit_code"] == 0 and data["reference"] == [0.0] * 4  # one reading per optimizer update
    assert sorted(int(s) for s in data["series"]["memory/rss"]) == [1, 2, 3, 4]


@pytest.mark.slow
def test_inprocess_overhead_helper_runs_on_cpu(tmp_path: Path) -> None:
    target = tmp_path / "o.json"
    subprocess.run([sys.executable, "-m", "scripts.gpu_checks.inprocess", "overhead", str(target), "--device", "cpu",
                    "--steps", "3", "--size", "16", "--batch", "4", "--pairs", "1"], check=True, cwd=ROOT, timeout=300)
    data = json.loads(target.read_text())
    assert len(data["pairs"]) == 1 and all(t > 0 for t in data["pairs"][0])
    assert judge.overhead("o", [tuple(p) for p in data["pairs"]], {}).summary.startswith("runner ")


def test_post_mortem_readback_of_a_snapshot_file(tmp_path: Path) -> None:
    import pickle

    folder = tmp_path / "oom"
    folder.mkdir()
    (folder / "memory_summary.txt").write_text("|  PyTorch CUDA memory summary, device ID 0  |")
    snapshot = {"segments": [], "device_traces": [[{"action": "alloc", "addr": 1, "size": 512, "stream": 0,
                                                     "frames": []},
                                                    {"action": "oom", "addr": 0, "size": 1 << 40, "stream": 0,
                                                     "frames": []}]]}
    (folder / "memory_snapshot.pickle").write_bytes(pickle.dumps(snapshot))
    pm = readback.post_mortem(folder)
    assert pm.files == ["memory_snapshot.pickle", "memory_summary.txt"]
    assert pm.snapshot_keys == ["device_traces", "segments"] and pm.snapshot_ooms == 1
    assert readback.post_mortem(tmp_path / "none").files == []


# --- the bundle ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_bundle_is_small_and_installs_offline(tmp_path: Path) -> None:
    """What `make gpu-bundle` runs, into a temporary folder; then the shell line's install, offline,
    for the GPU machine's Python 3.12 (this machine's Python imports the pure packages)."""
    bundle = tmp_path / BUNDLE
    out = subprocess.run([sys.executable, "-m", "scripts.gpu_checks.bundle", "build", str(bundle)], cwd=ROOT,
                         capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, out.stderr[-2000:]
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < LIMIT
    assert re.search(rf"{re.escape(str(bundle))}: \d+\.\d MiB", out.stdout)
    wheels = sorted(p.name for p in (bundle / "wheels").iterdir())
    for name in ("visdom-0.2.4-", "tornado-6.5", "google_crc32c-", "tomli_w-", "jsonpatch-", "websocket_client-"):
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
               str(site), "--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
               *map(str, sorted((bundle / "wheels").iterdir()))]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    subprocess.run([sys.executable, "-m", "tarfile", "-e", str(bundle / "visdom_static.tar.xz"), str(site / "visdom")],
                   check=True, timeout=300)
    assert (site / "visdom" / "static" / "version.built").read_text().strip() == "0.2.4"
    code = "import visdom, tornado, jsonpatch, websocket, tomli_w; print(visdom.__file__, tornado.__file__)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(site)))
    assert probe.returncode == 0, probe.stderr
    assert all(path.startswith(str(site)) for path in probe.stdout.split()), probe.stdout


# --- the checks' own code, rehearsed on CPU -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checks_rehearse_on_cpu(tmp_path: Path) -> None:
    """The GPU checks' runs and readback, on CPU with small images: each verdict is what CPU can give, so
    any failure left is in the checks' code (run, parse, read back), not in the GPU."""
    from scripts.gpu_checks import runs
    from tests.support.visdom_server import VisdomServer

    with VisdomServer(tmp_path / "visdom") as server:
        ctx = runs.Context(work=tmp_path / "work", gpus=0, total_memory=0, visdom_url=server.url, device="cpu",
                           size=32, batch=4)
        ctx.work.mkdir()
        fp16, syncs, nvml = runs.streams(ctx, "fp16", 300)
    # everything but what only CUDA has: CPU autocast is bf16 without a GradScaler, no sync debug, no NVML
    assert fp16.status == "FAIL" and fp16.reason == "no train/amp_scale under fp16 + GradScaler", fp16.reason
    assert fp16.numbers["visdom"].get("image", 0) >= 1 and fp16.numbers["scalar_tags"] > 10
    assert syncs.reason.startswith("the trainer wrote no sync report")
    assert "memory/gpu_total never logged" in nvml.reason
    dp = runs.data_parallel(ctx, 300)[0]
    assert dp.status == "PASS", dp.reason
    stop = runs.interrupt(ctx, 300)[0]
    assert stop.numbers["pids"] >= 6  # supervisor, trainer, 4 workers
    assert "NVML unavailable" in stop.summary and "exit 130" in stop.summary, stop.summary
    # (whether all were gone within 5 s is not asserted here: this machine's load decides that)

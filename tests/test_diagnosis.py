"""Findings from real runs through the CLI: each kind provoked by a user factory or a flag, checked in
findings.json, on the console (one line, once) and in `runner report --json`; a healthy run raises none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.diagnosis import gradient_rules, rules
from tests.support.report import report_json

TINY = ["--image-size", "16", "--batch-size", "4", "--no-progress", "--no-graph", "--resume", "never"]


def train(cli, run_dir: Path, name: str, *args: str) -> tuple[list[dict], str]:
    """Run `runner train` in-process; returns findings.json and the console output."""
    out = cli("train", *TINY, "--run-dir", str(run_dir), "--name", name, *args)
    findings = json.loads((run_dir / name / "findings.json").read_text())
    return findings, out.stderr


def only(findings: list[dict], kind: str) -> dict:
    matching = [f for f in findings if f["kind"] == kind]
    assert len(matching) == 1, findings
    return matching[0]


def check_console_and_report(console: str, finding: dict, run_dir: Path, name: str) -> dict:
    """The console shows the finding once, on one line; the report lists it with its evidence."""
    lines = [line for line in console.splitlines() if f"{finding['severity'].upper()} {finding['kind']}" in line]
    assert len(lines) == 1, console
    assert finding["message"] in lines[0] and finding["advice"] in lines[0]
    report = report_json(run_dir, name)
    assert finding in report["findings"]
    return report


def test_input_bound_from_a_slow_dataset(cli, tmp_path: Path) -> None:
    findings, console = train(cli, tmp_path, "slow", "--model", "mlp",
                              "--data", "tests.support.models:input_bound_data",
                              "--batch-size", "2", "--steps", "13", "--log-every", "1", "--viz", "none")
    finding = only(findings, "input_bound")
    assert finding["severity"] == "warning" and finding["evidence"]["workers"] == 0
    assert min(finding["evidence"]["share"]) > rules.INPUT_BOUND_SHARE
    assert "--workers" in finding["advice"]
    report = check_console_and_report(console, finding, tmp_path, "slow")
    assert report["status"] == "finished"


def test_unreadable_samples_from_a_dataset_with_broken_files(cli, tmp_path: Path) -> None:
    findings, console = train(cli, tmp_path, "broken", "--model", "mlp", "--data",
                              "tests.support.models:unreadable_data", "--steps", "8", "--log-every", "2",
                              "--viz", "none")
    finding = only(findings, "unreadable_samples")
    evidence = finding["evidence"]  # every fourth sample is broken: about a quarter of those loaded
    assert 0.1 <= evidence["share"] <= 0.4 and evidence["share"] == evidence["skipped"] / evidence["loaded"]
    assert evidence["files"] and all(name.startswith("sample ") and name.endswith("(OSError)")
                                     for name in evidence["files"]), evidence
    check_console_and_report(console, finding, tmp_path, "broken")


def test_exploding_gradients_from_a_learning_rate_too_large(cli, tmp_path: Path) -> None:
    findings, console = train(cli, tmp_path, "lr", "--model", "tests.support.models:linear_denoiser", "--task",
                              "denoise", "--samples", "32", "--optimizer", "sgd", "--lr", "2", "--steps", "16",
                              "--log-every", "2", "--hist-every", "1", "--images-every", "1000",
                              "--on-nan", "skip", "--viz", "tensorboard")
    finding = only(findings, "exploding_gradients")
    assert finding["severity"] == "error" and finding["evidence"]["layer"] in ("weight", "bias")
    assert finding["evidence"]["ratio"] == "inf" or finding["evidence"]["ratio"] >= gradient_rules.EXPLODE_FACTOR
    check_console_and_report(console, finding, tmp_path, "lr")
    assert finding["message"] in tensorboard_texts(tmp_path / "lr", "findings")  # emitted back through the hub


def tensorboard_texts(run_path: Path, prefix: str) -> str:
    """Every text TensorBoard holds under tags starting with `prefix`, read back with EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    accumulator = EventAccumulator(str(run_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    texts = [tensor_util.make_ndarray(e.tensor_proto).item().decode() for tag in accumulator.Tags()["tensors"]
             if tag.startswith(prefix) for e in accumulator.Tensors(tag)]
    return "\n".join(texts)


def test_memory_growth_from_a_model_that_keeps_its_outputs(tmp_path: Path) -> None:
    """In a process of its own: in the test process, memory freed by earlier runs would absorb the leak."""
    from tests.support.runs import run_runner

    out = run_runner("train", *TINY, "--run-dir", str(tmp_path), "--name", "leak", "--model",
                     "tests.support.models:leaky_model", "--data", "tests.support.models:Shapes", "--steps", "30",
                     "--log-every", "2", "--viz", "none")
    assert out.code == 0, out.stderr
    findings, console = json.loads((tmp_path / "leak" / "findings.json").read_text()), out.stderr
    finding = only(findings, "memory_growth")
    assert finding["evidence"]["measure"] == "host RSS"
    assert finding["evidence"]["slope_mib_per_100_steps"] >= rules.MEMORY_SLOPE_MIB_PER_100
    check_console_and_report(console, finding, tmp_path, "leak")


def test_first_nonfinite_names_the_module(cli, tmp_path: Path) -> None:
    out = cli("train", *TINY, "--run-dir", str(tmp_path), "--name", "nan", "--model", "tests.support.models:nan_at_6",
              "--data", "tests.support.models:Shapes", "--steps", "12", "--log-every", "2", "--checkpoint-every", "2",
              "--viz", "none")  # --on-nan stop: the failed window is re-run on the last checkpoint's weights
    assert out.code != 0
    findings = json.loads((tmp_path / "nan" / "findings.json").read_text())
    finding = only(findings, "first_nonfinite")
    assert finding["evidence"]["module"] == "encoder.block2.1" and finding["evidence"]["where"] == "forward"
    report = check_console_and_report(out.stderr, finding, tmp_path, "nan")
    assert report["status"] == "failed"


def test_healthy_run_raises_no_warning(cli, tmp_path: Path) -> None:
    """The demo's workload, smaller: Tiny-UNet denoising, histograms and images on, a log point every
    2 steps so that every rule has points after warm-up to judge."""
    findings, console = train(cli, tmp_path, "healthy", "--model", "tinyunet", "--image-size", "16",
                              "--batch-size", "8", "--steps", "40", "--log-every", "2", "--images-every", "10",
                              "--hist-every", "5", "--viz", "tensorboard")
    assert [f for f in findings if f["severity"] in ("warning", "error")] == []
    summary = json.loads((tmp_path / "healthy" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 40
    assert "WARNING" not in console and "ERROR" not in console


@pytest.mark.slow
def test_straggler_rank_under_ddp(tmp_path: Path) -> None:
    from tests.support.runs import run_runner

    out = run_runner("train", *TINY, "--run-dir", str(tmp_path), "--name", "ddp", "--strategy", "ddp",
                     "--nproc", "2", "--device", "cpu", "--model", "mlp", "--data",
                     "tests.support.models:slow_rank1_data", "--steps", "16", "--log-every", "2", "--viz", "none")
    assert out.code == 0, out.stderr
    findings = json.loads((tmp_path / "ddp" / "findings.json").read_text())
    finding = only(findings, "straggler_rank")
    assert finding["evidence"]["rank"] == 1 and "data wait" in finding["advice"]
    check_console_and_report(out.stderr, finding, tmp_path, "ddp")


def test_dashboard_trouble_when_visdom_is_unreachable(cli, tmp_path: Path, monkeypatch) -> None:
    """Nothing listens on the Visdom URL: the hub's `telemetry/unreachable_s` grows at each log point.
    The threshold is lowered from 30 s so that the run stays short; the path is the real one."""
    monkeypatch.setattr(rules, "UNREACHABLE_S", 1.0)
    findings, console = train(cli, tmp_path, "away", "--model", "mlp",
                              "--data", "tests.support.models:input_bound_data",  # 0.4 s a step: past 1 s by step 4
                              "--batch-size", "2", "--steps", "8", "--log-every", "1", "--viz", "visdom",
                              "--visdom-url", "http://127.0.0.1:8399", "--images-every", "1000", "--hist-every", "1000")
    finding = only(findings, "dashboard_trouble")
    assert finding["evidence"]["unreachable_s"] >= 1.0 and "runner dashboards replay" in finding["advice"]
    check_console_and_report(console, finding, tmp_path, "away")

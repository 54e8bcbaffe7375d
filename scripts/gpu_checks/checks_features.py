"""Checks for the features built beside the acceptance run: stall detection with NCCL's flight recorder,
evaluation under AMP, --compile, and runner.observe around an own CUDA loop. Each returns Verdicts; a
failed run's own error comes first in its verdict's reason."""

from __future__ import annotations

import json
from pathlib import Path

from runner.telemetry import tags
from scripts.gpu_checks import judge_features, readback
from scripts.gpu_checks.runs import Context, execute, explain, healthy, runner, train_args
from scripts.gpu_checks.verdict import Verdict, amend

STALL_FRAME = "gpu_checks/models.py"  # the sleeping forward, as py-spy and faulthandler both name its file


def stall(ctx: Context, timeout: float) -> list[Verdict]:
    """One NCCL rank asleep in its forward at step 6: the stall watch captures stacks, heartbeats and the
    flight recorder's dump, reports the stall, and --on-stall stop ends the run."""
    name = "stall"
    out = runner(ctx, name, train_args(ctx, name, "--strategy", "ddp", "--nproc", "1", "--model",
                                       "scripts.gpu_checks.models:stall_at_step_6", "--image-size", "32",
                                       "--batch-size", "8", "--steps", "20", "--log-every", "1", "--stall-timeout",
                                       "5", "--on-stall", "stop", "--viz", "tensorboard", "--no-graph"), timeout)
    captures = sorted(p for p in (ctx.runs / name / "stall").glob("*") if p.is_dir())
    files = sorted(p.name for p in captures[-1].iterdir()) if captures else []
    stacks = _read(captures[-1] / "stacks.txt") if captures else ""
    kinds = [str(r.get("kind")) for r in _jsonl(ctx.runs / name / "stall" / "findings.jsonl")]
    verdict = judge_features.stall("stall with flight recorder", out.code, files, stacks, kinds, STALL_FRAME)
    return [explain(verdict, out) if verdict.status == "FAIL" else verdict]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _jsonl(path: Path) -> list[dict]:
    records = []
    for line in _read(path).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def evaluation(ctx: Context, timeout: float) -> list[Verdict]:
    """--val-split and --eval-every under --amp (fp16 + GradScaler on CUDA): evaluation in autocast."""
    name, steps, every = "val-amp", 20, 5
    out = runner(ctx, name, train_args(ctx, name, "--model", "tinyunet", "--image-size", "128", "--batch-size",
                                       str(ctx.batch), "--amp", "--val-split", "0.2", "--eval-every", str(every),
                                       "--steps", str(steps), "--log-every", "5", "--viz", "tensorboard",
                                       "--no-graph"), timeout)
    board = readback.board(ctx.runs / name)
    val = {tag: board.scalars[tag] for tag in board.scalars if tag.startswith(tags.VAL)}
    verdict = judge_features.evaluation("evaluation under AMP", val, every, steps)
    return [healthy(amend(verdict, [board.error] if board.error else []), out, ctx.runs / name)]


def compiled(ctx: Context, timeout: float) -> list[Verdict]:
    """--compile with AMP: inductor and Triton on this GPU, the compile time apart from the steps'."""
    name, steps, every = "compile", 12, 4
    out = runner(ctx, name, train_args(ctx, name, "--model", "tinyunet", "--image-size", "128", "--batch-size",
                                       str(ctx.batch), "--amp", "--compile", "--steps", str(steps), "--log-every",
                                       str(every), "--viz", "tensorboard", "--no-graph"), timeout)
    board = readback.board(ctx.runs / name)
    verdict = judge_features.compiled("compile", board.values(tags.COMPILE_S), board.scalars.get(tags.LOSS, {}),
                                      range(every, steps + 1, every))
    return [healthy(amend(verdict, [board.error] if board.error else []), out, ctx.runs / name)]


def own_loop(ctx: Context, timeout: float) -> list[Verdict]:
    """runner.observe around a plain loop with the user's own GradScaler (scripts/gpu_checks/own_loop.py)."""
    name, steps, every = "observe", 20, 5
    out = execute(ctx, name, ["-m", "scripts.gpu_checks.own_loop", str(ctx.runs), name, str(steps), ctx.device],
                  timeout)
    board = readback.board(ctx.runs / name)
    wanted = [tags.LOSS, tags.STEP_MS, tags.MEMORY + ("allocated" if ctx.device == "cuda" else "rss")]
    verdict = judge_features.own_loop("runner.observe", board.steps(tags.LOSS), range(every, steps + 1, every),
                                      list(board.scalars), wanted)
    return [healthy(amend(verdict, [board.error] if board.error else []), out, ctx.runs / name)]

"""The CUDA memory checks: the per-step series, the estimate against two real steps, --batch-size auto
and a real out-of-memory under a per-process budget, --oom retry. Each returns Verdicts; a failed run's
own error comes first in its verdict's reason."""

from __future__ import annotations

import re

from runner.telemetry import tags
from scripts.gpu_checks import judge, readback
from scripts.gpu_checks.runs import Context, GiB, error_tail, explain, inprocess, runner, train_args
from scripts.gpu_checks.verdict import Verdict, amend

# (model, image side, batch, precision), the row that matters most first: a run's default on a GPU
ESTIMATED = (("tinyunet", 256, 16, "amp"), ("tinyunet", 256, 16, "fp32"), ("resnet18", 128, 64, "amp"),
             ("resnet18", 128, 64, "fp32"), ("cnn", 128, 64, "amp"), ("mlp", 128, 64, "fp32"))


def memory_series(ctx: Context, timeout: float) -> list[Verdict]:
    data, error = inprocess(ctx, "memory", timeout, "--steps", "12", "--size", "128", "--batch", "16",
                            "--log-every", "4")
    if data is None:
        return [judge.failed("per-step CUDA memory", "no run", error or "the helper wrote nothing")]
    series = {tag: {int(s): v for s, v in values.items()} for tag, values in data["series"].items()}
    verdict = judge.memory_series("per-step CUDA memory", series, data["steps"], data["reference"])
    return [amend(verdict, [error] if error else [], first=True)]


def estimates(ctx: Context, timeout: float) -> list[Verdict]:
    rows = [",".join(map(str, row)) for row in ESTIMATED]
    data, error = inprocess(ctx, "estimates", timeout, "--rows", ";".join(rows))
    found = (data or {}).get("rows", [])
    verdict = judge.estimates("estimate vs measured", found, len(ESTIMATED))
    return [amend(verdict, [error] if error else [], first=True)]


# --- --batch-size auto under a budget; real OOM at step K; --oom retry ------------------------------

AUTO_BUDGET = 6 * GiB
OOM_STEP = 3  # models.oom_at_step_3's (that module imports torch; this one must not)
TRIAL = re.compile(r"batch\s+(\d+): (fits|does not fit)")


def auto_batch(ctx: Context, timeout: float) -> list[Verdict]:
    name, cap = "auto", 1024
    out = runner(ctx, name, train_args(ctx, name, "--model", "tinyunet", "--image-size", "256", "--amp",
                                       "--batch-size", "auto", "--max-batch-size", str(cap), "--samples", "4096",
                                       "--steps", "3", "--log-every", "1", "--viz", "tensorboard", "--no-graph"),
                 timeout, ctx.budget_env(AUTO_BUDGET))
    trials = [(int(b), verdict == "fits") for b, verdict in TRIAL.findall(out.stderr)]
    chosen_match = re.search(r"using (\d+) \(", out.stderr)
    chosen = int(chosen_match.group(1)) if chosen_match else None
    largest = max((b for b, fits in trials if fits), default=None)
    ctx.facts["auto_largest"] = largest
    peaks = readback.board(ctx.runs / name).values(tags.MEMORY + "peak")
    verdict = judge.auto_batch("batch size auto", out.code, AUTO_BUDGET, chosen, cap, trials, max(peaks, default=None))
    return [explain(verdict, out)]


def oom_at_step(ctx: Context, timeout: float) -> list[Verdict]:
    name = "oom"
    out = runner(ctx, name, train_args(ctx, name, "--model", "scripts.gpu_checks.models:oom_at_step_3",
                                       "--image-size", "64", "--batch-size", "8", "--steps", "6", "--log-every", "1",
                                       "--checkpoint-every", "100", "--memory-snapshot", "--viz", "tensorboard",
                                       "--no-graph"),
                 timeout, ctx.budget_env(2 * GiB))
    pm = readback.post_mortem(ctx.runs / name / "oom")
    last_step, problems = _last_step(ctx, name)
    verdict = judge.oom("real OOM at step K", out.code, error_tail(out.stderr), pm.files, pm.summary,
                        pm.snapshot_keys, pm.snapshot_ooms, last_step, OOM_STEP, pm.viewer_ok)
    if verdict.status == "FAIL":  # exit 1 is expected here: the run's own error only when something is wrong
        verdict = explain(verdict, out)
    return [amend(verdict, problems)]


def _last_step(ctx: Context, name: str) -> tuple[int | None, list[str]]:
    last = ctx.runs / name / "checkpoints" / "last.pt"
    if not last.is_file():
        return None, []
    try:
        from runner.train import checkpoint

        return int(checkpoint.load(last)["step"]), []
    except Exception as exc:
        return None, [f"last.pt unreadable: {type(exc).__name__}: {exc}"]


def oom_retry(ctx: Context, timeout: float) -> list[Verdict]:
    name, steps = "retry", 4
    largest = ctx.facts.get("auto_largest") or 64
    batch = 4 * largest  # two halvings from out of memory to what the search found to fit
    out = runner(ctx, name, train_args(ctx, name, "--model", "tinyunet", "--image-size", "256", "--amp",
                                       "--batch-size", str(batch), "--samples", str(2 * batch), "--steps", str(steps),
                                       "--log-every", "1", "--oom", "retry", "--viz", "tensorboard", "--no-graph"),
                 timeout, ctx.budget_env(AUTO_BUDGET))
    board = readback.board(ctx.runs / name)
    verdict = judge.oom_retry("oom retry", out.code, board.texts.get(tags.MEMORY_OOM, []), batch,
                              board.steps(tags.LOSS), steps)
    return [explain(verdict, out)]

"""The training-health rules: a loss spike, a run diverging before any NaN, a run that stopped learning.

They read what the trainer sends at every log point: the window's mean loss and its largest and
smallest step loss (`train/loss_max`, with its step), the global gradient norm measured at every step
(`norms/grad_global`, its window maximum, the largest layer's), the task's metric, and for
denoising the noisy input's own PSNR. The advice combines the evidence: a spike with a gradient-norm
jump is the learning rate; a spike without one is the data.
"""

from __future__ import annotations

import math
import statistics

from runner.diagnosis.evidence import finding, significant
from runner.diagnosis.history import History
from runner.telemetry import tags
from runner.telemetry.events import Finding

# loss_spike: a step's loss 10× the run's recent level. Healthy training falls fastest at the start,
# yet the first steps of the demo's Tiny-UNet lose only 2.2× within the first window (0.35 → 0.15),
# and step-to-step noise in a window is well under 2×; a 10× jump is a blow-up, not noise. The recent
# level is the median of the last 8 log points' mean losses before this one and this window's
# smallest step loss (the only level there is at the first log point).
SPIKE_FACTOR = 10.0
SPIKE_HISTORY = 8
# A gradient-norm jump goes with it when the window's largest global norm is 10× the recent median
# of the windows' mean norms (or, at the first log point, 10× this window's smallest).
GRAD_JUMP_FACTOR = 10.0

# diverging: the mean loss rising at 4 log points in a row to at least twice where it started, or,
# after warm-up (early steps may raise the gradient norm while the loss falls), the global gradient
# norm rising at 4 log points in a row to 10× where it started. Either is a trend no noise makes.
DIVERGE_POINTS = 4
DIVERGE_LOSS_RATIO = 2.0
DIVERGE_GRAD_RATIO = 10.0

# not_learning: after warm-up, 4 log points whose loss fell by less than 5 % in all, and a metric at
# chance: mean accuracy at most 1.5× 1/classes (a window of 160 samples at chance 0.1 has a standard
# error of 0.024, so a mean over 4 windows stays far below 0.15), or a denoised output whose PSNR is
# not 0.5 dB above the noisy input's (the network adds nothing to its input).
NOT_LEARNING_POINTS = 4
FLAT_DROP = 0.05
CHANCE_FACTOR = 1.5
PSNR_MARGIN_DB = 0.5


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def _lr_advice(h: History) -> str:
    lr = h.facts.config.get("lr")
    clip = h.facts.config.get("clip_grad_norm")
    parts = [f"lower --lr (now {lr})" if lr is not None else "lower --lr"]
    parts.append(f"clip gradients harder (now --clip-grad-norm {clip})" if clip else
                 "clip gradients (--clip-grad-norm 1.0)")
    parts.append("or warm the learning rate up over the first steps")
    return ", ".join(parts)


def loss_spike(h: History, step: int) -> Finding | None:
    peak, at, low = (h.value(t, step) for t in (tags.LOSS_MAX, tags.LOSS_MAX_STEP, tags.LOSS_MIN))
    if peak is None or at is None:
        return None
    before = [v for s, v in h.series(tags.LOSS) if s < step and math.isfinite(v)][-SPIKE_HISTORY:]
    reference = before + ([low] if low is not None and math.isfinite(low) else [])
    if not reference:
        return None
    median = statistics.median(reference)
    if median <= 0 or peak < SPIKE_FACTOR * median:
        return None
    grad_max = h.value(tags.GRAD_GLOBAL_MAX, step)
    grads_before = [v for s, v in h.series(tags.GRAD_GLOBAL) if s < step and math.isfinite(v)][-SPIKE_HISTORY:]
    usual_grad = statistics.median(grads_before) if grads_before else h.value(tags.GRAD_GLOBAL_MIN, step)
    jump = bool(grad_max and usual_grad and grad_max >= GRAD_JUMP_FACTOR * usual_grad)
    evidence = {"step": int(at), "loss": significant(peak), "median": significant(median), "log_point": step,
                "grad_norm_max": significant(grad_max) if grad_max is not None else None,
                "grad_norm_usual": significant(usual_grad) if usual_grad else None,
                "largest_layer": h.grad_layer(step), "lr": h.facts.config.get("lr"),
                "optimizer": h.facts.config.get("optimizer")}
    if jump:
        advice = (f"the gradient norm jumped with it ({usual_grad:.3g} → {grad_max:.3g}, largest in "
                  f"{h.grad_layer(step) or 'one layer'}): the step size is too large for this model; "
                  + _lr_advice(h))
    else:
        advice = (f"the gradient norm did not jump: look at the batch of step {int(at)} (extreme values, "
                  "wrong labels, a corrupt file); if it recurs, " + _lr_advice(h))
    return finding("loss_spike", "warning", step,
                   f"the loss spiked to {peak:.4g} at step {int(at)}, {peak / median:,.0f}× its recent median "
                   f"{median:.4g}" + (" with a gradient-norm jump" if jump else ""), evidence, advice)


def _rising(series: list[tuple[int, float]], ratio: float) -> bool:
    values = [v for _, v in series]
    return (len(values) == DIVERGE_POINTS and _finite(values) and values[0] > 0
            and all(b > a for a, b in zip(values, values[1:], strict=False)) and values[-1] >= ratio * values[0])


def diverging(h: History, step: int) -> Finding | None:
    loss = h.series(tags.LOSS)[-DIVERGE_POINTS:]
    steady = set(h.steady)
    grads = [(s, v) for s, v in h.series(tags.GRAD_GLOBAL) if s in steady][-DIVERGE_POINTS:]
    loss_up, grads_up = _rising(loss, DIVERGE_LOSS_RATIO), _rising(grads, DIVERGE_GRAD_RATIO)
    if not (loss_up or grads_up):
        return None
    what = " and ".join(w for w, up in (("the loss", loss_up), ("the gradient norm", grads_up)) if up)
    series = loss if loss_up else grads
    evidence = {"steps": [s for s, _ in series], "loss": [significant(v) for _, v in loss],
                "grad_norm": [significant(v) for _, v in grads], "largest_layer": h.grad_layer(step),
                "lr": h.facts.config.get("lr"), "optimizer": h.facts.config.get("optimizer")}
    return finding("diverging", "warning", step,
                   f"{what} rose at each of the last {DIVERGE_POINTS} log points (steps {series[0][0]}–"
                   f"{series[-1][0]}): the run is diverging, and NaN usually follows", evidence,
                   _lr_advice(h))


def not_learning(h: History, step: int) -> Finding | None:
    points = list(h.steady)[-NOT_LEARNING_POINTS:]
    if len(points) < NOT_LEARNING_POINTS:
        return None
    losses = h.values(tags.LOSS, points)
    if losses is None or not _finite(losses) or losses[0] <= 0:
        return None
    if (losses[0] - losses[-1]) / losses[0] >= FLAT_DROP:
        return None
    at_chance = _at_chance(h, points)
    if at_chance is None:
        return None
    sentence, evidence = at_chance
    evidence.update(steps=points, loss=[significant(v) for v in losses])
    spikes = [(s, v) for s, v in h.series(tags.LOSS_MAX) if s < points[0] and v >= SPIKE_FACTOR * losses[-1]]
    if spikes:
        evidence["spike"] = {"log_point": spikes[0][0], "loss": significant(spikes[0][1])}
        advice = (f"it collapsed after the loss spiked (log point {spikes[0][0]}): restart from before it and "
                  + _lr_advice(h))
    else:
        lr = h.facts.config.get("lr")
        advice = ("check that the targets belong to the inputs (a shuffled label list, a wrong folder), that "
                  f"the learning rate is not too small (now {lr}) and that gradients reach the model "
                  "(norms/grad_global)")
    return finding("not_learning", "warning", step,
                   f"the loss stayed flat over the last {NOT_LEARNING_POINTS} log points and {sentence}",
                   evidence, advice)


def _at_chance(h: History, points: list[int]) -> tuple[str, dict] | None:
    """Whether the metric is at chance at `points`: (how, in words; evidence) or None."""
    accuracy = h.values(tags.train("accuracy"), points)
    if accuracy is not None:
        classes = h.facts.classes
        if not classes:
            return None
        mean, chance = statistics.fmean(accuracy), 1.0 / classes
        if mean > CHANCE_FACTOR * chance:
            return None
        return (f"the accuracy is at chance ({mean:.3f}, chance {chance:.3f} for {classes} classes)",
                {"accuracy": [significant(v) for v in accuracy], "chance": significant(chance), "classes": classes})
    psnr, noisy = h.values(tags.train("psnr"), points), h.values(tags.INPUT_PSNR, points)
    if psnr is None or noisy is None:
        return None
    out, base = statistics.fmean(psnr), statistics.fmean(noisy)
    if out > base + PSNR_MARGIN_DB:
        return None
    return (f"the output's PSNR ({out:.2f} dB) is not above the noisy input's ({base:.2f} dB)",
            {"psnr": [significant(v) for v in psnr], "input_psnr": [significant(v) for v in noisy]})

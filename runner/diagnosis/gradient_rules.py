"""The gradient rules: a layer's gradient norm far outside its own history (exploding) or far below
the other layers' (vanishing), from the per-layer norms (`norms/grads/<parameter>`) the trainer sends
at histogram steps.
"""

from __future__ import annotations

import math
import statistics

from runner.diagnosis.evidence import finding, significant
from runner.diagnosis.history import History
from runner.telemetry import tags
from runner.telemetry.events import Finding

# gradients (per-layer norms at histogram steps). Healthy training moves a layer's gradient norm by
# one or two orders of magnitude at most (it shrinks as the loss falls); a 1000× jump over its own
# history is a blow-up. Layers below 1e-4 of the median layer carry no signal (e.g. a conv bias
# before BatchNorm, whose gradient is rounding noise) and are never judged.
EXPLODE_FACTOR = 1000.0
GRAD_MIN_HISTORY = 2  # earlier histogram steps needed before a layer's own history counts
NEGLIGIBLE_SHARE = 1e-4
# vanishing: a layer's share of the median layer's gradient fell 1000× below its own usual share,
# at two histogram steps in a row (all layers shrinking together is convergence, not this).
VANISH_FACTOR = 1e-3
VANISH_POINTS = 2


def _grad_norms(h: History) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """Per-layer gradient norms and their histogram steps; nothing when no new ones came since the last
    log point (the gradient rules then have nothing new to judge, and cost nothing)."""
    layers = [tag for tag, series in h.scalars.items() if tag.startswith(tags.NORMS_GRADS) and series]
    previous = h.log_points[-2] if len(h.log_points) > 1 else -1
    if not layers or max(h.scalars[tag][-1][0] for tag in layers) <= previous:
        return {}, []
    norms = {tag[len(tags.NORMS_GRADS):]: h.series(tag) for tag in layers}
    return norms, sorted({s for series in norms.values() for s, _ in series})


def _at(series: list[tuple[int, float]], step: int) -> float | None:
    return next((v for s, v in series if s == step), None)


def exploding_gradients(h: History, step: int) -> Finding | None:
    norms, hist_steps = _grad_norms(h)
    if not hist_steps:
        return None
    last = hist_steps[-1]
    now = {name: v for name, series in norms.items() if (v := _at(series, last)) is not None}
    finite_now = [v for v in now.values() if math.isfinite(v)]
    median_now = statistics.median(finite_now) if finite_now else 0.0
    worst: tuple[float, str, float, float] | None = None
    for name, value in now.items():
        before = [v for s, v in norms[name] if s < last and math.isfinite(v)]
        if not math.isfinite(value):
            ratio, usual = math.inf, (statistics.median(before) if before else float("nan"))
        elif len(before) >= GRAD_MIN_HISTORY and value >= NEGLIGIBLE_SHARE * median_now:
            usual = statistics.median(before)
            ratio = value / usual if usual > 0 else 0.0
        else:
            continue
        if ratio >= EXPLODE_FACTOR and (worst is None or ratio > worst[0]):
            worst = (ratio, name, value, usual)
    if worst is None:
        return None
    ratio, name, value, usual = worst
    growing = sum(1 for n, v in now.items() if not math.isfinite(v) or v >= EXPLODE_FACTOR * _usual(norms[n], last))
    evidence = {"layer": name, "step": last, "grad_norm": significant(value), "usual_norm": significant(usual),
                "ratio": significant(ratio),
                "median_layer_norm": significant(median_now), "layers_exploding": growing, "layers": len(now),
                "lr": h.facts.config.get("lr"), "optimizer": h.facts.config.get("optimizer")}
    size = "is not finite" if not math.isfinite(value) else f"is {value:.3g}, {ratio:.0f}× its usual {usual:.3g}"
    return finding("exploding_gradients", "error", step,
                    f"the gradient norm of {name} at step {last} {size} ({growing} of {len(now)} layers blew up)",
                    evidence, f"lower --lr (now {h.facts.config.get('lr')}), add gradient clipping or warm-up, "
                              "or check the inputs/targets of that step for extreme values")


def _usual(series: list[tuple[int, float]], before: int) -> float:
    values = [v for s, v in series if s < before and math.isfinite(v)]
    return statistics.median(values) if len(values) >= GRAD_MIN_HISTORY else math.inf


def vanishing_gradients(h: History, step: int) -> Finding | None:
    norms, hist_steps = _grad_norms(h)
    if len(hist_steps) < GRAD_MIN_HISTORY + VANISH_POINTS:
        return None
    shares: dict[str, dict[int, float]] = {name: {} for name in norms}  # layer → step → norm / median layer
    for s in hist_steps:
        now = {name: v for name, series in norms.items() if (v := _at(series, s)) is not None and math.isfinite(v)}
        median = statistics.median(now.values()) if now else 0.0
        if median > 0:
            for name, value in now.items():
                shares[name][s] = value / median
    recent, earlier = hist_steps[-VANISH_POINTS:], hist_steps[:-VANISH_POINTS]
    for name, by_step in shares.items():
        usual = [by_step[s] for s in earlier if s in by_step]
        if len(usual) < GRAD_MIN_HISTORY or statistics.median(usual) < NEGLIGIBLE_SHARE:
            continue
        typical = statistics.median(usual)
        lately = [by_step[s] for s in recent if s in by_step]
        if len(lately) == len(recent) and all(v < VANISH_FACTOR * typical for v in lately):
            evidence = {"layer": name, "steps": recent, "share_of_median_layer": [significant(v) for v in lately],
                        "usual_share": significant(typical)}
            return finding("vanishing_gradients", "warning", step,
                            f"the gradient of {name} fell to {lately[-1]:.2g} of the median layer's "
                            f"(usually {typical:.2g}) at the last {len(recent)} histogram steps", evidence,
                            "check for saturating activations or a dead path before that layer (ReLU that never "
                            "fires, a sigmoid/tanh in saturation); normalisation or residual connections help")
    return None

"""The rule on generalisation: validation loss going up while training loss goes down (overfitting),
from the `val/loss` of each evaluation and the `train/loss` of the log points.
"""

from __future__ import annotations

from runner.diagnosis.evidence import finding, significant
from runner.diagnosis.history import History
from runner.telemetry import tags
from runner.telemetry.events import Finding

# overfitting: one evaluation above the last is noise (a small validation set, a bumpy optimiser);
# validation loss higher at each of the last three evaluations in a row, 2 % above its lowest point
# in that span, while the training loss fell over the same steps, is the model learning the
# training set rather than the task.
OVERFIT_RISES = 3  # consecutive evaluations, each above the one before
OVERFIT_MIN_RISE = 0.02  # the last value at least this much (relative) above the span's first


def overfitting(h: History, step: int) -> Finding | None:
    val = h.series(tags.val("loss"))[-(OVERFIT_RISES + 1):]
    if len(val) < OVERFIT_RISES + 1:
        return None
    values = [v for _, v in val]
    rising = all(b > a for a, b in zip(values, values[1:], strict=False))
    if not rising or values[-1] < values[0] * (1 + OVERFIT_MIN_RISE):
        return None
    first, last = val[0][0], val[-1][0]
    train = [(s, v) for s, v in h.series(tags.LOSS) if s <= last]
    before = [v for s, v in train if s <= first]
    if not before or not train or train[-1][0] <= first or train[-1][1] >= before[-1]:
        return None
    evidence = {"eval_steps": [s for s, _ in val], "val_loss": [significant(v) for v in values],
                "train_loss": [significant(before[-1]), significant(train[-1][1])],
                "train_loss_steps": [max(s for s, _ in train if s <= first), train[-1][0]]}
    return finding("overfitting", "warning", step,
                   f"validation loss rose at each of the last {OVERFIT_RISES} evaluations ({values[0]:.4g} at step "
                   f"{first} → {values[-1]:.4g} at step {last}) while training loss fell ({before[-1]:.4g} → "
                   f"{train[-1][1]:.4g})", evidence,
                   "the model is memorising the training set: keep best.pt (the best validation point), stop "
                   "earlier, add data or augmentation, raise --weight-decay, or use a smaller model")

"""Where a NaN/inf starts: re-run one step with hooks and name the first module (or parameter) at fault.

Called by the trainer once, after a non-finite loss: a one-off cost after the failure, none before.
Forward hooks see modules finish in execution order (a child before its parent), so the first module
whose output is non-finite while its inputs are finite is the innermost one where it starts. When the
whole forward and the loss are finite, backward runs with gradient hooks on the parameters: the first
gradient (in the order backward computes them) that is not finite names the parameter.
Call it with the unwrapped model (no DDP wrapper): a lone rank must not enter a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from runner.telemetry import tags
from runner.telemetry.events import Finding


def _tensors(value: Any) -> list[torch.Tensor]:
    """Floating-point tensors inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _finite(value: Any) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in _tensors(value))


def _describe(value: Any) -> dict[str, Any]:
    """How many values of the first non-finite tensor are NaN / inf, and its shape."""
    for tensor in _tensors(value):
        t = tensor.detach()
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            return {"shape": list(t.shape), "nan": nan, "inf": inf, "numel": t.numel()}
    return {}


def locate_nonfinite(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                     autocast_ctx_factory: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     ) -> dict[str, Any]:
    """Re-run forward (and, if that is finite, backward) on `inputs`; return where non-finite values start.

    Returns {"module": qualified name ("" for the model's own forward code), "where": "forward" |
    "loss" | "gradient" | "not reproduced", "details": {...}}. Buffers (BatchNorm statistics) are put
    back and gradients cleared afterwards, so the model is as it was.
    """
    names = {module: name for name, module in model.named_modules()}
    found: dict[str, Any] = {}
    order: list[str] = []

    def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        order.append(names[module])
        if not found and not _finite(output) and _finite(args) and _finite(kwargs):
            found.update(module=names[module], where="forward",
                         details={"type": type(module).__name__, "output": _describe(output),
                                  "own_parameters_finite": _finite(list(module.parameters(recurse=False))),
                                  "modules_before": len(order) - 1})

    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    handles = [m.register_forward_hook(forward_hook, with_kwargs=True) for m in model.modules()]
    try:
        model.zero_grad(set_to_none=True)
        with autocast_ctx_factory():
            if not _finite(inputs):
                return {"module": "", "where": "forward",
                        "details": {"input": _describe(inputs), "note": "the batch itself is not finite"}}
            output = model(inputs)
            loss = loss_fn(output, targets)
        for handle in handles:
            handle.remove()
        handles = []
        if found:
            return found
        if not _finite(loss):
            return {"module": "", "where": "loss",
                    "details": {"loss": _describe(loss), "note": "the model's output is finite; the loss is not"}}
        return _first_bad_gradient(model, loss)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])
        model.zero_grad(set_to_none=True)


def _first_bad_gradient(model: nn.Module, loss: torch.Tensor) -> dict[str, Any]:
    bad: list[tuple[str, dict[str, Any]]] = []
    handles = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            def hook(grad: torch.Tensor, name: str = name) -> None:
                if not _finite(grad):
                    bad.append((name, _describe(grad)))
            handles.append(param.register_hook(hook))
    try:
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if not bad:
        return {"module": "", "where": "not reproduced",
                "details": {"note": "the re-run step was finite in forward and backward (a non-deterministic "
                                    "or data-order dependent failure)"}}
    name, details = bad[0]
    return {"module": name.rpartition(".")[0], "where": "gradient",
            "details": {"parameter": name, "gradient": details, "parameters_nonfinite": [n for n, _ in bad]}}


def nonfinite_finding(result: dict[str, Any], step: int, rank: int = 0) -> Finding:
    """The `first_nonfinite` finding for what `locate_nonfinite` returned (the trainer emits it)."""
    where, module = result["where"], result["module"] or "the model's own forward code"
    message = {
        "forward": f"the first non-finite value of step {step} comes out of {module} in the forward pass "
                   "(its inputs were finite)",
        "loss": f"the loss of step {step} is non-finite while the model's output is finite",
        "gradient": f"forward was finite at step {step}; the first non-finite gradient is that of "
                    f"{result['details'].get('parameter', module)}",
    }.get(where, f"the loss of step {step} was non-finite, but re-running the step did not reproduce it")
    advice = {
        "forward": f"look at {module}: a division by zero, log/sqrt of a non-positive value, an overflow under "
                   "fp16 (try bf16 or a smaller --lr), or weights already huge from earlier steps",
        "loss": "check the targets and the loss inputs (log of 0, empty classes, targets out of range)",
        "gradient": "a backward overflow: lower --lr, clip gradients, or use bf16 instead of fp16",
    }.get(where, "lower --lr, or run with --on-nan skip to step over the odd batch")
    return Finding(tag=tags.FINDINGS, step=step, rank=rank, kind="first_nonfinite", severity="error",
                   message=message, evidence={"module": result["module"], "where": where, **result["details"]},
                   advice=advice)

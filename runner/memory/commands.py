"""`runner memory`: the estimate before training (torch imported inside the command)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from runner.cli_errors import run_command

if TYPE_CHECKING:
    from torch import nn

    from runner.memory.estimate import Breakdown

_DEFAULT_SHAPE = "3,64,64"


def memory(
    model: str = typer.Option("tinyunet", help="mlp|cnn|resnet18|tinyunet|unet or package.module:factory."),
    input_shape: str = typer.Option(_DEFAULT_SHAPE, help="One sample's shape, e.g. 1,28,28 (C,H,W)."),
    batch_size: int = typer.Option(16, help="Batch size to estimate."),
    optimizer: str = typer.Option("adam", help="sgd|momentum|adam|adamw."),
    num_classes: int = typer.Option(10, help="Classes (classification models)."),
    task: str = typer.Option("auto", help="auto|classify|denoise."),
    amp: bool = typer.Option(False, "--amp", help="Select mixed precision (both are always estimated)."),
    amp_dtype: str = typer.Option("auto", help="auto|fp16|bf16 under --amp, as `runner train` takes it (auto: fp16 "
                                               "with a GradScaler on CUDA, bf16 on CPU)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda: the device to estimate for; on a GPU two real steps "
                                            "are measured too."),
    json_output: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Estimate memory for a model: parameters, gradients, optimizer state, input batch, activations."""
    run_command(lambda: _memory(model, input_shape, batch_size, optimizer, num_classes, task, amp, amp_dtype,
                                device, json_output), debug=debug)


def _parse_shape(text: str) -> tuple[int, ...]:
    from runner.errors import usage_error

    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise usage_error(f"input-shape: expected positive integers like 1,28,28, got {text!r}")
    return shape


def _memory(model_name: str, input_shape: str, batch_size: int, optimizer: str, num_classes: int, task: str,
            amp: bool, amp_dtype: str, device: str, json_output: bool) -> int:
    import json

    import torch

    from runner import config
    from runner.errors import usage_error
    from runner.memory.estimate import estimate
    from runner.memory.report import as_json, format_bytes, rich_table
    from runner.models import build_model

    shape = _parse_shape(input_shape)
    if batch_size < 1:
        raise usage_error(f"batch-size must be at least 1, got {batch_size}")
    cfg = config.TrainConfig(model=model_name, optimizer=optimizer, num_classes=num_classes, task=task,
                             device=device, channels=shape[0], image_size=shape[-1], batch_size=batch_size, amp=amp,
                             amp_dtype=amp_dtype)
    config.validate(cfg)
    device_type = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    model = build_model(model_name, shape[0], shape[-1], num_classes)
    breakdown = estimate(model, shape, batch_size, optimizer, cfg.resolved_task, device_type, amp, model_name,
                         amp_dtype)
    measured = _measure(model, breakdown, cfg.resolved_task) if device_type == "cuda" else None
    if json_output:
        out = as_json(breakdown)
        if measured is not None:
            out["measured"] = measured
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(rich_table(breakdown))
    if measured is None:
        return 0
    if "error" in measured:
        console.print(f"measured on {measured['device']}: {measured['error']}")
    else:
        console.print(f"measured peak on {measured['device']} (two real steps): {format_bytes(measured['peak'])}; "
                      f"estimate {format_bytes(measured['estimate'])} ({measured['error_percent']:+.1f}%)")
    return 0


def _measure(model: nn.Module, breakdown: Breakdown, task: str) -> dict[str, Any]:
    """Two real steps on the GPU: the measured peak beside the estimate, with the error in %."""
    import torch

    from runner.memory.postmortem import is_out_of_memory
    from runner.memory.trial import measured_peak, release

    if not torch.cuda.is_available():
        return {"device": "cuda", "error": "no CUDA device here: estimate only"}
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        peak: int | None = measured_peak(model, breakdown.optimizer, breakdown.input_shape, breakdown.batch_size,
                                         task, breakdown.amp, device, breakdown.amp_dtype)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # cuDNN/cuBLAS failures to allocate too
        if not is_out_of_memory(exc):
            raise
        peak = None
    release(model, device)
    if peak is None:
        return {"device": str(device), "error": f"out of memory at batch {breakdown.batch_size}"}
    estimate = breakdown.total()
    return {"device": str(device), "peak": peak, "estimate": estimate,
            "error_percent": 100.0 * (estimate - peak) / max(peak, 1)}

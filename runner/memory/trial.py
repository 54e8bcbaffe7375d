"""Real training steps on random data, to measure a peak or to see whether a batch fits (CUDA)."""

from __future__ import annotations

import gc

import torch
from torch import nn

from runner.optim import amp_dtype, make_optimizer, make_scaler
from runner.tasks import make_task


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, input_shape: tuple[int, ...], batch: int,
              task: str, amp: bool, device: torch.device, steps: int = 2, amp_choice: str = "auto") -> None:
    """`steps` steps in the trainer's order (forward, zero_grad, backward, step): the first creates the
    optimizer state, the second has the previous gradients alive during forward, as training does.
    `amp_choice` is the run's --amp-dtype: the dtype and whether a GradScaler runs are the run's own."""
    loss_of = make_task(task).loss
    scaler = make_scaler(device.type, amp, amp_choice)
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype(device.type, True, amp_choice), enabled=amp)
    model.train()
    for _ in range(steps):
        inputs = torch.rand(batch, *input_shape, device=device)
        targets = (torch.zeros(batch, dtype=torch.long, device=device) if task == "classify"  # class 0 always exists
                   else torch.rand(batch, *input_shape, device=device))
        with autocast:
            loss = loss_of(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        del inputs, targets, loss


def measured_peak(model: nn.Module, optimizer_name: str, input_shape: tuple[int, ...], batch: int, task: str,
                  amp: bool, device: torch.device, amp_choice: str = "auto", benchmark: bool = True) -> int:
    """Peak bytes allocated on a CUDA device over two real steps, counting everything this process
    holds there (the model's parameters too). Moves `model` to `device`; raises what
    `postmortem.is_out_of_memory` recognises when the batch does not fit. The trainer's cuDNN
    setting (benchmark on) is used, so that autotuning workspaces count in the peak; `benchmark=False`
    measures without them (the acceptance run reports the workspaces apart from the estimate's parts)."""
    torch.backends.cudnn.benchmark = benchmark
    torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    optimizer = make_optimizer(optimizer_name, model.parameters(), 1e-3, 0.0, fused=True)  # as the trainer's
    run_steps(model, optimizer, input_shape, batch, task, amp, device, amp_choice=amp_choice)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def release(model: nn.Module, device: torch.device) -> None:
    """Drop gradients and collect garbage, then return cached blocks to the device."""
    for param in model.parameters():
        param.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

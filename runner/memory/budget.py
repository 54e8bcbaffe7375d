"""How much memory a step may use: a budget on the CPU, the usable part of a CUDA device.

Shared by `--batch-size auto` and the out-of-memory post-mortem, so both speak of the same number.
On CUDA a per-process cap (`torch.cuda.set_per_process_memory_fraction`, or
`PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:F`) counts: the caching allocator refuses to
go past it, so neither the search nor the advice may assume the whole card.
"""

from __future__ import annotations

import torch

from runner.config import TrainConfig, parse_bytes
from runner.memory.report import format_bytes

RAM_SHARE = 0.5  # default CPU budget: this share of the available RAM


def memory_budget(cfg: TrainConfig) -> tuple[int, str]:
    """The CPU budget in bytes and how it was set."""
    if cfg.memory_budget:
        budget = parse_bytes(cfg.memory_budget)
        return budget, f"--memory-budget {format_bytes(budget)}"
    import psutil

    budget = int(psutil.virtual_memory().available * RAM_SHARE)
    return budget, f"{format_bytes(budget)} ({RAM_SHARE:.0%} of the available RAM; set --memory-budget)"


def cuda_limit(total: int, fraction: float) -> int:
    """The bytes the caching allocator will hand out on a card of `total` bytes under `fraction`."""
    return int(total * fraction)


def cuda_capacity(device: torch.device) -> tuple[int, str]:
    """Bytes this process may still hold on `device` (free + its own cache, within its cap), and a phrase."""
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    if fraction < 1.0:
        capped = cuda_limit(total, fraction)
        if capped < usable:
            return capped, f"the {format_bytes(capped)} usable on {device} (per-process memory fraction {fraction:g})"
    return usable, f"the {format_bytes(usable)} usable on {device}"

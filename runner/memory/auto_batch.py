"""`--batch-size auto`: the largest batch that fits, then 80% of it (headroom for fragmentation,
cuDNN workspaces and the odd larger batch).

Search: powers of two from 1 until a batch does not fit, then bisection between the last that fit and
the first that did not. On CUDA a trial is two real steps on random inputs (optimizer state created,
then a steady-state step); `torch.OutOfMemoryError` means "does not fit", and memory is freed before
the next trial. Elsewhere a trial compares the estimate with a memory budget (--memory-budget,
default half the available RAM); there the estimate is all there is, so the choice is also lowered
until its estimate stays within 80% of the budget (headroom in memory, not only in samples). The
search goes up to cap / 0.8, so that 80% of the largest batch can still reach the cap (the dataset
size or --max-batch-size), which bounds the choice.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from runner.config import TrainConfig, parse_bytes
from runner.errors import RunnerError
from runner.memory.estimate import estimate
from runner.memory.report import format_bytes

KEEP = (4, 5)  # keep 80% of the largest batch that fits
RAM_SHARE = 0.5  # default CPU budget: this share of the available RAM


@dataclass(frozen=True)
class Trial:
    batch: int
    fits: bool
    detail: str

    def line(self) -> str:
        return f"batch {self.batch:>6}: {'fits' if self.fits else 'does not fit'} ({self.detail})"


@dataclass
class BatchSearch:
    """The trials, the largest batch that fit, and the batch chosen."""

    limit: str  # what the trials were measured against
    cap: int
    trials: list[Trial] = field(default_factory=list)
    largest: int = 0
    within_headroom: int | None = None  # CPU: the largest batch whose estimate is within 80% of the budget
    chosen: int = 0

    @property
    def kept(self) -> int:
        """80% of the largest batch that fit."""
        return max(1, self.largest * KEEP[0] // KEEP[1])

    def choose(self) -> None:
        headroom = self.kept if self.within_headroom is None else self.within_headroom
        self.chosen = max(1, min(self.cap, self.kept, headroom))

    def summary(self) -> str:
        if self.chosen == self.kept:
            why = "80% of it"
        elif self.chosen == self.cap:
            why = f"80% would be {self.kept}: capped by the dataset size / --max-batch-size"
        else:
            why = f"80% would be {self.kept}: lowered so that its estimate stays within 80% of the budget"
        return (f"batch size auto: largest that fits {self.largest} against {self.limit}; "
                f"using {self.chosen} ({why}), after {len(self.trials)} trials")

    def text(self) -> str:
        """Markdown for the dashboards: the trials, then the choice."""
        lines = ["| batch | fits | detail |", "|---:|---|---|"]
        lines += [f"| {t.batch} | {'yes' if t.fits else 'no'} | {t.detail} |" for t in self.trials]
        return self.summary() + "\n\n" + "\n".join(lines)


def largest_fitting(fits: Callable[[int], bool], ceiling: int) -> int:
    """The largest batch in [1, ceiling] for which `fits` holds (0 if not even 1), assuming that
    what fits is a prefix: doubling from 1, then bisecting the last gap."""
    good, bad, batch = 0, 0, 1
    while True:
        if not fits(batch):
            bad = batch
            break
        good = batch
        if batch >= ceiling:
            return good
        batch = min(2 * batch, ceiling)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def choose_batch_size(cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                      dataset_len: int) -> BatchSearch:
    """Search, print each trial and the choice on stderr, and return the search (`.chosen`)."""
    cap = max(1, min(dataset_len, cfg.max_batch_size))
    ceiling = math.ceil(cap * KEEP[1] / KEEP[0])
    if device.type == "cuda":
        search = _search_on_device(cfg, model, input_shape, device, cap, ceiling)
    else:
        search = _search_budget(cfg, model, input_shape, device, cap, ceiling)
    search.choose()
    _say(search.summary())
    return search


def _say(line: str) -> None:
    print(f"[auto batch] {line}", file=sys.stderr, flush=True)


def _run(search: BatchSearch, trial: Callable[[int], Trial], ceiling: int) -> None:
    def fits(batch: int) -> bool:
        result = trial(batch)
        search.trials.append(result)
        _say(result.line())
        return result.fits

    search.largest = largest_fitting(fits, ceiling)


def memory_budget(cfg: TrainConfig) -> tuple[int, str]:
    """The CPU budget in bytes and how it was set."""
    if cfg.memory_budget:
        budget = parse_bytes(cfg.memory_budget)
        return budget, f"--memory-budget {format_bytes(budget)}"
    import psutil

    budget = int(psutil.virtual_memory().available * RAM_SHARE)
    return budget, f"{format_bytes(budget)} ({RAM_SHARE:.0%} of the available RAM; set --memory-budget)"


def _search_budget(cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                   cap: int, ceiling: int) -> BatchSearch:
    budget, described = memory_budget(cfg)
    breakdown = estimate(model, input_shape, 1, cfg.optimizer, cfg.resolved_task, device.type, cfg.amp, cfg.model)
    search = BatchSearch(limit=f"a memory budget of {described}", cap=cap)

    def trial(batch: int) -> Trial:
        total = breakdown.total(batch=batch)
        return Trial(batch, total <= budget, f"estimate {format_bytes(total)}")

    _run(search, trial, ceiling)
    if search.largest == 0:
        raise RunnerError(f"--batch-size auto: even a batch of 1 needs about {format_bytes(breakdown.total())}, "
                          f"more than {described}; raise --memory-budget or use a smaller model or --image-size")
    search.within_headroom = breakdown.largest_batch(budget * KEEP[0] // KEEP[1])
    return search


def _search_on_device(cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                      cap: int, ceiling: int) -> BatchSearch:
    """Real trials; the model's weights and the RNG are restored afterwards."""
    from runner.memory.trial import measured_peak, release

    total = torch.cuda.get_device_properties(device).total_memory
    search = BatchSearch(limit=f"{device} ({format_bytes(total)}), two real steps a trial", cap=cap)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def trial(batch: int) -> Trial:
        try:
            peak: int | None = measured_peak(model, cfg.optimizer, input_shape, batch, cfg.resolved_task,
                                             cfg.amp, device)
        except torch.OutOfMemoryError:
            peak = None  # leaving the handler drops the traceback and the failed step's tensors
        release(model, device)
        return Trial(batch, peak is not None, "out of memory" if peak is None else f"peak {format_bytes(peak)}")

    with torch.random.fork_rng(devices=[device]):
        try:
            _run(search, trial, ceiling)
        finally:
            model.load_state_dict(initial)
            release(model, device)
    if search.largest == 0:
        raise RunnerError(f"--batch-size auto: even a batch of 1 runs out of memory on {device} "
                          f"({format_bytes(total)}); try --amp, a smaller --image-size or a smaller model")
    return search

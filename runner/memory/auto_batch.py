"""`--batch-size auto`: the largest batch that fits, then 80% of it (headroom for fragmentation,
cuDNN workspaces and the odd larger batch).

Search: powers of two from 1 until a batch does not fit, then bisection between the last that fit and
the first that did not. On CUDA a trial is two real steps on random inputs (optimizer state created,
then a steady-state step) with cuDNN autotuning on, as in training, so that its workspaces count; an
out-of-memory error (`postmortem.is_out_of_memory`: the allocator's, cuDNN's or cuBLAS's) means "does
not fit", and memory is freed before the next trial. The search never goes past the batch at which
a tensor would hold 2^31 elements (32-bit indexing in many kernels: other errors, not "out of
memory"), nor past a per-process memory cap's reach (the allocator enforces it). Elsewhere a trial
compares the estimate with a memory budget (--memory-budget,
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

from runner.config import TrainConfig
from runner.errors import RunnerError
from runner.memory.budget import cuda_capacity, memory_budget
from runner.memory.estimate import estimate, largest_tensor_per_sample
from runner.memory.postmortem import is_out_of_memory
from runner.memory.report import format_bytes

KEEP = (4, 5)  # keep 80% of the largest batch that fits
INDEX_LIMIT = 2**31 - 1  # elements in one tensor that 32-bit kernel indexing can address


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
    ceiling: int = 0  # the largest batch tried
    trials: list[Trial] = field(default_factory=list)
    largest: int = 0
    within_headroom: int | None = None  # CPU: the largest batch whose estimate is within 80% of the budget
    chosen: int = 0
    ceiling_reason: str = ""  # why the search went no higher than `ceiling`, when not the cap

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
        if self.largest == self.ceiling and self.ceiling_reason:
            why += f"; the search stopped at {self.ceiling}: {self.ceiling_reason}"
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
    ceiling, reason = search_ceiling(cap, largest_tensor_per_sample(model, input_shape))
    if device.type == "cuda":
        search = _search_on_device(cfg, model, input_shape, device, cap, ceiling)
    else:
        search = _search_budget(cfg, model, input_shape, device, cap, ceiling)
    search.ceiling, search.ceiling_reason = ceiling, reason
    search.choose()
    _say(search.summary())
    return search


def search_ceiling(cap: int, elements_per_sample: int) -> tuple[int, str]:
    """The largest batch to try: cap / 0.8 (so that 80% of it can reach the cap), but no batch whose
    largest tensor passes 2^31 elements; with the reason when that bound is the lower one."""
    ceiling = math.ceil(cap * KEEP[1] / KEEP[0])
    indexable = INDEX_LIMIT // max(elements_per_sample, 1)
    if indexable < ceiling:
        return max(1, indexable), (f"a batch of {indexable + 1} would make a tensor of more than 2^31 elements "
                                   f"({elements_per_sample:,} per sample)")
    return ceiling, ""


def _say(line: str) -> None:
    print(f"[auto batch] {line}", file=sys.stderr, flush=True)


def _run(search: BatchSearch, trial: Callable[[int], Trial], ceiling: int) -> None:
    def fits(batch: int) -> bool:
        result = trial(batch)
        search.trials.append(result)
        _say(result.line())
        return result.fits

    search.largest = largest_fitting(fits, ceiling)


def _search_budget(cfg: TrainConfig, model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                   cap: int, ceiling: int) -> BatchSearch:
    budget, described = memory_budget(cfg)
    breakdown = estimate(model, input_shape, 1, cfg.optimizer, cfg.resolved_task, device.type, cfg.amp, cfg.model,
                         cfg.amp_dtype)
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

    _usable, where = cuda_capacity(device)
    search = BatchSearch(limit=f"{where}, two real steps a trial", cap=cap)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def trial(batch: int) -> Trial:
        result = measured_trial(batch, lambda: measured_peak(model, cfg.optimizer, input_shape, batch,
                                                             cfg.resolved_task, cfg.amp, device, cfg.amp_dtype))
        release(model, device)
        return result

    with torch.random.fork_rng(devices=[device]):
        try:
            _run(search, trial, ceiling)
        finally:
            model.load_state_dict(initial)
            release(model, device)
    if search.largest == 0:
        raise RunnerError(f"--batch-size auto: even a batch of 1 runs out of memory ({where}); "
                          "try --amp, a smaller --image-size or a smaller model")
    return search


def measured_trial(batch: int, peak_of: Callable[[], int]) -> Trial:
    """Run one trial: its peak, or "does not fit" for any out-of-memory error (the allocator's, cuDNN's,
    cuBLAS's); other errors are real failures and propagate. Returning from the handler drops the
    traceback and with it the failed step's tensors, before the next trial."""
    try:
        peak = peak_of()
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        first = " ".join(str(exc).split()).split(". ")[0]
        return Trial(batch, False, f"out of memory: {first[:120]}")
    return Trial(batch, True, f"peak {format_bytes(peak)}")

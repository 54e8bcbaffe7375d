"""The memory of one training step in four parts: parameters, gradients, optimizer state, and the
input batch plus the activations autograd keeps for backward.

Activations are measured, not guessed: the forward pass and the loss run under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd saves; the unique
storages among them (minus parameters, buffers and the input, counted elsewhere) are summed. The
pass runs on fake tensors (meta storage: no memory, no compute) that claim the target device, so a
CUDA estimate needs no GPU; once in fp32 and once under autocast (the run's --amp-dtype; auto is fp16
on CUDA, bf16 on CPU). Two
small batches give a per-sample slope and a batch-independent part (under AMP: the fp16 copies of
weights that backward needs). A model fake tensors cannot run (data-dependent Python) gets the same
two passes for real, on the model's own device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from runner.errors import RunnerError
from runner.optim import amp_dtype
from runner.tasks import make_task

OPTIMIZER_STATE_FACTOR = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
PROBE_BATCHES = (2, 4)  # not 1: BatchNorm refuses one value per channel in training mode
PARTS = ("parameters", "gradients", "optimizer_state", "input_batch", "activations")
PRECISIONS = ("fp32", "amp")


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward: `fixed + batch * per_sample`."""

    per_sample: int
    fixed: int

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample


@dataclass(frozen=True)
class Breakdown:
    """The estimate for one model, input shape, batch size and optimizer (activations in fp32 and AMP,
    or in the one precision a real step ran in)."""

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    optimizer: str
    device_type: str
    amp: bool  # the selected precision
    parameters: int  # count, exact
    trainable: int
    parameter_bytes: int  # parameters and buffers
    gradient_bytes: int
    optimizer_bytes: int
    sample_bytes: int  # one input and its target
    activations: dict[str, Activations]
    method: str  # how activations were measured: "fake tensors" or "real pass"
    amp_dtype: str = "auto"  # the run's --amp-dtype, which the AMP activations were measured under

    @property
    def precision(self) -> str:
        return "amp" if self.amp else "fp32"

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions whose activations are known, in table order."""
        return tuple(p for p in PRECISIONS if p in self.activations)

    def parts(self, precision: str | None = None, batch: int | None = None) -> dict[str, int]:
        """The five parts in bytes, in table order."""
        b = self.batch_size if batch is None else batch
        return {
            "parameters": self.parameter_bytes,
            "gradients": self.gradient_bytes,
            "optimizer_state": self.optimizer_bytes,
            "input_batch": b * self.sample_bytes,
            "activations": self.activations[precision or self.precision].at(b),
        }

    def total(self, precision: str | None = None, batch: int | None = None) -> int:
        return sum(self.parts(precision, batch).values())

    def biggest_part(self, precision: str | None = None) -> tuple[str, int]:
        return max(self.parts(precision).items(), key=lambda item: item[1])

    def largest_batch(self, capacity: int, precision: str | None = None) -> int:
        """The largest batch whose estimate fits in `capacity` bytes (0 if not even one sample)."""
        fixed = self.total(precision, batch=0)
        per_sample = self.total(precision, batch=1) - fixed
        if capacity < fixed + per_sample:
            return 0
        return (capacity - fixed) // max(per_sample, 1)


def estimate(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, optimizer: str, task: str,
             device_type: str, amp: bool, name: str = "", amp_choice: str = "auto") -> Breakdown:
    """The breakdown for `model` (any device, meta included) at `batch_size`, in fp32 and AMP (under
    `amp_choice`, the run's --amp-dtype)."""
    activations, method = measure_activations(model, input_shape, task, device_type, amp_choice)
    return breakdown(model, input_shape, batch_size, optimizer, task, device_type, amp, activations, method, name,
                     amp_choice)


def breakdown(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, optimizer: str, task: str,
              device_type: str, amp: bool, activations: dict[str, Activations], method: str,
              name: str = "", amp_choice: str = "auto") -> Breakdown:
    """The breakdown around activations already measured (for one or both precisions)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    param_bytes = sum(_nbytes(t) for t in params) + sum(_nbytes(b) for b in model.buffers())
    grad_bytes = sum(_nbytes(p) for p in trainable)
    target_bytes = 8 if task == "classify" else 4 * math.prod(input_shape)
    return Breakdown(
        model=name or type(model).__name__, input_shape=tuple(input_shape), batch_size=batch_size,
        optimizer=optimizer, device_type=device_type, amp=amp,
        parameters=sum(p.numel() for p in params), trainable=sum(p.numel() for p in trainable),
        parameter_bytes=param_bytes, gradient_bytes=grad_bytes,
        optimizer_bytes=OPTIMIZER_STATE_FACTOR[optimizer] * grad_bytes,
        sample_bytes=4 * math.prod(input_shape) + target_bytes,
        activations=activations, method=method, amp_dtype=amp_choice,
    )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --- measuring activations ---------------------------------------------------------------------

def measure_activations(model: nn.Module, input_shape: tuple[int, ...], task: str, device_type: str,
                        amp_choice: str = "auto") -> tuple[dict[str, Activations], str]:
    """Per-sample and fixed saved-for-backward bytes in fp32 and AMP, and how they were measured."""
    try:
        return _fit(lambda b, cast: _fake_pass(model, input_shape, b, task, device_type, cast), amp_choice), \
            "fake tensors"
    except Exception as fake_error:
        try:
            return _fit(lambda b, cast: _real_pass(model, input_shape, b, task, cast), amp_choice), "real pass"
        except Exception as exc:
            raise RunnerError(f"cannot measure activations: the model's forward failed on inputs of shape "
                              f"(batch, {', '.join(map(str, input_shape))}): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''} "
                              f"(fake tensors: {type(fake_error).__name__})") from None


def _fit(saved_bytes: Callable[[int, str | None], int], amp_choice: str) -> dict[str, Activations]:
    """Saved bytes at two batch sizes, per precision → a per-sample slope and a fixed part. `saved_bytes`
    takes the batch and the autocast choice (None: fp32)."""
    small, large = PROBE_BATCHES
    out = {}
    for precision in PRECISIONS:
        cast = amp_choice if precision == "amp" else None
        a, b = saved_bytes(small, cast), saved_bytes(large, cast)
        per_sample = max(0, (b - a) // (large - small))
        out[precision] = Activations(per_sample=per_sample, fixed=max(0, a - small * per_sample))
    return out


class SavedTensors:
    """A pack hook that sums the bytes of the unique storages autograd saves, skipping some.

    `hold` keeps each counted tensor referenced, so a storage freed mid-pass cannot hand its key to a
    new one; free on fake tensors, and not wanted on a real training step (autograd keeps the saved
    tensors alive until backward anyway, and holding them longer would raise the peak).
    """

    def __init__(self, skip: Iterable[torch.Tensor], hold: bool = True) -> None:
        self.skip = {_storage_key(t) for t in skip}
        self.seen: dict[int, int] = {}
        self.held: list[torch.Tensor] | None = [] if hold else None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            key, nbytes = _storage_key(tensor), tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a tensor subclass): not counted
            return tensor
        if key not in self.skip and key not in self.seen:
            self.seen[key] = nbytes
            if self.held is not None:
                self.held.append(tensor)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _storage_key(tensor: torch.Tensor) -> int:
    """The storage's identity (its C++ address): views share it; fake tensors have one too."""
    return tensor.untyped_storage()._cdata


@contextlib.contextmanager
def _autocast(device_type: str, choice: str | None) -> Iterator[None]:
    """`torch.autocast` without its device-availability check, so fake CUDA tensors get CUDA's rules;
    `choice` is the --amp-dtype (None: no autocast)."""
    if choice is None:
        yield
        return
    previous, previous_dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, amp_dtype(device_type, True, choice))
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, previous)
        torch.set_autocast_dtype(device_type, previous_dtype)


def _saved_bytes(model: nn.Module, tensors: dict[str, torch.Tensor], inputs: torch.Tensor, target: torch.Tensor,
                 task: str, device_type: str, cast: str | None) -> int:
    saved = SavedTensors([*tensors.values(), inputs, target])
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
                _autocast(device_type, cast):
            output = functional_call(model, tensors, (inputs,))
            make_task(task).loss(output, target)
    finally:
        model.train(was_training)
    return saved.total


def _fake_pass(model: nn.Module, input_shape: tuple[int, ...], batch: int, task: str, device_type: str,
               cast: str | None) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device(device_type)
    with FakeTensorMode(allow_non_fake_inputs=True):
        tensors = {n: torch.empty(p.shape, dtype=p.dtype, device=device, requires_grad=p.requires_grad)
                   for n, p in model.named_parameters()}
        tensors.update({n: torch.empty(b.shape, dtype=b.dtype, device=device) for n, b in model.named_buffers()})
        inputs = torch.empty(batch, *input_shape, device=device)
        target = (torch.zeros(batch, dtype=torch.long, device=device) if task == "classify"
                  else torch.empty(batch, *input_shape, device=device))
        return _saved_bytes(model, tensors, inputs, target, task, device_type, cast)


def largest_tensor_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Elements per sample of the largest tensor entering or leaving any module in a forward pass (fake
    tensors: no memory, no compute). Many CUDA kernels index with 32 bits, so a batch whose tensors
    pass 2^31 elements fails with errors other than out-of-memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = PROBE_BATCHES[0]
    largest = batch * math.prod(input_shape)

    def note(_module: nn.Module, args: tuple, output: object) -> None:
        nonlocal largest
        for value in (*args, *(output if isinstance(output, (tuple, list)) else (output,))):
            if isinstance(value, torch.Tensor):
                largest = max(largest, value.numel())

    handle = nn.modules.module.register_module_forward_hook(note)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            tensors = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
            tensors.update({n: torch.empty(b.shape, dtype=b.dtype) for n, b in model.named_buffers()})
            with torch.no_grad():
                functional_call(model, tensors, (torch.empty(batch, *input_shape),))
    except Exception:
        pass
    finally:
        handle.remove()
    return -(-largest // batch)


def _real_pass(model: nn.Module, input_shape: tuple[int, ...], batch: int, task: str, cast: str | None) -> int:
    """The same pass on real tensors on the model's device; buffers cloned, RNG restored."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
        tensors.update({n: b.clone() for n, b in model.named_buffers()})  # BatchNorm stats stay untouched
        inputs = torch.rand(batch, *input_shape, device=device)
        target = (torch.zeros(batch, dtype=torch.long, device=device) if task == "classify"
                  else torch.rand(batch, *input_shape, device=device))
        return _saved_bytes(model, tensors, inputs, target, task, device.type, cast)

"""`runner.observe(...)`'s keyword options: the observability flags of `runner train`, resolved into a
`TrainConfig` the same way (defaults < RUNNER_* environment variables < what the caller passes), so that
validation, defaults and every consumer of the config (sinks, Reporter, rules) are shared.

The environment variable of each option is read from the `train` command's own flag definitions: a
variable added there applies here too. The workload fields that describe the caller's own loop (model,
optimizer, lr, device, world) are filled from the objects it hands over.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import fields
from typing import Any

from runner import config as config_io
from runner.config import IMPORT_PATH, TrainConfig
from runner.errors import usage_error

# `runner train` flags that mean the same for an own loop (the others describe runner's own workload)
OBSERVE_FIELDS = ("run_dir", "name", "experiment", "viz", "visdom_url", "visdom_port", "log_every", "images_every",
                  "hist_every", "memory_every", "system_every", "graph", "progress", "workers",
                  "worker_start_method", "stall_timeout", "on_stall")
OPTIMIZER_NAMES = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}


def option_names() -> tuple[str, ...]:
    """The options this runner's TrainConfig has (stall_* only once the stall detector exists)."""
    known = {f.name for f in fields(TrainConfig)}
    return tuple(name for name in OBSERVE_FIELDS if name in known)


def env_names() -> dict[str, str]:
    """Option → RUNNER_* variable, as the `train` command defines them."""
    from runner.train_command import make_train_command

    parameters = inspect.signature(make_train_command(lambda _cfg: 0)).parameters
    found = {name: getattr(p.default, "envvar", None) for name, p in parameters.items()}
    return {name: var for name, var in found.items() if isinstance(var, str) and name in option_names()}


def workload(model: Any, optimizer: Any, device_type: str, steps: int, task: str) -> dict[str, Any]:
    """The config fields that describe the caller's loop, as far as the config's vocabulary goes."""
    cls = type(getattr(model, "module", model))  # DDP / DataParallel: the user's module inside
    model_name = f"{cls.__module__}:{cls.__name__}"
    values: dict[str, Any] = {"model": model_name if IMPORT_PATH.match(model_name) else "mlp",
                              "data": "runner.own_loop:loop", "device": device_type, "steps": steps,
                              "task": task if task in config_io.TASKS else "auto"}
    groups = getattr(optimizer, "param_groups", None) or [{}]
    lr = groups[0].get("lr")
    if isinstance(lr, (int, float)) and lr > 0:
        values["lr"] = float(lr)
    name = OPTIMIZER_NAMES.get(type(optimizer).__name__)
    if name == "sgd" and groups[0].get("momentum"):
        name = "momentum"
    if name:
        values["optimizer"] = name
    if isinstance(groups[0].get("weight_decay"), (int, float)):
        values["weight_decay"] = float(groups[0]["weight_decay"])
    return values


def resolve(options: dict[str, Any], loop: dict[str, Any]) -> TrainConfig:
    """Defaults < RUNNER_* environment < `options`; `loop` (from `workload`) fills the rest. Unknown
    options are usage errors naming the ones there are."""
    allowed = option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise usage_error(f"runner.observe: unknown option(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(allowed)}")
    values: dict[str, Any] = dict(loop)
    for name, var in env_names().items():
        if os.environ.get(var):
            values[name] = os.environ[var]
    values.update({key: value for key, value in options.items() if value is not None})
    return config_io.resolve(None, values)

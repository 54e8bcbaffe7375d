"""The run's configuration: one dataclass, its validation, and TOML in and out.

Imports nothing heavy: `runner --help` and the supervisor read it without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import time
import tomllib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from runner.errors import usage_error
from runner.telemetry import tags

MODELS = ("mlp", "cnn", "resnet18", "tinyunet", "unet")
DATA_KINDS = ("synthetic", "imagefolder", "paired", "mnist", "cifar10")
TASKS = ("auto", "classify", "denoise")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
VIZ = ("none", "tensorboard", "visdom", "both")
STRATEGIES = ("single", "dp", "ddp")
ON_NAN = ("stop", "skip")
ON_OOM = ("stop", "retry")
ON_STALL = ("report", "stop")
LR_SCHEDULES = ("constant", "cosine", "step", "onecycle")
MONITOR_MODES = ("min", "max")
AMP_DTYPES = ("auto", "fp16", "bf16")
START_METHODS = ("default", "fork", "spawn", "forkserver")
DENOISE_MODELS = ("tinyunet", "unet")
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


@dataclass
class TrainConfig:
    """Everything a run needs; flags override a TOML file, which overrides these defaults."""

    # workload
    model: str = "tinyunet"
    data: str = "synthetic"
    task: str = "auto"
    image_size: int = 64
    channels: int = 3
    num_classes: int = 10
    samples: int = 512  # size of the synthetic set
    noise_sigma: float = 0.2
    download: bool = False
    weighted_sampling: bool = False
    # validation
    val_data: str = ""  # the same forms as data; empty: none, or --val-split
    val_split: float = 0.0  # a fraction of data held out for validation (0: none)
    eval_every: int = 0  # steps between evaluations; 0: every epoch (and always at the end)
    monitor: str = tags.val("loss")  # the tag best.pt follows
    monitor_mode: str = "min"
    # optimisation
    steps: int = 0  # 0: from --epochs, else 100
    epochs: int = 0  # used when steps is 0: steps = epochs * batches per epoch
    batch_size: int | str = 16  # an int, or "auto"
    max_batch_size: int = 4096
    memory_budget: str = ""  # e.g. "2GiB"; empty: a share of available RAM (CPU auto batch)
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    amp: bool = False
    amp_dtype: str = "auto"  # under --amp; auto: fp16 + GradScaler on CUDA, bf16 on CPU
    lr_schedule: str = "constant"
    warmup_steps: int = 0  # linear warm-up from 1 % of lr before the schedule (runner/train/schedule.py)
    min_lr: float = 0.0  # where cosine ends; the floor of step
    clip_grad_norm: float = 0.0  # 0: no clipping
    accumulate: int = 1  # micro-batches per optimizer step
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    workers: int = 0
    worker_start_method: str = "default"
    device: str = "auto"
    # distribution
    strategy: str = "single"
    gpus: str = ""  # dp: "0,1"; empty = all visible
    nproc: int = 1
    nnodes: str = "1"
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    max_restarts: int = 0
    sync_bn: bool = False
    collective_timeout: float = 300.0  # seconds a collective may wait in steady training (long phases: 30 min)
    # observability
    viz: str = "tensorboard"
    log_every: int = 10
    images_every: int = 100
    hist_every: int = 100
    memory_every: int = 1
    system_every: float = 1.0  # seconds between NVML / psutil samples
    graph: bool = True
    visdom_url: str = ""  # empty: http://127.0.0.1:<visdom_port>, started for the run if down
    visdom_port: int = 8097
    flush_secs: float = 5.0  # every sink's files reach the disk within this long of an event
    stall_timeout: float | str = "auto"  # seconds without progress; auto: max(60, 10x the median step); 0: off
    on_stall: str = "report"  # report (the run stays alive) | stop (exit 1 after the capture)
    # run bookkeeping
    run_dir: str = "runs"
    name: str = ""
    experiment: str = ""  # Visdom env group and TensorBoard hparams experiment; empty: <model>-<data kind>
    resume: str = "auto"  # auto | never | PATH
    checkpoint_every: int = 50
    on_nan: str = "stop"
    oom: str = "stop"
    memory_snapshot: bool = False
    profile: str = ""  # START:STOP: torch.profiler over those steps (trace under <run>/profile/)
    debug: bool = False
    progress: bool = True

    @property
    def run_path(self) -> Path:
        """The folder of this run: `<run_dir>/<name>`."""
        return Path(self.run_dir) / self.name

    @property
    def resolved_task(self) -> str:
        """`classify` or `denoise`, deciding `auto` from the model and data."""
        if self.task != "auto":
            return self.task  # classify, denoise, or a package.module:factory import path
        if self.model in DENOISE_MODELS or self.data.startswith("paired:"):
            return "denoise"
        return "classify"

    @property
    def experiment_name(self) -> str:
        """`--experiment`, else `<model>-<data kind>` (with `_` as `-`: Visdom groups envs at the first `_`)."""
        return self.experiment or f"{_model_part(self.model)}-{_data_part(self.data)}".replace("_", "-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type, or raise a usage error naming the key."""
    kind = _field_types()[name]
    default = getattr(TrainConfig(), name)
    try:
        if name == "batch_size":
            if str(value).lower() == "auto":
                return "auto"
            return int(value)
        if name == "stall_timeout":
            return "auto" if str(value).lower() == "auto" else float(value)
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise usage_error(f"{name.replace('_', '-')}: expected {kind}, got {value!r}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file; unknown keys and unreadable files are usage errors."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise usage_error(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise usage_error(f"cannot read config file {path}: {exc}") from None
    raw = raw.get("train", raw)
    known = _field_types()
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise usage_error(f"unknown key(s) in {path}: {', '.join(unknown)}")
    return raw


def resolve(config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file, then flags (the ones given, i.e. not None); validated."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_toml(Path(config_file)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if not cfg.name:
        cfg.name = default_name(cfg)
    validate(cfg)
    return cfg


def default_name(cfg: TrainConfig) -> str:
    """`<model>-<data kind>-<stamp>`: the time, unless several processes must agree on the name.

    In a torchrun rank the stamp is torchrun's run id (a fresh uuid per launch for one node, the same on
    every rank and every restart); for a multi-node `runner train`, the --rdzv-id every node is given.
    """
    model, data = _model_part(cfg.model), _data_part(cfg.data)
    if "RANK" in os.environ:  # a rank: every rank, and every restart, must find the same run
        stamp = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if stamp == "none":  # torchrun's id without --rdzv-id: every launch would share it
            raise usage_error("torchrun gave this run the id 'none' (no --rdzv-id): pass --name, so that "
                              "every rank and every restart finds the same run")
        if UUID.fullmatch(stamp):  # torchrun's own id for one node: 8 hex digits are plenty
            stamp = stamp[:8]
    elif cfg.nnodes != "1":
        if not cfg.rdzv_id:
            raise usage_error("a multi-node run needs a name every node agrees on: pass --rdzv-id (or --name), "
                              "the same on every node")
        stamp = cfg.rdzv_id
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{model}-{data}-{stamp}"


def _model_part(model: str) -> str:
    """`cnn` → `cnn`; `package.module:factory` → `factory`."""
    return model.rsplit(":", 1)[-1]


def _data_part(data: str) -> str:
    """`imagefolder:PATH` → `imagefolder`; `package.module:factory` → `module`."""
    return data.split(":", 1)[0].rsplit(".", 1)[-1]


def choice_hint(value: str, allowed: Sequence[str]) -> str:
    """`did you mean 'visdom'? choose one of ...` for a value outside `allowed`."""
    close = difflib.get_close_matches(value, allowed, n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    return f"{suggestion}choose one of {', '.join(allowed)}"


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise usage_error(f"unknown {name} {value!r}: {choice_hint(value, allowed)}")


def _unprintable(text: str) -> bool:
    """Control characters and line breaks: they would break folder names, env names and log lines."""
    return any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in text)


def _check_liveness(cfg: TrainConfig) -> None:
    """--flush-secs, --stall-timeout, --collective-timeout: what keeps a stuck run visible."""
    if cfg.flush_secs <= 0:
        raise usage_error(f"flush-secs must be positive, got {cfg.flush_secs}")
    if cfg.stall_timeout != "auto" and float(cfg.stall_timeout) < 0:
        raise usage_error(f"stall-timeout must be auto, 0 (off) or a number of seconds, got {cfg.stall_timeout}")
    if cfg.collective_timeout <= 0:
        raise usage_error(f"collective-timeout must be positive, got {cfg.collective_timeout}")


def validate(cfg: TrainConfig) -> None:
    """Every check that needs no torch and no disk beyond the run dir's name."""
    _validate_workload(cfg)
    _validate_training(cfg)
    _validate_choices(cfg)
    _validate_numbers(cfg)
    _check_liveness(cfg)
    _validate_shape(cfg)
    _validate_names(cfg)


def _validate_workload(cfg: TrainConfig) -> None:
    """--model and --data name something that exists (a built-in, or an import path)."""
    if cfg.model not in MODELS and not IMPORT_PATH.match(cfg.model):
        raise usage_error(f"unknown model {cfg.model!r}: {choice_hint(cfg.model, MODELS)} "
                          "or give an import path package.module:factory")
    kind = cfg.data.split(":", 1)[0]
    if kind not in DATA_KINDS and not IMPORT_PATH.match(cfg.data):
        raise usage_error(
            f"unknown data {cfg.data!r}: choose synthetic, imagefolder:PATH, "
            "paired:NOISY_DIR,CLEAN_DIR, mnist:ROOT, cifar10:ROOT or package.module:factory"
        )
    if kind in ("imagefolder", "paired", "mnist", "cifar10") and ":" not in cfg.data:
        raise usage_error(f"data {kind} needs a path: --data {kind}:PATH")


def _validate_choices(cfg: TrainConfig) -> None:
    """Each flag with a fixed set of values has one of them (else: the closest, suggested)."""
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("device", cfg.device, DEVICES)
    _choice("viz", cfg.viz, VIZ)
    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("on-nan", cfg.on_nan, ON_NAN)
    _choice("oom", cfg.oom, ON_OOM)
    _choice("on-stall", cfg.on_stall, ON_STALL)
    _choice("amp-dtype", cfg.amp_dtype, AMP_DTYPES)
    _choice("worker-start-method", cfg.worker_start_method, START_METHODS)


def _validate_numbers(cfg: TrainConfig) -> None:
    """Counts, sizes and rates in range."""
    if cfg.batch_size != "auto" and int(cfg.batch_size) < 1:
        raise usage_error(f"batch-size must be at least 1 (or auto), got {cfg.batch_size}")
    positive = ("image_size", "channels", "num_classes", "samples", "log_every", "images_every",
                "hist_every", "memory_every", "checkpoint_every", "nproc", "max_batch_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise usage_error(f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("steps", "epochs", "workers", "max_restarts", "node_rank"):
        if getattr(cfg, name) < 0:
            raise usage_error(f"{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise usage_error(f"lr must be positive, got {cfg.lr}")
    if cfg.system_every <= 0:
        raise usage_error(f"system-every must be positive, got {cfg.system_every}")


def _validate_shape(cfg: TrainConfig) -> None:
    """What the model and --profile need of the sizes and steps."""
    if cfg.model in DENOISE_MODELS and cfg.image_size % 8:
        raise usage_error(f"{cfg.model} halves the image 3 times: image-size must be a multiple of 8, "
                          f"got {cfg.image_size}")
    if cfg.profile and not (re.fullmatch(r"[1-9]\d*:[1-9]\d*", cfg.profile)
                            and int(cfg.profile.split(":")[0]) <= int(cfg.profile.split(":")[1])):
        raise usage_error(f"profile takes START:STOP steps with 1 <= START <= STOP, e.g. 10:15, "
                          f"got {cfg.profile!r}")


def _validate_names(cfg: TrainConfig) -> None:
    """--name is a folder, --experiment a Visdom env prefix: both printable, neither with a separator."""
    if "/" in cfg.name or cfg.name in (".", ".."):
        raise usage_error(f"name must be a plain folder name, got {cfg.name!r}")
    for key in ("name", "experiment"):
        if _unprintable(getattr(cfg, key)):
            raise usage_error(f"{key} must not contain control characters or line breaks, got {getattr(cfg, key)!r}")
    if "_" in cfg.experiment:
        raise usage_error(f"experiment must not contain '_' (Visdom groups envs at the first '_'), "
                          f"got {cfg.experiment!r}")


def _validate_training(cfg: TrainConfig) -> None:
    """The checks of the task, validation, schedule, clipping and accumulation flags."""
    if cfg.task not in TASKS and not IMPORT_PATH.match(cfg.task):
        raise usage_error(f"unknown task {cfg.task!r}: {choice_hint(cfg.task, TASKS)} "
                          "or give an import path package.module:factory")
    _choice("lr-schedule", cfg.lr_schedule, LR_SCHEDULES)
    _choice("monitor-mode", cfg.monitor_mode, MONITOR_MODES)
    if cfg.accumulate < 1:
        raise usage_error(f"accumulate must be at least 1, got {cfg.accumulate}")
    for name in ("warmup_steps", "eval_every"):
        if getattr(cfg, name) < 0:
            raise usage_error(f"{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise usage_error(f"min-lr must lie between 0 and lr ({cfg.lr}), got {cfg.min_lr}")
    if cfg.clip_grad_norm < 0:
        raise usage_error(f"clip-grad-norm must not be negative (0: off), got {cfg.clip_grad_norm}")
    if not 0 <= cfg.val_split < 1:
        raise usage_error(f"val-split is the held-out fraction, 0 <= FRACTION < 1, got {cfg.val_split}")
    if cfg.val_split and cfg.val_data:
        raise usage_error("give either --val-data or --val-split, not both")
    kind = cfg.val_data.split(":", 1)[0]
    if cfg.val_data and kind not in DATA_KINDS and not IMPORT_PATH.match(cfg.val_data):
        raise usage_error(f"unknown val-data {cfg.val_data!r}: the same forms as --data")
    if not cfg.monitor.startswith((tags.VAL, tags.TRAIN)):
        raise usage_error(f"monitor names a train/ or val/ tag, e.g. val/loss or val/accuracy, got {cfg.monitor!r}")


def dumps(cfg: TrainConfig) -> str:
    """The resolved configuration as TOML (a `[train]` table), loadable with `--config`."""
    header = "# Resolved configuration of this run; reuse it with: runner train --config FILE\n"
    return header + tomli_w.dumps({"train": cfg.to_dict()})


def save(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved configuration atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(cfg), encoding="utf-8")
    os.replace(tmp, path)


def parse_bytes(text: str) -> int:
    """`2GiB`, `512MiB`, `1.5G`, `1000000` → bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise usage_error(f"cannot read a size from {text!r}: use e.g. 2GiB or 512MiB")
    number, unit, suffix = match.groups()
    base = 1024 if suffix.lower().startswith("i") or not suffix else 1000
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * base**power)

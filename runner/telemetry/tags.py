"""The tag vocabulary: every name runner gives an event, in one place.

The loop, both dashboards, the layout table, the rules, `runner report` and the tests use these names
(or the functions that build the per-layer and per-rank ones); a name written as a bare string
elsewhere is a name that can drift. Groups are the part before the first `/` and decide where a tag
lands (TensorBoard's tag tree, Visdom's panes via dashboards/layout.py). Torch-free.
"""

from __future__ import annotations

MIB = 1024.0**2

# --- groups (tag prefixes) -------------------------------------------------------------------------
TRAIN = "train/"
VAL = "val/"
TIME = "time/"
MEMORY = "memory/"
SYSTEM = "system/"
TELEMETRY = "telemetry/"
WEIGHTS = "weights/"
GRADS = "grads/"
NORMS = "norms/"  # norms/<histogram tag>: the L2 norm of each histogrammed tensor
NORMS_WEIGHTS = "norms/weights/"
NORMS_GRADS = "norms/grads/"
IMAGES = "images/"
ESTIMATE = "memory/estimate_"  # the memory estimate's parts: memory/estimate_<part>

# --- training scalars, one value per log point -----------------------------------------------------
LOSS = "train/loss"
LR = "train/lr"
SAMPLES_PER_S = "train/samples_per_s"
SKIPPED = "train/skipped"  # unreadable samples so far
AMP_SKIPPED = "train/amp_skipped"  # updates GradScaler skipped so far
AMP_SCALE = "train/amp_scale"
GRAD_NORM = "train/grad_norm"  # global gradient norm at histogram steps
CLIP_NORM = "train/clip_norm"  # --clip-grad-norm: mean pre-clip global gradient norm over the window
CLIPPED_SHARE = "train/clipped_share"  # --clip-grad-norm: the window's share of steps that were clipped
# Gradient norms measured at every step (runner/train/grad_norms.py), read at log points:
GRAD_GLOBAL = "norms/grad_global"  # the global gradient norm, mean over the window's finite steps
GRAD_GLOBAL_MAX = "norms/grad_global_max"  # its largest value in the window
GRAD_GLOBAL_MIN = "norms/grad_global_min"  # its smallest value in the window
GRAD_LAYER_MAX = "norms/grad_layer_max"  # the largest per-parameter gradient norm in the window
GRAD_LAYER_MAX_NAME = "norms/grad_layer_max_name"  # Text: that parameter's name, when it changes
LOSS_MAX = "train/loss_max"  # the window's largest finite step loss (a spike the mean hides)
LOSS_MAX_STEP = "train/loss_max_step"  # the step it came from
LOSS_MIN = "train/loss_min"  # the window's smallest finite step loss
INPUT_PSNR = "train/psnr_input"  # denoise: the PSNR of the noisy input itself, what "not learning" compares to


def train(name: str) -> str:
    """`train/<name>`: a task's metric (accuracy, psnr, ...)."""
    return TRAIN + name


def val(name: str) -> str:
    """`val/<name>`: an evaluation's loss or metric."""
    return VAL + name


# --- where the step's time goes --------------------------------------------------------------------
TIME_PARTS = ("data_wait", "h2d", "forward", "backward", "optimizer", "telemetry", "other")
STEP_MS = "time/step_ms"
DATA_WAIT_MS = "time/data_wait_ms"
SLOWEST_RANK = "time/slowest_rank"
TIME_SKEW = "time/skew"
EVAL_S = "time/eval_s"  # one evaluation's wall time (kept out of the step breakdown and samples/s)
COMPILE_S = "time/compile_s"  # --compile: the first step's extra time, compiling (kept out of its timings)


def time_ms(part: str, rank: int | None = None) -> str:
    """`time/<part>_ms` (a part of TIME_PARTS, or `step`), with `/rank<r>` for one rank's own."""
    return f"{TIME}{part}_ms" + (f"/rank{rank}" if rank is not None else "")


# --- memory and system -----------------------------------------------------------------------------
ESTIMATE_TOTAL = ESTIMATE + "total"
SYSTEM_READINGS = frozenset({"cpu_percent", "workers", "gpu_util", "gpu_power_w", "gpu_temp_c"})  # not bytes


def estimate(part: str) -> str:
    """`memory/estimate_<part>` (parameters, gradients, optimizer_state, input_batch, activations, total)."""
    return ESTIMATE + part


def reading(key: str, rank: int | None = None) -> str:
    """A memory sample's key as a tag: `system/<key>` for CPU %, GPU readings and worker counts,
    `memory/<key>` for bytes; `/rank<r>` under DDP."""
    group = SYSTEM if key in SYSTEM_READINGS else MEMORY
    return f"{group}{key}" + (f"/rank{rank}" if rank is not None else "")


def ranks_memory(key: str, stat: str) -> str:
    """`memory/ranks_<key>_<min|max|skew>`: one memory reading across DDP ranks."""
    return f"{MEMORY}ranks_{key}_{stat}"


# --- runner's own health ---------------------------------------------------------------------------
DROPPED = "telemetry/dropped"
BACKLOG = "telemetry/backlog"
UNREACHABLE_S = "telemetry/unreachable_s"
DROPPED_BY = "telemetry/dropped/"  # telemetry/dropped/<sink>/<event kind>: what one sink never got


def dropped(sink: str, kind: str) -> str:
    """`telemetry/dropped/<sink>/<kind>`: events of `kind` (Scalar, Histogram...) that `sink` never got."""
    return f"{DROPPED_BY}{sink}/{kind}"

# --- histograms, norms, images ---------------------------------------------------------------------
IMAGES_SAMPLES = "images/samples"
VAL_IMAGES = "images/val_samples"  # the first validation batch at each evaluation


def weights(name: str) -> str:
    return WEIGHTS + name


def grads(name: str) -> str:
    return GRADS + name


# --- events that are not scalars -------------------------------------------------------------------
STATUS = "status"  # Text: the run's state in words (started, resumed, finished, failed...)
CONFIG = "config"  # Text: the resolved config.toml
UNREADABLE = "data/unreadable"  # Text: files that failed to load
AUTO_BATCH = "auto_batch"  # Text: the --batch-size auto search
MEMORY_ESTIMATE = "memory_estimate"  # Text: the estimate's table
MEMORY_OOM = "memory_oom"  # Text: an out-of-memory retry or post-mortem
PROFILE = "profile"  # Text: where a --profile trace was written
MODEL = "model"  # Graph: the traced model and its layer table
FINDINGS = "findings"  # Finding
STALL_FINDINGS = "findings/stall"  # Finding of the stall watch (another process, which prints it itself)
HPARAMS = "hparams"  # HParams
MEMORY_SAMPLE = "memory"  # MemorySample: one step's readings (see `reading`)
LOG_POINT = "log_point"  # LogPoint: closes a log point
BEST = "best"  # Text: best.pt was written: the --monitor tag, its value and step

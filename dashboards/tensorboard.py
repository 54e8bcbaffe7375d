"""The TensorBoard sink: every event type into one `SummaryWriter` in the run's folder.

`tensorboard --logdir runs` shows every run; tags are grouped `train/`, `memory/`, `system/`,
`weights/`, `grads/`, `norms/`, `images/`, and a custom-scalars page puts loss/metric, memory and
throughput side by side. Runs on the hub's sink thread: PNG encoding, histogram protos and waiting
for in-flight device copies all happen here, never on the training thread.
"""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np

from runner.telemetry.events import Event, Graph, Histogram, HParams, ImageGrid, MemorySample, Scalar, Text, as_array

_RANKS = r"(/rank\d+)?$"
LAYOUT = {
    "runner": {
        "loss": ["Multiline", [r"^train/loss$"]],
        "metric": ["Multiline", [r"^train/(accuracy|psnr)$"]],
        "throughput (samples/s)": ["Multiline", [r"^train/samples_per_s$"]],
        "step time and data wait (ms)": ["Multiline", [r"^train/(step_time|data_wait)_ms$"]],
        "process RSS (bytes)": ["Multiline", [r"^memory/rss" + _RANKS]],
        "DataLoader workers RSS (bytes)": ["Multiline", [r"^memory/workers_rss" + _RANKS]],
        "CUDA memory (bytes)": ["Multiline", [r"^memory/(allocated|reserved|active|peak)" + _RANKS]],
        "GPU utilisation (%)": ["Multiline", [r"^system/gpu_util" + _RANKS]],
    }
}
_HPARAM_TYPES = (bool, int, float, str)


class TensorBoardSink:
    """Writes events into `run_path`; `purge_step` drops what an earlier attempt logged from that step on."""

    def __init__(self, run_path: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_path), purge_step=purge_step)
        self.writer.add_custom_scalars(LAYOUT)
        self._write = {Scalar: self._scalar, ImageGrid: self._image, Histogram: self._histogram,
                       Graph: self._graph, MemorySample: self._memory, Text: self._text, HParams: self._hparams}

    def write(self, event: Event) -> None:
        self._write[type(event)](event)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    # --- one method per event type ---------------------------------------------------------

    def _scalar(self, event: Scalar) -> None:
        self.writer.add_scalar(event.tag, float(event.value), event.step)

    def _memory(self, event: MemorySample) -> None:
        for tag, value in event.series().items():
            self.writer.add_scalar(tag, value, event.step)

    def _image(self, event: ImageGrid) -> None:
        self.writer.add_image(event.tag, as_array(event.image), event.step, dataformats="CHW")
        if event.caption:
            self.writer.add_text(f"{event.tag}/caption", event.caption, event.step)

    def _histogram(self, event: Histogram) -> None:
        lo, hi, num, total, squares, counts = event.unpack()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.writer.add_text(event.tag, f"not finite at step {event.step} (min {lo}, max {hi})", event.step)
            return
        if hi > lo:  # bins split [lo, hi] evenly; TensorBoard wants each bin's upper edge
            limits = lo + (hi - lo) * np.arange(1, len(counts) + 1) / len(counts)
        else:  # a constant tensor: one bucket
            limits, counts = np.array([hi]), np.array([num])
        self.writer.add_histogram_raw(event.tag, min=lo, max=hi, num=int(num), sum=total, sum_squares=squares,
                                      bucket_limits=limits.tolist(), bucket_counts=counts.tolist(),
                                      global_step=event.step)

    def _graph(self, event: Graph) -> None:
        if event.graph_def is not None:
            from tensorboard.compat.proto import event_pb2

            self.writer._get_file_writer().add_event(event_pb2.Event(graph_def=event.graph_def.SerializeToString()))
            self.writer.add_text(event.tag, "Layers (outputs for a batch of 2):\n\n" + event.layer_table, event.step)
        else:
            self.writer.add_text(event.tag, f"**Model graph unavailable**: tracing failed ({event.error}).\n\n"
                                 "Layers (outputs for a batch of 2):\n\n" + event.layer_table, event.step)

    def _text(self, event: Text) -> None:
        text = event.text
        if event.tag == "config":  # TOML: a code block keeps its lines
            text = "\n".join("    " + line for line in text.splitlines())
        self.writer.add_text(event.tag, text, event.step)

    def _hparams(self, event: HParams) -> None:
        """Hyperparameters and final metrics into this run's folder (add_hparams would make a subfolder)."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, _HPARAM_TYPES) else str(v) for k, v in event.hparams.items()}
        metrics = {k: float(v) for k, v in event.metrics.items()}
        writer = self.writer._get_file_writer()
        for summary in hparams(values, metrics):
            writer.add_summary(summary, event.step)  # metric columns read the run's own train/ scalars

"""The TensorBoard sink: every event type into one `SummaryWriter` in the run's folder.

`tensorboard --logdir runs` shows every run; tags are grouped `train/`, `memory/`, `system/`,
`weights/`, `grads/`, `norms/`, `images/`, and a custom-scalars page puts loss/metric, memory and
throughput side by side. Runs on the hub's sink thread: PNG encoding, histogram protos and waiting
for in-flight device copies all happen here, never on the training thread. What it costs still
competes with the step for the CPU and the GIL, so it is kept small: the scalars of a step go out as
one event (histograms too), images are PNG-encoded at a fast compression level, and records are
checksummed with the vectorised CRC of `dashboards.crc32c`.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from dashboards.crc32c import record
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
_BATCHED = (Scalar, MemorySample, Histogram)
_LAYERS = "Layers (outputs for an example batch of 2):\n\n"


def _fast_records(file_writer: Any) -> None:
    """Checksum this writer's records with the vectorised CRC (same bytes on disk as TensorBoard's own).

    TensorBoard's `RecordWriter` is shared by its writer thread; overriding `write` on that one instance
    leaves every other SummaryWriter in the process as it was. A TensorBoard without these internals
    keeps its own (slower) path.
    """
    try:
        records = file_writer.event_writer._async_writer._writer
        stream = records._writer
    except AttributeError:
        return
    records.write = lambda data: stream.write(record(data))


def _png(image: np.ndarray) -> Summary.Image:
    """A (C, H, W) float image in [0, 1] as a PNG summary, at zlib level 1 (add_image uses 6: slower on smooth
    images, no smaller on noisy ones)."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    channels, height, width = image.shape
    if channels == 1:
        pixels = pixels[:, :, 0]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=out.getvalue())


class TensorBoardSink:
    """Writes events into `run_path`; `purge_step` drops what an earlier attempt logged from that step on."""

    def __init__(self, run_path: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # flush_secs: the file reaches the disk every 5 s (default 120 s), so a live TensorBoard keeps up
        self.writer = SummaryWriter(log_dir=str(run_path), purge_step=purge_step, flush_secs=5)
        self._file = self.writer._get_file_writer()  # created now: the purge marker goes first
        _fast_records(self._file)
        self.writer.add_custom_scalars(LAYOUT)
        self._values: list[Summary.Value] = []  # scalars and histograms of `_values_step`: one event
        self._values_step = 0
        self._write = {Scalar: self._scalar, ImageGrid: self._image, Histogram: self._histogram,
                       Graph: self._graph, MemorySample: self._memory, Text: self._text, HParams: self._hparams}

    def write(self, event: Event) -> None:
        if self._values and (event.step != self._values_step or type(event) not in _BATCHED):
            self._write_values()
        self._write[type(event)](event)

    def flush(self) -> None:
        self._write_values()
        self.writer.flush()

    def close(self) -> None:
        self._write_values()
        self.writer.close()

    # --- one method per event type ---------------------------------------------------------

    def _add_value(self, step: int, value: Summary.Value) -> None:
        self._values_step = step
        self._values.append(value)

    def _write_values(self) -> None:
        if self._values:
            self._file.add_summary(Summary(value=self._values), self._values_step)
            self._values = []

    def _scalar(self, event: Scalar) -> None:
        self._add_value(event.step, Summary.Value(tag=event.tag, simple_value=float(event.value)))

    def _memory(self, event: MemorySample) -> None:
        for tag, value in event.series().items():
            self._add_value(event.step, Summary.Value(tag=tag, simple_value=value))

    def _image(self, event: ImageGrid) -> None:
        self._file.add_summary(Summary(value=[Summary.Value(tag=event.tag, image=_png(as_array(event.image)))]),
                               event.step)
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
        histogram = HistogramProto(min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                                   bucket_limit=limits.tolist(), bucket=counts.tolist())
        self._add_value(event.step, Summary.Value(tag=event.tag, histo=histogram))

    def _graph(self, event: Graph) -> None:
        if event.graph_def is None:
            self.writer.add_text(event.tag, f"**Model graph unavailable**: tracing failed ({event.error}).\n\n"
                                 + _LAYERS + event.layer_table, event.step)
            return
        from tensorboard.compat.proto import event_pb2

        self._file.add_event(event_pb2.Event(graph_def=event.graph_def.SerializeToString()))
        self.writer.add_text(event.tag, _LAYERS + event.layer_table, event.step)

    def _text(self, event: Text) -> None:
        text = event.text
        if event.tag == "config":  # TOML: an indented (code) block keeps its lines
            text = "\n".join("    " + line for line in text.splitlines())
        self.writer.add_text(event.tag, text, event.step)

    def _hparams(self, event: HParams) -> None:
        """Hyperparameters and final metrics into this run's folder (add_hparams would make a subfolder)."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, _HPARAM_TYPES) else str(v) for k, v in event.hparams.items()}
        metrics = {k: float(v) for k, v in event.metrics.items()}
        for summary in hparams(values, metrics):
            self._file.add_summary(summary, event.step)  # metric columns read the run's own train/ scalars

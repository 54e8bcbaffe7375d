"""TensorBoard `Summary` protos for what the TensorBoard sink writes, built with TensorBoard's public
protos and plugin metadata (no torch, no SummaryWriter): text, the custom-scalars layout, images,
histograms and the HParams plugin's experiment, session start and session end."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import metadata as text_metadata

from dashboards.layout import scalar_panes

HPARAM_TYPES = (bool, int, float, str)
# How a run's end status (the trainer's word) shows in the HParams table. TensorBoard's statuses have no
# "aborted": a run stopped on request is neither a success nor a failure, as one killed (no session end).
SESSION_STATUS = {
    "finished": api_pb2.STATUS_SUCCESS,
    "failed": api_pb2.STATUS_FAILURE,
    "stopped": api_pb2.STATUS_UNKNOWN,
}


def text(tag: str, content: str) -> Summary:
    """A text-plugin summary (markdown), under `<tag>/text_summary` as SummaryWriter.add_text names it."""
    tensor = TensorProto(dtype="DT_STRING", string_val=[content.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary(value=[Summary.Value(tag=f"{tag}/text_summary", tensor=tensor,
                                        metadata=text_metadata.create_summary_metadata(tag, ""))])


def custom_scalars_layout() -> layout_pb2.Layout:
    """The custom-scalars page, derived from `dashboards.layout`: a category per group, a multiline chart
    per scalar pane (the plugin anchors regexes at the start only: `$` ends each)."""
    categories: dict[str, list[layout_pb2.Chart]] = {}
    for group, pane in scalar_panes():
        title = f"{pane.title} ({pane.unit})" if pane.unit else pane.title
        chart = layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
            tag=[f"^(?:{tag})$" for tag in pane.tags]))
        categories.setdefault(group.title, []).append(chart)
    return layout_pb2.Layout(category=[layout_pb2.Category(title=title, chart=charts)
                                       for title, charts in categories.items()])


def custom_scalars() -> Summary:
    tensor = TensorProto(dtype="DT_STRING", string_val=[custom_scalars_layout().SerializeToString()],
                         tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag="custom_scalars__config__", tensor=tensor,
                                        metadata=custom_scalar_metadata.create_summary_metadata())])


def png(image: np.ndarray) -> Summary.Image:
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


def histogram(lo: float, hi: float, num: float, total: float, squares: float, counts: np.ndarray) -> HistogramProto:
    """Bins that split [lo, hi] evenly, as TensorBoard wants them (each bin's upper edge)."""
    if hi > lo:
        limits = lo + (hi - lo) * np.arange(1, len(counts) + 1) / len(counts)
    else:  # a constant tensor: one bucket
        limits, counts = np.array([hi]), np.array([num])
    return HistogramProto(min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                          bucket_limit=limits.tolist(), bucket=counts.tolist())


def hparam_values(hparams: dict[str, Any]) -> dict[str, bool | int | float | str]:
    return {k: v if isinstance(v, HPARAM_TYPES) else str(v) for k, v in hparams.items()}


def hparams_start(hparams: dict[str, Any], metrics: list[str], trial: str) -> list[Summary]:
    """The experiment (hparam and metric columns) and this run's session start (its values): from then on
    the run is a row of the HParams table, its metrics read from the run's own scalars of those tags."""
    values = hparam_values(hparams)
    experiment = hparams_summary.hparams_config_pb(
        hparams=[hparams_summary.HParam(name) for name in sorted(values)],
        metrics=[hparams_summary.Metric(tag) for tag in metrics])
    return [experiment, hparams_summary.hparams_pb(values, trial_id=trial)]


def hparams_end(status: str) -> Summary:
    """The session end with the run's status (see SESSION_STATUS; any other word: STATUS_UNKNOWN)."""
    data = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
        status=SESSION_STATUS.get(status, api_pb2.STATUS_UNKNOWN), end_time_secs=time.time()))
    return Summary(value=[Summary.Value(tag=hparams_metadata.SESSION_END_INFO_TAG,
                                        metadata=hparams_metadata.create_summary_metadata(data),
                                        tensor=hparams_metadata.NULL_TENSOR)])

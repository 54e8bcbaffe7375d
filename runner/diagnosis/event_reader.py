"""Every scalar point of a run's TensorBoard event files, read straight from the TFRecord framing.

Why not TensorBoard's EventAccumulator: it keeps a random sample of 1,000 points per tag unless told
otherwise, and reads through TensorFlow's compatibility layer. Here each record is framed as
`dashboards/event_file.record` writes it (length, its CRC, data, its CRC) and parsed as an `Event` proto; the
scalars are its `simple_value`s (what runner's sink and `SummaryWriter.add_scalar` write) and
scalar-plugin tensors. A resumed run's file starts with a START session log at its purge step: the
points of earlier files from that step on are dropped, as TensorBoard drops them. A live run's last
record may be half written: reading stops there. Torch-free.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tensorboard.compat.proto.event_pb2 import Event, SessionLog

_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_FOOTER = 4  # masked CRC of the data (not checked: the data either parses or the file is cut short)


class Point(NamedTuple):
    tag: str
    step: int
    wall_time: float
    value: float


def event_files(run_path: Path) -> list[Path]:
    """The run's event files in writing order (their names start with the creation time)."""
    return sorted(run_path.glob("events.out.tfevents.*"), key=lambda p: (p.name.split(".")[3], p.name))


def records(path: Path) -> Iterator[bytes]:
    """The data of each complete record of a TFRecord file."""
    data = path.read_bytes()
    at, end = 0, len(data)
    while at + _HEADER.size <= end:
        length, _ = _HEADER.unpack_from(data, at)
        start = at + _HEADER.size
        if start + length + _FOOTER > end:
            return  # a record still being written
        yield data[start:start + length]
        at = start + length + _FOOTER


def _scalars(event: Event) -> list[Point]:
    step, wall, out = event.step, event.wall_time, []
    for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            out.append(Point(value.tag, step, wall, value.simple_value))
        elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars" and value.tensor.float_val:
            out.append(Point(value.tag, step, wall, value.tensor.float_val[0]))
    return out


def scalar_points(run_path: Path) -> list[Point]:
    """Every scalar point of the run, in file and step order, after the purges of resumed attempts."""
    points: list[Point] = []
    for path in event_files(run_path):
        for data in records(path):
            event = Event.FromString(data)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                points = [p for p in points if p.step < event.step]  # a resumed attempt logs from here on again
                continue
            if event.HasField("summary"):
                points += _scalars(event)
    return points

"""TensorBoard's event file, written with public parts only: `Event` protos and the TFRecord framing.

Why not `SummaryWriter`: its records are checksummed by TensorBoard's pure-Python CRC-32C (about
0.2 µs a byte), and neither it nor TensorBoard offers a public way to change that (an earlier version
patched TensorBoard's private writer internals). Measured here on 100k scalars, 20 a step: ~65k
scalars/s through SummaryWriter, 350k-750k/s through this file (2 busy cores).
Framing a record is four fields (length, its masked CRC-32C, data, its masked CRC-32C; the TFRecord
format TensorBoard reads); `google-crc32c` computes the CRC in C. The sink already runs on its own
thread, so records go straight into a buffered file, flushed every `flush_secs` and on `flush()`.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

import google_crc32c
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_FILE_NUMBER = itertools.count()  # files opened in one second by one process get distinct names


def masked_crc32c(data: bytes) -> int:
    """The CRC-32C of `data`, masked as TFRecord stores it (so that CRCs of CRCs stay well spread)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = _LENGTH.pack(len(data))
    return length + _CRC.pack(masked_crc32c(length)) + data + _CRC.pack(masked_crc32c(data))


class EventFile:
    """A new `events.out.tfevents.*` file in `log_dir` (named as TensorBoard's writers name theirs).

    `purge_step`: readers drop what earlier files of this folder logged from that step on (a resumed
    run's checkpoint was older than its last logged step).
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None, flush_secs: float = 5.0) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBER)}"
        self.path = log_dir / name
        self._file = open(self.path, "wb", buffering=1 << 16)  # noqa: SIM115 (open for the writer's life; close())
        self._flush_secs = flush_secs
        self._next_flush = time.monotonic() + flush_secs
        self.add(Event(wall_time=time.time(), step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            self.add(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add(self, event: Event) -> None:
        self._file.write(record(event.SerializeToString()))
        if time.monotonic() >= self._next_flush:
            self.flush()

    def add_summary(self, summary: Summary, step: int) -> None:
        self.add(Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        """To the OS (a live TensorBoard reads it), not to the disk: fsync would cost a disk write a flush."""
        self._file.flush()
        self._next_flush = time.monotonic() + self._flush_secs

    def close(self) -> None:
        self._file.close()

"""visdom.log keeps every version of a replaced pane (images, histograms, text), not only the one each
send window ended with; replaying the log gives the final image pane a live viewer saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dashboards.visdom import VisdomSink, read_log, replay
from runner.telemetry.events import Histogram, ImageGrid
from tests.support.visdom_server import VisdomServer, by_title


def _image(value: float) -> np.ndarray:
    return np.full((3, 8, 8), value, dtype=np.float32)


def _logged(log: Path, win: str) -> list[dict]:
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [msg for _, msg in entries if msg.get("win") == win]


def test_every_replaced_version_is_logged_and_replay_matches_live(tmp_path: Path) -> None:
    log = tmp_path / "visdom.log"
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "live", log, send_every=3600.0)  # one send window: the whole run
        for step in (1, 2, 3):
            sink.write(ImageGrid(tag="images/samples", step=step, image=_image(step / 4)))
            for row, name in enumerate(("a", "b")):  # a pane built a row at a time is one version per step
                sink.write(Histogram(tag=f"weights/{name}", step=step, data=np.zeros((2, 69)), row=row))
        sink.close()
        images = _logged(log, "images_samples")
        assert [m["opts"]["caption"] for m in images] == ["step 1", "step 2", "step 3"]
        assert len(_logged(log, "weights")) == 3
        live = by_title(server.windows("live"))["images/samples"]
        assert read_log(log).panes["images_samples"].message() is not None
        env, _ = replay_as(log, server.url, "replayed")
        replayed = by_title(server.windows(env))["images/samples"]
    assert replayed["content"] == live["content"] and "step 3" in json.dumps(live["content"])


def replay_as(log: Path, url: str, env: str) -> tuple[str, int]:
    """Replay `log` into another env of the same server (the log names its env in every message)."""
    renamed = log.with_name("renamed.log")
    lines = []
    for line in log.read_text().splitlines():
        endpoint, msg = json.loads(line)
        msg["eid"] = env
        lines.append(json.dumps([endpoint, msg]))
    renamed.write_text("\n".join(lines) + "\n")
    return replay(renamed, url)

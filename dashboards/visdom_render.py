"""What the non-line events look like in Visdom: image grids, histograms, the memory estimate's bars,
text panes (markdown rendered by markdown-it-py), the run pane and the findings pane.

Each function returns one `events` message that replaces its window's content; the sink builds them
lazily (only the latest of each pane is ever encoded).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
from markdown_it import MarkdownIt

from dashboards.visdom_series import Message, finite

STATUS_LINES = 30
SEVERITY = {"error": 0, "warning": 1, "info": 2}
COLOURS = {"error": "#b91c1c", "warning": "#b45309", "info": "#1d4ed8"}
MOST_FINDINGS = 50  # the findings pane lists the latest of each kind; kinds are few, this is a bound
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")  # raw HTML is escaped
_STYLE = ("<style>.runner-md{font-family:monospace;font-size:12px}.runner-md table{border-collapse:collapse}"
          ".runner-md th,.runner-md td{padding:1px 8px;border-bottom:1px solid #e5e7eb;text-align:left}"
          ".runner-md p{margin:0 0 4px 0}</style>")


def markdown_html(text: str) -> str:
    """Markdown (CommonMark with tables; line breaks kept) as HTML for a text pane; raw HTML escaped."""
    return f'{_STYLE}<div class="runner-md">{_MARKDOWN.render(text)}</div>'


def image_message(win: str, env: str, image: np.ndarray, title: str, caption: str) -> Message:
    """A (C, H, W) image in [0, 1] as a PNG image pane, scaled up (nearest) to be at least ~384 px wide."""
    from PIL import Image

    array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    if array.ndim == 2:
        array = array[None]
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    pixels = (np.clip(array[:3], 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    picture = Image.fromarray(pixels)
    scale = max(1, min(8, 384 // max(picture.width, 1)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return Message.of("events", {"data": [{"content": {"src": src, "caption": caption}, "type": "image"}],
                                 "win": win, "eid": env,
                                 "opts": {"title": title, "caption": caption, "width": picture.width,
                                          "height": picture.height}})


def histogram_message(win: str, env: str, kind: str, step: int,
                       rows: dict[str, tuple[float, float, np.ndarray]]) -> Message:
    """Bar charts of one kind's tensors at one step, in one pane: a dropdown picks the tensor."""
    names = list(rows)
    data = []
    for i, name in enumerate(names):
        lo, hi, counts = rows[name]
        width = (hi - lo) / len(counts) if hi > lo else 1.0
        data.append({"type": "bar", "name": name, "visible": i == 0, "x0": finite(lo + width / 2),
                     "dx": finite(width), "width": finite(width), "y": [int(c) for c in counts],
                     "marker": {"color": "#1f77b4" if kind == "weights" else "#ff7f0e"}})
    buttons = [{"label": name, "method": "restyle", "args": [{"visible": [j == i for j in range(len(names))]}]}
               for i, name in enumerate(names)]
    layout = {"showlegend": False, "bargap": 0, "margin": {"l": 50, "r": 20, "t": 50, "b": 40},
              "xaxis": {"title": "value"}, "yaxis": {"title": "count"},
              "updatemenus": [{"buttons": buttons, "direction": "down", "showactive": True, "x": 0, "xanchor": "left",
                               "y": 1.16, "yanchor": "top"}]}
    title = f"{kind} histograms · step {step}"
    return Message.of("events", {"data": data, "layout": layout, "win": win, "eid": env,
                                 "opts": {"title": title, "width": 480, "height": 360}})


def text_message(win: str, env: str, content: str, title: str, width: int = 480, height: int = 360) -> Message:
    return Message.of("events", {"data": [{"content": content, "type": "text"}], "win": win, "eid": env,
                                 "opts": {"title": title, "width": width, "height": height}})


def bars_message(win: str, env: str, values: dict[str, float], title: str) -> Message:
    data = [{"type": "bar", "x": list(values), "y": [finite(v) for v in values.values()],
             "marker": {"color": ["#d62728" if k == "total" else "#1f77b4" for k in values]}}]
    layout = {"showlegend": False, "margin": {"l": 60, "r": 20, "t": 30, "b": 110}, "yaxis": {"title": "MiB"}}
    return Message.of("events", {"data": data, "layout": layout, "win": win, "eid": env, "opts": {"title": title}})


class RunText:
    """The run pane: status lines, final metrics and the configuration."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status: list[tuple[int, str]] = []
        self.config = ""
        self.metrics: dict[str, float] = {}

    def html(self) -> str:
        status = "".join(f"<div>step {step}: {html.escape(text)}</div>" for step, text in self.status[-STATUS_LINES:])
        parts = [f'<div style="font-family:monospace;font-size:12px"><b>run {html.escape(self.name)}</b>{status}']
        if self.metrics:
            rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in self.metrics.items())
            parts.append(f"<br><b>final metrics</b><table>{rows}</table>")
        if self.config:
            config = html.escape(self.config)
            parts.append(f"<details open><summary><b>config</b></summary><pre>{config}</pre></details>")
        return "".join(parts) + "</div>"


class FindingsText:
    """The findings pane: the latest finding of each kind, most severe first (then the latest first)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, severity: str, message: str, evidence: dict[str, Any], advice: str, step: int) -> None:
        self.latest.pop(kind, None)
        self.latest[kind] = {"kind": kind, "severity": severity, "message": message, "evidence": evidence,
                             "advice": advice, "step": step}
        if len(self.latest) > MOST_FINDINGS:
            self.latest.pop(next(iter(self.latest)))

    def ordered(self) -> list[dict[str, Any]]:
        return sorted(self.latest.values(), key=lambda f: (SEVERITY.get(f["severity"], len(SEVERITY)), -f["step"]))

    def html(self) -> str:
        if not self.latest:
            return '<div style="font-family:monospace;font-size:12px">no findings</div>'
        items = []
        for f in self.ordered():
            colour = COLOURS.get(f["severity"], "#374151")
            evidence = ", ".join(f"{html.escape(str(k))}={html.escape(_short(v))}" for k, v in f["evidence"].items())
            advice = f'<div style="margin-left:1em">→ {html.escape(f["advice"])}</div>' if f["advice"] else ""
            seen = f'<div style="margin-left:1em;color:#6b7280">step {f["step"]}; {evidence}</div>'
            items.append(f'<li class="finding" data-severity="{html.escape(f["severity"])}" style="margin-bottom:6px">'
                         f'<b style="color:{colour}">{html.escape(f["severity"])}</b> '
                         f'<b>{html.escape(f["kind"])}</b>: {html.escape(f["message"])}{advice}{seen}</li>')
        return (f'<ul style="font-family:monospace;font-size:12px;padding-left:1.2em;margin:0">{"".join(items)}</ul>')


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."

"""The model graph as a picture: an SVG of the traced graph at module level, in a layered layout.

The traced nodes (`GraphNode`: name, op, inputs, shape) are reduced to the data flow between
`aten::` ops, then ops of the same module that feed each other are merged into one box (at the
shallowest module depth that still shows the model's structure). Boxes are placed in layers by
longest path from the input; edges to the next layer are short curves, longer ones (skip
connections) arc along the right side. Without a traced graph, the layer table's rows are drawn
as a chain. Pure Python, no torch.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict
from dataclasses import dataclass, field

from runner.telemetry.events import GraphNode

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 190, 40, 26, 26, 16
MAX_BOXES = 60
_SCOPE = re.compile(r"^(?P<type>[^\[]+)\[(?P<name>[^\]]+)\]$")
_COLORS = (  # (op substring, fill)
    ("conv", "#dbeafe"), ("linear", "#dcfce7"), ("addmm", "#dcfce7"), ("matmul", "#dcfce7"),
    ("norm", "#fef9c3"), ("pool", "#fce7f3"), ("cat", "#ede9fe"), ("add", "#ede9fe"),
    ("upsample", "#fce7f3"), ("relu", "#ffedd5"), ("gelu", "#ffedd5"), ("sigmoid", "#ffedd5"),
)


@dataclass
class Box:
    """One drawn node: a module (or a lone op) and the ops merged into it."""

    key: str
    label: str
    detail: str
    ops: list[str] = field(default_factory=list)
    fill: str = "#f3f4f6"


def _short_shape(shape: str) -> str:
    """`2×16×32×32` → `N×16×32×32` (the batch of the example input is not the model's)."""
    parts = shape.split("×")
    return "×".join(["N", *parts[1:]]) if len(parts) > 1 else shape


def _module_path(node: GraphNode) -> list[tuple[str, str]]:
    """(type, name) of each module scope above the op:
    `UNet/Sequential[enc1]/Conv2d[0]/x` → [(Sequential, enc1), (Conv2d, 0)]."""
    path = []
    for part in node.name.split("/")[1:-1]:
        match = _SCOPE.match(part)
        if match:
            path.append((match["type"], match["name"]))
    return path


def _fill(ops: list[str]) -> str:
    for needle, color in _COLORS:
        if any(needle in op for op in ops):
            return color
    return "#f3f4f6"


def _data_graph(nodes: list[GraphNode]) -> tuple[list[GraphNode], dict[str, list[str]]]:
    """The aten ops and IO nodes, each with the data nodes it reads (through lists, tuples, constants)."""
    by_name = {n.name: n for n in nodes}
    keep = [n for n in nodes if n.op.startswith("aten::") or n.op == "IO Node"]
    kept = {n.name for n in keep}
    memo: dict[str, list[str]] = {}

    def sources(name: str, seen: frozenset[str] = frozenset()) -> list[str]:
        if name in kept:
            return [name]
        if name in memo:
            return memo[name]
        node = by_name.get(name)
        found: list[str] = []
        if node is not None and name not in seen:
            for inp in node.inputs:
                found += sources(inp, seen | {name})
        memo[name] = found
        return found

    inputs: dict[str, list[str]] = {}
    for node in keep:
        found: list[str] = []
        for inp in node.inputs:
            found += [s for s in sources(inp) if s != node.name and s not in found]
        inputs[node.name] = found
    ops = [n for n in keep if n.op != "IO Node"]
    for node in keep:  # an output whose producer was not resolved reads the last op
        if node.op == "IO Node" and node.name.startswith("output") and not inputs[node.name] and ops:
            inputs[node.name] = [ops[-1].name]
    return keep, inputs


def _group(keep: list[GraphNode], inputs: dict[str, list[str]], depth: int) -> tuple[dict[str, str], list[str]]:
    """Merge ops of the same module (at `depth`) that feed each other; returns node → group and group order."""
    def key(node: GraphNode) -> str:
        if node.op == "IO Node":
            return node.name
        path = _module_path(node)[:depth]
        return ".".join(name for _, name in path)

    parent = {n.name: n.name for n in keep}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    keys = {n.name: key(n) for n in keep}
    for node in keep:
        for src in inputs[node.name]:
            if keys[src] and keys[src] == keys[node.name]:
                parent[find(node.name)] = find(src)
    group = {n.name: find(n.name) for n in keep}
    order = list(dict.fromkeys(group[n.name] for n in keep))
    return group, order


def _boxes(nodes: list[GraphNode]) -> tuple[list[Box], list[tuple[int, int]]]:
    keep, inputs = _data_graph(nodes)
    max_depth = max((len(_module_path(n)) for n in keep), default=1) or 1
    depth = 1
    group, order = _group(keep, inputs, depth)
    while len(order) < 8 and depth < max_depth:
        deeper = _group(keep, inputs, depth + 1)
        if len(deeper[1]) > MAX_BOXES:
            break
        depth, (group, order) = depth + 1, deeper
    index = {g: i for i, g in enumerate(order)}
    members: dict[str, list[GraphNode]] = defaultdict(list)
    for node in keep:
        members[group[node.name]].append(node)
    boxes = []
    for g in order:
        ops = [n.op.removeprefix("aten::").strip("_") for n in members[g]]
        first, last = members[g][0], members[g][-1]
        if first.op == "IO Node":
            label, detail = first.name.split("/")[0], _short_shape(first.shape)
        else:
            path = _module_path(first)[:depth]
            name = ".".join(n for _, n in path)
            label = f"{name} · {path[-1][0]}" if path else ops[0]
            if len(ops) == 1:
                detail = f"{ops[0]}  {_short_shape(last.shape)}"
            else:
                detail = f"{len(ops)} ops  {_short_shape(last.shape)}"
        boxes.append(Box(key=g, label=label, detail=detail.strip(), ops=ops, fill=_fill(ops) if ops else "#e5e7eb"))
    edges = sorted({(index[group[s]], index[group[n.name]]) for n in keep for s in inputs[n.name]
                    if group[s] != group[n.name]})
    return boxes, edges


def _table_boxes(layer_table: str) -> tuple[list[Box], list[tuple[int, int]]]:
    """Without a traced graph: the layer table's rows as a chain (grouped by top-level module when long)."""
    rows = []
    for line in layer_table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("layer", "") and not cells[0].startswith(("---", "**")):
            rows.append(cells)
    if len(rows) > MAX_BOXES:
        merged: dict[str, list[list[str]]] = defaultdict(list)
        for row in rows:
            merged[row[0].split(".")[0]].append(row)
        boxes = [Box(key=k, label=k, detail=f"{len(v)} layers  {_short_shape(v[-1][2])}") for k, v in merged.items()]
    else:
        boxes = [Box(key=r[0], label=f"{r[0]} · {r[1]}", detail=_short_shape(r[2]), ops=[r[1].lower()],
                     fill=_fill([r[1].lower()])) for r in rows]
    return boxes, [(i, i + 1) for i in range(len(boxes) - 1)]


def _layers(count: int, edges: list[tuple[int, int]]) -> list[int]:
    """Longest-path layer of each box, in topological order (boxes on a cycle keep what they have)."""
    children: dict[int, list[int]] = defaultdict(list)
    waiting = [0] * count
    for src, dst in edges:
        children[src].append(dst)
        waiting[dst] += 1
    layer = [0] * count
    ready = [i for i in range(count) if waiting[i] == 0]
    while ready:
        node = ready.pop()
        for child in children[node]:
            layer[child] = max(layer[child], layer[node] + 1)
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return layer


def _text(x: float, y: float, content: str, size: int, weight: str = "normal", color: str = "#111827") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="{size}" font-weight="{weight}" '
            f'fill="{color}">{html.escape(content)}</text>')


def _fit(text: str, size: int) -> str:
    limit = int((BOX_W - 10) / (0.58 * size))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(boxes: list[Box], edges: list[tuple[int, int]], title: str) -> str:
    """An SVG document of the boxes in layers, top to bottom."""
    layer = _layers(len(boxes), edges)
    rows: dict[int, list[int]] = defaultdict(list)
    for i, lay in enumerate(layer):
        rows[lay].append(i)
    parents: dict[int, list[int]] = defaultdict(list)
    for src, dst in edges:
        parents[dst].append(src)
    slot: dict[int, float] = {}
    for lay in sorted(rows):  # order each layer by the mean slot of its parents (barycenter)
        members = sorted(rows[lay],
                         key=lambda i: (sum(slot.get(p, 0) for p in parents[i]) / max(len(parents[i]), 1), i))
        for j, i in enumerate(members):
            slot[i] = j - (len(members) - 1) / 2
        rows[lay] = members
    widest = max((len(m) for m in rows.values()), default=1)
    long_edges = [(s, d) for s, d in edges if layer[d] - layer[s] != 1]
    arc_room = 30 + 12 * min(len(long_edges), 12)
    width = MARGIN * 2 + widest * BOX_W + (widest - 1) * GAP_X + arc_room
    top = MARGIN + 22
    height = top + (max(layer, default=0) + 1) * (BOX_H + GAP_Y) + MARGIN
    center = MARGIN + (widest * BOX_W + (widest - 1) * GAP_X) / 2
    pos = {i: (center + slot[i] * (BOX_W + GAP_X), top + layer[i] * (BOX_H + GAP_Y)) for i in range(len(boxes))}
    right_edge = center + (widest * BOX_W + (widest - 1) * GAP_X) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="runner-graph-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6b7280"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
        _text(width / 2, MARGIN + 8, title, 14, "bold"),
    ]
    arc = 0
    for src, dst in edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        if layer[dst] - layer[src] == 1:
            mid = (y1 + BOX_H + y2) / 2
            d = f"M{x1:.1f},{y1 + BOX_H:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}"
        else:  # a skip connection: out of the right side, along the margin, back in
            arc += 1
            out = right_edge + 14 + 12 * ((arc - 1) % 12)
            sx, sy = x1 + BOX_W / 2, y1 + BOX_H / 2
            ex, ey = x2 + BOX_W / 2, y2 + BOX_H / 2
            d = f"M{sx:.1f},{sy:.1f} C{out:.1f},{sy:.1f} {out:.1f},{ey:.1f} {ex:.1f},{ey:.1f}"
        parts.append(f'<path d="{d}" fill="none" stroke="#9ca3af" stroke-width="1.4" '
                     'marker-end="url(#runner-graph-arrow)"/>')
    for i, box in enumerate(boxes):
        x, y = pos[i]
        parts.append(f'<g><title>{html.escape(box.key)}: {html.escape(", ".join(box.ops))}</title>'
                     f'<rect x="{x - BOX_W / 2:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="6" '
                     f'fill="{box.fill}" stroke="#6b7280" stroke-width="1"/>'
                     + _text(x, y + 16, _fit(box.label, 12), 12, "bold")
                     + _text(x, y + 32, _fit(box.detail, 11), 11, color="#374151") + "</g>")
    parts.append("</svg>")
    return "".join(parts)


def graph_svg(nodes: list[GraphNode], layer_table: str, title: str = "model") -> str:
    """The picture of a traced model (or, when tracing failed, of its layer table)."""
    boxes, edges = _boxes(nodes) if nodes else _table_boxes(layer_table)
    if not boxes:
        boxes, edges = [Box(key="model", label="no graph", detail="tracing failed")], []
    return render(boxes, edges, title)

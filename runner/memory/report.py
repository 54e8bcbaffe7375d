"""The breakdown as people and programs read it: a rich table, a markdown table, and JSON."""

from __future__ import annotations

from typing import Any

from runner.memory.estimate import PARTS, Breakdown

COLUMNS = {"fp32": "fp32", "amp": "AMP"}

LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer_state": "optimizer state",
          "input_batch": "input batch", "activations": "activations for backward"}


def format_bytes(count: float) -> str:
    """1536 → '1.50 KiB' (binary units, 3 significant figures)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"


def how(breakdown: Breakdown, part: str) -> str:
    """What a part is made of (for the selected precision), with the numbers that make it."""
    b = breakdown
    if part == "parameters":
        frozen = f", {b.parameters - b.trainable:,} frozen" if b.trainable != b.parameters else ""
        return f"{b.parameters:,} parameters{frozen} + buffers"
    if part == "gradients":
        return "1× the trainable parameters"
    if part == "optimizer_state":
        factor = b.optimizer_bytes // b.gradient_bytes if b.gradient_bytes else 0
        return f"{b.optimizer}: {factor}× the trainable parameters"
    if part == "input_batch":
        return f"{b.batch_size} × {'×'.join(map(str, b.input_shape))} and targets"
    act = b.activations[b.precision]
    if not act.per_sample:  # measured once for this batch (a real step), not per sample
        return b.method
    return f"{b.batch_size} × {format_bytes(act.per_sample)} + {format_bytes(act.fixed)} ({b.method})"


def rows(breakdown: Breakdown) -> list[tuple[str, ...]]:
    """(part, one column per known precision, how) rows, the total last."""
    parts = {p: breakdown.parts(p) for p in breakdown.precisions}
    out = [(LABELS[name], *(format_bytes(parts[p][name]) for p in parts), how(breakdown, name)) for name in PARTS]
    out.append(("total", *(format_bytes(breakdown.total(p)) for p in parts), ""))
    return out


def title(breakdown: Breakdown) -> str:
    shape = ",".join(map(str, breakdown.input_shape))
    return (f"{breakdown.model}: input {shape}, batch {breakdown.batch_size}, {breakdown.optimizer}, "
            f"{'AMP' if breakdown.amp else 'fp32'} on {breakdown.device_type}")


def rich_table(breakdown: Breakdown) -> Any:
    """A rich Table; the selected precision's column is bold."""
    from rich.table import Table

    table = Table(title=title(breakdown), title_justify="left")
    table.add_column("part")
    for precision in breakdown.precisions:
        selected = precision == breakdown.precision
        table.add_column(COLUMNS[precision] + (" *" if selected else ""), justify="right",
                         style="bold" if selected else None)
    table.add_column("how")
    body = rows(breakdown)
    for index, row in enumerate(body):
        table.add_row(*row, end_section=index == len(body) - 2)
    return table


def markdown(breakdown: Breakdown) -> str:
    """The same table as markdown (TensorBoard text, post-mortem files)."""
    columns = [COLUMNS[p] for p in breakdown.precisions]
    lines = [f"**{title(breakdown)}**", "", f"| part | {' | '.join(columns)} | how |",
             "|---|" + "---:|" * len(columns) + "---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows(breakdown)]
    return "\n".join(lines)


def as_json(breakdown: Breakdown) -> dict[str, Any]:
    """Every number of the table, exact, in bytes."""
    b = breakdown
    return {
        "model": b.model,
        "input_shape": list(b.input_shape),
        "batch_size": b.batch_size,
        "optimizer": b.optimizer,
        "device_type": b.device_type,
        "selected": b.precision,
        "amp_dtype": b.amp_dtype,
        "parameters": b.parameters,
        "trainable_parameters": b.trainable,
        "activations_measured_by": b.method,
        "activations_per_sample": {p: b.activations[p].per_sample for p in b.precisions},
        "activations_fixed": {p: b.activations[p].fixed for p in b.precisions},
        "bytes": {p: {**b.parts(p), "total": b.total(p)} for p in b.precisions},
    }

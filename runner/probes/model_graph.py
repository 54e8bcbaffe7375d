"""The model's picture: a traced graph for TensorBoard (and drawable nodes), plus a layer table.

Tracing happens once, before the first step. If it fails (data-dependent control flow, exotic
outputs), the event carries the error and the layer table instead, and the run goes on.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from runner.telemetry import tags
from runner.telemetry.events import Graph, GraphNode

log = logging.getLogger("runner.telemetry")


def _shape_of(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return "×".join(str(d) for d in output.shape)
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {_shape_of(v)}" for k, v in output.items()) + "}"
    if isinstance(output, (list, tuple)):
        return "(" + ", ".join(_shape_of(v) for v in output) + ")"
    return type(output).__name__


def layer_table(model: nn.Module, example: torch.Tensor) -> str:
    """The torchsummary view: leaf layers with type, output shape and parameter count (markdown)."""
    shapes: dict[str, str] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: shapes.__setitem__(name, _shape_of(out))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    rows = ["| layer | type | output shape | parameters |", "|---|---|---|---|"]
    for name, module in model.named_modules():
        if name in shapes:
            count = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(f"| {name} | {type(module).__name__} | {shapes[name]} | {count:,} |")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows.append(f"| **total** | | | {total:,} ({trainable:,} trainable) |")
    return "\n".join(rows)


def _nodes(graph_def: Any) -> list[GraphNode]:
    nodes = []
    for node in graph_def.node:
        shape = ""
        if "_output_shapes" in node.attr:
            dims = node.attr["_output_shapes"].list.shape
            if dims:
                shape = "×".join(str(d.size) for d in dims[0].dim)
        nodes.append(GraphNode(name=node.name, op=node.op, inputs=list(node.input), shape=shape))
    return nodes


# The torch releases whose private graph helpers `_graph_def` was checked on (pyproject allows >= the first).
GRAPH_HELPERS_CHECKED = ((2, 6), (2, 14))


def torch_release(version: str = torch.__version__) -> tuple[int, int]:
    """(major, minor) of a torch version string such as "2.14.1+cu130"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _graph_def(model: nn.Module, example: torch.Tensor) -> Any:
    """TensorBoard's GraphDef of a trace (as `SummaryWriter.add_graph` builds it, without its second,
    checking run of the model: half the time).

    The one place that uses torch's private helpers (`torch.utils.tensorboard._pytorch_graph.parse`,
    `torch._C._jit_pass_inline`; unchanged from 2.6 to 2.14). A release without them gets an error
    naming it, and the caller shows the layer table instead."""
    from tensorboard.compat.proto.graph_pb2 import GraphDef
    from tensorboard.compat.proto.versions_pb2 import VersionDef

    try:
        from torch.utils.tensorboard._pytorch_graph import parse

        inline = torch._C._jit_pass_inline
    except (ImportError, AttributeError) as exc:
        first, last = (".".join(map(str, v)) for v in GRAPH_HELPERS_CHECKED)
        newer = " (newer than the releases checked)" if torch_release() > GRAPH_HELPERS_CHECKED[1] else ""
        raise RuntimeError(f"torch {torch.__version__}{newer} lacks the private graph helpers runner uses "
                           f"(checked on torch {first} to {last}): {exc}") from exc
    with warnings.catch_warnings():  # here only: torch.jit.trace's deprecation notice and tracer remarks
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        trace = torch.jit.trace(model, (example,), strict=False, check_trace=False)
    graph = trace.graph
    inline(graph)
    return GraphDef(node=parse(graph, trace, (example,)), versions=VersionDef(producer=22))


def _reason(exc: BaseException) -> str:
    """One readable line: the message's first line, or its last when the first dumps a tensor."""
    lines = [line.strip(" :") for line in str(exc).strip().splitlines() if line.strip(" :")]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if len(lines[0]) > 160 or "tensor(" in lines[0] else lines[0]
    return f"{type(exc).__name__}: {line[:200]}"


def trace_graph(model: nn.Module, example: torch.Tensor, step: int = 0, rank: int = 0) -> Graph:
    """Trace the (unwrapped) model on an example batch; never raises: a model that cannot be traced
    (or run on the example) gets the error and whatever layer table could be made."""
    was_training = model.training
    model.eval()  # BatchNorm with a tiny batch; the structure is the same
    try:
        try:
            table = layer_table(model, example)
        except Exception as exc:
            table = f"(no layer table: the model did not run on an example batch of shape {tuple(example.shape)}: " \
                    f"{_reason(exc)})"
        try:
            graph_def = _graph_def(model, example)
        except Exception as exc:
            log.warning("model graph: tracing failed (%s); logging the layer table instead", _reason(exc))
            return Graph(tag=tags.MODEL, step=step, rank=rank, graph_def=None, nodes=[], layer_table=table,
                         error=_reason(exc))
        return Graph(tag=tags.MODEL, step=step, rank=rank, graph_def=graph_def, nodes=_nodes(graph_def),
                     layer_table=table)
    finally:
        model.train(was_training)

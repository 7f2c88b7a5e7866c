"""Multiply-accumulates and parameter counts, from static shapes with a batch of one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int


def node_macs(node: gs.Node, shapes: dict[str, tuple]) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul; 0 for everything else."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
        return 0
    weight = node.inputs[1]
    wshape = weight.values.shape if isinstance(weight, gs.Constant) else shapes.get(weight.name)
    out = shapes.get(node.outputs[0].name)
    x = shapes.get(node.inputs[0].name)
    if wshape is None or out is None or x is None or any(not isinstance(d, int) for d in (*out, *x)):
        return 0
    if node.op == "Conv":
        return int(np.prod(out, dtype=np.int64) * np.prod(wshape[1:], dtype=np.int64))
    if node.op == "ConvTranspose":
        return int(np.prod(x, dtype=np.int64) * np.prod(wshape[1:], dtype=np.int64))
    inner = x[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else x[-1]
    return int(np.prod(out, dtype=np.int64) * inner)


def model_cost(graph: gs.Graph, shapes: dict[str, tuple]) -> Cost:
    macs = sum(node_macs(node, shapes) for node in graph.nodes)
    params = sum(int(t.values.size) for t in graph.tensors().values()
                 if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating))
    return Cost(int(macs), int(params))

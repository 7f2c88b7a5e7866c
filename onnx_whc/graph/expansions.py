"""Folded constants larger than what they are computed from, and how they are written back.

Loading folds everything that does not depend on the inputs, so the analysis sees constants. Some
folds expand: LeViT's attention biases are `Gather(table, indices)`, a (heads, offsets) table
turned into (heads, N, N); an `Expand` or `Tile` of a small constant. Written out folded, such a
tensor would make the pruned model carry more weights than its original. Export writes the
original computation back for every expansion that the surgery left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class Expansion:
    """A folded constant, and the nodes and weights of the original model that compute it."""

    values: np.ndarray  # the folded values: the surgery leaves this very array in place when it changes nothing
    nodes: list[onnx.NodeProto]  # in the original model's order
    sources: list[onnx.TensorProto]  # the initializers they read


def _float_elements(tensor: onnx.TensorProto) -> int:
    if onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind != "f":
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64))


def find_expansions(model: onnx.ModelProto, graph: gs.Graph) -> dict[str, Expansion]:
    """The constants of the folded `graph` that `model` computes from fewer float values than they hold."""
    initializers = {t.name: t for t in model.graph.initializer}
    order = {}
    producer = {}
    for index, node in enumerate(model.graph.node):
        for name in node.output:
            producer[name] = node
            order[name] = index
    found = {}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or tensor.name not in producer or tensor.name in initializers:
            continue
        values = tensor.values
        if not isinstance(values, np.ndarray) or values.dtype.kind != "f":
            continue
        nodes, sources = _computation(tensor.name, producer, initializers)
        if nodes is None:
            continue
        constants = [a.t for node in nodes if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
        if values.size > sum(map(_float_elements, sources + constants)):
            nodes.sort(key=lambda node: order[node.output[0]])
            found[tensor.name] = Expansion(values, [_copy(n) for n in nodes], [_copy(t) for t in sources])
    return found


def _computation(name: str, producer: dict, initializers: dict):
    """(nodes, initializers) computing `name` from initializers alone, or (None, None)."""
    nodes, sources, seen, stack = [], [], set(), [name]
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        if current in initializers:
            sources.append(initializers[current])
            continue
        node = producer.get(current)
        if node is None or node.domain not in ("", "ai.onnx") or any(a.HasField("g") or a.graphs for a in node.attribute):
            return None, None  # reads a graph input, or is no plain ONNX op
        if node not in nodes:
            nodes.append(node)
            stack.extend(node.input)
    return nodes, sources


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def unchanged(graph: gs.Graph, expansions: dict[str, Expansion]) -> list[str]:
    """The expansions the graph still holds as they were folded."""
    tensors = graph.tensors()
    return [name for name, e in expansions.items()
            if isinstance(tensors.get(name), gs.Constant) and tensors[name].values is e.values]


def restore(model: onnx.ModelProto, names: list[str], expansions: dict[str, Expansion]) -> None:
    """Write the original computation of each named expansion back in place of its folded values.

    Left folded: one a layer reads as its weight or bias (recovery refits those), a graph output,
    and one whose computation would clash with a tensor of the model.
    """
    graph = model.graph
    initializers = {t.name: i for i, t in enumerate(graph.initializer)}
    outputs = {o.name for o in graph.output}
    layer_inputs = {name for node in graph.node if node.op_type in LAYERS for name in node.input[1:]}
    produced = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    node_names = {node.name for node in graph.node}
    restored, nodes = set(), []
    for name in names:
        expansion = expansions[name]
        if name not in initializers or name in outputs or name in layer_inputs:
            continue
        made = {out for node in expansion.nodes for out in node.output}
        if made & (produced | set(initializers) - {name}) or any(
                s.name in initializers and not _same(graph.initializer[initializers[s.name]], s)
                for s in expansion.sources):
            continue
        restored.add(name)
        produced |= made
        for source in expansion.sources:
            if source.name not in initializers:
                initializers[source.name] = len(graph.initializer)
                graph.initializer.append(source)
        for node in expansion.nodes:
            node = _copy(node)
            base = node.name or f"{node.op_type}_{name}"
            node.name, count = base, 0
            while node.name in node_names:
                count += 1
                node.name = f"{base}_{count}"
            node_names.add(node.name)
            nodes.append(node)
    if not restored:
        return
    for index in sorted((initializers[name] for name in restored), reverse=True):
        del graph.initializer[index]
    # They read initializers alone (and each other, in the original's order): first in the graph.
    everything = nodes + [_copy(n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(everything)


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)

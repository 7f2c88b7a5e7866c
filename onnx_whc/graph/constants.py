"""The values of a graph's constant tensors (its initializers and its Constant nodes' outputs) and of node attributes."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


def constant_arrays(graph: onnx.GraphProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of those of `names` that are constants; only those are copied out of the graph."""
    wanted = set(names)
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in wanted}
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted:
            value = next((attr.t for attr in node.attribute if attr.name == "value"), None)
            if value is not None:
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default

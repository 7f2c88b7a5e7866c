"""The values of a graph's constant tensors (its initializers and its Constant nodes' outputs), of node attributes,
and of the model's default opset."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


def default_opset(model: onnx.ModelProto, missing: int | None = None) -> int | None:
    """The version of the default ONNX domain the model imports; `missing` where it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


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


def list_initializers_as_inputs(model: onnx.ModelProto, former_weights: Iterable[str] = ()) -> None:
    """List every initializer among the graph inputs too, with its type and shape, as IR < 4 requires.

    Declarations of weights a rewrite dropped (`former_weights` no longer among the initializers)
    go with them: left behind they would read as inputs to feed. The real inputs keep their place
    in front; every weight is declared after them from its own type and dimensions, so new weights
    (a recovered bias, a copy of a shared weight) and resized ones are declared as they are.
    """
    weights = {t.name: t for t in model.graph.initializer}
    gone = set(former_weights) - set(weights)
    real = [i for i in model.graph.input if i.name not in weights and i.name not in gone]
    declared = [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer]
    del model.graph.input[:]
    model.graph.input.extend(real + declared)

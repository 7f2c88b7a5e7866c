"""The exactness oracle: the original model with the removed channels' readers zeroed.

A correctly pruned model computes exactly what the original computes once every Conv,
ConvTranspose, Gemm and MatMul input slice that reads a removed channel is set to zero.
Tests, benchmarks and the fuzzer compare against this; any index mistake shows up.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .dependency import ChannelAnalysis
from .load import LoadedModel
from .ops import consumer_weight_axis


def zeroed_reference(loaded: LoadedModel, analysis: ChannelAnalysis, removed_roots: np.ndarray) -> onnx.ModelProto:
    """Export the unpruned graph of `loaded` with every reader of a removed channel zeroed."""
    graph = loaded.graph.copy()
    for node in graph.nodes:
        where = consumer_weight_axis(node)
        mask = analysis.keep_mask(node.inputs[0].name, removed_roots) if where else None
        if mask is None or mask.all():
            continue
        index, axis = where
        weight = np.array(node.inputs[index].values, copy=True)
        if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1:
            group = int(node.attrs["group"])
            if weight.shape[1] == 1:
                continue  # depthwise passes channels on; its readers downstream are zeroed
            mask = mask.reshape(group, -1)[0]
        index_tuple = [slice(None)] * weight.ndim
        index_tuple[axis] = ~mask
        weight[tuple(index_tuple)] = 0
        node.inputs[index] = gs.Constant(f"{node.inputs[index].name}__zeroed_{node.name}", weight)
    return export(graph, loaded)


def export(graph: gs.Graph, loaded: LoadedModel) -> onnx.ModelProto:
    """Export a graph with the original model's IR version and metadata."""
    model = gs.export_onnx(graph.cleanup(), do_type_check=False)
    model.ir_version = loaded.ir_version
    if loaded.initializers_as_inputs:
        known = {i.name for i in model.graph.input}
        for tensor in model.graph.initializer:
            if tensor.name not in known:
                model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    for key, value in loaded.metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model

"""The exactness oracle: the original model with the removed channels' readers zeroed.

A correctly pruned model computes exactly what the original computes once every Conv,
ConvTranspose, Gemm and MatMul input slice that reads a removed channel is set to zero.
Tests, benchmarks and the fuzzer compare against this; any index mistake shows up.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import expansions
from .constants import list_initializers_as_inputs
from .dependency import ChannelAnalysis
from .load import LoadedModel, graphsurgeon_to_stderr
from .ops import consumer_weight_axis


def zeroed_reference(loaded: LoadedModel, analysis: ChannelAnalysis, removed_roots: np.ndarray) -> onnx.ModelProto:
    """Export the unpruned graph of `loaded` with every reader of a removed channel zeroed."""
    graph = loaded.graph.copy()
    for node in graph.nodes:
        where = consumer_weight_axis(node) if analysis.reads_channels(node) else None
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


_STREAMED_BYTES = 1 << 16


def _export_streaming_weights(graph: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx, but large weights are written straight into the exported model.

    The exporter builds every tensor, then copies them into a graph, then the graph into a model:
    twice the weights on top of the graph's own arrays. Exporting empty placeholders and filling
    them in one tensor at a time keeps it to once.
    """
    large = {}
    for tensor in graph.tensors().values():
        if (isinstance(tensor, gs.Constant) and isinstance(tensor.values, np.ndarray)
                and tensor.values.nbytes >= _STREAMED_BYTES and tensor.data_location is None
                and tensor.export_dtype == tensor.values.dtype):
            large[tensor.name] = (tensor, tensor.values)
            tensor.values = np.zeros(0, dtype=tensor.values.dtype)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in large.values():
            tensor.values = values
    for proto in model.graph.initializer:
        if proto.name in large:
            proto.CopyFrom(onnx.numpy_helper.from_array(large[proto.name][1], proto.name))
    return model


def release_weights(graph: gs.Graph) -> None:
    """Empty every weight of a graph that is no longer needed (its export holds them)."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and isinstance(tensor.values, np.ndarray):
            tensor.values = np.zeros(0, dtype=tensor.values.dtype)


@graphsurgeon_to_stderr()
def export(graph: gs.Graph, loaded: LoadedModel) -> onnx.ModelProto:
    """Export a graph with the original model's IR version and metadata."""
    model = _export_streaming_weights(graph.cleanup())
    if loaded.expansions:
        expansions.restore(model, expansions.unchanged(graph, loaded.expansions), loaded.expansions)
    model.ir_version = loaded.ir_version
    if loaded.initializers_as_inputs or loaded.ir_version < 4:
        list_initializers_as_inputs(model)
    for key, value in loaded.metadata.items():
        model.metadata_props.add(key=key, value=value)
    return model

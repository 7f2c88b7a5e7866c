"""Graph surgery: remove the planned channels from every weight, parameter and index.

One rewrite per rule kind, mirroring `dependency`. Sliced weights become new constants so an
initializer shared by several nodes is never changed under another reader.
"""

from __future__ import annotations

import gc

import numpy as np
import onnx_graphsurgeon as gs

from .dependency import (
    ChannelAnalysis,
    gemm_output_axis,
    pad_amounts,
    resize_channel_position,
    slice_params,
    split_sizes,
)
from .load import LoadedModel, graphsurgeon_to_stderr, return_freed_memory
from .ops import consumer_weight_axis, node_rule, normalize_axis, param_channel_axis, rule_for
from .plan import PrunePlan
from .reshape_target import reshape_target, rewrite_target


class _Surgeon:
    def __init__(self, loaded: LoadedModel, analysis: ChannelAnalysis, plan: PrunePlan):
        self.loaded = loaded
        self.analysis = analysis
        self.removed = plan.removed_roots
        self.readers = {}
        for node in loaded.graph.nodes:
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant):
                    self.readers[tensor.name] = self.readers.get(tensor.name, 0) + 1
        self.copies: dict[str, list[gs.Constant]] = {}  # a shared constant's rewritten values so far

    def keep(self, tensor) -> np.ndarray | None:
        mask = self.analysis.keep_mask(tensor.name, self.removed) if tensor is not None else None
        return None if mask is None or mask.all() else mask

    def rank(self, tensor) -> int:
        return len(self.loaded.shapes[tensor.name])

    def set_input(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give a node's constant input new values. A constant other nodes read too is never changed
        under them: the node gets a copy, and readers left with equal values share one copy."""
        old = node.inputs[index]
        values = np.ascontiguousarray(values)
        if self.readers.get(old.name, 0) <= 1:
            node.inputs[index] = gs.Constant(old.name, values)
            return
        copies = self.copies.setdefault(old.name, [])
        same = next((c for c in copies if c.values.dtype == values.dtype and c.values.shape == values.shape
                     and np.array_equal(c.values, values)), None)
        if same is None:
            same = gs.Constant(f"{old.name}__{node.name}", values)
            copies.append(same)
        node.inputs[index] = same

    def slice_input(self, node: gs.Node, index: int, axis: int, mask: np.ndarray) -> None:
        values = np.asarray(node.inputs[index].values)
        self.set_input(node, index, np.compress(mask, values, axis=axis))


def _elementwise(s: _Surgeon, node: gs.Node) -> None:
    mask = s.keep(node.inputs[0])
    if mask is None:
        return
    for index in rule_for(node.op).params:
        if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
            shape = node.inputs[index].values.shape
            axis = param_channel_axis(node.op, shape, s.rank(node.inputs[0]))
            if axis is not None and shape[axis] == len(mask):
                s.slice_input(node, index, axis, mask)


def _broadcast(s: _Surgeon, node: gs.Node) -> None:
    out = node.outputs[0]
    mask = s.keep(out)
    if mask is None:
        return
    for index, tensor in enumerate(node.inputs):
        if isinstance(tensor, gs.Constant):
            axis = param_channel_axis(node.op, tensor.values.shape, s.rank(out), s.analysis.axis(out.name))
            if axis is not None and tensor.values.shape[axis] == len(mask):
                s.slice_input(node, index, axis, mask)


def _conv(s: _Surgeon, node: gs.Node) -> None:
    mask_in, mask_out = s.keep(node.inputs[0]), s.keep(node.outputs[0])
    if mask_in is None and mask_out is None:
        return
    weight = np.asarray(node.inputs[1].values)
    group = int(node.attrs.get("group", 1))
    if mask_out is not None:
        weight = weight[mask_out]
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            s.slice_input(node, 2, 0, mask_out)
    if group > 1 and weight.shape[1] == 1:
        # Depthwise: whole groups went; the group count follows the input channels.
        node.attrs["group"] = int(mask_in.sum()) if mask_in is not None else group
    elif mask_in is not None:
        weight = weight[:, mask_in.reshape(group, -1)[0]]
    s.set_input(node, 1, weight)


def _conv_transpose(s: _Surgeon, node: gs.Node) -> None:
    mask_in, mask_out = s.keep(node.inputs[0]), s.keep(node.outputs[0])
    weight = np.asarray(node.inputs[1].values)
    if mask_in is not None:
        weight = weight[mask_in]
    if mask_out is not None:
        weight = weight[:, mask_out]
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            s.slice_input(node, 2, 0, mask_out)
    if mask_in is not None or mask_out is not None:
        s.set_input(node, 1, weight)


def _pad(s: _Surgeon, node: gs.Node) -> None:
    mask = s.keep(node.outputs[0])
    if mask is None:
        return  # also tensors that carry no channels (shape computations) and have no recorded shape
    rank = s.rank(node.inputs[0])
    channel_axis = s.analysis.axis(node.outputs[0].name)
    begin, end, _ = pad_amounts(node, rank, channel_axis, s.loaded.opset)
    if begin == 0 and end == 0:
        return
    new_begin, new_end = int(mask[:begin].sum()), int(mask[len(mask) - end:].sum()) if end else 0
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
        pads[channel_axis], pads[channel_axis + rank] = new_begin, new_end
        node.attrs["pads"] = pads
        return
    pads = np.asarray(node.inputs[1].values).copy()
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = [normalize_axis(int(a), rank) for a in np.asarray(node.inputs[3].values).ravel()]
    i = axes.index(channel_axis)
    pads[i], pads[i + len(axes)] = new_begin, new_end
    s.set_input(node, 1, pads)


def _split(s: _Surgeon, node: gs.Node) -> None:
    mask = s.keep(node.inputs[0])
    channel_axis = s.analysis.axis(node.inputs[0].name)
    if mask is None or normalize_axis(int(node.attrs.get("axis", 0)), s.rank(node.inputs[0])) != channel_axis:
        return
    sizes = split_sizes(node, len(mask))
    offsets = np.cumsum([0] + sizes)
    new_sizes = np.array([mask[lo:hi].sum() for lo, hi in zip(offsets[:-1], offsets[1:])], dtype=np.int64)
    node.attrs.pop("num_outputs", None)
    if len(node.inputs) > 1 and node.inputs[1].name:
        s.set_input(node, 1, new_sizes)
    elif s.loaded.opset >= 13:
        node.inputs.append(gs.Constant(f"{node.name}__split", new_sizes))
    else:
        node.attrs["split"] = new_sizes.tolist()


def _slice(s: _Surgeon, node: gs.Node) -> None:
    mask = s.keep(node.inputs[0])
    if mask is None:
        return
    rank = s.rank(node.inputs[0])
    params = slice_params(node, rank)
    channel_axis = s.analysis.axis(node.inputs[0].name)
    if channel_axis not in params:
        return
    start, end, step = params[channel_axis]
    lo, hi, _ = slice(start, end, step).indices(len(mask))
    hi = max(lo, hi)
    new_lo = int(mask[:lo].sum())
    new_hi = new_lo + int(mask[lo:hi].sum())
    if "starts" in node.attrs:
        axes = [normalize_axis(int(a), rank) for a in node.attrs.get("axes", range(len(node.attrs["starts"])))]
        i = axes.index(channel_axis)
        for key, value in (("starts", new_lo), ("ends", new_hi)):
            values = list(node.attrs[key])
            values[i] = value
            node.attrs[key] = values
        return
    n = len(np.asarray(node.inputs[1].values).ravel())
    axes = list(range(n))
    if len(node.inputs) > 3 and node.inputs[3].name:
        axes = [normalize_axis(int(a), rank) for a in np.asarray(node.inputs[3].values).ravel()]
    i = axes.index(channel_axis)
    for index, value in ((1, new_lo), (2, new_hi)):
        values = np.asarray(node.inputs[index].values).copy().reshape(-1)
        values[i] = value
        s.set_input(node, index, values)


def _reshape(s: _Surgeon, node: gs.Node) -> None:
    """The target's channel count (feature count after a flatten; C/g where a channel shuffle splits it)."""
    target = reshape_target(node)
    if target is None:
        return  # a run-time target that mentions no channel count: it adapts by itself
    changes = {}
    mask_in, mask_out = s.keep(node.inputs[0]), s.keep(node.outputs[0])
    axis = s.analysis.axis(node.outputs[0].name)  # a moved SE gate's channels need not be on axis 1
    if mask_out is not None and len(target.values) > axis and target.known(axis) and target.values[axis] > 0:
        changes[axis] = int(mask_out.sum())
    elif mask_out is None and mask_in is not None and len(target.values) == 5 and target.values[2] > 0:
        changes[2] = int(mask_in.sum()) // target.values[1]  # the shuffle's split: every group lost alike
    rewrite_target(node, target, changes, lambda old: old if s.readers.get(old, 0) <= 1 else f"{old}__{node.name}")


def _group_normalization(s: _Surgeon, node: gs.Node) -> None:
    """Whole groups went: `num_groups` counts those left; scale and bias lose their groups (opset 18)
    or their channels (21)."""
    mask = s.keep(node.inputs[0])
    if mask is None:
        return
    groups = int(node.attrs["num_groups"])
    kept_groups = mask.reshape(groups, -1)[:, 0]
    node.attrs["num_groups"] = int(kept_groups.sum())
    for index in (1, 2):
        if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
            size = node.inputs[index].values.shape[0]
            s.slice_input(node, index, 0, mask if size == len(mask) else kept_groups)


def _resize(s: _Surgeon, node: gs.Node) -> None:
    mask = s.keep(node.outputs[0])
    if mask is None or node.op != "Resize" or len(node.inputs) < 4 or not isinstance(node.inputs[3], gs.Constant):
        return
    position = resize_channel_position(node, s.rank(node.inputs[0]))
    if position is None:
        return
    sizes = np.asarray(node.inputs[3].values).copy()
    sizes[position] = int(mask.sum())
    s.set_input(node, 3, sizes)


def _consumer(s: _Surgeon, node: gs.Node) -> None:
    mask = s.keep(node.inputs[0]) if s.analysis.reads_channels(node) else None
    if mask is not None:
        index, axis = consumer_weight_axis(node)
        s.slice_input(node, index, axis, mask)


def _gemm(s: _Surgeon, node: gs.Node) -> None:
    """Input features as any consumer; output features are rows of the weight and the bias."""
    _consumer(s, node)
    mask = s.keep(node.outputs[0])
    if mask is None:
        return
    s.slice_input(node, 1, gemm_output_axis(node), mask)
    if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        bias = node.inputs[2].values
        if bias.ndim and bias.shape[-1] == len(mask):
            s.slice_input(node, 2, bias.ndim - 1, mask)


REWRITES = {
    "elementwise": _elementwise, "broadcast": _broadcast, "conv": _conv, "conv_transpose": _conv_transpose,
    "pad": _pad, "split": _split, "slice": _slice, "reshape": _reshape, "resize": _resize,
    "gemm": _gemm, "matmul": _gemm, "groupnorm": _group_normalization,
}


@graphsurgeon_to_stderr()
def apply_plan(loaded: LoadedModel, analysis: ChannelAnalysis, plan: PrunePlan) -> gs.Graph:
    """Rewrite `loaded.graph` in place so the planned channels no longer exist."""
    surgeon = _Surgeon(loaded, analysis, plan)
    graph = loaded.graph
    for node in list(graph.nodes):
        rewrite = REWRITES.get(node_rule(node).kind)
        if rewrite:
            rewrite(surgeon, node)
    keep_shapes = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep_shapes:
            tensor.shape = None  # stale channel counts; ONNX Runtime infers them again
    graph.cleanup().toposort()
    gc.collect()  # replaced weights sit in reference cycles (gs tensors <-> their node lists)
    return_freed_memory()
    return graph

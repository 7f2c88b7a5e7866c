"""Data-free bias compensation: fold the expected value of removed channels into their readers.

A reader y = W x + b that loses input channel c loses W[:, c] x_c; replacing it with its
expectation W[:, c] E[x_c] keeps every output's mean. Without data, E[x_c] is estimated by
propagating per-channel Gaussian statistics (mean, variance) through the original graph:

- graph inputs are taken as normalised (mean 0, variance 1 per channel);
- BatchNormalization outputs are N(beta, gamma^2), as its running statistics promise
  (Nagel et al., 2019, data-free quantization);
- Conv/Gemm map means exactly and variances as if inputs were independent;
- Relu and Clip (ReLU6) use the moments of a clipped Gaussian; Add sums means and variances;
  pooling, Identity and channel Pad/Slice/Concat/Flatten move them along.

Where an op has no rule the estimate stops and readers downstream are left as they are.
With BatchNormalization folded into Conv, the Conv rule carries the whole estimate.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.constants import attribute
from .layers import Layer, read_affine, write_affine
from .replay import Weights

_erf = np.vectorize(math.erf, otypes=[np.float64])


class Stats:
    """Per-channel (or per-feature, for 2-D tensors) mean and variance."""

    def __init__(self, mean: np.ndarray, var: np.ndarray):
        self.mean = np.asarray(mean, np.float64)
        self.var = np.maximum(np.asarray(var, np.float64), 0.0)


def _cdf(t):
    return 0.5 * (1.0 + _erf(t / math.sqrt(2.0)))


def _pdf(t):
    return np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def clipped(stats: Stats, low: float, high: float) -> Stats:
    """Mean and variance of clip(z, low, high) for z ~ N(mean, var)."""
    mu, sigma = stats.mean, np.sqrt(stats.var)
    certain = sigma < 1e-12
    s = np.where(certain, 1.0, sigma)
    a, b = (low - mu) / s, (high - mu) / s
    pa, pb = _cdf(a), _cdf(b)
    da, db = _pdf(a), _pdf(b)
    a_da = np.where(np.isfinite(a), a, 0.0) * da  # t * pdf(t) -> 0 at infinite bounds
    b_db = np.where(np.isfinite(b), b, 0.0) * db
    low_part = low * pa if np.isfinite(low) else 0.0
    high_part = high * (1 - pb) if np.isfinite(high) else 0.0
    inside = pb - pa
    mean = low_part + high_part + mu * inside + s * (da - db)
    low_sq = low * low * pa if np.isfinite(low) else 0.0
    high_sq = high * high * (1 - pb) if np.isfinite(high) else 0.0
    second = low_sq + high_sq + mu * mu * inside + 2 * mu * s * (da - db) + s * s * (inside + a_da - b_db)
    exact = np.clip(mu, low, high)
    return Stats(np.where(certain, exact, mean), np.where(certain, 0.0, second - mean * mean))


class _Propagation:
    def __init__(self, model: onnx.ModelProto):
        self.weights = {t.name: t for t in model.graph.initializer}
        self.stats: dict[str, Stats] = {}
        self.ranks: dict[str, int] = {}
        for tensor in model.graph.input:
            dims = tensor.type.tensor_type.shape.dim
            if len(dims) >= 2 and dims[1].HasField("dim_value"):
                c = dims[1].dim_value
                self.stats[tensor.name] = Stats(np.zeros(c), np.ones(c))
                self.ranks[tensor.name] = len(dims)

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.weights[name]).astype(np.float64) if name in self.weights else None

    def run(self, nodes) -> dict[str, Stats]:
        for node in nodes:
            rule = RULES.get(node.op_type)
            inputs = [self.stats.get(name) for name in node.input[:1]]
            if rule is None or inputs[0] is None or not node.output:
                continue
            try:
                result = rule(self, node)
            except (KeyError, ValueError, IndexError, TypeError):
                result = None  # a shape this rule does not cover: stop the estimate here
            if result is not None:
                self.stats[node.output[0]] = result
                self.ranks[node.output[0]] = self.ranks.get(node.input[0], 4) if node.op_type not in (
                    "Flatten", "Reshape", "Gemm", "MatMul") else 2
        return self.stats


def _conv(p: _Propagation, node) -> Stats | None:
    w, x = p.const(node.input[1]), p.stats[node.input[0]]
    if w is None:
        return None
    group = int(attribute(node, "group", 1))
    c_out, per_group = w.shape[0], w.shape[1]
    sums, squares = w.reshape(c_out, per_group, -1).sum(axis=2), (w.reshape(c_out, per_group, -1) ** 2).sum(axis=2)
    mean_in = x.mean.reshape(group, per_group)
    var_in = x.var.reshape(group, per_group)
    owner = np.arange(c_out) // (c_out // group)  # the group of each output channel
    mean = (sums * mean_in[owner]).sum(axis=1)
    var = (squares * var_in[owner]).sum(axis=1)
    bias = p.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return Stats(mean + (bias if bias is not None else 0.0), var)


def _gemm(p: _Propagation, node) -> Stats | None:
    w, x = p.const(node.input[1]), p.stats[node.input[0]]
    if w is None or (node.op_type == "Gemm" and attribute(node, "transA", 0)):
        return None
    matrix = w.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else w
    alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    mean, var = alpha * (x.mean @ matrix), alpha * alpha * (x.var @ matrix ** 2)
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in p.weights:
        mean = mean + float(attribute(node, "beta", 1.0)) * p.const(node.input[2]).reshape(-1)
    return Stats(mean, var)


def _batch_norm(p: _Propagation, node) -> Stats | None:
    scale, shift = p.const(node.input[1]), p.const(node.input[2])
    return None if scale is None or shift is None else Stats(shift, scale ** 2)


def _clip(p: _Propagation, node) -> Stats:
    low, high = -np.inf, np.inf
    if node.op_type == "Relu":
        low = 0.0
    elif len(node.input) > 1:  # opset >= 11: bounds are inputs
        low = float(p.const(node.input[1])) if node.input[1] else low
        high = float(p.const(node.input[2])) if len(node.input) > 2 and node.input[2] else high
    else:
        low, high = float(attribute(node, "min", -np.inf)), float(attribute(node, "max", np.inf))
    return clipped(p.stats[node.input[0]], low, high)


def _same(p: _Propagation, node) -> Stats:
    return p.stats[node.input[0]]


def _add(p: _Propagation, node) -> Stats | None:
    parts = [p.stats.get(name) for name in node.input]
    if any(part is None for part in parts) or len({len(part.mean) for part in parts}) != 1:
        return None
    return Stats(sum(part.mean for part in parts), sum(part.var for part in parts))


def _pad(p: _Propagation, node) -> Stats | None:
    x = p.stats[node.input[0]]
    rank = p.ranks.get(node.input[0], 4)
    pads = attribute(node, "pads")
    if pads is None:
        values = p.const(node.input[1]) if len(node.input) > 1 else None
        if values is None or (len(node.input) > 3 and node.input[3]):
            return None
        pads = values.astype(np.int64).tolist()
    before, after = int(pads[1]), int(pads[1 + rank])
    zeros = lambda n: np.zeros(n)  # noqa: E731 - padded channels are constant zeros
    return Stats(np.concatenate([zeros(before), x.mean, zeros(after)]),
                 np.concatenate([zeros(before), x.var, zeros(after)]))


def _slice(p: _Propagation, node) -> Stats | None:
    x = p.stats[node.input[0]]
    starts, ends = p.const(node.input[1]), p.const(node.input[2])
    axes = p.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    steps = p.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(len(starts))
    rank = p.ranks.get(node.input[0], 4)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if int(axis) % rank == 1:
            index = np.arange(len(x.mean))[slice(int(start), int(min(end, 2 ** 62)), int(step))]
            return Stats(x.mean[index], x.var[index])
    return x


def _flatten(p: _Propagation, node) -> Stats | None:
    """Only a global pool's N x C x 1 x 1 output flattens channel for channel, which is all we need."""
    x = p.stats[node.input[0]]
    return x if node.op_type == "Flatten" and int(attribute(node, "axis", 1)) == 1 else None


def _concat(p: _Propagation, node) -> Stats | None:
    parts = [p.stats.get(name) for name in node.input]
    if int(attribute(node, "axis", 0)) != 1 or any(part is None for part in parts):
        return None
    return Stats(np.concatenate([part.mean for part in parts]), np.concatenate([part.var for part in parts]))


RULES: dict[str, Callable] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _gemm, "BatchNormalization": _batch_norm,
    "Relu": _clip, "Clip": _clip, "Add": _add, "Sum": _add, "Pad": _pad, "Slice": _slice,
    "Flatten": _flatten, "Concat": _concat,
    **{op: _same for op in ("Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool")},
}


def expected_inputs(original: onnx.ModelProto) -> dict[str, Stats]:
    """Estimated per-channel statistics of every tensor the rules reach."""
    return _Propagation(original).run(original.graph.node)


def compensate(original: onnx.ModelProto, pruned: onnx.ModelProto, layers: list[Layer],
               stats: dict[str, Stats] | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """Fold each removed input channel's mean (estimated unless `stats` gives it) into its reader's bias."""
    stats = expected_inputs(original) if stats is None else stats
    source, target = Weights(original), Weights(pruned)
    records = []
    for layer in layers:
        x = stats.get(layer.input)
        if not layer.consumer or x is None or layer.op == "MatMul" or len(x.mean) != len(layer.in_keep):
            continue
        full = read_affine(source, layer)  # original weights, every input channel
        groups, dim, _ = full.weights.shape
        if groups > 1 and dim // max(1, _kernel(source, layer)) == 1:
            continue  # depthwise: its removed inputs took their outputs with them
        removed = ~layer.in_keep
        per_group = len(removed) // groups
        kernel = dim // per_group
        lost_mean = np.where(removed, x.mean, 0.0).reshape(groups, per_group)
        patch = np.repeat(lost_mean, kernel, axis=1)  # (G, d): the patch mean of the removed inputs only
        shift = np.einsum("gd,gdm->gm", patch, full.weights).reshape(-1)
        affine = read_affine(target, layer)
        kept_out = np.flatnonzero(layer.out_keep) if layer.out_keep is not None else np.arange(len(shift))
        affine.bias = affine.bias + shift[kept_out].reshape(affine.bias.shape)
        write_affine(target, layer, affine)
        records.append({"layer": layer.node, "shift_rms": round(float(np.sqrt(np.mean(shift[kept_out] ** 2))), 6)})
    return target.export(), records


def _kernel(weights: Weights, layer: Layer) -> int:
    shape = weights.weight(weights.node(layer.node).input[1]).shape
    return int(np.prod(shape[2:])) if layer.op == "Conv" else 1

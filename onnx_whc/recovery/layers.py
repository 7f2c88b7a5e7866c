"""The layers recovery can change: Conv, Gemm and MatMul with constant weights.

Each layer is seen as per-group affine maps `y_g = x_g @ W_g + b_g` over its input patches
(a Conv's receptive fields, a Gemm's feature rows), so every method works on plain matrices.
Patches are gathered only at sampled output positions (im2col on samples), which bounds the
memory whatever the image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper

from ..graph.constants import attribute, constant_arrays
from .replay import Replay, Weights

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Layer:
    node: str  # node name, the same in the original and the pruned model
    op: str
    input: str
    output: str
    in_keep: np.ndarray | None  # original input channels (Gemm/MatMul: features) that survive
    out_keep: np.ndarray | None  # original output channels that survive
    consumer: bool  # its input lost channels
    residual: list[str] = field(default_factory=list)  # other operands of the Add its output feeds
    # the range of the Relu/Clip that is the only reader of its output (of the residual Add's sum)
    bounds: tuple[float, float] | None = None

    @property
    def channels_last(self) -> bool:
        """A Gemm's or MatMul's features run along the last axis (any axes between are positions)."""
        return self.op != "Conv"


@dataclass
class Affine:
    """Per-group affine maps: weights (G, d, m), bias (G, m) or None when the op has no bias."""

    weights: np.ndarray
    bias: np.ndarray | None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (G, S, d) -> (G, S, m)."""
        y = np.matmul(x, self.weights)
        return y if self.bias is None else y + self.bias[:, None, :]


def find_layers(model: onnx.ModelProto, keep: Callable[[str], np.ndarray | None]) -> list[Layer]:
    """Every layer whose input differs from the original's, in topological order, but those whose
    weight or bias another node reads too (siamese branches, a layer applied twice).

    A tensor differs when it lost channels or anything upstream of it did.
    """
    weights = {t.name for t in model.graph.initializer}
    constants = constant_arrays(model.graph, (name for node in model.graph.node if node.op_type == "Clip"
                                              for name in node.input[1:]))
    changed = {name for node in model.graph.node for name in node.output if _lost(keep(name))}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        inputs = [name for name in node.input if name and name not in weights]
        if not any(name in changed for name in inputs):
            continue
        changed.update(name for name in node.output if name)
        # A layer whose weight or bias other nodes read too keeps them: refitting it alone would copy them.
        shared = any(name in weights and len(readers[name]) > 1 for name in node.input[1:3])
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in weights and not shared:
            in_keep, out_keep = keep(node.input[0]), keep(node.output[0])
            residual = _residual(node.output[0], readers, weights)
            rectified = readers[node.output[0]][0].output[0] if residual else node.output[0]  # the Add's sum
            layers.append(Layer(node.name, node.op_type, node.input[0], node.output[0],
                                in_keep, out_keep, _lost(in_keep), residual, _bounds(rectified, readers, constants)))
    return layers


def _residual(name: str, readers: dict, weights: set[str]) -> list[str]:
    """The other operands when a layer's only reader is a residual Add/Sum."""
    nodes = readers.get(name, [])
    if len(nodes) != 1 or nodes[0].op_type not in ("Add", "Sum"):
        return []
    others = [other for other in nodes[0].input if other != name]
    return [] if any(other in weights or not other for other in others) else others


def _bounds(name: str, readers: dict, constants: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """(low, high) of the rectifier that is the only reader of `name`: Relu, or Clip with constant bounds."""
    nodes = readers.get(name, [])
    if len(nodes) != 1 or nodes[0].op_type not in ("Relu", "Clip"):
        return None
    node = nodes[0]
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if len(node.input) == 1:  # opset 6: bounds as attributes
        return float(attribute(node, "min", -3.4e38)), float(attribute(node, "max", 3.4e38))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        operand = node.input[index] if len(node.input) > index else ""
        if operand and (operand not in constants or constants[operand].size != 1):
            return None
        bounds.append(float(constants[operand].item()) if operand else default)
    return bounds[0], bounds[1]


def _lost(mask: np.ndarray | None) -> bool:
    return mask is not None and not bool(mask.all())


# ---- convolution geometry --------------------------------------------------------------------

@dataclass
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]  # padding before each spatial axis
    end: tuple[int, ...]  # and after it
    group: int

    @classmethod
    def of(cls, node: onnx.NodeProto, weight_shape: tuple, in_spatial: tuple[int, ...]) -> "ConvGeometry":
        kernel = tuple(int(k) for k in weight_shape[2:])
        n = len(kernel)
        strides = tuple(attribute(node, "strides", [1] * n))
        dilations = tuple(attribute(node, "dilations", [1] * n))
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
                total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
                begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
                end.append(total - begin[-1])
        elif auto_pad == "VALID":
            begin = end = [0] * n
        else:
            pads = list(attribute(node, "pads", [0] * 2 * n))
            begin, end = pads[:n], pads[n:]
        return cls(kernel, strides, dilations, tuple(begin), tuple(end), int(attribute(node, "group", 1)))

    def output_size(self, in_spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((size + b + e - d * (k - 1) - 1) // s + 1 for size, b, e, d, k, s in
                     zip(in_spatial, self.begin, self.end, self.dilations, self.kernel, self.strides))


# ---- sampled positions and patches -----------------------------------------------------------

@dataclass
class Sample:
    """Where a layer is looked at: sample (image) index and output coordinates of each row."""

    image: np.ndarray  # (S,)
    coords: np.ndarray  # (S, spatial rank); empty for a Gemm or a MatMul on rows


def sample_positions(count: int, out_spatial: tuple[int, ...], wanted: int, rng) -> Sample:
    """`wanted` output positions spread evenly over the samples, random within each."""
    if not out_spatial:
        return Sample(np.arange(count), np.zeros((count, 0), np.int64))
    per_image = int(np.prod(out_spatial))
    total = min(wanted, count * per_image)
    image = np.sort(np.arange(total) % count)
    flat = rng.integers(0, per_image, size=total)
    coords = np.stack(np.unravel_index(flat, out_spatial), axis=1)
    return Sample(image, coords)


def _for_chunks(replay: Replay, sample: Sample):
    """(chunk index, rows of the sample inside it, their index within the chunk)."""
    for c, (lo, hi) in enumerate(replay.bounds):
        rows = np.flatnonzero((sample.image >= lo) & (sample.image < hi))
        if len(rows):
            yield c, rows, sample.image[rows] - lo


def _select(x: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """x[:, channels], as a view when the channels are one contiguous run."""
    if len(channels) and np.all(np.diff(channels) == 1):
        return x[:, channels[0]:channels[-1] + 1]
    return x[:, channels]


def patches(replay: Replay, name: str, sample: Sample, geometry: ConvGeometry | None,
            channels: np.ndarray, out_size: tuple[int, ...] = ()) -> np.ndarray:
    """Input patches (S, C, *kernel) of a Conv at the sampled outputs, or rows (S, C) of a Gemm or MatMul."""
    chunks = replay.chunks(name)
    if geometry is None:  # features along the last axis, at the sampled positions of the axes before it
        out = np.empty((len(sample.image), len(channels)), np.float32)
        for c, rows, local in _for_chunks(replay, sample):
            out[rows] = _select(chunks[c][(local, *sample.coords[rows].T)], channels)
        return out
    n = len(geometry.kernel)
    reach = [d * (k - 1) + 1 for k, d in zip(geometry.kernel, geometry.dilations)]
    out = np.empty((len(sample.image), len(channels), *geometry.kernel), np.float32)
    for c, rows, local in _for_chunks(replay, sample):
        x = _select(chunks[c], channels)
        sizes = x.shape[2:]
        ends = [max(0, (o - 1) * s + r - size - b)
                for o, s, r, size, b in zip(out_size, geometry.strides, reach, sizes, geometry.begin)]
        padded = np.zeros(x.shape[:2] + tuple(b + size + e for b, size, e in zip(geometry.begin, sizes, ends)),
                          np.float32)
        padded[(slice(None), slice(None)) + tuple(slice(b, b + size) for b, size in zip(geometry.begin, sizes))] = x
        view = sliding_window_view(padded, reach, axis=tuple(range(2, 2 + n)))
        windows = view[(local, slice(None)) + tuple(sample.coords[rows, j] * geometry.strides[j] for j in range(n))]
        out[rows] = windows[(Ellipsis,) + tuple(slice(None, None, d) for d in geometry.dilations)]
    return out


def outputs(replay: Replay, name: str, sample: Sample, channels: np.ndarray, last: bool = False) -> np.ndarray:
    """A tensor's values (S, C) at the sampled positions; its channels on axis 1, or the last axis."""
    chunks = replay.chunks(name)
    out = np.empty((len(sample.image), len(channels)), np.float32)
    for c, rows, local in _for_chunks(replay, sample):
        positions = tuple(coord[:, None] for coord in sample.coords[rows].T)
        index = (local[:, None], *positions, channels[None, :]) if last else \
            (local[:, None], channels[None, :], *positions)
        out[rows] = chunks[c][index]
    return out


# ---- reading and writing a layer's weights as affine maps ------------------------------------

def node_of(replay: Weights, layer: Layer) -> onnx.NodeProto:
    return replay.node(layer.node)


def read_affine(replay: Weights, layer: Layer) -> Affine:
    node = node_of(replay, layer)
    w = replay.weight(node.input[1]).astype(np.float64)
    has_bias = len(node.input) > 2 and node.input[2] in replay.weights
    if layer.op == "Conv":
        group = int(attribute(node, "group", 1))
        c_out = w.shape[0]
        weights = w.reshape(group, c_out // group, -1).transpose(0, 2, 1)
        bias = replay.weight(node.input[2]).astype(np.float64) if has_bias else np.zeros(c_out)
        return Affine(weights, bias.reshape(group, -1))
    if layer.op == "MatMul":
        return Affine(w[None], None)
    alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
    matrix = alpha * (w.T if attribute(node, "transB", 0) else w)
    bias = np.zeros(matrix.shape[1])
    if has_bias:
        bias = bias + beta * replay.weight(node.input[2]).astype(np.float64).reshape(-1)
    return Affine(matrix[None], bias[None])


def write_affine(replay: Weights, layer: Layer, affine: Affine) -> None:
    node = node_of(replay, layer)
    dtype = replay.weight(node.input[1]).dtype
    shape = replay.weight(node.input[1]).shape
    if layer.op == "Conv":
        group, d, m = affine.weights.shape
        replay.set_input(layer.node, 1, affine.weights.transpose(0, 2, 1).reshape(shape), dtype)
        replay.set_input(layer.node, 2, affine.bias.reshape(-1), dtype)
        return
    if layer.op == "MatMul":
        replay.set_input(layer.node, 1, affine.weights[0], dtype)
        return
    alpha = float(attribute(node, "alpha", 1.0))
    matrix = affine.weights[0] / alpha
    replay.set_input(layer.node, 1, matrix.T if attribute(node, "transB", 0) else matrix, dtype)
    replay.set_input(layer.node, 2, affine.bias[0], dtype)
    for attr in list(node.attribute):
        if attr.name == "beta":
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute("beta", 1.0))


def geometry_of(replay: Replay, layer: Layer) -> ConvGeometry | None:
    if layer.op != "Conv":
        return None
    node = node_of(replay, layer)
    x = replay.chunks(layer.input)[0]
    return ConvGeometry.of(node, replay.weight(node.input[1]).shape, x.shape[2:])


def out_spatial(replay: Replay, layer: Layer, geometry: ConvGeometry | None) -> tuple[int, ...]:
    """Output spatial size, from the cached input so no extra run is needed."""
    x = replay.chunks(layer.input)[0]
    return tuple(x.shape[1:-1]) if geometry is None else geometry.output_size(x.shape[2:])

"""Every supported graph pattern, pruned at 0.2/0.4/0.6 through the exactness oracle.

Each graph is a few builder lines. Besides the oracle (checker, output shapes, equality with the
consumer-zeroed original), every test says where channels must have gone, or why a group
must stay whole.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_whc.api import analyze
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load

from .builder import GraphBuilder
from .oracle import prune_and_compare

RATIOS = [0.2, 0.4, 0.6]


def keep(n: int, ratio: float) -> int:
    """Channels a lone n-channel group keeps: n - floor(ratio * n), never fewer than one."""
    return max(1, n - math.floor(ratio * n + 1e-9))


# ---- reading a pruned model -------------------------------------------------------------------

def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    tensor_name = node_named(model, node_name).input[index]
    init = next(t for t in model.graph.initializer if t.name == tensor_name)
    return numpy_helper.to_array(init)


def attr(node: onnx.NodeProto, key: str, default=None):
    found = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == key]
    return found[0] if found else default


def out_channels(model, node_name: str) -> int:
    """Output channels (a Gemm's or MatMul's output features) of a weighted node."""
    node, w = node_named(model, node_name), weight(model, node_name)
    if node.op_type == "ConvTranspose":
        return w.shape[1] * attr(node, "group", 1)
    if node.op_type == "MatMul" or node.op_type == "Gemm" and not attr(node, "transB", 0):
        return w.shape[1]
    return w.shape[0]


def in_channels(model, node_name: str) -> int:
    node, w = node_named(model, node_name), weight(model, node_name)
    if node.op_type == "Conv":
        return w.shape[1] * attr(node, "group", 1)
    if node.op_type == "Gemm" and attr(node, "transB", 0):
        return w.shape[1]
    return w.shape[0]


def group_reasons(model, producer: str) -> list[str]:
    """Reasons the group written by `producer` cannot be pruned (empty when it can)."""
    report = analyze(model)
    return next(g.reasons for g in report.groups if producer in g.producers)


def sandwich(middle, opset: int = 17, channels: int = 16, size: int = 8):
    """x -> c1 (channels) -> middle -> c2 (4 filters): c1's channels are the prunable group."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, size, size])
    y = middle(b, b.conv(x, channels, name="c1"))
    return b.build([b.conv(y, 4, name="c2")])


def assert_sandwich_pruned(model, ratio, channels: int = 16):
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == keep(channels, ratio)
    assert in_channels(pruned, "c2") == keep(channels, ratio)
    return pruned


# ---- Conv, normalisation, per-channel elementwise ---------------------------------------------

def _erf_gelu(b, y):
    """x * 0.5 * (1 + erf(x / sqrt 2)), as exported before opset 20."""
    scaled = b.op("Div", [y, b.const(np.float32(math.sqrt(2)))])
    one_plus = b.op("Add", [b.op("Erf", [scaled]), b.const(np.float32(1))])
    return b.op("Mul", [b.op("Mul", [y, one_plus]), b.const(np.float32(0.5))])


PER_CHANNEL = {
    "batch_norm_alone": (17, lambda b, y: b.batch_norm(y)),
    "batch_norm": (17, lambda b, y: b.relu(b.batch_norm(y))),
    "instance_norm": (17, lambda b, y: b.instance_norm(y)),
    "relu": (17, lambda b, y: b.relu(y)),
    "leaky_relu": (17, lambda b, y: b.leaky_relu(y, alpha=0.1)),
    "prelu_per_channel": (17, lambda b, y: b.op("PRelu", [y, b.random([16, 1, 1], 0.3)])),
    "prelu_shared": (17, lambda b, y: b.op("PRelu", [y, b.const(np.full([1], 0.2))])),
    "clip": (17, lambda b, y: b.op("Clip", [y, b.const(np.float32(0)), b.const(np.float32(6))])),
    "clip_opset6_attrs": (6, lambda b, y: b.clip(y, min=0.0, max=6.0)),
    "sigmoid": (17, lambda b, y: b.sigmoid(y)),
    "hard_sigmoid": (17, lambda b, y: b.hard_sigmoid(y, alpha=0.2, beta=0.5)),
    "hard_swish": (17, lambda b, y: b.hard_swish(y)),
    "tanh": (17, lambda b, y: b.tanh(y)),
    "elu": (17, lambda b, y: b.elu(y, alpha=0.5)),
    "selu": (17, lambda b, y: b.selu(y)),
    "softplus": (17, lambda b, y: b.softplus(y)),
    "gelu_opset20": (20, lambda b, y: b.gelu(y)),
    "gelu_erf_chain": (17, _erf_gelu),
    "mish": (18, lambda b, y: b.mish(y)),
    "identity": (17, lambda b, y: b.identity(y)),
    "dropout": (17, lambda b, y: b.dropout(y)),
    "dropout_with_mask": (17, lambda b, y: b.op("Dropout", [y], outputs=2)[0]),
    "cast_float_to_float": (17, lambda b, y: b.cast(y, to=onnx.TensorProto.FLOAT)),
    "swish_as_mul_sigmoid": (17, lambda b, y: b.op("Mul", [y, b.sigmoid(y)])),
}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_conv_chain(bias, ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, bias=bias, name="c1"))
    model = b.build([b.conv(y, 4, name="c2")])
    pruned = assert_sandwich_pruned(model, ratio)
    assert len(node_named(pruned, "c1").input) == (3 if bias else 2)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("case", list(PER_CHANNEL))
def test_per_channel_ops(case, ratio):
    opset, middle = PER_CHANNEL[case]
    pruned = assert_sandwich_pruned(sandwich(middle, opset), ratio)
    # Per-channel parameters shrink with the channels they scale.
    for node in pruned.graph.node:
        if node.op_type in ("BatchNormalization", "InstanceNormalization"):
            assert weight(pruned, node.name, 1).shape == (keep(16, ratio),)
        if node.op_type == "PRelu" and case == "prelu_per_channel":
            assert weight(pruned, node.name, 1).shape == (keep(16, ratio), 1, 1)


CONSTANT_SHAPES = {"scalar": (), "c11": (16, 1, 1), "1c11": (1, 16, 1, 1), "1": (1,)}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", list(CONSTANT_SHAPES))
@pytest.mark.parametrize("op,constant_first", [("Mul", False), ("Add", False), ("Sub", False), ("Sub", True),
                                               ("Div", False), ("Mul", True)])
def test_arithmetic_with_constant(op, constant_first, shape, ratio):
    def middle(b, y):
        c = b.positive(CONSTANT_SHAPES[shape])  # positive: Div stays well conditioned
        return b.op(op, [c, y] if constant_first else [y, c])

    pruned = assert_sandwich_pruned(sandwich(middle), ratio)
    constant = weight(pruned, node_named(pruned, "c2").input[0], 0 if constant_first else 1)
    if shape in ("c11", "1c11"):
        assert keep(16, ratio) in constant.shape
    else:
        assert constant.size == 1


# ---- ops between activations: residual adds and SE gates --------------------------------------

@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("op", ["Add", "Sum", "Mul", "Sub", "Max", "Min"])
def test_binary_op_couples_two_convs(op, ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="c1"))
    r = b.conv(a, 16, name="c2")
    y = b.relu(b.op(op, [r, a]))
    model = b.build([b.conv(y, 4, name="c3")])
    pruned, plan = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == out_channels(pruned, "c2") == keep(16, ratio)
    assert in_channels(pruned, "c2") == in_channels(pruned, "c3") == keep(16, ratio)
    coupled = [d for d in plan.decisions if {"c1", "c2"} <= {p.node.name for p, _ in d.group.producers}]
    assert len(coupled) == 1  # one group, one decision for both convs


@pytest.mark.parametrize("ratio", RATIOS)
def test_spatial_attention_gate_broadcasts_one_channel(ratio):
    """Mul by a one-channel map (CBAM-style spatial attention) couples nothing."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="c1"))
    gate = b.sigmoid(b.conv(a, 1, k=7, name="attention"))
    model = b.build([b.conv(b.op("Mul", [a, gate]), 4, name="c3")])
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "attention") == keep(16, ratio)
    assert in_channels(pruned, "c3") == keep(16, ratio)
    assert out_channels(pruned, "attention") == 1


@pytest.mark.parametrize("ratio", RATIOS)
def test_squeeze_excitation_gate(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="c1"))
    s = b.global_average_pool(a)
    s = b.relu(b.conv(s, 4, k=1, name="se_reduce"))
    s = b.sigmoid(b.conv(s, 16, k=1, name="se_expand"))
    y = b.op("Mul", [a, s])
    model = b.build([b.conv(y, 4, name="c3")])
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == out_channels(pruned, "se_expand") == keep(16, ratio)
    assert in_channels(pruned, "se_reduce") == keep(16, ratio)
    assert out_channels(pruned, "se_reduce") == in_channels(pruned, "se_expand") == keep(4, ratio)


# ---- pooling, reductions, resizing, padding ---------------------------------------------------

SPATIAL = {
    "max_pool": (17, lambda b, y: b.max_pool(y, kernel_shape=[2, 2], strides=[2, 2])),
    "average_pool": (17, lambda b, y: b.average_pool(y, kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "global_average_pool": (17, lambda b, y: b.global_average_pool(y)),
    "global_max_pool": (17, lambda b, y: b.global_max_pool(y)),
    "reduce_mean_attr_axes": (17, lambda b, y: b.reduce_mean(y, axes=[2, 3], keepdims=1)),
    "reduce_mean_input_axes": (18, lambda b, y: b.op("ReduceMean", [y, b.ints([-2, -1])], keepdims=1)),
    "reduce_max_input_axes": (18, lambda b, y: b.op("ReduceMax", [y, b.ints([2, 3])], keepdims=1)),
    "resize_scales": (17, lambda b, y: b.op("Resize", [y, "", b.const(np.array([1, 1, 2, 2], np.float32))],
                                            mode="nearest")),
    "resize_scales_axes": (18, lambda b, y: b.op("Resize", [y, "", b.const(np.array([2, 2], np.float32))],
                                                 axes=[2, 3], mode="linear")),
    "resize_sizes_axes": (18, lambda b, y: b.op("Resize", [y, "", "", b.ints([12, 12])], axes=[2, 3],
                                                mode="nearest")),
    "resize_opset11_scales": (11, lambda b, y: b.op("Resize", [y, b.const(np.zeros(0, np.float32)),
                                                               b.const(np.array([1, 1, 2, 2], np.float32))])),
    "upsample_opset9": (9, lambda b, y: b.op("Upsample", [y, b.const(np.array([1, 1, 2, 2], np.float32))])),
    "upsample_opset7_attr": (7, lambda b, y: b.upsample(y, scales=[1.0, 1.0, 2.0, 2.0])),
    "pad_spatial": (17, lambda b, y: b.op("Pad", [y, b.ints([0, 0, 1, 2, 0, 0, 2, 1])])),
    "pad_spatial_axes": (18, lambda b, y: b.op("Pad", [y, b.ints([1, 1, 1, 1]), "", b.ints([2, 3])])),
    "pad_spatial_reflect": (17, lambda b, y: b.op("Pad", [y, b.ints([0, 0, 1, 1, 0, 0, 1, 1])], mode="reflect")),
    "pad_spatial_opset2_attr": (9, lambda b, y: b.pad(y, pads=[0, 0, 1, 1, 0, 0, 1, 1])),
    "pytorch_pad_chain": (17, lambda b, y: b.torch_pad(y, [0, 1, 0, 1])),
    "transpose_spatial": (17, lambda b, y: b.transpose(y, perm=[0, 1, 3, 2])),
    "softmax_spatial": (17, lambda b, y: b.softmax(y, axis=-1)),
}


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("case", list(SPATIAL))
def test_spatial_ops(case, ratio):
    opset, middle = SPATIAL[case]
    assert_sandwich_pruned(sandwich(middle, opset), ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_resize_with_full_sizes(ratio):
    """Resize sizes over all axes names the channel count: surgery must rewrite it."""
    b = GraphBuilder(dynamic_batch=False)  # the sizes fix the batch too
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="c1"))
    y = b.op("Resize", [y, "", "", b.ints([1, 16, 12, 12])], mode="nearest")
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="c2")]), ratio)
    assert out_channels(pruned, "c1") == keep(16, ratio)
    sizes = weight(pruned, node_named(pruned, "c2").input[0], 3)
    assert sizes.tolist() == [1, keep(16, ratio), 12, 12]


@pytest.mark.parametrize("ratio", RATIOS)
def test_reduce_mean_without_keepdims_into_gemm(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.reduce_mean(b.relu(b.conv(x, 16, name="c1")), axes=[2, 3], keepdims=0)
    pruned, _ = prune_and_compare(b.build([b.gemm(y, 10, name="fc")]), ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "fc") == keep(16, ratio)


# ---- channel re-indexing: channel Pad, Concat, Split, Slice ----------------------------------

def option_a_block(b: GraphBuilder, x: str, name: str) -> str:
    """A CIFAR ResNet downsampling block with the option-A shortcut: strided Slice + channel Pad + Add."""
    c = b.channels(x)
    r = b.relu(b.conv(x, 2 * c, stride=2, name=f"{name}.conv1"))
    r = b.conv(r, 2 * c, name=f"{name}.conv2")
    shortcut = b.op("Slice", [x, b.ints([0, 0]), b.ints([2 ** 31, 2 ** 31]), b.ints([2, 3]), b.ints([2, 2])])
    pads = [0, c // 2, 0, 0, 0, c // 2 + c % 2, 0, 0]
    if b.opset < 11:  # Pad-2 takes its amounts as an attribute
        shortcut = b.pad(shortcut, pads=pads)
    else:
        shortcut = b.op("Pad", [shortcut, b.ints(pads)])
    return b.relu(b.op("Add", [r, shortcut]))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [10, 17])
def test_channel_pad_option_a_shortcut(opset, ratio):
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="stem"))
    y = option_a_block(b, a, "block")
    model = b.build([b.conv(y, 4, name="head")])
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "block.conv1") == keep(32, ratio)
    # The trunk (stem + padded zeros + block.conv2) loses its share of 32 channels,
    # the stem at most its own share of 16.
    assert out_channels(pruned, "block.conv2") == in_channels(pruned, "head") == keep(32, ratio)
    assert keep(16, ratio) <= out_channels(pruned, "stem") < 16
    pad = next(n for n in pruned.graph.node if n.op_type == "Pad")
    pads = attr(pad, "pads") if opset < 11 else weight(pruned, pad.name, 1)
    assert pads[1] + pads[5] + out_channels(pruned, "stem") == keep(32, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_concat_on_channels(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Concat", [b.relu(b.conv(x, 8, name="c1")), b.conv(x, 12, name="c2")], axis=1)
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="c3")]), ratio)
    assert out_channels(pruned, "c1") == keep(8, ratio)
    assert out_channels(pruned, "c2") == keep(12, ratio)
    assert in_channels(pruned, "c3") == keep(8, ratio) + keep(12, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_concat_on_spatial_axis_couples(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Concat", [b.conv(x, 16, name="c1"), b.conv(x, 16, name="c2")], axis=2)
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="c3")]), ratio)
    assert out_channels(pruned, "c1") == out_channels(pruned, "c2") == keep(16, ratio)


def _split(b, y, opset_style: str):
    if opset_style == "sizes_input":
        return b.op("Split", [y, b.ints([6, 10])], outputs=2, axis=1)
    if opset_style == "equal_input_less":
        return b.op("Split", [y], outputs=2, axis=1)
    if opset_style == "sizes_attr":
        return b.op("Split", [y], outputs=2, axis=1, split=[6, 10])
    if opset_style == "num_outputs":
        return b.op("Split", [y], outputs=3, axis=1, num_outputs=3)
    raise ValueError(opset_style)


SPLITS = [(13, "sizes_input"), (13, "equal_input_less"), (11, "sizes_attr"), (11, "equal_input_less"),
          (18, "num_outputs"), (18, "sizes_input")]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset,style", SPLITS, ids=[f"opset{o}-{s}" for o, s in SPLITS])
def test_split_on_channels(opset, style, ratio):
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, 8, 8])
    parts = _split(b, b.relu(b.conv(x, 16, name="c1")), style)
    heads = [b.conv(p, 4, name=f"head{i}") for i, p in enumerate(parts)]
    y = heads[0]
    for h in heads[1:]:
        y = b.op("Add", [y, h])
    pruned, _ = prune_and_compare(b.build([y]), ratio)
    kept = [in_channels(pruned, f"head{i}") for i in range(len(parts))]
    assert out_channels(pruned, "c1") == sum(kept) == keep(16, ratio)
    assert min(kept) >= 1


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("bounds", [(4, 12), (-12, -2), (0, 2 ** 62), (8, 100)], ids=str)
def test_slice_on_channels(bounds, ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="c1"))
    part = b.op("Slice", [a, b.ints([bounds[0]]), b.ints([bounds[1]]), b.ints([1])])
    y = b.op("Add", [b.conv(part, 4, name="c2"), b.conv(a, 4, name="c3")])
    pruned, _ = prune_and_compare(b.build([y]), ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "c3") == keep(16, ratio)
    assert 1 <= in_channels(pruned, "c2") <= len(range(16)[slice(*bounds)])


@pytest.mark.parametrize("ratio", RATIOS)
def test_slice_with_negative_axis(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="c1"))
    part = b.op("Slice", [a, b.ints([3]), b.ints([13]), b.ints([-3])])  # axis -3 of NCHW: the channels
    y = b.op("Add", [b.conv(part, 4, name="c2"), b.conv(a, 4, name="c3")])
    pruned, _ = prune_and_compare(b.build([y]), ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "c3") == keep(16, ratio)
    assert 1 <= in_channels(pruned, "c2") <= 10


@pytest.mark.parametrize("ratio", RATIOS)
def test_slice_opset9_attributes(ratio):
    b = GraphBuilder(opset=9)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 16, name="c1"))
    part = b.op("Slice", [a], starts=[2, 0], ends=[14, 8], axes=[1, 2])
    y = b.op("Add", [b.conv(part, 4, name="c2"), b.conv(a, 4, name="c3")])
    pruned, _ = prune_and_compare(b.build([y]), ratio)
    assert out_channels(pruned, "c1") == keep(16, ratio)


# ---- depthwise, grouped, transposed convolutions ----------------------------------------------

@pytest.mark.parametrize("ratio", RATIOS)
def test_depthwise_chain(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="c1"))
    y = b.relu(b.conv(y, 16, group=16, name="dw1"))
    y = b.relu(b.conv(y, 24, k=1, name="pw1"))
    y = b.relu(b.conv(y, 24, group=24, name="dw2"))
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, k=1, name="pw2")]), ratio)
    assert out_channels(pruned, "c1") == out_channels(pruned, "dw1") == keep(16, ratio)
    assert attr(node_named(pruned, "dw1"), "group") == keep(16, ratio)
    assert out_channels(pruned, "dw2") == in_channels(pruned, "pw2") == keep(24, ratio)
    assert attr(node_named(pruned, "dw2"), "group") == keep(24, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_depthwise_multiplier_two(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="c1"))
    y = b.relu(b.conv(y, 32, group=16, name="dw"))
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, k=1, name="pw")]), ratio)
    assert out_channels(pruned, "c1") == attr(node_named(pruned, "dw"), "group") == keep(16, ratio)
    assert out_channels(pruned, "dw") == in_channels(pruned, "pw") == 2 * keep(16, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("groups,channels", [(2, 16), (4, 32)])
def test_grouped_conv_removes_same_positions_per_group(groups, channels, ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, channels, name="c1"))
    y = b.relu(b.conv(y, channels, group=groups, name="g"))
    model = b.build([b.conv(y, 4, k=1, name="c3")])
    pruned, plan = prune_and_compare(model, ratio)
    per_group = keep(channels // groups, ratio)
    assert out_channels(pruned, "c1") == out_channels(pruned, "g") == groups * per_group
    assert attr(node_named(pruned, "g"), "group") == groups
    analysis = analyze_channels(load(model))
    for tensor in ("c1", "g"):
        mask = analysis.keep_mask(tensor, plan.removed_roots).reshape(groups, -1)
        assert (mask == mask[0]).all() and mask[0].sum() == per_group


@pytest.mark.parametrize("ratio", RATIOS)
def test_conv_transpose_as_consumer_and_producer(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="c1"))
    y = b.relu(b.conv_transpose(y, 12, name="up"))
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="c3")]), ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "up") == keep(16, ratio)
    assert out_channels(pruned, "up") == in_channels(pruned, "c3") == keep(12, ratio)
    assert weight(pruned, "up", 2).shape == (keep(12, ratio),)


# ---- heads: Flatten, Reshape, Gemm, MatMul ----------------------------------------------------

def _head(b, y, kind):
    if kind == "gemm_transB1":
        return b.gemm(y, 10, trans_b=1, name="fc")
    if kind == "gemm_transB0":
        return b.gemm(y, 10, trans_b=0, name="fc")
    return b.matmul(y, 10, name="fc")


HEADS = ["gemm_transB1", "gemm_transB0", "matmul"]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "unpooled"])
@pytest.mark.parametrize("head", HEADS)
def test_flatten_into_fully_connected(head, pooled, ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, stride=2, name="c1"))  # 4x4 maps
    if pooled:
        y = b.global_average_pool(y)
    pruned, _ = prune_and_compare(b.build([_head(b, b.flatten(y), head)]), ratio)
    assert out_channels(pruned, "c1") == keep(16, ratio)
    assert in_channels(pruned, "fc") == keep(16, ratio) * (1 if pooled else 16)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [9, 13, 17])
@pytest.mark.parametrize("hidden", HEADS + ["matmul_add"])
def test_hidden_fully_connected_layers_are_filters(hidden, opset, ratio):
    """A VGG-style classifier: conv -> flatten -> FC 24 -> ReLU -> FC 12 -> ReLU -> FC 10 (output)."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.flatten(b.relu(b.conv(x, 16, stride=2, name="c1")))
    for width, name in ((24, "fc1"), (12, "fc2")):
        if hidden == "matmul_add":  # PyTorch's Linear on a 3-D input, or an older exporter: MatMul + Add
            y = b.op("Add", [b.matmul(y, width, name=name), b.random([width], 0.1, f"{name}.bias")])
        else:
            y = _fully_connected(b, y, width, hidden, name)
        y = b.relu(y)
    pruned, _ = prune_and_compare(b.build([b.gemm(y, 10, name="out")]), ratio)
    assert out_channels(pruned, "c1") == keep(16, ratio)
    assert out_channels(pruned, "fc1") == keep(24, ratio)
    assert out_channels(pruned, "fc2") == keep(12, ratio)
    assert out_channels(pruned, "out") == 10  # feeds the graph output: whole
    if hidden.startswith("gemm"):
        assert weight(pruned, "fc1", 2).shape == (keep(24, ratio),)


def _fully_connected(b, y, width, kind, name):
    if kind == "matmul":
        return b.matmul(y, width, name=name)
    return b.gemm(y, width, trans_b=1 if kind == "gemm_transB1" else 0, name=name)


def test_a_gemm_with_one_bias_value_for_every_output_is_pruned():
    b = GraphBuilder(dynamic_batch=False)
    x = b.flatten(b.relu(b.conv(b.input("x", [1, 3, 4, 4]), 8, name="c1")))
    weight_ = b.random([6, 128], 0.1, "fc.weight")
    y = b.op("Gemm", [x, weight_, b.random([1, 1], 0.1, "fc.bias")], name="fc", transB=1)
    y = b.op("Gemm", [b.relu(y), b.random([4, 6], 0.1, "out.weight"), b.random([1, 4], 0.1, "out.bias")],
             name="out", transB=1)
    pruned, _ = prune_and_compare(b.build([y]), 0.5)
    assert out_channels(pruned, "fc") == 3 and weight(pruned, "fc", 2).shape == (1, 1)


def _reshape_target(b, y, style):
    if style == "constant_1_F":
        return b.ints([1, 16 * 16])
    if style == "constant_minus1_F":
        return b.ints([-1, 16 * 16])
    if style in ("torch_features", "paddle_features"):  # the feature count written into a run-time target
        return _target(b, y, [16 * 16], style.split("_")[0])
    # PyTorch's x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat with -1.
    n = b.op("Gather", [b.op("Shape", [y]), b.ints(0)], axis=0)
    n = b.op("Unsqueeze", [n, b.ints([0])])
    return b.op("Concat", [n, b.ints([-1])], axis=0)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("style", ["constant_1_F", "constant_minus1_F", "dynamic_shape_chain", "torch_features",
                                   "paddle_features"])
def test_reshape_into_gemm(style, ratio):
    b = GraphBuilder(dynamic_batch=style != "constant_1_F")
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, stride=2, name="c1"))
    y = b.op("Reshape", [y, _reshape_target(b, y, style)])
    pruned, _ = prune_and_compare(b.build([b.gemm(y, 10, name="fc")]), ratio)
    assert out_channels(pruned, "c1") == keep(16, ratio)
    assert in_channels(pruned, "fc") == keep(16, ratio) * 16


# ---- groups that must stay whole, each with its reason ----------------------------------------

def _batch(b, y, style):
    """The batch as PyTorch's x.size(0) (Shape -> Gather -> Unsqueeze) or paddle2onnx (Shape -> Slice)."""
    if style == "torch":
        return b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [y]), b.ints(0)], axis=0), b.ints([0])])
    return b.op("Slice", [b.op("Shape", [y]), b.ints([0]), b.ints([1]), b.ints([0])])


def _target(b, y, values, style):
    """A Reshape target: a constant (0 copies the batch), or the batch read at run time and constants."""
    if style == "constant":
        return b.ints([0] + values)
    return b.op("Concat", [_batch(b, y, style), b.ints(values)], axis=0)


def _shuffle(b, y, groups=4, style="constant", name="shuffle"):
    """ShuffleNet's channel_shuffle: view(N, g, C/g, H, W), transpose(1, 2), view(N, C, H, W)."""
    c, h, w = b.static_shape(y)[1:]
    split = b.op("Reshape", [y, _target(b, y, [groups, c // groups, h, w], style)], name=f"{name}.split")
    moved = b.transpose(split, perm=[0, 2, 1, 3, 4])
    return b.op("Reshape", [moved, _target(b, y, [-1, h, w], style)], name=f"{name}.merge")


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("style, opset", [("constant", 11), ("constant", 17), ("torch", 17), ("paddle", 13)])
@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_loses_the_same_positions_in_every_group(groups, style, opset, ratio):
    b = GraphBuilder(opset=opset, dynamic_batch=style != "constant")
    x = b.input("x", [1, 3, 8, 8])
    y = _shuffle(b, b.relu(b.conv(x, 16, name="c1")), groups, style)
    model = b.build([b.conv(b.relu(y), 4, name="c2", c_in=16)])
    pruned, plan = prune_and_compare(model, ratio)
    kept = out_channels(pruned, "c1")
    assert kept == in_channels(pruned, "c2") == groups * keep(16 // groups, ratio)  # the ratio applies per group
    # c1's channel i * C/g + j: every shuffle group i lost the same positions j.
    lost = ~analyze_channels(load(model)).keep_mask("c1", plan.removed_roots).reshape(groups, 16 // groups)
    assert (lost == lost[0]).all()


@pytest.mark.parametrize("ratio", RATIOS)
def test_shufflenet_v2_unit(ratio):
    """torchvision's ShuffleNetV2 unit: split in halves, a branch on one, concat, channel shuffle."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="stem"))
    for unit in range(2):
        left, right = b.op("Split", [y, b.ints([8, 8])], outputs=2, axis=1)
        right = b.relu(b.conv(right, 8, k=1, name=f"u{unit}.pw1"))
        right = b.conv(right, 8, group=8, name=f"u{unit}.dw")
        right = b.relu(b.conv(right, 8, k=1, name=f"u{unit}.pw2"))
        y = _shuffle(b, b.op("Concat", [left, right], axis=1), 2, name=f"u{unit}.shuffle")
    model = b.build([b.gemm(b.flatten(b.global_average_pool(y)), 5, name="fc")])
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "u0.pw1") == out_channels(pruned, "u1.pw1") == keep(8, ratio)
    assert not [r for g in analyze(model).groups for r in g.reasons if "Reshape" in r or "Transpose" in r]


UNPRUNABLE = {
    "channel_split_summed_over_positions": (lambda b, y: b.op("ReduceSum", [b.op("Reshape", [y, b.ints([0, 4, 4, 8, 8])]),
                                                                         b.ints([2])], keepdims=0),
                                            "ReduceSum reduces over the channel or batch axis"),
    "lrn": (lambda b, y: b.op("LRN", [y], size=3), "LRN mixes neighbouring channels"),
    "softmax_channels": (lambda b, y: b.softmax(y, axis=1), "Softmax over the channel axis"),
    "layer_norm_channels": (lambda b, y: b.op("LayerNormalization", [y, b.positive([16, 8, 8])], axis=1),
                            "LayerNormalization over the channel axis"),
    "slice_step_2": (lambda b, y: b.op("Slice", [y, b.ints([0]), b.ints([16]), b.ints([1]), b.ints([2])]),
                     "Slice with step 2 on the channel axis"),
    "depth_to_space": (lambda b, y: b.space_to_depth(b.depth_to_space(y, blocksize=2), blocksize=2),
                       "DepthToSpace moves channels into space"),
}


@pytest.mark.parametrize("case", list(UNPRUNABLE))
def test_unprunable_group_keeps_every_channel(case):
    middle, reason = UNPRUNABLE[case]

    def graph(b, y):
        other = b.relu(b.conv(y, 8, name="free"))  # an unrelated group that stays prunable
        return b.op("Add", [b.conv(middle(b, y), 8, name="after"), other])

    model = sandwich(graph)
    assert any(reason in r for r in group_reasons(model, "c1")), group_reasons(model, "c1")
    assert not group_reasons(model, "free")
    pruned, _ = prune_and_compare(model, 0.4)
    assert out_channels(pruned, "c1") == 16
    assert out_channels(pruned, "free") == keep(8, 0.4)


@pytest.mark.parametrize("op", ["Mystery", "Relu"])
def test_op_of_a_custom_domain_blocks(op):
    """An op outside the default domain is unknown even when it borrows a standard name."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op(op, [b.conv(x, 16, name="c1")], domain="com.example")
    model = b.build([b.conv(y, 4, name="c2", c_in=16)])
    assert any("unknown op" in r for r in group_reasons(model, "c1"))


def test_conv_feeding_a_graph_output_is_fixed():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.conv(x, 16, name="c1")
    model = b.build([a, b.conv(b.relu(a), 4, name="c2")])
    assert any("feeds graph output 'c1'" in r for r in group_reasons(model, "c1"))
    pruned, plan = prune_and_compare(model, 0.6)
    assert out_channels(pruned, "c1") == 16 and plan.removed_channels == 0


# ---- selection limits on real graphs ----------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 3])
def test_never_removes_the_last_channel(channels):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, channels, name="c1"))
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="c2")]), 0.6)
    assert out_channels(pruned, "c1") == in_channels(pruned, "c2") == max(1, channels - math.floor(0.6 * channels))


@pytest.mark.parametrize("ratio", RATIOS)
def test_round_to_keeps_multiples_of_eight(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 32, name="c1"))
    y = b.relu(b.conv(y, 20, name="c2"))
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="c3")]), ratio, round_to=8)
    assert out_channels(pruned, "c1") == min(32, math.ceil(keep(32, ratio) / 8) * 8)
    assert out_channels(pruned, "c2") == min(20, math.ceil(keep(20, ratio) / 8) * 8)
    assert out_channels(pruned, "c1") % 8 == 0


@pytest.mark.parametrize("ratio", RATIOS)
def test_round_to_in_a_coupled_option_a_trunk(ratio):
    """Layers of different widths share one group: each must still keep a multiple of 8."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="stem"))
    y = option_a_block(b, option_a_block(b, y, "stage2"), "stage3")
    pruned, _ = prune_and_compare(b.build([b.conv(y, 4, name="head")]), ratio, round_to=8)
    for name, width in [("stem", 16), ("stage2.conv1", 32), ("stage2.conv2", 32), ("stage3.conv2", 64)]:
        assert out_channels(pruned, name) == min(width, math.ceil(keep(width, ratio) / 8) * 8), name


def test_exclude_globs_keep_matching_groups_whole():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="stem.conv"))
    y = b.relu(b.conv(y, 16, name="block1.conv"))
    y = b.relu(b.conv(y, 16, name="block2.conv"))
    model = b.build([b.conv(y, 4, name="head")])
    pruned, plan = prune_and_compare(model, 0.5, exclude=("stem*", "*2.conv"))
    assert out_channels(pruned, "stem.conv") == 16
    assert out_channels(pruned, "block2.conv") == 16
    assert out_channels(pruned, "block1.conv") == 8
    skipped = {d.group.producers[0][0].node.name: d.skipped for d in plan.decisions if d.group.producers}
    assert skipped["stem.conv"] == "excluded by --exclude 'stem*' (stem.conv)"
    assert skipped["block1.conv"] == ""


def shrink_filters(model: onnx.ModelProto, tensor: str, rows: list[int], factor: float = 1e-3) -> None:
    """Make some filters tiny so every criterion ranks them lowest."""
    init = next(t for t in model.graph.initializer if t.name == tensor)
    values = numpy_helper.to_array(init).copy()
    values[rows] *= factor
    init.CopyFrom(numpy_helper.from_array(values, tensor))


@pytest.mark.parametrize("segment", [1, 2])
def test_split_segment_never_becomes_empty(segment):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    small, rest = b.op("Split", [b.relu(b.conv(x, 16, name="c1")), b.ints([segment, 16 - segment])],
                       outputs=2, axis=1)
    model = b.build([b.op("Add", [b.conv(small, 4, name="head0"), b.conv(rest, 4, name="head1")])])
    shrink_filters(model, "c1.weight", list(range(segment)))  # the whole small segment ranks lowest
    pruned, plan = prune_and_compare(model, 0.6)
    assert in_channels(pruned, "head0") == 1
    assert out_channels(pruned, "c1") == keep(16, 0.6)
    assert in_channels(pruned, "head1") == keep(16, 0.6) - 1


def test_a_run_time_target_computed_otherwise_that_mentions_the_channel_count_blocks():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, stride=2, name="c1"))
    batch = b.op("Max", [b.op("Slice", [b.op("Shape", [y]), b.ints([0]), b.ints([1]), b.ints([0])]), b.ints([1])])
    flat = b.op("Reshape", [y, b.op("Concat", [batch, b.ints([256])], axis=0)])
    model = b.build([b.gemm(flat, 10, name="fc")])
    assert any("computed at run time from the channel count" in r for r in group_reasons(model, "c1"))
    pruned, _ = prune_and_compare(model, 0.5)
    assert out_channels(pruned, "c1") == 16


# ---- channels moved off axis 1: NHWC round trips, SE gates in NHWC, permute before a flatten ------

NHWC, NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_nhwc_round_trips_with_per_channel_constants_and_an_se_gate(opset, ratio):
    """tf2onnx's MobileNetV3-style block: Conv -> NHWC -> HardSwish, per-channel scale and shift in NHWC
    -> an SE gate computed in NCHW, reshaped 1xCx1x1 -> 1x1x1xC and multiplied in NHWC -> NCHW -> Conv."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.transpose(b.conv(x, 16, name="c1"), perm=NHWC)
    y = b.op("HardSigmoid" if opset < 14 else "HardSwish", [y])
    y = b.op("Add", [b.op("Mul", [y, b.positive([16], "scale")]), b.random([16], 0.1, "shift")])
    gate = b.global_average_pool(b.transpose(y, perm=NCHW))
    gate = b.sigmoid(b.conv(b.relu(b.conv(gate, 4, k=1, name="se1")), 16, k=1, name="se2"))
    y = b.op("Mul", [y, b.op("Reshape", [gate, b.ints([-1, 1, 1, 16])])])
    y = b.transpose(y, perm=NCHW)
    model = b.build([b.conv(y, 4, name="c2")])
    assert not [r for g in analyze(model).groups for r in g.reasons if "graph output" not in r]
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == out_channels(pruned, "se2") == in_channels(pruned, "c2") == keep(16, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("perm, flatten", [(NHWC, "Flatten"), (NHWC, "Reshape"), ([0, 3, 2, 1], "Reshape")],
                         ids=["keras-permute-flatten", "nhwc-reshape", "torch-permute-0321-view"])
def test_a_permute_before_a_flatten_maps_features_through_the_permutation(perm, flatten, ratio):
    """Keras Permute + Flatten + Dense, and MTCNN's x.permute(0, 3, 2, 1).view(N, -1) + Linear."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    y = b.transpose(b.relu(b.conv(x, 8, stride=2, name="c1")), perm=perm)  # 3x3 maps
    y = b.flatten(y) if flatten == "Flatten" else b.op("Reshape", [y, b.ints([0, -1])])
    pruned, _ = prune_and_compare(b.build([b.gemm(b.relu(b.gemm(y, 12, name="fc1")), 5, name="fc2")]), ratio)
    assert out_channels(pruned, "c1") == keep(8, ratio)
    assert in_channels(pruned, "fc1") == keep(8, ratio) * 9


@pytest.mark.parametrize("ratio", RATIOS)
def test_channels_last_concat_split_and_slice_follow_the_moved_axis(ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.transpose(b.conv(x, 8, name="ca"), perm=NHWC)
    c = b.transpose(b.conv(x, 8, name="cb"), perm=NHWC)
    y = b.op("Concat", [a, c], axis=-1)
    first, second = b.op("Split", [y, b.ints([10, 6])], outputs=2, axis=3)
    y = b.op("Concat", [first, second], axis=3)
    y = b.op("Slice", [y, b.ints([0]), b.ints([12]), b.ints([3])])
    model = b.build([b.conv(b.transpose(y, perm=NCHW), 4, name="c2")])
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "ca") == out_channels(pruned, "cb") == keep(8, ratio)
    assert keep(8, ratio) <= in_channels(pruned, "c2") <= keep(8, ratio) + 4  # the slice kept cb's first 4


def _linear(b, y, width, name, bias=True):
    """PyTorch's nn.Linear (and tf2onnx's Dense) on a channels-last tensor: MatMul over the last axis + Add."""
    y = b.matmul(y, width, name=name)
    return b.op("Add", [y, b.random([width], 0.1, f"{name}.bias")]) if bias else y


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_a_linear_per_position_on_channels_last_maps_reads_and_writes_channels(opset, ratio):
    """Conv -> NHWC -> Linear 24 -> ReLU -> Linear 16 (no bias) -> NCHW -> Conv: three prunable groups, the
    MatMuls' inputs and outputs along the last axis."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, 6, 6])
    y = b.transpose(b.conv(x, 16, name="c1"), perm=NHWC)
    y = _linear(b, b.relu(_linear(b, y, 24, "fc1")), 16, "fc2", bias=False)
    model = b.build([b.conv(b.transpose(b.relu(y), perm=NCHW), 4, name="c2")])
    assert not [r for g in analyze(model).groups for r in g.reasons if "graph output" not in r]
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "fc1") == keep(16, ratio)
    assert out_channels(pruned, "fc1") == in_channels(pruned, "fc2") == keep(24, ratio)
    assert out_channels(pruned, "fc2") == in_channels(pruned, "c2") == keep(16, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_convnext_block_prunes_its_mlp_behind_a_layer_norm_over_channels(ratio):
    """ConvNeXt: depthwise 7x7 -> permute to NHWC -> LayerNorm over C -> Linear 4C -> GELU -> Linear C ->
    layer scale -> permute back -> residual Add. The LayerNorm fixes the trunk; the 4C hidden features go."""
    b = GraphBuilder(opset=17)
    x = b.input("x", [1, 3, 8, 8])
    trunk = b.conv(x, 8, k=2, stride=2, pad=0, name="stem")
    y = b.transpose(b.conv(trunk, 8, k=7, group=8, name="dw"), perm=NHWC)
    y = b.op("LayerNormalization", [y, b.positive([8]), b.random([8], 0.1)], axis=-1, name="norm")
    y = _linear(b, _erf_gelu(b, _linear(b, y, 32, "pw1")), 8, "pw2")
    y = b.transpose(b.op("Mul", [y, b.positive([8], "gamma")]), perm=NCHW)
    model = b.build([b.conv(b.op("Add", [trunk, y]), 4, name="head")])
    assert any("LayerNormalization over the channel axis" in r for r in group_reasons(model, "stem"))
    assert not group_reasons(model, "pw1")
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "pw1") == in_channels(pruned, "pw2") == keep(32, ratio)
    assert out_channels(pruned, "pw2") == out_channels(pruned, "stem") == 8


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [11, 13, 17])
def test_a_linear_on_a_token_sequence_prunes_its_hidden_features(opset, ratio):
    """A patch embedding flattened to tokens (N, C, HW) -> (N, HW, C), then an MLP on the sequence."""
    b = GraphBuilder(opset=opset, dynamic_batch=False)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("Reshape", [b.conv(x, 16, k=2, stride=2, pad=0, name="patch"), b.ints([1, 16, 16])])
    y = b.transpose(y, perm=[0, 2, 1])
    y = _linear(b, b.relu(_linear(b, y, 24, "fc1")), 5, "fc2")
    pruned, _ = prune_and_compare(b.build([b.op("ReduceMean", [y], axes=[1])]), ratio)
    assert out_channels(pruned, "patch") == in_channels(pruned, "fc1") == keep(16, ratio)
    assert out_channels(pruned, "fc1") == in_channels(pruned, "fc2") == keep(24, ratio)
    assert out_channels(pruned, "fc2") == 5  # feeds the graph output


CHANNELS_LAST_BLOCKERS = {
    "maxpool_on_nhwc": (lambda b, y: b.transpose(b.op("MaxPool", [b.transpose(y, perm=NHWC)], kernel_shape=[2, 2]),
                                                 perm=NCHW), "MaxPool reads channels moved to axis 3"),
    "conv_on_nhwc": (lambda b, y: b.transpose(b.conv(b.transpose(y, perm=NHWC), 8, name="wrong"), perm=NCHW),
                     "Conv reads channels moved to axis 3"),
    "reduce_over_moved_channels": (lambda b, y: b.op("ReduceMean", [b.transpose(y, perm=NHWC)], axes=[3]),
                                   "reduces over the channel or batch axis"),
    "batch_moved": (lambda b, y: b.transpose(y, perm=[1, 0, 2, 3]), "Transpose moves the batch axis"),
    "matmul_over_width": (lambda b, y: b.matmul(y, 5), "MatMul over an axis of its 4-D input that does not carry"),
}


@pytest.mark.parametrize("case", list(CHANNELS_LAST_BLOCKERS))
def test_ops_that_need_channels_on_axis_1_block_channels_last_tensors(case):
    middle, reason = CHANNELS_LAST_BLOCKERS[case]
    b = GraphBuilder(opset=17)
    x = b.input("x", [1, 3, 8, 8])
    y = middle(b, b.relu(b.conv(x, 8, name="c1")))
    model = b.build([y])
    assert any(reason in r for r in group_reasons(model, "c1")), group_reasons(model, "c1")


def test_layer_norm_decomposed_over_the_channel_axis_blocks_with_its_reason():
    """LayerNorm as older exporters write it: mean and variance by ReduceMean over the channels."""
    b = GraphBuilder(opset=17)
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(x, 16, name="c1")
    centred = b.op("Sub", [y, b.op("ReduceMean", [y], axes=[1])])
    spread = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[1])
    y = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [spread, b.const(np.float32(1e-5))])])])
    model = b.build([b.conv(y, 4, name="c2")])
    assert any("ReduceMean reduces over the channel or batch axis" in r for r in group_reasons(model, "c1"))
    pruned, _ = prune_and_compare(model, 0.4)
    assert out_channels(pruned, "c1") == 16

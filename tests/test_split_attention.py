"""Split attention (ResNeSt), as timm's SplitAttn exports: the radix slices lose the same positions.

timm's SplitAttn convolves to r * C channels (groups = cardinality * r), reshapes them to
(N, r, C, H, W), sums the radix slices, pools, runs fc1 and fc2 (to r * C), and its RadixSoftmax
views the attention as (N, cardinality, r, C / cardinality), transposes the radix forward, takes the
softmax over it and flattens it; reshaped to (N, r, C, 1, 1) it weighs each slice, and the weighted
slices are summed. Channel c of every radix slice is one removable class, so the reshapes stay valid
splits with C rewritten. Every case goes through the exactness oracle at 0.2/0.4/0.6.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_whc import prune
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load

from .builder import GraphBuilder
from .oracle import prune_and_compare
from .test_patterns import RATIOS, group_reasons, in_channels, keep, node_named, out_channels

CHANNELS = 16  # C: channels of each radix slice
SIZE = 8


def _axes_input(b: GraphBuilder, op: str, x: str, axes: list[int], keepdims: int, name: str,
                attribute_until: int) -> str:
    """A reduction with its axes as an attribute before `attribute_until`, as an input from it."""
    if b.opset < attribute_until:
        return b.op(op, [x], name=name, axes=axes, keepdims=keepdims)
    return b.op(op, [x, b.ints(axes, f"{name}.axes")], name=name, keepdims=keepdims)


def _batch(b: GraphBuilder, y: str, name: str) -> str:
    """x.size(0) as torch exports it: Shape -> Gather(0) -> Unsqueeze."""
    n = b.op("Gather", [b.op("Shape", [y], name=f"{name}.shape"), b.ints(0, f"{name}.zero")], name=f"{name}.gather",
             axis=0)
    if b.opset < 13:
        return b.op("Unsqueeze", [n], name=f"{name}.unsqueeze", axes=[0])
    return b.op("Unsqueeze", [n, b.ints([0], f"{name}.axis")], name=f"{name}.unsqueeze")


def _target(b: GraphBuilder, batch: str | None, values: list[int], name: str) -> str:
    """A view's target: constants (0 copies the batch), or the batch read at run time and constants."""
    if batch is None:
        return b.ints([0] + values, name)
    return b.op("Concat", [batch, b.ints(values, f"{name}.rest")], name=f"{name}.concat", axis=0)


def _shape_reads(b: GraphBuilder, y: str, radix: int, name: str) -> tuple[str, str]:
    """`B, RC, H, W = x.shape; x.reshape((B, radix, RC // radix, H, W))` as a dynamic-batch export writes
    it: every dimension read from Shape, RC divided by the radix at run time. Returns the target and
    the batch, which the attention's reshapes read again."""
    shape = b.op("Shape", [y], name=f"{name}.shape")

    def dim(i: int) -> str:
        return b.op("Gather", [shape, b.ints(i, f"{name}.i{i}")], name=f"{name}.dim{i}", axis=0)

    def unsqueezed(x: str, i: int) -> str:
        if b.opset < 13:
            return b.op("Unsqueeze", [x], name=f"{name}.u{i}", axes=[0])
        return b.op("Unsqueeze", [x, b.ints([0], f"{name}.ua{i}")], name=f"{name}.u{i}")

    batch = unsqueezed(dim(0), 0)
    per_slice = b.op("Div", [dim(1), b.ints(radix, f"{name}.radix")], name=f"{name}.div")
    pieces = [batch, b.ints([radix], f"{name}.r"), unsqueezed(per_slice, 1), unsqueezed(dim(2), 2),
              unsqueezed(dim(3), 3)]
    return b.op("Concat", pieces, name=f"{name}.concat", axis=0), batch


def _softmax(b: GraphBuilder, x: str, name: str) -> str:
    """F.softmax(x, dim=1) of a 4-D tensor: Softmax(axis=1) from opset 13; before, torch moves the axis
    last, takes the softmax there and moves it back."""
    if b.opset >= 13:
        return b.op("Softmax", [x], name=name, axis=1)
    moved = b.op("Transpose", [x], name=f"{name}.to_last", perm=[0, 3, 2, 1])
    return b.op("Transpose", [b.op("Softmax", [moved], name=name, axis=3)], name=f"{name}.back", perm=[0, 3, 2, 1])


def split_attention(b: GraphBuilder, x: str, radix: int = 2, cardinality: int = 1, attn: int = 8,
                    style: str = "constant", name: str = "sa", channels: int = CHANNELS) -> str:
    """timm's SplitAttn as torch.onnx.export writes it, BatchNorms folded into the convs.

    style "constant": constant view targets; "torch": a dynamic batch read from Shape (the radix view
    reads every dimension from Shape, as `x.shape` does)."""
    mid = radix * channels
    y = b.relu(b.conv(x, mid, group=cardinality * radix, name=f"{name}.conv"), name=f"{name}.act0")
    if style == "torch":
        split_target, batch = _shape_reads(b, y, radix, f"{name}.split_shape")
    else:
        batch = None
        split_target = _target(b, batch, [radix, channels, SIZE, SIZE], f"{name}.split_shape")
    split = b.op("Reshape", [y, split_target], name=f"{name}.split")
    gap = _axes_input(b, "ReduceSum", split, [1], 0, f"{name}.sum", 13)
    gap = _axes_input(b, "ReduceMean", gap, [2, 3], 1, f"{name}.gap", 18)
    a = b.relu(b.conv(gap, attn, k=1, group=cardinality, name=f"{name}.fc1", c_in=channels), name=f"{name}.act1")
    a = b.conv(a, mid, k=1, group=cardinality, name=f"{name}.fc2", c_in=attn)
    # RadixSoftmax (its batch is x.size(0) of its own input): view(B, cardinality, radix, -1).transpose(1, 2),
    # softmax over the radix, reshape(B, -1)
    rs_batch = _batch(b, a, f"{name}.rs_batch") if style == "torch" else None
    a = b.op("Reshape", [a, _target(b, rs_batch, [cardinality, radix, -1], f"{name}.rs_shape")], name=f"{name}.rs_view")
    a = b.op("Transpose", [a], name=f"{name}.rs_transpose", perm=[0, 2, 1, 3])
    a = _softmax(b, a, f"{name}.rs_softmax")
    a = b.op("Reshape", [a, _target(b, rs_batch, [-1], f"{name}.rs_flat_shape")], name=f"{name}.rs_flat")
    # .view(B, -1, 1, 1), then .reshape((B, radix, RC // radix, 1, 1)), with SplitAttn's B and RC
    a = b.op("Reshape", [a, _target(b, batch, [-1, 1, 1], f"{name}.attn_shape")], name=f"{name}.attn_view")
    a = b.op("Reshape", [a, _target(b, batch, [radix, channels, 1, 1], f"{name}.attn_split_shape")],
             name=f"{name}.attn_split")
    weighted = b.op("Mul", [split, a], name=f"{name}.mul")
    return _axes_input(b, "ReduceSum", weighted, [1], 0, f"{name}.out", 13)


def resnest_split_attention(b: GraphBuilder, x: str, radix: int = 2, attn: int = 8, name: str = "sa") -> str:
    """The original ResNeSt SplAtConv2d: the radix slices and their attention cut with Split on the
    channel axis, each slice times its attention, summed with Add; the same RadixSoftmax."""
    mid = radix * CHANNELS
    y = b.relu(b.conv(x, mid, group=radix, name=f"{name}.conv"), name=f"{name}.act0")
    splits = b.op("Split", [y, b.ints([CHANNELS] * radix, f"{name}.sizes")], outputs=radix, name=f"{name}.cut", axis=1)
    gap = splits[0]
    for i, part in enumerate(splits[1:]):
        gap = b.op("Add", [gap, part], name=f"{name}.gap_add{i}")
    gap = b.op("GlobalAveragePool", [gap], name=f"{name}.gap")
    a = b.relu(b.conv(gap, attn, k=1, name=f"{name}.fc1", c_in=CHANNELS), name=f"{name}.act1")
    a = b.conv(a, mid, k=1, name=f"{name}.fc2", c_in=attn)
    a = b.op("Reshape", [a, b.ints([0, 1, radix, -1], f"{name}.rs_shape")], name=f"{name}.rs_view")
    a = b.op("Transpose", [a], name=f"{name}.rs_transpose", perm=[0, 2, 1, 3])
    a = b.op("Reshape", [b.op("Softmax", [a], name=f"{name}.rs_softmax", axis=1), b.ints([0, -1, 1, 1], f"{name}.v")],
             name=f"{name}.attn_view")
    attns = b.op("Split", [a, b.ints([CHANNELS] * radix, f"{name}.attn_sizes")], outputs=radix, name=f"{name}.attn_cut",
                 axis=1)
    out = None
    for i, (part, weight) in enumerate(zip(splits, attns)):
        product = b.op("Mul", [weight, part], name=f"{name}.mul{i}")
        out = product if out is None else b.op("Add", [out, product], name=f"{name}.add{i}")
    return out


def net(opset: int = 17, style: str = "constant", block=split_attention, **options) -> onnx.ModelProto:
    """x -> c0 (16 filters) -> split attention -> c2 (4 filters)."""
    b = GraphBuilder(opset=opset, dynamic_batch=style != "constant")
    x = b.input("x", [1, 3, SIZE, SIZE])
    y = block(b, b.relu(b.conv(x, 16, name="c0")), **({"style": style} if block is split_attention else {}), **options)
    return b.build([b.conv(y, 4, name="c2", c_in=CHANNELS)])


def values(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def target_of(model: onnx.ModelProto, reshape: str) -> list[int]:
    """A Reshape's constant target, or the constants after the batch of a Concat target."""
    node = node_named(model, reshape)
    init = {t.name for t in model.graph.initializer}
    if node.input[1] in init:
        return values(model, node.input[1]).tolist()
    concat = next(n for n in model.graph.node if node.input[1] in n.output)
    return [int(v) for name in concat.input if name in init for v in values(model, name).ravel()]


def assert_slices_pruned_alike(pruned: onnx.ModelProto, ratio: float, radix: int = 2) -> int:
    left = keep(CHANNELS, ratio)
    assert out_channels(pruned, "sa.conv") == out_channels(pruned, "sa.fc2") == radix * left
    assert in_channels(pruned, "sa.fc1") == in_channels(pruned, "c2") == left
    return left


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_split_attention_prunes_exactly(opset, ratio):
    model = net(opset)
    assert not group_reasons(model, "sa.conv")
    pruned, plan = prune_and_compare(model, ratio)
    left = assert_slices_pruned_alike(pruned, ratio)
    assert target_of(pruned, "sa.split") == [0, 2, left, SIZE, SIZE]
    assert target_of(pruned, "sa.attn_split") == [0, 2, left, 1, 1]
    assert target_of(pruned, "sa.rs_view") == [0, 1, 2, -1]
    # The conv's channel c and r * C + c went together: every radix slice lost the same positions.
    gone = ~analyze_channels(load(model)).keep_mask("sa.conv", plan.removed_roots).reshape(2, CHANNELS)
    assert (gone == gone[0]).all() and gone[0].sum() == CHANNELS - left


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("opset", [13, 17])
def test_split_attention_with_a_dynamic_batch(opset, ratio):
    """The batch read from Shape; the radix split reads every dimension from Shape (folded at loading)."""
    model = net(opset, style="torch")
    assert not group_reasons(model, "sa.conv")
    pruned, _ = prune_and_compare(model, ratio)
    left = assert_slices_pruned_alike(pruned, ratio)
    assert target_of(pruned, "sa.attn_split") == [2, left, 1, 1]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("radix,cardinality", [(4, 1), (2, 2), (2, 4)])
def test_split_attention_radix_and_cardinality(radix, cardinality, ratio):
    """More radix slices, and cardinality groups: the conv's groups and the attention's card x radix view
    tie position p of every C / cardinality block."""
    model = net(17, radix=radix, cardinality=cardinality, attn=8)
    assert not group_reasons(model, "sa.conv")
    pruned, _ = prune_and_compare(model, ratio)
    per_block = CHANNELS // cardinality
    left = cardinality * keep(per_block, ratio)
    assert out_channels(pruned, "sa.conv") == out_channels(pruned, "sa.fc2") == radix * left
    assert in_channels(pruned, "c2") == left


@pytest.mark.parametrize("ratio", RATIOS)
def test_resnest_split_attention_with_split_and_add(ratio):
    """ResNeSt's own SplAtConv2d: Split on the channels and Add instead of the 5-D reshape and ReduceSum."""
    model = net(17, block=resnest_split_attention)
    assert not group_reasons(model, "sa.conv")
    pruned, _ = prune_and_compare(model, ratio)
    assert_slices_pruned_alike(pruned, ratio)


def test_split_then_merged_back_prunes():
    """A split of the channels read back as they were: (N, 16, H, W) -> (N, 4, 4, H, W) -> (N, 16, H, W)."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, SIZE, SIZE])
    y = b.op("Reshape", [b.relu(b.conv(x, 16, name="c1")), b.ints([0, 4, 4, SIZE, SIZE])])
    y = b.op("Reshape", [b.sigmoid(y), b.ints([0, 16, SIZE, SIZE])], name="merge")
    model = b.build([b.conv(y, 4, name="c2", c_in=16)])
    assert not group_reasons(model, "c1")
    pruned, _ = prune_and_compare(model, 0.5)
    # The four slices lose the same positions: 4 classes of 4 channels, 2 go.
    assert out_channels(pruned, "c1") == in_channels(pruned, "c2") == 8
    assert target_of(pruned, "merge") == [0, 8, SIZE, SIZE]


def _blocked(middle) -> tuple[onnx.ModelProto, list[str]]:
    b = GraphBuilder()
    x = b.input("x", [1, 3, SIZE, SIZE])
    y = middle(b, b.relu(b.conv(x, 16, name="c1")))
    model = b.build([b.conv(y, 4, name="c2")])
    return model, group_reasons(model, "c1")


BLOCKED = {
    "summed over the positions": (
        lambda b, y: b.op("ReduceSum", [b.op("Reshape", [y, b.ints([0, 4, 4, SIZE, SIZE])]), b.ints([2])], keepdims=0),
        "ReduceSum reduces over the channel or batch axis"),
    "softmax over the positions": (
        lambda b, y: b.op("Reshape", [b.softmax(b.op("Reshape", [y, b.ints([0, 4, 4, SIZE, SIZE])]), axis=2),
                                      b.ints([0, 16, SIZE, SIZE])]),
        "Softmax over the channel axis"),
    "target copying the input's size": (
        lambda b, y: b.op("Reshape", [b.op("Reshape", [y, b.ints([0, 2, 0, SIZE, SIZE])]), b.ints([0, 16, SIZE, SIZE])]),
        "Reshape 1x16x8x8 -> 1x2x8x8x8 splits the channels, and its target copies a dimension of the input"),
    "slices merged with space": (
        lambda b, y: b.op("Reshape", [b.op("Reshape", [y, b.ints([0, 4, 4, SIZE, SIZE])]), b.ints([0, 4, -1, SIZE])]),
        "Reshape 1x4x4x8x8 -> 1x4x32x8 mixes channels"),
}


@pytest.mark.parametrize("case", list(BLOCKED))
def test_splits_that_cannot_stay_exact_block(case):
    middle, reason = BLOCKED[case]
    model, reasons = _blocked(middle)
    assert any(reason in r for r in reasons), reasons
    pruned, _ = prune_and_compare(model, 0.5)
    assert out_channels(pruned, "c1") == 16


def test_split_attention_prunes_and_recovers():
    """The whole prune: two split-attention blocks behind a stem, a classifier head, recovery on
    synthetic images and validation."""
    b = GraphBuilder(opset=17, dynamic_batch=False)
    x = b.input("x", [1, 3, 32, 32])
    y = b.relu(b.conv(x, 16, stride=4, name="c0"))
    y = split_attention(b, y, name="sa")
    y = split_attention(b, b.relu(b.conv(y, 16, k=1, name="c1", c_in=CHANNELS)), name="sb")
    model = b.build([b.gemm(b.flatten(b.op("GlobalAveragePool", [y])), 10, name="fc")])
    pruned, report = prune(model, ratio=0.5, round_to=1, allocate=False, validate=True)
    assert report.recovery is not None and report.macs_kept < 1
    assert out_channels(pruned, "sa.conv") == out_channels(pruned, "sa.fc2") == 2 * in_channels(pruned, "c1")

"""GroupNorm, as exporters write it and as the GroupNormalization op: whole groups go.

A GroupNorm's statistics mix the channels of a group and no others, so removing whole groups is
exact: each group's C/G channels form one removable class, and the surgery rewrites the group count
(the Reshape target's G, or `num_groups`) with the per-group and per-channel parameters. Every case
goes through the exactness oracle at 0.2/0.4/0.6.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_whc import prune
from onnx_whc.errors import UserInputError
from onnx_whc.graph.load import load

from .builder import GraphBuilder
from .oracle import prune_and_compare
from .test_patterns import RATIOS, group_reasons, in_channels, node_named, out_channels

CHANNELS = 16


def exported_group_norm(b: GraphBuilder, y: str, groups: int, back: str = "shape", split: str = "minus1",
                        name: str = "gn") -> str:
    """PyTorch's F.group_norm before opset 18: Reshape (0, G, -1), InstanceNormalization with unit
    scale and zero bias per group, Reshape back (to Shape(x), or a constant), Mul and Add per channel."""
    c, rest = CHANNELS, None
    target = [0, groups, -1]
    if split == "explicit":
        shape = b.static_shape(y)
        rest = c // groups * shape[2] * shape[3]
        target = [0, groups, rest]
    r = b.op("Reshape", [y, b.ints(target, f"{name}.split_shape")], name=f"{name}.split")
    n = b.op("InstanceNormalization", [r, b.const(np.ones(groups), f"{name}.ones"),
                                       b.const(np.zeros(groups), f"{name}.zeros")], name=f"{name}.norm", epsilon=1e-5)
    shape = b.op("Shape", [y], name=f"{name}.shape") if back == "shape" else b.ints([0, c, 8, 8], f"{name}.back_shape")
    merged = b.op("Reshape", [n, shape], name=f"{name}.merge")
    scaled = b.op("Mul", [merged, b.positive([c, 1, 1], f"{name}.weight")], name=f"{name}.mul")
    return b.op("Add", [scaled, b.random([c, 1, 1], 0.1, f"{name}.bias")], name=f"{name}.add")


def native_group_norm(b: GraphBuilder, y: str, groups: int, name: str = "gn") -> str:
    """The GroupNormalization op of opset 21: scale and bias per channel."""
    return b.op("GroupNormalization", [y, b.positive([CHANNELS], f"{name}.scale"), b.random([CHANNELS], 0.1, f"{name}.bias")],
                name=name, num_groups=groups, epsilon=1e-5)


def net(norm, opset: int, groups: int, **options) -> onnx.ModelProto:
    """x -> c1 (16 filters) -> GroupNorm -> Relu -> c2 (4 filters)."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(norm(b, b.conv(x, CHANNELS, name="c1"), groups, **options))
    return b.build([b.conv(y, 4, name="c2", c_in=CHANNELS)])


def values(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def kept_groups(groups: int, ratio: float) -> int:
    return max(1, groups - int(np.floor(ratio * groups + 1e-9)))


def assert_whole_groups_removed(pruned: onnx.ModelProto, groups: int, ratio: float) -> int:
    left = kept_groups(groups, ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "c2") == left * CHANNELS // groups
    return left


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("groups", [2, 4, 8, 16])
@pytest.mark.parametrize("opset", [13, 17])
def test_exported_group_norm_loses_whole_groups(opset, groups, ratio):
    model = net(exported_group_norm, opset, groups)
    assert not group_reasons(model, "c1")
    pruned, _ = prune_and_compare(model, ratio)
    left = assert_whole_groups_removed(pruned, groups, ratio)
    assert list(values(pruned, node_named(pruned, "gn.split").input[1])) == [0, left, -1]
    norm = node_named(pruned, "gn.norm")
    assert len(values(pruned, norm.input[1])) == len(values(pruned, norm.input[2])) == left
    assert values(pruned, node_named(pruned, "gn.mul").input[1]).shape == (left * CHANNELS // groups, 1, 1)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("back,split", [("constant", "minus1"), ("shape", "explicit"), ("constant", "explicit")])
def test_exported_group_norm_with_constant_targets(back, split, ratio):
    """A constant target back to (N, C, H, W) loses the channels; an explicit (N, G, C/G*H*W) keeps its
    group size, which whole groups leave unchanged."""
    model = net(exported_group_norm, 13, 4, back=back, split=split)
    pruned, _ = prune_and_compare(model, ratio)
    left = assert_whole_groups_removed(pruned, 4, ratio)
    split_target = values(pruned, node_named(pruned, "gn.split").input[1])
    assert split_target[1] == left and split_target[2] in (-1, CHANNELS // 4 * 64)
    if back == "constant":
        assert list(values(pruned, node_named(pruned, "gn.merge").input[1])) == [0, left * CHANNELS // 4, 8, 8]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("groups", [2, 4, 16])
def test_group_normalization_op_loses_whole_groups(groups, ratio):
    model = net(native_group_norm, 21, groups)
    assert not group_reasons(model, "c1")
    pruned, _ = prune_and_compare(model, ratio)
    left = assert_whole_groups_removed(pruned, groups, ratio)
    node = node_named(pruned, "gn")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "num_groups")) == left
    assert len(values(pruned, node.input[1])) == len(values(pruned, node.input[2])) == left * CHANNELS // groups


def test_one_group_normalises_every_channel_together():
    """One group is a LayerNorm over C x H x W: its channels stay, with the reason."""
    exported = net(exported_group_norm, 13, 1)
    assert any("Reshape 1x16x8x8 -> 1x1x1024 mixes channels" in r for r in group_reasons(exported, "c1"))
    native = net(native_group_norm, 21, 1)
    assert any("GroupNormalization with 1 group normalises all its channels together" in r
               for r in group_reasons(native, "c1"))
    for model in (exported, native):
        pruned, _ = prune_and_compare(model, 0.5)
        assert out_channels(pruned, "c1") == CHANNELS


def test_opset_18_group_normalization_is_refused_by_onnx():
    """Opset 18's GroupNormalization (scale and bias per group) is deprecated: onnx's checker refuses it."""
    b = GraphBuilder(opset=18)
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("GroupNormalization", [b.conv(x, CHANNELS, name="c1"), b.positive([4]), b.random([4], 0.1)],
             num_groups=4, epsilon=1e-5)
    model = b.build([b.conv(b.relu(y), 4, name="c2", c_in=CHANNELS)], check=False)
    with pytest.raises(UserInputError, match="deprecated"):
        load(model)


@pytest.mark.parametrize("norm,opset", [(exported_group_norm, 13), (native_group_norm, 21)])
def test_group_norm_prunes_and_recovers(norm, opset):
    """The whole prune: allocation, recovery on synthetic images, validation."""
    b = GraphBuilder(opset=opset, dynamic_batch=False)
    x = b.input("x", [1, 3, 32, 32])
    y = b.relu(norm(b, b.conv(x, CHANNELS, name="c1"), 8))
    y = b.relu(norm(b, b.conv(y, CHANNELS, name="c2", c_in=CHANNELS), 4, name="gn2"))
    model = b.build([b.gemm(b.flatten(b.op("GlobalAveragePool", [y])), 10, name="fc")])
    pruned, report = prune(model, ratio=0.5, round_to=1, allocate=False, validate=True)
    assert report.recovery is not None and report.macs_kept < 1
    assert out_channels(pruned, "c1") % 2 == 0 and out_channels(pruned, "c2") % 4 == 0

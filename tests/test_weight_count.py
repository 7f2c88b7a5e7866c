"""No pruned model carries more weights than its original: folded expansions are written back as
they were computed, readers of one weight share one sliced copy, recovery leaves shared weights
shared, and no unused weight is left behind. (tests/oracle.py checks the count on every pattern.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_whc import prune

from .builder import GraphBuilder
from .oracle import float_params, prune_and_compare, unused_weights

RATIOS = [0.2, 0.4, 0.6]


def attention_bias_net(opset: int = 13) -> onnx.ModelProto:
    """LeViT's attention bias: a (1, 64) table gathered by constant (256, 256) indices and added to
    token-token scores. Loading folds the Gather into 65,536 values, a thousand times the table."""
    b = GraphBuilder(opset=opset, seed=2)
    x = b.input("x", [1, 3, 16, 16])
    y = b.relu(b.conv(b.relu(b.conv(x, 32, name="c1")), 32, name="c2"))
    table = b.random([1, 64], name="bias_table")
    index = b.ints(np.random.default_rng(0).integers(0, 64, (256, 256)), name="bias_index")
    bias = b.op("Gather", [table, index], axis=1, name="bias_gather")
    tokens = b.op("Reshape", [b.conv(y, 1, k=1, name="proj"), b.ints([0, 1, 256])])
    scores = b.op("MatMul", [b.op("Transpose", [tokens], perm=[0, 2, 1]), tokens])
    attended = b.op("ReduceMean", [b.op("Add", [scores, bias])], axes=[2], keepdims=0)
    return b.build([attended, b.gemm(b.flatten(b.op("GlobalAveragePool", [y])), 10, name="fc")])


def siamese_net() -> onnx.ModelProto:
    """One conv weight read by two branches whose sum a head reads, and a layer applied twice."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 3, 16, 16])
    stem = b.relu(b.conv(x, 32, name="stem"))
    left = b.conv(stem, 32, name="left")
    right = b.op("Conv", [b.sigmoid(stem), "left.weight", "left.bias"], name="right", kernel_shape=[3, 3],
                 pads=[1, 1, 1, 1])
    y = b.relu(b.op("Add", [left, right]))
    once = b.relu(b.conv(y, 32, name="once"))
    twice = b.relu(b.op("Conv", [once, "once.weight", "once.bias"], name="twice", kernel_shape=[3, 3],
                        pads=[1, 1, 1, 1]))
    return b.build([b.gemm(b.flatten(b.op("GlobalAveragePool", [twice])), 10, name="fc")])


def assert_no_more_weights(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    assert float_params(pruned) <= float_params(original)
    assert not unused_weights(pruned)
    onnx.checker.check_model(pruned, full_check=True)


@pytest.mark.parametrize("ratio", RATIOS)
def test_a_folded_gather_is_written_back(ratio):
    model = attention_bias_net()
    pruned, plan = prune_and_compare(model, ratio)
    assert plan.removed_channels > 0
    gather = next(n for n in pruned.graph.node if n.op_type == "Gather")
    assert list(gather.input) == ["bias_table", "bias_index"]
    assert float_params(pruned) < float_params(model) < 65536


def test_a_folded_gather_is_written_back_after_recovery():
    model = attention_bias_net()
    pruned, report = prune(model, ratio=0.5, validate=True)
    assert report.recovery is not None and report.recovery["layers"] > 0
    assert_no_more_weights(pruned, model)
    assert any(n.op_type == "Gather" for n in pruned.graph.node)


def test_an_ir3_gather_is_declared_among_the_inputs():
    model = attention_bias_net(opset=9)
    model.ir_version = 3
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    pruned, _ = prune_and_compare(model, 0.5)
    inputs = {i.name for i in pruned.graph.input}
    assert {"bias_table", "bias_index"} <= inputs and {t.name for t in pruned.graph.initializer} <= inputs


@pytest.mark.parametrize("ratio", RATIOS)
def test_readers_of_one_weight_share_one_copy(ratio):
    model = siamese_net()
    pruned, plan = prune_and_compare(model, ratio)
    assert plan.removed_channels > 0
    nodes = {n.name: n for n in pruned.graph.node}
    assert nodes["left"].input[1:] == nodes["right"].input[1:] and nodes["once"].input[1:] == nodes["twice"].input[1:]
    assert len(pruned.graph.initializer) == len(model.graph.initializer)


def test_recovery_leaves_a_shared_weight_shared():
    model = siamese_net()
    pruned, report = prune(model, ratio=0.5, validate=True, allocate=False)
    fitted = {record["layer"] for record in report.recovery["per_layer"]}
    assert "stem" not in fitted and "fc" in fitted and not fitted & {"left", "right", "once", "twice"}
    nodes = {n.name: n for n in pruned.graph.node}
    assert nodes["left"].input[1:] == nodes["right"].input[1:] and nodes["once"].input[1:] == nodes["twice"].input[1:]
    assert_no_more_weights(pruned, model)

"""Odd but legal graphs: every opset from 7 to 21, IR versions 3 to 10, several inputs and
outputs, missing or repeated node names, subgraphs, weights fed as inputs, shared weights and
symbolic batches. Each is pruned and held to the oracle (tests/oracle.py) or run through the CLI.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_whc import analyze, prune
from onnx_whc.cli import main
from onnx_whc.graph.load import load

from .fuzz.builder import Net
from .oracle import prune_and_compare


def mixed_net(opset: int, ir_version: int | None = None) -> onnx.ModelProto:
    """A small CNN using every op whose signature changed between opsets 7 and 21."""
    net = Net(opset, seed=opset)
    x = net.input(3, 16, 16)
    a = net.act(net.bn(net.conv(x, 8)), "Relu")
    b = net.act(net.conv(a, 12, stride=2), "Clip")
    shortcut = net.pad_channels(net.subsample(a), 2, 2, with_axes=True)  # Pad: attribute < 11, input >= 11
    r = net.add(b, shortcut)
    left, right = net.split(r, [6, 6], by_count=True)  # Split: attribute < 13, input >= 13, num_outputs 18
    r = net.se(net.concat([net.conv(left, 6), right]), 4, reduce=True)  # ReduceMean axes: input >= 18
    up = net.pool(net.upsample(net.conv(r, 6, k=1)), "AveragePool")  # Upsample < 10, Resize after
    net.output(net.head(up, 5, reduce=True))
    return net.model(ir_version)


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain: o.version for o in model.opset_import}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("opset", range(7, 22))
def test_every_opset(opset):
    model = mixed_net(opset)
    onnx.checker.check_model(model, full_check=True)
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    assert opsets(pruned) == opsets(model) and pruned.ir_version == model.ir_version


# The newest opset each IR version can carry.
IR_OPSET = {3: 8, 4: 9, 5: 10, 6: 11, 7: 14, 8: 18, 9: 20, 10: 21}


@pytest.mark.parametrize("ir_version", sorted(IR_OPSET))
def test_every_ir_version(ir_version):
    model = mixed_net(IR_OPSET[ir_version], ir_version)
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0 and pruned.ir_version == ir_version
    inputs = {i.name for i in pruned.graph.input}
    weights = {t.name for t in pruned.graph.initializer}
    if ir_version == 3:  # IR 3 requires every initializer among the inputs, new ones included
        assert weights <= inputs
    else:
        assert inputs == {"input"}


def test_ir3_through_the_cli(tmp_path):
    source, out = tmp_path / "ir3.onnx", tmp_path / "out.onnx"
    onnx.save(mixed_net(7), source)
    result = cli("prune", source, "--ratio", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out), full_check=True)
    assert onnx.load(out).ir_version == 3


def bias_free_ir3() -> onnx.ModelProto:
    """IR 3, opset 9, as old exporters wrote ShuffleNet v1: convs without biases (recovery adds them),
    a weight read by two convs (each gets its own copy), initializers listed among the inputs."""
    net = Net(9, seed=21)
    x = net.input(3, 32, 32)
    a = net.act(net.bn(net.conv(x, 32, bias=False)))
    shared = net.const(net.weight((32, 32, 3, 3), 288), "shared")
    left = net.act(net.conv(a, 32, weight=shared, bias=False))
    right = net.act(net.conv(net.pool(a, "MaxPool"), 32, weight=shared, bias=False))
    b = net.act(net.conv(net.add(net.pool(left, "AveragePool"), right), 32, bias=False))
    net.output(net.head(b, 10))
    model = net.model(3)
    onnx.checker.check_model(model, full_check=True)
    return model


def _assert_valid_ir3(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == 3
    weights = [t.name for t in pruned.graph.initializer]
    inputs = [i.name for i in pruned.graph.input]
    assert inputs[0] == "input" and set(inputs[1:]) == set(weights) and len(inputs) == len(weights) + 1
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert all(declared[t.name] == list(t.dims) for t in pruned.graph.initializer)
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    outputs = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert outputs[0].shape == (2, 10) and np.isfinite(outputs[0]).all()
    # Listed weights are still weights, not inputs, when the pruned model is read again.
    assert [t.name for t in load(pruned).graph.inputs] == ["input"]
    assert [g.channels for g in analyze(pruned).groups] != [g.channels for g in analyze(original).groups]


def test_ir3_recovered_weights_are_listed_as_inputs():
    """Recovery writes new initializers (a bias where a conv had none, a copy of a shared weight):
    under IR 3 each is declared among the inputs too, and the replaced ones are no longer."""
    model = bias_free_ir3()
    pruned, report = prune(model, ratio=0.5, validate=True)
    assert report.recovery is not None and report.recovery["layers"] > 0
    assert any(".recovered_" in t.name for t in pruned.graph.initializer)
    _assert_valid_ir3(pruned, model)


def test_ir3_recovered_through_the_cli(tmp_path):
    source, out = tmp_path / "ir3.onnx", tmp_path / "out.onnx"
    model = bias_free_ir3()
    onnx.save(model, source)
    result = cli("prune", source, "--ratio", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(str(out), full_check=True)
    _assert_valid_ir3(onnx.load(out), model)


def test_several_inputs_and_outputs():
    net = Net(17, seed=3)
    image, depth = net.input(3, 16, 16, "image"), net.input(1, 16, 16, "depth")
    a = net.act(net.conv(image, 8))
    b = net.act(net.conv(depth, 4))
    fused = net.act(net.conv(net.concat([a, b]), 10))
    features = net.output(net.conv(fused, 6, name="features"))  # a raw output: its channels stay
    net.output(net.head(fused, 3))
    net.output(net.head(net.act(net.conv(b, 5)), 2))
    model = net.model()
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in pruned.graph.input] == ["image", "depth"]
    conv = next(n for n in pruned.graph.node if n.output[0] == features)
    assert numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == conv.input[1])).shape[0] == 6


def _chain(opset: int = 17) -> onnx.ModelProto:
    net = Net(opset, seed=5)
    y = net.input(3, 8, 8)
    for width in (8, 8, 6):
        y = net.act(net.conv(y, width))
    net.output(net.head(y, 4))
    return net.model()


def test_unnamed_nodes(tmp_path):
    model = _chain()
    for node in model.graph.node:
        node.name = ""
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    names = [n.name for n in pruned.graph.node]
    assert all(names) and len(set(names)) == len(names)
    source = tmp_path / "unnamed.onnx"
    onnx.save(model, source)
    assert cli("prune", source, "-o", tmp_path / "out.onnx").exit_code == 0


def test_duplicate_node_names():
    model = _chain()
    for node in model.graph.node:
        node.name = "layer"
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    producers = [p for g in analyze(model).groups for p in g.producers]
    assert len(set(producers)) == len(producers) == 4  # three convs and the head: told apart in reports and --exclude


def _if_model() -> onnx.ModelProto:
    """c1's output is read inside both branches of an If; c2 -> c3 is an ordinary chain."""
    net = Net(17, seed=7)
    x = net.input(3, 8, 8)
    a = net.act(net.conv(x, 8, name="c1"))
    b = net.act(net.conv(a, 8, name="c2"))
    net.output(net.head(net.conv(b, 6, name="c3"), 4))
    mean = net.node("ReduceMean", [x], (), keepdims=0)
    cond = net.node("Greater", [mean, net.const(np.float32(0.0))], ())
    out = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Add", [a, a], ["branch_out"], name="then_add")], "then", [], [out])
    other = helper.make_graph([helper.make_node("Relu", [a], ["branch_out"], name="else_relu")], "else", [], [out])
    net.nodes.append(helper.make_node("If", [cond], ["gated"], name="gate", then_branch=then, else_branch=other))
    net.shape["gated"] = net.shape[a]
    net.output("gated")
    return net.model()


def _bodies(model: onnx.ModelProto) -> list[bytes]:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return [helper.get_attribute_value(a).node[0].SerializeToString() for a in node.attribute]


def test_subgraph_captures_keep_their_channels():
    model = _if_model()
    groups = {tuple(g.producers): g for g in analyze(model).groups}
    assert any("captured by a subgraph of If node gate" in r for r in groups[("c1",)].reasons)
    assert groups[("c2",)].prunable
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    assert _bodies(pruned) == _bodies(model)
    c1 = next(n for n in pruned.graph.node if n.name == "c1")
    assert next(t for t in pruned.graph.initializer if t.name == c1.input[1]).dims[0] == 8


def test_conv_weights_fed_as_graph_input():
    net = Net(17, seed=9)
    x = net.input(3, 8, 8)
    net.inputs.append(helper.make_tensor_value_info("kernel", TensorProto.FLOAT, [8, 3, 3, 3]))
    a = net.act(net.conv(x, 8, weight="kernel", bias=False, name="dynamic"))
    b = net.act(net.conv(a, 8, name="static"))
    net.output(net.head(b, 4))
    model = net.model()
    groups = {tuple(g.producers): g for g in analyze(model).groups}
    reasons = [g.reasons for g in analyze(model).groups if "dynamic" in g.nodes and not g.prunable]
    assert any("Conv weights are not constant (node dynamic)" in r for rs in reasons for r in rs)
    assert groups[("static",)].prunable
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    assert [i.name for i in pruned.graph.input] == ["input", "kernel"]


def test_initializer_shared_by_two_convs(capfd):
    """Siamese branches and a repeated layer read one weight; each reader is sliced on its own."""
    net = Net(17, seed=11)
    x = net.input(3, 8, 8)
    shared = net.const(net.weight((16, 3, 3, 3), 27), "shared")
    left = net.act(net.conv(x, 16, weight=shared, bias=False))
    right = net.act(net.conv(net.act(x, "Sigmoid"), 16, weight=shared, bias=False))
    square = net.const(net.weight((16, 16, 3, 3), 144), "square")  # over 1024 values: a 'weight' to loading
    twice = net.conv(net.act(net.conv(left, 16, weight=square, bias=False)), 16, weight=square, bias=False)
    net.output(net.head(net.act(twice), 3))
    net.output(net.head(right, 3))
    model = net.model()
    pruned, plan = prune_and_compare(model, 0.5)
    assert plan.removed_channels > 0
    readers = [n for n in pruned.graph.node if n.op_type == "Conv"]
    shapes = {n.name: tuple(next(t for t in pruned.graph.initializer if t.name == n.input[1]).dims) for n in readers}
    assert all(shape[0] < 16 for shape in shapes.values()), shapes
    assert "[W]" not in capfd.readouterr().out  # no warnings about look-alike tensors


@pytest.mark.parametrize("batch", ["batch", 1])
def test_first_dimension_symbolic_or_fixed(tmp_path, batch):
    net = Net(17, seed=13, batch=batch)
    x = net.input(3, 16, 16)
    net.output(net.head(net.act(net.conv(net.act(net.conv(x, 8)), 8)), 4))
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(net.model(), source)
    result = cli("prune", source, "--ratio", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    pruned = onnx.load(out)
    for info in (pruned.graph.input[0], pruned.graph.output[0]):
        first = info.type.tensor_type.shape.dim[0]
        assert (first.dim_param or first.dim_value) == batch
    rows = 3 if batch == "batch" else 1
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": np.zeros((rows, 3, 16, 16), np.float32)})[0]
    assert y.shape == (rows, 4)
    prune_and_compare(net.model(), 0.5)

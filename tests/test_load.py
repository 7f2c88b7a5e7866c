"""Ways a model file can hold its weights and structure, each pruned through the exactness oracle."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from onnx_whc.api import analyze
from onnx_whc.graph.load import load

from .builder import GraphBuilder
from .oracle import prune_and_compare
from .test_patterns import RATIOS, in_channels, keep, node_named, out_channels, weight


def small_cnn(b: GraphBuilder) -> onnx.ModelProto:
    """conv -> BN -> relu -> conv -> relu -> pool -> flatten -> gemm: two prunable groups."""
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.batch_norm(b.conv(x, 16, name="c1")))
    y = b.relu(b.conv(y, 12, name="c2"))
    y = b.flatten(b.global_average_pool(y))
    return b.build([b.gemm(y, 10, name="fc")])


def assert_small_cnn_pruned(pruned: onnx.ModelProto, ratio: float) -> None:
    assert out_channels(pruned, "c1") == in_channels(pruned, "c2") == keep(16, ratio)
    assert out_channels(pruned, "c2") == in_channels(pruned, "fc") == keep(12, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_external_data_model_from_path(tmp_path, ratio):
    model = small_cnn(GraphBuilder())
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 0
    assert all(onnx.external_data_helper.uses_external_data(t) for t in onnx.load(str(path), load_external_data=False)
               .graph.initializer)
    pruned, _ = prune_and_compare(path, ratio)
    assert_small_cnn_pruned(pruned, ratio)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in pruned.graph.initializer)


@pytest.mark.parametrize("ratio", RATIOS)
def test_weights_as_constant_nodes(ratio):
    model = small_cnn(GraphBuilder(weights_as="constant"))
    assert not model.graph.initializer and sum(n.op_type == "Constant" for n in model.graph.node) >= 10
    pruned, _ = prune_and_compare(model, ratio)
    assert_small_cnn_pruned(pruned, ratio)


@pytest.mark.parametrize("ratio", RATIOS)
def test_weights_built_by_constant_of_shape(ratio):
    """A bias filled by ConstantOfShape and a weight computed as ConstantOfShape(1) * W fold into constants."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    fill = onnx.helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.25])
    bias = b.op("ConstantOfShape", [b.ints([16])], name="bias_fill", value=fill)
    ones = b.op("ConstantOfShape", [b.ints([16, 3, 3, 3])], name="ones",
                value=onnx.helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    w = b.op("Mul", [ones, b.random([16, 3, 3, 3], 0.2)], name="scaled_weight")
    y = b.relu(b.op("Conv", [x, w, bias], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    model = b.build([b.conv(y, 4, name="c2", c_in=16)])
    loaded = load(model)
    assert {n.op for n in loaded.graph.nodes} == {"Conv", "Relu"}
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "c2") == keep(16, ratio)
    assert np.allclose(weight(pruned, "c1", 2), 0.25)


def _shape_based_same_pad(b: GraphBuilder, y: str) -> str:
    """'same' padding computed from the runtime spatial size: Shape -> Slice -> Sub -> Concat -> Pad."""
    hw = b.op("Slice", [b.op("Shape", [y]), b.ints([2]), b.ints([4])])
    missing = b.op("Sub", [b.ints([9, 9]), hw])  # pad 8x8 maps to 9x9: one row and one column at the end
    pads = b.op("Concat", [b.ints([0, 0, 0, 0, 0, 0]), missing], axis=0)
    return b.op("Pad", [y, pads])


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("chain", ["torch_pad_constant_chain", "shape_slice_concat"])
def test_same_padding_chain_folds_away(chain, ratio):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 16, name="c1"))
    y = b.torch_pad(y, [0, 1, 0, 1]) if chain == "torch_pad_constant_chain" else _shape_based_same_pad(b, y)
    model = b.build([b.conv(y, 4, k=2, pad=0, name="c2")])
    loaded = load(model)
    assert {n.op for n in loaded.graph.nodes} == {"Conv", "Relu", "Pad"}
    pad = next(n for n in loaded.graph.nodes if n.op == "Pad")
    assert isinstance(pad.inputs[1], gs.Constant)
    pruned, _ = prune_and_compare(model, ratio)
    assert out_channels(pruned, "c1") == in_channels(pruned, "c2") == keep(16, ratio)


def test_shape_reads_of_dynamic_dimensions_are_not_baked_in():
    """With a dynamic height and width, the padding follows the input size: folding it for the
    --input-shape given would break every other size, so it stays computed (and blocks c1)."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = _shape_based_same_pad(b, b.relu(b.conv(x, 16, name="c1")))
    y = b.relu(b.conv(y, 8, k=2, pad=0, name="c2"))
    model = b.build([b.conv(y, 4, name="c3")])
    for value in (model.graph.input[0], model.graph.output[0]):
        for dim, name in zip(value.type.tensor_type.shape.dim[2:], "HW"):
            dim.dim_param = name
    loaded = load(model, {"x": (1, 3, 8, 8)})
    assert "Shape" in {n.op for n in loaded.graph.nodes}
    pruned, _ = prune_and_compare(model, 0.5, input_shapes={"x": (1, 3, 8, 8)})
    assert out_channels(pruned, "c1") == 16 and out_channels(pruned, "c2") == 4
    # The pruned model still pads any size to 9x9.
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((1, 3, 6, 6), np.float32)})[0].shape == (1, 4, 8, 8)


@pytest.mark.parametrize("ratio", RATIOS)
def test_old_ir_with_initializers_as_inputs(ratio):
    b = GraphBuilder(opset=8, ir_version=3)
    model = small_cnn(b)
    inputs = {i.name for i in model.graph.input}
    assert model.ir_version == 3 and {t.name for t in model.graph.initializer} <= inputs
    pruned, _ = prune_and_compare(model, ratio)
    assert_small_cnn_pruned(pruned, ratio)
    assert pruned.ir_version == 3
    pruned_inputs = [i.name for i in pruned.graph.input]
    assert pruned_inputs[0] == "x"
    assert {t.name for t in pruned.graph.initializer} <= set(pruned_inputs)
    # The declared input shapes follow the pruned initializers.
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    for t in pruned.graph.initializer:
        assert declared[t.name] == list(t.dims)


@pytest.mark.parametrize("ratio", RATIOS)
def test_initializer_shared_by_two_convs(ratio):
    """Two convs read one weight; one is fixed by a graph output. The readers of a weight lose the
    same channels (one weight serves them), so the other keeps its filters too, with the reason."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    a = b.conv(x, 16, name="fixed")
    y = b.op("Conv", [x, "fixed.weight", "fixed.bias"], name="pruned", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = b.build([a, b.conv(b.relu(y), 4, name="head", c_in=16)])
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fixed.weight"))
    group = next(g for g in analyze(model).groups if "pruned" in g.nodes)
    assert "feeds graph output 'fixed'" in group.reasons[0] and set(group.producers) == {"fixed", "pruned"}
    pruned, _ = prune_and_compare(model, ratio)
    np.testing.assert_array_equal(weight(pruned, "fixed"), original)
    assert node_named(pruned, "fixed").input[1] == node_named(pruned, "pruned").input[1]
    assert in_channels(pruned, "head") == 16


@pytest.mark.parametrize("ratio", RATIOS)
def test_initializer_shared_by_two_convs_loses_the_same_filters(ratio):
    """Both readers of the shared weight are pruned: their groups (one coupled with 'partner' by an
    Add) join, lose the same filters, and one sliced weight and bias serve both."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    p = b.relu(b.conv(x, 16, name="p"))
    q = b.op("Conv", [x, "p.weight", "p.bias"], name="q", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    q = b.relu(b.op("Add", [q, b.conv(x, 16, name="partner", c_in=3)]))  # couples q with 'partner'
    y = b.op("Add", [b.conv(p, 4, name="head_p", c_in=16), b.conv(q, 4, name="head_q", c_in=16)])
    model = b.build([y])
    pruned, plan = prune_and_compare(model, ratio)
    assert out_channels(pruned, "p") == out_channels(pruned, "q") == out_channels(pruned, "partner") == keep(16, ratio)
    assert [sorted(p.node.name for p, _ in d.group.producers) for d in plan.decisions if len(d.removed)] == \
        [["p", "partner", "q"]]
    assert node_named(pruned, "p").input[1:] == node_named(pruned, "q").input[1:]
    assert len(pruned.graph.initializer) == len(model.graph.initializer)  # the shared weight and bias: once each


@pytest.mark.parametrize("ratio", RATIOS)
def test_fp16_weights_keep_their_type(ratio):
    model = small_cnn(GraphBuilder(dtype=np.float16))
    # Half precision has a 2^-10 (~1e-3) resolution and the pruned model sums fewer terms in
    # a different order than the zeroed original: allow a few units in the last place.
    pruned, _ = prune_and_compare(model, ratio, rtol=5e-3, atol=5e-3)
    assert_small_cnn_pruned(pruned, ratio)
    assert {t.data_type for t in pruned.graph.initializer} == {TensorProto.FLOAT16}
    assert pruned.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def _dynamic_cnn(head: str = "pool", imgsz: str | None = None) -> onnx.ModelProto:
    """conv -> relu -> conv -> relu -> global pool (or flatten) -> gemm, input N x 3 x H x W."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 16, 16])
    y = b.relu(b.conv(b.relu(b.conv(x, 16, name="c1")), 12, name="c2"))
    y = b.flatten(b.global_average_pool(y) if head == "pool" else y)
    model = b.build([b.gemm(y, 10, name="fc")])
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ["N", None, "H", "W"]):
        if name:
            dim.dim_param = name
    if imgsz:
        model.metadata_props.add(key="imgsz", value=imgsz)
    return model


def test_dynamic_image_size_is_measured_at_the_default_and_stays_dynamic():
    model = _dynamic_cnn()
    loaded = load(model)
    assert loaded.input_shapes == {"x": (1, 3, 224, 224)}
    assert "measured at 1x3x224x224 (the default" in loaded.probe_sizes["x"]
    pruned, _ = prune_and_compare(model, 0.5)
    dims = pruned.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    # Analysis never fixed H and W: the pruned model computes what the zeroed original does at other sizes.
    from onnx_whc.graph.dependency import analyze_channels
    from onnx_whc.graph.equivalence import zeroed_reference
    from onnx_whc.plan.select import select
    loaded = load(model)
    analysis = analyze_channels(loaded)
    reference = zeroed_reference(loaded, analysis, select(analysis, 0.5).removed_roots)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 40, 56)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    np.testing.assert_allclose(run(pruned), run(reference), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("imgsz, expected", [("[32, 48]", (32, 48)), ("64", (64, 64)), ("nonsense", (224, 224))])
def test_dynamic_image_size_from_the_models_metadata(imgsz, expected):
    loaded = load(_dynamic_cnn(imgsz=imgsz))
    assert loaded.input_shapes["x"] == (1, 3, *expected)
    origin = "the model's imgsz metadata" if expected != (224, 224) else "the default"
    assert f"measured at 1x3x{expected[0]}x{expected[1]} ({origin}; --input-shape to choose)" in loaded.probe_sizes["x"]


def test_given_input_shape_wins_over_the_probe_size():
    loaded = load(_dynamic_cnn(imgsz="[32, 48]"), {"x": (1, 3, 20, 20)})
    assert loaded.input_shapes["x"] == (1, 3, 20, 20) and not loaded.probe_sizes


def test_dynamic_size_that_only_runs_at_one_size_asks_for_it():
    from onnx_whc.errors import UserInputError
    with pytest.raises(UserInputError, match=r"input 'x' has a dynamic size and the model does not run at "
                                             r"1x3x224x224 .*node name: fc.*; give --input-shape x:1x3x\?x\? "
                                             r"with the size it runs at"):
        load(_dynamic_cnn(head="flatten"))

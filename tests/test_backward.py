"""Gradients written as ONNX nodes: every rule against central finite differences of the forward model.

Each case is a tiny graph whose loss is sum(output * R) for a fixed random R (the seed). Graph
inputs named x* and initializers named w* are differentiated; initializers named c* stay constants.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_whc.graph import backward
from onnx_whc.graph.backward import RULES, NoGradient, backpropagate, static_shapes, with_batch

from .builder import GraphBuilder

F = TensorProto.FLOAT


def _runtime(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _as_inputs(model, names):
    """A copy whose initializers in `names` are graph inputs: the finite differences move them."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    kept = [t for t in model.graph.initializer if t.name not in names]
    for t in model.graph.initializer:
        if t.name in names:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _single(op, ins, outputs=1, opset=17, used=None, seed=0, **attrs):
    """A one-node model. `ins` lists (name, value) or "" for a skipped input: x* graph inputs,
    w* initializers in wrt, c* constant initializers. `used` picks the outputs the loss reads."""
    names = [i if isinstance(i, str) else i[0] for i in ins]
    outs = [f"y{k}" for k in range(outputs)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **attrs)
    values = {i[0]: np.asarray(i[1]) for i in ins if not isinstance(i, str)}
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in values.items() if n.startswith("x")]
    inits = [numpy_helper.from_array(v, n) for n, v in values.items() if not n.startswith("x")]
    graph = helper.make_graph([node], "case", inputs, [], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    _add_outputs(model, [outs[k] for k in (used if used is not None else range(outputs))])
    feeds = {n: v for n, v in values.items() if n.startswith("x")}
    return model, feeds, [n for n in values if n[0] in "xw"]


def _add_outputs(model, names):
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in inferred.graph.value_info}
    model.graph.output.extend(infos[name] for name in names)


def _gradients(model, feeds, wrt, seed=0, weights_as_inputs=False):
    """(the gradients backpropagate writes, the loss as a function of the wrt values, the wrt values)."""
    rng = np.random.default_rng(seed)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wrt}
    forward = _as_inputs(model, weights)
    grad_model = onnx.ModelProto.FromString((forward if weights_as_inputs else model).SerializeToString())
    opsets = [(o.domain, o.version) for o in grad_model.opset_import]
    outputs = [(o.name, helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)) for o in model.graph.output]
    shapes = static_shapes(grad_model)
    seeds = {name: rng.standard_normal(shapes[name]).astype(dtype) for name, dtype in outputs}
    for name, value in seeds.items():
        grad_model.graph.input.append(helper.make_tensor_value_info(f"seed_{name}", helper.np_dtype_to_tensor_dtype(
            value.dtype), value.shape))
    found = backpropagate(grad_model, {name: f"seed_{name}" for name in seeds}, wrt)
    assert [(o.domain, o.version) for o in grad_model.opset_import] == opsets  # the forward ops keep their meaning
    assert set(found) == set(wrt)
    grad_model.graph.output.extend(helper.make_tensor_value_info(g, F, None) for g in found.values())
    feed = dict(feeds, **{f"seed_{n}": v for n, v in seeds.items()}, **(weights if weights_as_inputs else {}))
    values = _runtime(grad_model).run(list(found.values()), feed)
    grads = dict(zip(found, values))
    forward_run = _runtime(forward)
    point = dict(feeds, **weights)

    def loss(changed):
        results = forward_run.run([n for n, _ in outputs], dict(point, **changed))
        return sum(float(np.sum(r.astype(np.float64) * seeds[n])) for r, (n, _) in zip(results, outputs))

    return grads, loss, point


def _check(model, feeds, wrt, seed=0, weights_as_inputs=False, eps=1e-2):
    """Each gradient agrees with central differences of the loss along two random directions."""
    grads, loss, point = _gradients(model, feeds, wrt, seed, weights_as_inputs)
    rng = np.random.default_rng(seed + 1)
    for name in wrt:
        assert grads[name].shape == point[name].shape, name
        for _ in range(2):
            direction = rng.standard_normal(point[name].shape)
            direction /= np.abs(direction).max()  # no value moves more than eps: kinks stay where they were
            moved = [{name: (point[name] + sign * eps * direction).astype(point[name].dtype)} for sign in (1, -1)]
            numeric = (loss(moved[0]) - loss(moved[1])) / (2 * eps)
            assert float(np.sum(grads[name] * direction)) == pytest.approx(numeric, rel=2e-2, abs=1e-3), name


def _normal(shape, scale=1.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _spaced(shape, low=-2.0, high=2.0, seed=0):
    """Distinct values (high-low)/(n-1) apart, shuffled: no two are near a tie."""
    values = np.linspace(low, high, int(np.prod(shape)))
    return np.random.default_rng(seed).permutation(values).reshape(shape).astype(np.float32)


def _positive(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)


def _away(values, kinks, margin=0.05):
    """`values` pushed at least `margin` from every kink."""
    values = values.copy()
    for kink in kinks:
        near = np.abs(values - kink) < margin
        values[near] = kink + np.where(values[near] >= kink, margin, -margin)
    return values


def _ints(values):
    return np.array(values, np.int64)


X4 = (2, 3, 4, 5)

UNARY = {
    "Identity": ({}, _normal(X4), 17),
    "Dropout": ({}, _normal(X4), 13),
    "Cast": ({"to": TensorProto.DOUBLE}, _normal(X4), 13),
    "Relu": ({}, _away(_normal(X4), [0]), 17),
    "LeakyRelu": ({"alpha": 0.1}, _away(_normal(X4), [0]), 17),
    "Sigmoid": ({}, _normal(X4, 2), 17),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, _away(_normal(X4, 3), [-4 / 3, 2]), 17),
    "HardSwish": ({}, _away(_normal(X4, 3), [-3, 3]), 14),
    "Tanh": ({}, _normal(X4), 17),
    "Exp": ({}, _normal(X4), 17),
    "Log": ({}, _positive(X4), 17),
    "Sqrt": ({}, _positive(X4), 17),
    "Neg": ({}, _normal(X4), 17),
}


@pytest.mark.parametrize("op", UNARY)
def test_elementwise(op):
    attrs, x, opset = UNARY[op]
    _check(*_single(op, [("x", x)], opset=opset, **attrs))


@pytest.mark.parametrize("opset", [11, 13])
def test_clip(opset):
    x = _away(_normal(X4), [-0.5, 0.7])
    _check(*_single("Clip", [("x", x), ("c_lo", np.float32(-0.5)), ("c_hi", np.float32(0.7))], opset=opset))
    _check(*_single("Clip", [("x", x), "", ("c_hi", np.float32(0.7))], opset=opset))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_broadcast_with_a_per_channel_weight(op):
    w = _positive((3, 1, 1), seed=1) if op == "Div" else _normal((3, 1, 1), seed=1)
    _check(*_single(op, [("x", _normal(X4)), ("w", w)]))
    _check(*_single(op, [("w", w), ("x", _positive(X4) if op == "Div" else _normal(X4))]))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_broadcast_between_two_inputs(op):
    x2 = _positive((4, 1), seed=2) if op == "Div" else _normal((4, 1), seed=2)
    _check(*_single(op, [("x1", _normal((2, 1, 5))), ("x2", x2)]), seed=3)


def test_an_input_used_twice_gets_both_shares():
    _check(*_single("Mul", [("x", _normal(X4)), ("x", _normal(X4))]))
    model, feeds, wrt = _single("Mul", [("x", _normal(X4)), ("x", _normal(X4))])
    grads, _, _ = _gradients(model, feeds, wrt)
    seed = np.random.default_rng(0).standard_normal(X4)
    np.testing.assert_allclose(grads["x"], 2 * feeds["x"] * seed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exponent", [np.float32(3.0), np.float32(0.5), np.int64(2)])
def test_pow_with_a_constant_exponent(exponent):
    _check(*_single("Pow", [("x", _positive(X4)), ("c", exponent)], opset=13))


def test_prelu_with_a_per_channel_slope():
    _check(*_single("PRelu", [("x", _away(_normal(X4), [0])), ("w", _normal((3, 1, 1), 0.5, seed=1))]))


def test_where():
    condition = np.random.default_rng(5).random((3, 4, 1)) < 0.5
    _check(*_single("Where", [("c", condition), ("x", _normal((2, 3, 4, 5))), ("w", _normal((5,), seed=1))]))


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset, axis", [(13, 1), (13, -1), (11, 1), (11, -1)])
def test_softmax(op, opset, axis):
    _check(*_single(op, [("x", _normal(X4, 2))], opset=opset, axis=axis))


@pytest.mark.parametrize("op, ins, opset, attrs", [
    ("Reshape", [("c", _ints([2, -1, 5]))], 13, {}),
    ("Flatten", [], 13, {"axis": 2}),
    ("Squeeze", [], 11, {"axes": [1]}),
    ("Squeeze", [("c", _ints([1]))], 13, {}),
    ("Unsqueeze", [], 11, {"axes": [0, 3]}),
    ("Unsqueeze", [("c", _ints([0, 3]))], 13, {}),
    ("Transpose", [], 13, {"perm": [0, 2, 3, 1]}),
    ("Transpose", [], 13, {}),
    ("Expand", [("c", _ints([2, 4, 1, 5]))], 13, {}),
])
def test_layout(op, ins, opset, attrs):
    x = _normal((2, 1, 4, 5)) if op in ("Squeeze", "Expand") else _normal(X4)
    _check(*_single(op, [("x", x), *ins], opset=opset, **attrs))


def test_concat_of_an_input_a_weight_and_a_constant():
    _check(*_single("Concat", [("x", _normal(X4)), ("c", _normal((2, 1, 4, 5))), ("w", _normal((2, 2, 4, 5)))],
                    axis=1))


@pytest.mark.parametrize("opset, ins, outputs, used, attrs", [
    (13, [("c", _ints([1, 2]))], 2, None, {"axis": 1}),
    (11, [], 2, None, {"axis": 1, "split": [2, 1]}),
    (13, [], 3, None, {"axis": -1}),  # equal parts
    (13, [], 3, [0, 2], {"axis": 0}),  # the middle part is not read: zeros flow back
    (18, [], 2, [1], {"axis": 2, "num_outputs": 2}),
])
def test_split(opset, ins, outputs, used, attrs):
    x = _normal((2, 3, 4, 6)) if attrs["axis"] != 0 else _normal((3, 3, 4, 6))
    _check(*_single("Split", [("x", x), *ins], outputs=outputs, opset=opset, used=used, **attrs))


def test_slice_with_steps_and_negative_starts():
    _check(*_single("Slice", [("x", _normal((2, 3, 9, 8))), ("c1", _ints([-8, 1])), ("c2", _ints([9, 7])),
                              ("c3", _ints([2, 3])), ("c4", _ints([3, 2]))]))


@pytest.mark.parametrize("opset, pads, axes", [
    (11, [0, 0, 1, 2, 0, 1, 0, 1], None),
    (13, [0, 1, -1, 0, 0, 0, 2, -2], None),  # negative pads crop
    (18, [1, 2, 0, 3], [2, -1]),
])
def test_pad(opset, pads, axes):
    ins = [("x", _normal(X4)), ("c_pads", _ints(pads)), ("c_value", np.float32(0.5))]
    ins += [("c_axes", _ints(axes))] if axes else []
    _check(*_single("Pad", ins, opset=opset, mode="constant"))


def test_global_average_pool():
    _check(*_single("GlobalAveragePool", [("x", _normal(X4))]))


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2], "count_include_pad": 1},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [3], "strides": [1], "pads": [1, 1]},
])
def test_average_pool(attrs):
    shape = (2, 3, 9) if len(attrs["kernel_shape"]) == 1 else (2, 3, 7, 8)
    _check(*_single("AveragePool", [("x", _normal(shape))], **attrs))


def test_average_pool_with_ceil_mode_windows_past_the_padding_is_refused():
    model, feeds, wrt = _single("AveragePool", [("x", _normal((1, 2, 6, 6)))], kernel_shape=[3, 3], strides=[2, 2],
                                ceil_mode=1)
    with pytest.raises(NoGradient, match="no gradient for AveragePool node 'averagepool_node' \\(ceil_mode"):
        _gradients(model, feeds, wrt)


@pytest.mark.parametrize("opset, attrs", [
    (11, {"kernel_shape": [5, 5], "strides": [1, 1], "pads": [2, 2, 2, 2]}),  # YOLOv8's SPPF
    (17, {"kernel_shape": [5, 5], "strides": [1, 1], "pads": [2, 2, 2, 2]}),
    (13, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    (13, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    (13, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    (13, {"kernel_shape": [2, 2], "strides": [1, 1], "dilations": [2, 2], "pads": [1, 0, 0, 1]}),
])
def test_max_pool(opset, attrs):
    _check(*_single("MaxPool", [("x", _spaced((1, 2, 6, 6), -3, 3))], opset=opset, **attrs))


def test_max_pool_credits_a_tie_once():
    model, feeds, wrt = _single("MaxPool", [("x", np.zeros((1, 1, 4, 4), np.float32))], kernel_shape=[2, 2],
                                strides=[1, 1])
    grads, _, _ = _gradients(model, feeds, wrt)
    seed = np.random.default_rng(0).standard_normal((1, 1, 3, 3))
    assert float(grads["x"].sum()) == pytest.approx(float(seed.sum()), rel=1e-5)  # each window passes dY on once


NO_ROI = ("c_roi", np.zeros(0, np.float32))


@pytest.mark.parametrize("opset, ins, attrs", [
    (13, [NO_ROI, ("c_scales", np.array([1, 1, 2, 2], np.float32))],  # YOLOv8's FPN
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    (13, ["", ("c_scales", np.array([1, 1, 3, 2], np.float32))], {"mode": "nearest"}),  # half_pixel, round_prefer_floor
    (11, [NO_ROI, ("c_scales", np.zeros(0, np.float32)), ("c_sizes", _ints([2, 3, 8, 10]))],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    (13, ["", ("c_scales", np.array([1, 1, 0.5, 0.5], np.float32))], {"mode": "nearest"}),  # downsampling
    (13, ["", "", ("c_sizes", _ints([2, 3, 6, 7]))], {"mode": "nearest", "nearest_mode": "round_prefer_ceil"}),
    (13, ["", ("c_scales", np.array([1, 1, 2, 2], np.float32))],
     {"mode": "nearest", "coordinate_transformation_mode": "align_corners"}),
    (18, ["", ("c_scales", np.array([2, 2], np.float32))], {"mode": "nearest", "axes": [2, 3]}),
])
def test_nearest_resize(opset, ins, attrs):
    _check(*_single("Resize", [("x", _normal(X4)), *ins], opset=opset, **attrs))


@pytest.mark.parametrize("op, opset, ins, attrs", [
    ("ReduceMean", 13, [], {"axes": [2, 3], "keepdims": 0}),
    ("ReduceMean", 18, [("c", _ints([-1]))], {}),
    ("ReduceSum", 11, [], {"axes": [1]}),
    ("ReduceSum", 13, [("c", _ints([0, 2]))], {"keepdims": 0}),
    ("ReduceSum", 13, [], {}),  # every axis
])
def test_reduce(op, opset, ins, attrs):
    _check(*_single(op, [("x", _normal(X4)), *ins], opset=opset, **attrs))


@pytest.mark.parametrize("opset", [11, 15])
def test_batch_normalization(opset):
    ins = [("x", _normal(X4)), ("w_scale", _positive((3,), 1)), ("w_bias", _normal((3,), seed=2)),
           ("c_mean", _normal((3,), seed=3)), ("c_var", _positive((3,), 4))]
    _check(*_single("BatchNormalization", ins, opset=opset, epsilon=1e-3))


CONVS = {
    "group 1": ((2, 3, 7, 7), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "stride 2": ((2, 3, 8, 8), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "stride 2 leaving a row": ((2, 3, 8, 8), (4, 3, 3, 3), {"strides": [2, 2]}),
    "dilation 2": ((1, 2, 9, 9), (3, 2, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "asymmetric pads": ((2, 3, 6, 6), (4, 3, 3, 3), {"pads": [0, 1, 2, 0]}),
    "pads wider than the kernel": ((1, 2, 5, 5), (2, 2, 3, 3), {"pads": [3, 0, 1, 4]}),
    "stride 2, pads wider than the kernel": ((1, 2, 7, 7), (2, 2, 3, 3), {"strides": [2, 2], "pads": [3, 1, 0, 4]}),
    "grouped": ((2, 4, 6, 6), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "depthwise": ((2, 4, 7, 7), (4, 1, 3, 3), {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "depthwise, stride 1": ((2, 4, 6, 6), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "depthwise, two filters per channel": ((2, 3, 6, 6), (6, 1, 3, 3), {"group": 3, "pads": [0, 1, 1, 0]}),
    "1-D": ((2, 3, 9), (4, 3, 3), {"strides": [2], "pads": [1, 0]}),
    "pointwise": ((2, 3, 5, 5), (4, 3, 1, 1), {}),
    "pointwise, stride 2": ((2, 3, 5, 5), (4, 3, 1, 1), {"strides": [2, 2]}),
    "depthwise 5x5": ((2, 3, 7, 7), (3, 1, 5, 5), {"group": 3, "pads": [2, 2, 2, 2]}),
    "SAME_UPPER": ((1, 3, 7, 7), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "SAME_LOWER": ((1, 3, 6, 6), (2, 3, 4, 4), {"auto_pad": "SAME_LOWER"}),
    "VALID, rectangular": ((1, 3, 6, 7), (2, 3, 2, 3), {"auto_pad": "VALID", "strides": [1, 2]}),
    # fewer filters than input channels at stride 1: dW from dY's windows
    "fewer filters": ((2, 5, 6, 6), (2, 5, 3, 3), {"pads": [1, 1, 1, 1]}),
    "fewer filters, dilation 2, asymmetric pads": ((1, 4, 9, 8), (2, 4, 3, 3), {"dilations": [2, 2],
                                                                               "pads": [2, 0, 1, 3]}),
    "fewer filters, grouped": ((2, 6, 6, 6), (4, 3, 3, 3), {"group": 2, "pads": [0, 1, 1, 0]}),
    "fewer filters, rectangular": ((2, 4, 6, 7), (3, 4, 2, 3), {"pads": [0, 1, 1, 1]}),
    "fewer filters, 1-D": ((2, 4, 9), (2, 4, 3), {"pads": [1, 2]}),
}
FROM_GRAD_WINDOWS = [case for case in CONVS if case.startswith("fewer filters")]


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("weights", ["initializers", "inputs"])
def test_conv_input_weight_and_bias(case, weights):
    x_shape, w_shape, attrs = CONVS[case]
    ins = [("x", _normal(x_shape)), ("w", _normal(w_shape, 0.5, seed=1)), ("w_bias", _normal(w_shape[:1], seed=2))]
    _check(*_single("Conv", ins, **attrs), weights_as_inputs=weights == "inputs")


@pytest.mark.parametrize("case", ["group 1", "stride 2 leaving a row", "dilation 2", "grouped", "depthwise", "1-D"])
def test_conv_weight_gradient_as_a_conv_where_the_unfolded_input_would_be_too_large(case, monkeypatch):
    monkeypatch.setattr(backward, "IM2COL_VALUES", 0)
    x_shape, w_shape, attrs = CONVS[case]
    _check(*_single("Conv", [("x", _normal(x_shape)), ("w", _normal(w_shape, 0.5, seed=1))], **attrs))


@pytest.mark.parametrize("case", FROM_GRAD_WINDOWS)
def test_conv_weight_gradient_from_the_gradient_windows_where_the_filters_are_fewer(case, monkeypatch):
    calls = []
    unfold = backward._conv_weight_grad_from_grad_windows
    monkeypatch.setattr(backward, "_conv_weight_grad_from_grad_windows", lambda *a: calls.append(a) or unfold(*a))
    x_shape, w_shape, attrs = CONVS[case]
    _check(*_single("Conv", [("x", _normal(x_shape)), ("w", _normal(w_shape, 0.5, seed=1))], **attrs))
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["stride 2", "depthwise", "depthwise, stride 1", "pads wider than the kernel", "1-D"])
def test_conv_input_gradient_with_a_constant_weight(case):
    x_shape, w_shape, attrs = CONVS[case]
    _check(*_single("Conv", [("x", _normal(x_shape)), ("c", _normal(w_shape, 0.5, seed=1))], **attrs))


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"strides": [2, 2], "group": 2},
    {"dilations": [2, 2], "pads": [0, 1, 1, 0]},
])
def test_conv_transpose(attrs):
    w_shape = (4, 2, 2, 2) if attrs.get("group") else (4, 3, 3, 3)
    ins = [("x", _normal((2, 4, 4, 4))), ("w", _normal(w_shape, 0.5, seed=1)), ("w_bias", _normal(w_shape[1] *
           attrs.get("group", 1), seed=2))]
    _check(*_single("ConvTranspose", ins, **attrs))


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm(trans_a, trans_b):
    a = _normal((4, 3) if trans_a else (3, 4))
    w = _normal((5, 4) if trans_b else (4, 5), seed=1)
    _check(*_single("Gemm", [("x", a), ("w", w), ("w_c", _normal((5,), seed=2))], transA=trans_a, transB=trans_b,
                    alpha=0.5, beta=2.0))
    _check(*_single("Gemm", [("x1", a), ("x2", w)], transA=trans_a, transB=trans_b))


def test_matmul():
    _check(*_single("MatMul", [("x", _normal((2, 3, 4))), ("w", _normal((4, 5), seed=1))]))
    _check(*_single("MatMul", [("x1", _normal((2, 1, 3, 4))), ("x2", _normal((5, 4, 6), seed=1))]))
    _check(*_single("MatMul", [("x", _normal((3, 4))), ("c", _normal((2, 4, 5), seed=1))]))


@pytest.mark.parametrize("op, ins, attrs", [
    ("Conv", [("x", _normal((2, 4, 6, 6))), ("w", _normal((4, 2, 3, 3), seed=1))], {"group": 2, "strides": [2, 2]}),
    ("MatMul", [("x", _normal((2, 3, 4))), ("w", _normal((4, 5), seed=1))], {}),
    ("Gemm", [("x", _normal((3, 4))), ("w", _normal((5, 4), seed=1))], {"transB": 1}),
])
def test_a_weight_in_wrt_is_read_from_the_graph_not_copied(op, ins, attrs):
    """The gradient model built at one weight gives the gradients at another when the initializer changes."""
    model, feeds, wrt = _single(op, ins, **attrs)
    other = _normal(ins[1][1].shape, seed=7)
    grad_model = onnx.ModelProto.FromString(model.SerializeToString())
    backpropagated, _, _ = _gradients(grad_model, feeds, wrt)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(other, "w"))
    moved, _, _ = _gradients(model, feeds, wrt)
    assert not np.allclose(moved["x"], backpropagated["x"])
    _check(model, feeds, wrt)


def _yolo_like():
    """A YOLOv8-like path: SiLU convs, C2f's Split and Concat, SPPF's chained MaxPools, the FPN's nearest
    Resize, and a DFL-like head (Reshape, Transpose, Softmax)."""
    b = GraphBuilder(opset=13, seed=4)

    def silu(t):
        return b.op("Mul", [t, b.sigmoid(t)])

    x = b.input("x", [2, 3, 16, 16])
    stem = silu(b.conv(x, 8, k=3, stride=2, name="stem"))
    left, right = b.op("Split", [stem, b.ints([4, 4])], outputs=2, axis=1)
    inner = silu(b.conv(right, 4, k=3, name="c2f_inner"))
    c2f = silu(b.conv(b.op("Concat", [left, right, inner], axis=1), 8, k=1, name="c2f_out"))
    down = silu(b.conv(c2f, 8, k=3, stride=2, group=8, name="down_dw"))
    pools = [down]
    for _ in range(3):
        pools.append(b.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]))
    sppf = silu(b.conv(b.op("Concat", pools, axis=1), 8, k=1, name="sppf_out"))
    up = b.op("Resize", [sppf, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    head = b.conv(silu(b.conv(b.op("Concat", [up, c2f], axis=1), 8, k=3, name="fpn")), 8, k=1, name="head")
    bins = b.op("Transpose", [b.op("Reshape", [head, b.ints([0, 2, 4, -1])])], perm=[0, 1, 3, 2])
    return with_batch(b.build(outputs=[b.op("Softmax", [bins], axis=-1)]), {"x": (2, 3, 16, 16)})


def test_a_yolo_like_graph_with_every_weight_in_wrt():
    model = _yolo_like()
    weights = [t.name for t in model.graph.initializer if t.name.endswith((".weight", ".bias"))]
    x = _normal((2, 3, 16, 16), seed=5)
    # a smaller step: moving a whole weight tensor by 1e-2 can swap the maxima of SPPF's close windows
    _check(model, {"x": x}, ["x", *weights], seed=1, eps=1e-3)


def test_a_node_without_a_rule_is_named_and_the_model_left_as_it_was():
    model, _, wrt = _single("Resize", [("x", _normal(X4)), "", ("c", np.array([1, 1, 2, 2], np.float32))],
                                mode="linear")
    before = model.SerializeToString()
    with pytest.raises(NoGradient, match=r"^no gradient for Resize node 'resize_node' \(linear mode\)$") as err:
        backpropagate(model, {"y0": "y0"}, wrt)
    assert (err.value.node, err.value.op) == ("resize_node", "Resize")
    assert model.SerializeToString() == before
    b = GraphBuilder(opset=13)
    x = b.input("x", [2, 6])
    values, _ = b.op("TopK", [b.relu(x), b.ints([3])], outputs=2, name="top")
    model = with_batch(b.build(outputs=[values]), {"x": (2, 6)})
    with pytest.raises(NoGradient, match="^no gradient for TopK node 'top'$"):
        backpropagate(model, {values: values}, ["x"])
    assert "TopK" not in RULES


def test_only_paths_from_wrt_to_the_loss_are_differentiated():
    """A shape read, an integer Cast and a TopK off the path get no backward nodes; an unused weight no entry."""
    b = GraphBuilder(opset=13, dynamic_batch=False)
    x = b.input("x", [2, 3, 4])
    unused = b.random([3], name="unused")
    b.op("Mul", [x, b.op("Unsqueeze", [unused, b.ints([1])])])
    size = b.op("ReduceProd", [b.op("Shape", [x])], keepdims=1)  # 24, read off x's shape
    rounded = b.op("Cast", [b.op("TopK", [x, b.ints([1])], outputs=2)[0]], to=TensorProto.INT64)
    nothing = b.op("Mul", [b.op("ReduceMax", [rounded], keepdims=0), b.ints([0])])
    flat = b.op("Reshape", [b.op("Tanh", [x]), b.op("Add", [size, nothing])])
    model = b.build(outputs=[flat], check=False)
    model.graph.input.append(helper.make_tensor_value_info("seed", F, [24]))
    found = backpropagate(model, {flat: "seed"}, ["x", "unused"])
    assert set(found) == {"x"}
    assert not {"Shape", "TopK", "ReduceSum"} & {n.op_type for n in model.graph.node if n.name.startswith("grad__")}
    x_value, seed = _normal((2, 3, 4)), _normal((24,), seed=1)
    model.graph.output.append(helper.make_tensor_value_info(found["x"], F, None))
    grad = _runtime(model).run([found["x"]], {"x": x_value, "seed": seed})[0]
    np.testing.assert_allclose(grad, (1 - np.tanh(x_value) ** 2) * seed.reshape(2, 3, 4), rtol=1e-5, atol=1e-6)


def test_a_missing_shape_names_the_node():
    model, _, wrt = _single("Flatten", [("x", _normal(X4))])
    with pytest.raises(NoGradient, match=r"^no gradient for Flatten node 'flatten_node' \(the shape of 'x' is not st"):
        backpropagate(model, {"y0": "y0"}, wrt, shapes={})
    model, _, wrt = _single("Relu", [("x", _normal(X4))], opset=10)
    with pytest.raises(NoGradient, match="opset 10 is older than 11"):
        backpropagate(model, {"y0": "y0"}, wrt)


def test_with_batch_fixes_the_inputs_and_the_outputs_batch():
    b = GraphBuilder(opset=13)
    x = b.input("x", [1, 3, 8, 8])
    model = b.build(outputs=[b.conv(x, 4, stride=2)])
    fixed = with_batch(model, {"x": (5, 3, 8, 8)})
    shapes = static_shapes(fixed)
    assert shapes["x"] == (5, 3, 8, 8) and shapes[model.graph.output[0].name] == (5, 4, 4, 4)
    assert shapes["conv_0.weight"] == (4, 3, 3, 3)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # the original is untouched

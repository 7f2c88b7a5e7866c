"""Model inversion: the backward pass written as ONNX nodes, and the images it refines."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_whc.data.calibration import (
    INVERSION_MACS,
    INVERSION_VALUE_MACS,
    augmented,
    normalize,
    preset_preprocess,
    synthetic_calibration,
)
from onnx_whc.data.deadleaves import dead_leaves
from onnx_whc.data.inversion import InversionSettings, NotInvertible, gradient_model, inversion_targets, refine

from .builder import GraphBuilder


def _smooth_classifier(with_max_pool: bool = False, side: int = 16, classes: int = 5):
    """Every op with a backward rule, between an image and `classes` logits (smooth activations only)."""
    b = GraphBuilder(opset=17, seed=3)
    x = b.input("x", [1, 3, side, side])
    y = b.sigmoid(b.conv(x, 8, k=3, stride=2, name="stem"))  # strided, padded
    y = b.op("Pad", [y, b.ints([0, 0, 1, 0, 0, 0, 0, 1]), b.const(np.float32(0))], mode="constant")
    dw = b.conv(y, 8, k=3, group=8, pad=0, name="dw")  # depthwise, unpadded, after an asymmetric Pad
    gate = b.sigmoid(b.conv(b.global_average_pool(dw), 8, k=1, name="se"))
    y = b.op("Mul", [dw, gate])  # squeeze-excitation: a broadcast product of two computed tensors
    branch = b.conv(y, 4, k=1, name="proj")
    y = b.op("Add", [branch, b.op("Sub", [branch, b.conv(y, 4, k=1, name="side")])])
    if with_max_pool:
        y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[1, 1])
    y = b.op("Concat", [y, b.op("Mul", [y, b.const(np.float32(0.5))])], axis=1)
    y = b.op("Clip", [y, b.const(np.float32(-50)), b.const(np.float32(50))])  # never reached: smooth here
    strided = b.op("Slice", [y, b.ints([1, 0]), b.ints([7, 7]), b.ints([2, 3]), b.ints([2, 3])])  # 3×3 of 7×7
    pooled = b.op("Add", [b.global_average_pool(y), b.global_average_pool(strided)])
    logits = b.op("Mul", [b.gemm(b.flatten(pooled), classes), b.const(np.float32(10))])  # confident
    return b.build(outputs=[b.softmax(logits, axis=1)])


def _loss_and_grad(model, x, target):
    grad_model = gradient_model(model, x.shape)
    sess = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    probs, grad = sess.run(None, {"x": x, "target": target})
    return probs, grad


def _assert_matches_finite_differences(grad, loss, x, rng):
    """`grad` agrees with central differences of `loss` at `x` along three random directions."""
    for _ in range(3):
        direction = rng.standard_normal(x.shape)
        eps = 1e-2
        numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
        assert float(np.sum(grad * direction)) == pytest.approx(numeric, rel=2e-2, abs=1e-3)


def test_input_gradient_matches_finite_differences():
    model = _smooth_classifier()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    target = np.eye(5, dtype=np.float32)[[0, 2, 4]]
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def loss(inputs):
        probs = forward.run(None, {"x": inputs.astype(np.float32)})[0].astype(np.float64)
        return -np.sum(target * np.log(probs))

    _, grad = _loss_and_grad(model, x, target)
    _assert_matches_finite_differences(grad, loss, x, rng)


def test_gradient_model_keeps_the_forward_outputs():
    model = _smooth_classifier()
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    probs, _ = _loss_and_grad(model, x, np.eye(5, dtype=np.float32)[:2])
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probs, forward.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_an_op_without_a_rule_is_named():
    with pytest.raises(NotInvertible, match="no gradient for MaxPool node"):
        gradient_model(_smooth_classifier(with_max_pool=True), (1, 3, 16, 16))


def test_a_dense_output_is_not_inverted():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    with pytest.raises(NotInvertible, match="is not N×classes"):
        gradient_model(b.build(outputs=[b.conv(x, 4)]), (1, 3, 8, 8))


def _refined_target_probability(classes: int):
    """(the probabilities of each image's target classes before and after, refined, again): 10 images."""
    model = _smooth_classifier(classes=classes)
    x = np.random.default_rng(2).uniform(-1, 1, (10, 3, 16, 16)).astype(np.float32)
    settings = InversionSettings(steps=15, lr=0.1, jitter=0, flip=False)
    grad_model = gradient_model(model, (4, 3, 16, 16))  # 4 images per run
    refined = refine(grad_model, x, np.float32(-1), np.float32(1), False, seed=0, settings=settings)
    targets = inversion_targets(10, classes, settings.classes_per_image, np.random.default_rng([0, 0x1A7E]))
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.arange(10)[:, None]
    before = forward.run(None, {"x": x})[0][rows, targets]
    after = forward.run(None, {"x": refined})[0][rows, targets]
    again = refine(grad_model, x, np.float32(-1), np.float32(1), False, seed=0, settings=settings)
    return before, after, refined, again


def test_refine_moves_images_towards_their_classes_within_the_pixel_range():
    before, after, refined, again = _refined_target_probability(5)
    assert refined.shape == (10, 3, 16, 16) and refined.min() >= -1 and refined.max() <= 1
    assert after.mean() > 1.2 * before.mean()  # as far as the pixel range lets this random net be driven
    np.testing.assert_array_equal(refined, again)  # deterministic from the seed


def test_refine_pushes_each_image_towards_a_mix_of_classes_on_many_class_models():
    targets = inversion_targets(10, 40, 4, np.random.default_rng(0))
    assert targets.shape == (10, 4) and len(np.unique(targets[:, 0])) == 10  # distinct first classes
    np.testing.assert_array_equal((targets - targets[:, :1]) % 40, np.tile([0, 10, 20, 30], (10, 1)))  # evenly spread
    assert inversion_targets(10, 5, 4, np.random.default_rng(0)).shape == (10, 1)  # few classes: one each
    before, after, _, _ = _refined_target_probability(40)
    # the cross-entropy to the equal mix fell: the mean log-probability of the four classes rose
    assert np.log(after).mean() > np.log(before).mean() + 1.0


def test_synthetic_calibration_fits_on_refined_images_and_holds_out_more_of_them():
    model = _smooth_classifier(side=64)
    preprocess = preset_preprocess("inception")
    calibration, _ = synthetic_calibration({"x": (1, 3, 64, 64)}, {"x": np.dtype(np.float32)}, preprocess,
                                           count=60, model=model, macs=1)
    assert calibration.synthetic and calibration.fit_count == 48 and calibration.held_count == 12
    assert calibration.source == ("60 built-in synthetic images: 48 dead leaves refined by model inversion towards "
                                  "random classes to fit on, 12 more refined likewise held out (no --calib given)")
    # on plain leaves the original's own classes are near ties: the held-out images are refined as well
    plain = normalize(dead_leaves(60, 64, 64, 0), preprocess)
    assert not np.allclose(calibration.fit["x"], plain[:48]) and not np.allclose(calibration.held["x"], plain[48:])
    assert np.abs(calibration.held["x"] - plain[48:]).mean() > 0.5 * np.abs(calibration.fit["x"] - plain[:48]).mean()


def test_a_budget_short_of_every_image_fills_the_fitting_set_with_copies():
    model = _smooth_classifier(side=64)
    macs = int(INVERSION_MACS / (40 * InversionSettings.steps)) - INVERSION_VALUE_MACS * 3 * 64 * 64  # pays for 40
    calibration, _ = synthetic_calibration({"x": (1, 3, 64, 64)}, {"x": np.dtype(np.float32)},
                                           preset_preprocess("inception"), count=60, model=model, macs=macs)
    assert calibration.source == ("60 built-in synthetic images: 40 dead leaves refined by model inversion towards "
                                  "random classes and 8 shifted and flipped copies of them to fit on, 12 more refined "
                                  "likewise held out (no --calib given)")
    assert calibration.fit_count == 48 and calibration.held_count == 12
    np.testing.assert_array_equal(calibration.fit["x"][40:], calibration.fit["x"][:8, ..., ::-1])  # mirrored


@pytest.mark.parametrize("side, macs, reason", [
    (64, "dense", "output 'conv_0' is not N×classes"),
    (32, 1, "the images are under 64 px"),
    (64, 10 ** 15, "the model is too large to invert in time"),
])
def test_synthetic_calibration_says_why_it_did_not_refine(side, macs, reason):
    if macs == "dense":
        b = GraphBuilder()
        x = b.input("x", [1, 3, side, side])
        model, macs = b.build(outputs=[b.conv(x, 4)]), 1
    else:
        model = _smooth_classifier(side=side)
    calibration, _ = synthetic_calibration({"x": (1, 3, side, side)}, {"x": np.dtype(np.float32)},
                                           preset_preprocess("inception"), count=40, model=model, macs=macs)
    assert calibration.source == ("40 built-in synthetic dead-leaves images (no --calib given; not refined by "
                                  f"model inversion: {reason})")


def test_augmented_adds_mirrored_then_shifted_copies():
    images = np.random.default_rng(0).standard_normal((3, 2, 18, 18)).astype(np.float32)
    out = augmented(images, 8, (2, 3), seed=0)
    assert out.shape == (8, 2, 18, 18)
    np.testing.assert_array_equal(out[:3], images)
    np.testing.assert_array_equal(out[3:6], images[..., ::-1])
    assert not np.array_equal(out[6], out[0])  # shifted


def test_the_spread_term_adds_the_gradient_of_the_deep_channels_log_variance():
    model = _smooth_classifier()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    target = np.eye(5, dtype=np.float32)[[1, 3]]
    deep = next(n.output[0] for n in model.graph.node if n.op_type == "Clip")  # the only activation: the deep half
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(onnx.ValueInfoProto(name=deep))
    forward = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    weight = 2.0

    def loss(inputs):
        probs, h = (a.astype(np.float64) for a in forward.run(None, {"x": inputs.astype(np.float32)}))
        log_var = np.log(h.var(axis=(2, 3)) + 1e-3)  # per image and channel
        return -np.sum(target * np.log(probs)) - weight * log_var.sum() / h.shape[1]

    sess = ort.InferenceSession(gradient_model(model, x.shape, spread=weight).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    grad = sess.run(["input_grad"], {"x": x, "target": target})[0]
    _, plain = _loss_and_grad(model, x, target)
    assert np.abs(grad - plain).max() > 1e-3 * np.abs(plain).max()  # the term is there
    _assert_matches_finite_differences(grad, loss, x, rng)

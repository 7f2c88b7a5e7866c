"""Distillation: the training model's gradients, the loop's promises, the views, and the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnx_whc.api import distill, prune
from onnx_whc.cli import main
from onnx_whc.data.calibration import Calibration, Preprocess
from onnx_whc.data.samples import Samples
from onnx_whc.data.views import Augment, Joined, Views
from onnx_whc.graph.backward import with_batch
from onnx_whc.measure.quality import OutputKind, QualityProbe, divergence
from onnx_whc.recovery import distill as distill_module
from onnx_whc.recovery.distill import (
    Distiller,
    DistillSettings,
    _Budget,
    _Parameter,
    _Target,
    augment_for,
    default_batch,
    parse_duration,
    trainable,
    training_model,
)

from .builder import GraphBuilder


def _classifier(seed: int = 0, softmax: bool = True, side: int = 12) -> onnx.ModelProto:
    b = GraphBuilder(opset=17, seed=seed)
    x = b.input("x", [1, 3, side, side])
    y = b.relu(b.conv(x, 8, k=3, stride=2, name="stem"))
    y = b.relu(b.conv(y, 8, k=3, group=8, name="dw"))
    y = b.op("Add", [y, b.conv(y, 8, k=1, name="proj")])
    logits = b.op("Mul", [b.gemm(b.flatten(b.global_average_pool(y)), 5, name="head"), b.const(np.float32(20))])
    return b.build(outputs=[b.softmax(logits, axis=1) if softmax else logits])


def _padded_classifier(seed: int = 0) -> onnx.ModelProto:
    """TF-style padding apart from the convs: an end-only Pad before a stride-2 conv, a symmetric one
    before a depthwise conv, and one padding with ones (not foldable) before a third."""
    b = GraphBuilder(opset=17, seed=seed)

    def pad(y, pads, fill=0.0):
        return b.op("Pad", [y, b.const(np.array(pads, np.int64)), b.const(np.float32(fill))])

    y = b.relu(b.conv(pad(b.input("x", [1, 3, 12, 12]), [0, 0, 0, 0, 0, 0, 1, 1]), 8, k=3, stride=2, pad=0,
                      name="stem"))
    y = b.relu(b.conv(pad(y, [0, 0, 1, 1, 0, 0, 1, 1]), 8, k=3, group=8, pad=0, name="dw"))
    y = b.relu(b.conv(pad(y, [0, 0, 1, 0, 0, 0, 0, 1], fill=1.0), 8, k=3, pad=1, name="ones"))
    return b.build(outputs=[b.softmax(b.gemm(b.flatten(b.global_average_pool(y)), 5, name="head"), axis=1)])


def _detector(seed: int = 0) -> onnx.ModelProto:
    """A dense output whose channels differ in scale by 1000x, read through Sigmoid·Mul and a Resize."""
    b = GraphBuilder(opset=17, seed=seed)
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(x, 6, k=3, name="c1")
    y = b.op("Mul", [y, b.sigmoid(y)])
    y = b.op("Resize", [y, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = b.conv(y, 4, k=1, name="head")
    scale = b.const(np.array([1000, 1, 1, 0.001], np.float32).reshape(1, 4, 1, 1))
    return b.build(outputs=[b.op("Mul", [y, scale])])


def _scored_detector(seed: int = 0) -> onnx.ModelProto:
    """A YOLO-style output: box values and Sigmoid class scores (mostly low) joined over the channels."""
    b = GraphBuilder(opset=17, seed=seed)
    y = b.conv(b.input("x", [1, 3, 8, 8]), 6, k=3, name="c1")
    y = b.op("Mul", [y, b.sigmoid(y)])
    boxes = b.conv(y, 2, k=1, name="box")
    logits = b.op("Add", [b.conv(y, 3, k=1, name="cls"), b.const(np.full((1, 3, 1, 1), -2.0, np.float32))])
    return b.build(outputs=[b.op("Concat", [boxes, b.sigmoid(logits)], axis=1)])


def _perturbed(model: onnx.ModelProto, amount: float, seed: int = 1) -> onnx.ModelProto:
    """The same graph with noise on every weight of its convs and Gemms: a student to heal."""
    student = onnx.ModelProto.FromString(model.SerializeToString())
    rng = np.random.default_rng(seed)
    names = set(trainable(student))
    for k, t in enumerate(student.graph.initializer):
        if t.name in names:
            value = numpy_helper.to_array(t)
            noisy = value + amount * np.std(value) * rng.standard_normal(value.shape).astype(np.float32)
            student.graph.initializer[k].CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), t.name))
    return student


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _calibration(n: int = 60, side: int = 12, seed: int = 0) -> Calibration:
    """Smooth images (blocks of 4×4 pixels plus a little noise): a conv net's classes depend on them."""
    rng = np.random.default_rng(seed)
    blocks = rng.standard_normal((n, 3, side // 4, side // 4)).astype(np.float32)
    x = np.repeat(np.repeat(blocks, 4, 2), 4, 3) + 0.3 * rng.standard_normal((n, 3, side, side)).astype(np.float32)
    return Calibration.of({"x": x}, "test samples")


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("90s", 90), ("1h30m", 5400), ("2h", 7200), ("45", 45),
                                           ("0.5m", 30)])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15x", "m", "1h30", "fast"])
def test_a_duration_that_is_none_says_so(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_views_per_step_follow_the_input_size():
    assert default_batch((1, 3, 32, 32)) == 64
    assert default_batch((1, 3, 224, 224)) == 16
    assert default_batch((1, 3, 320, 320)) == 8
    assert default_batch((1, 64, 64, 1)) == 64  # channels last


def _loss(targets, outs, teacher_outs, temperature, weights):
    total = 0.0
    for target, s, t, w in zip(targets, outs, teacher_outs, weights):
        if target.kind.kind == "classifier":
            def soft(z):
                z = z / temperature - (z / temperature).max(1, keepdims=True)
                return np.exp(z) / np.exp(z).sum(1, keepdims=True)
            p, q = soft(t.astype(np.float64)), soft(s.astype(np.float64))
            total += temperature ** 2 * float(np.mean(np.sum(p * (np.log(p) - np.log(q)), 1)))
        else:
            total += float(np.mean((s.astype(np.float64) - t) ** 2 * w))
    return total


@pytest.mark.parametrize("which", ["classifier", "detector", "classifier and its pooled map", "padded classifier"])
def test_training_gradients_match_finite_differences_of_the_loss(which):
    """The gradient outputs of the training model are those of T²·KL (classifier) or the variance-weighted
    squared error (dense), checked along random directions of every trained weight at once; with a term
    on the map the pooling reads too, its gradient joins the logits' on the way back. Zero spatial
    Pads before convs are folded into the convs' pads: the logits stay the student's."""
    teacher = {"detector": _detector, "padded classifier": _padded_classifier}.get(which, _classifier)(0)
    student = _perturbed(teacher, 0.3)
    rng = np.random.default_rng(2)
    shape = (4, 3, 8, 8) if which == "detector" else (4, 3, 12, 12)
    x = rng.standard_normal(shape).astype(np.float32)
    wanted = list(trainable(student))
    producers = {o: n for n in student.graph.node for o in n.output}
    out = student.graph.output[0].name

    def dense(k: int, tensor: str, t: np.ndarray) -> np.ndarray:
        channels = t.shape[1]
        w = (1 / np.moveaxis(t, 1, 0).reshape(channels, -1).var(1)).reshape(1, channels, 1, 1).astype(np.float32)
        targets.append(_Target(tensor, OutputKind("dense", 1)))
        feeds.update({f"target__{k}": t, f"weight__{k}": (2 * w / t.size).astype(np.float32)})
        return w

    targets, feeds = [], {}
    if which == "detector":
        temperature = 1.0
        teacher_outs = _run(teacher, x)
        weights = [dense(0, out, teacher_outs[0])]
    else:
        logits = producers[out].input[0]
        pooled = next(n.input[0] for n in student.graph.node if n.op_type == "GlobalAveragePool")
        teacher_model = onnx.ModelProto.FromString(teacher.SerializeToString())
        for name in (logits, pooled):
            teacher_model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
        _, t, t_pooled = _run(teacher_model, x)
        targets.append(_Target(logits, OutputKind("classifier", 1)))
        temperature = 2.0
        e = np.exp(t / temperature - (t / temperature).max(1, keepdims=True))
        feeds["target__0"] = (e / e.sum(1, keepdims=True)).astype(np.float32)
        teacher_outs, weights = [t], [None]
        if which == "classifier and its pooled map":
            weights.append(dense(1, pooled, t_pooled))
            teacher_outs.append(t_pooled)
    model, grads = training_model(student, {"x": shape}, targets, wanted, temperature)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer if t.name in grads}
    # every weight and bias, and the detector's per-channel output scale
    assert set(values) == set(wanted) and len(wanted) == (5 if which == "detector" else 8)
    if which == "padded classifier":
        pads = {n.output[0] for n in student.graph.node if n.op_type == "Pad"}
        assert len(pads) == 3 and len(pads & {o for n in model.graph.node for o in n.output}) == 1  # the ones'
        with_logits = onnx.ModelProto.FromString(student.SerializeToString())
        with_logits.graph.output.append(onnx.helper.make_tensor_value_info(targets[0].tensor, 1, None))
        student_logits = _run(with_logits, x)[1]
        np.testing.assert_allclose(sess.run([targets[0].tensor], {"x": x, **feeds, **values})[0], student_logits,
                                   rtol=1e-5, atol=1e-5)

    def loss_at(vals):
        outs = sess.run([target.tensor for target in targets], {"x": x, **feeds, **vals})
        return _loss(targets, outs, teacher_outs, temperature, weights)

    analytic = dict(zip(values, sess.run([grads[n] for n in values], {"x": x, **feeds, **values})))
    _assert_directional_derivatives(values, analytic, loss_at, rng, absolute=1e-4)


def _assert_directional_derivatives(values: dict, analytic: dict, loss_at, rng, absolute: float) -> None:
    """The analytic gradients against central differences of `loss_at` along three random directions of
    every weight at once."""
    for _ in range(3):
        direction = {n: rng.standard_normal(v.shape).astype(np.float32) * (np.std(v) + 1e-3) for n, v in values.items()}
        eps = 2e-3
        plus = loss_at({n: v + eps * direction[n] for n, v in values.items()})
        minus = loss_at({n: v - eps * direction[n] for n, v in values.items()})
        predicted = sum(float(np.sum(analytic[n] * direction[n])) for n in values)
        assert predicted == pytest.approx((plus - minus) / (2 * eps), rel=3e-2, abs=absolute)


def test_sigmoid_scores_train_on_their_logits_by_the_binary_divergence():
    """The binary KL divergence of sigmoid(logits) from the teacher's probabilities, each channel weighted, beside
    the box part's squared error: the training model's gradients match finite differences of that loss."""
    teacher = _scored_detector(0)
    student = _perturbed(teacher, 0.3)
    producers = {o: n for n in student.graph.node for o in n.output}
    boxes, scores = producers[student.graph.output[0].name].input
    logits = producers[scores].input[0]
    targets = [_Target(boxes, OutputKind("dense", 1), scale=0.4), _Target(logits, OutputKind("dense", 1), scale=0.6,
                                                                         role="logits")]
    shape = (4, 3, 8, 8)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    with_inner = onnx.ModelProto.FromString(teacher.SerializeToString())
    for name in (boxes, logits):
        with_inner.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    _, t_boxes, t_logits = _run(with_inner, x)
    p = 1 / (1 + np.exp(-t_logits.astype(np.float64)))
    w_boxes = (1 / t_boxes.var((0, 2, 3))).reshape(1, 2, 1, 1).astype(np.float32)
    w_scores = np.array([1.0, 3.0, 0.5], np.float32).reshape(1, 3, 1, 1)
    targets[0].weights, targets[1].weights = w_boxes, w_scores
    feeds = {"target__0": t_boxes, "weight__0": distill_module._difference_weight(targets[0], t_boxes.size),
             "target__1": p.astype(np.float32), "weight__1": distill_module._difference_weight(targets[1], p.size)}
    model, grads = training_model(student, {"x": shape}, targets, list(trainable(student)), 1.0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer if t.name in grads}

    def loss_at(vals):
        s_boxes, s_logits = (v.astype(np.float64) for v in sess.run([boxes, logits], {"x": x, **feeds, **vals}))
        q = 1 / (1 + np.exp(-s_logits))
        binary = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
        return 0.4 * float(np.mean((s_boxes - t_boxes) ** 2 * w_boxes)) + 0.6 * float(np.mean(binary * w_scores))

    analytic = dict(zip(values, sess.run([grads[n] for n in values], {"x": x, **feeds, **values})))
    _assert_directional_derivatives(values, analytic, loss_at, np.random.default_rng(3), absolute=1e-5)


def test_an_output_of_sigmoid_scores_is_matched_part_by_part():
    """With `sigmoid_logits`, the Concat's box part keeps the squared error and the scores' logits take the
    binary divergence, each weighted by its share of the channels; the run heals the scores."""
    teacher = _scored_detector(0)
    student, distiller = _distiller(teacher, 0.5, 200, DistillSettings(steps=120, lr=0.01, sigmoid_logits=True),
                                    side=8)
    output = student.graph.output[0].name
    producers = {o: n for n in student.graph.node for o in n.output}
    boxes, scores = producers[output].input
    found = distiller.targets([output])
    assert [(t.tensor, t.role, t.scale) for t in found] == [(boxes, "output", 0.4),
                                                            (producers[scores].input[0], "logits", 0.6)]
    plain = Distiller(teacher, student, distiller.views, distiller.probe, DistillSettings(steps=1)).targets([output])
    assert [(t.tensor, t.role) for t in plain] == [(output, "output")]
    distiller.run()
    assert distiller.report.logits == [producers[scores].input[0]] and distiller.report.loss_on == [boxes]
    assert distiller.report.divergence_after < 0.5 * distiller.report.divergence_before, distiller.report.curve


def _distiller(teacher, damage: float, samples: int, settings: DistillSettings, side: int = 12):
    """The student (`teacher` with noise of `damage` times each weight's std) and its distiller."""
    student = _perturbed(teacher, damage)
    return student, _distiller_of(teacher, student, samples, settings, side)


def _distiller_of(teacher, student, samples: int, settings: DistillSettings, side: int = 12) -> Distiller:
    """A distiller of `student` towards `teacher` on `samples` random calibration images."""
    calibration = _calibration(samples, side=side)
    probe = QualityProbe(teacher, calibration.held, "held-out test samples", 64)
    views = Views("x", (1, 3, side, side), arrays=calibration.fit["x"], augment=Augment(mix="none"), seed=0)
    return Distiller(teacher, student, views, probe, settings)


def test_distillation_heals_a_student_and_keeps_its_graph():
    student, distiller = _distiller(_classifier(0), 0.5, 300, DistillSettings(steps=150, batch=16, lr=0.01))
    healed = distiller.run()
    report = distiller.report
    assert report.after > report.before + 0.1, report.curve
    assert report.steps == 150 and report.views == 150 * 16 and report.best_step > 0
    # the same graph, new initializer values only
    assert [n.SerializeToString() for n in healed.graph.node] == [n.SerializeToString() for n in student.graph.node]
    assert [(t.name, list(t.dims)) for t in healed.graph.initializer] == \
        [(t.name, list(t.dims)) for t in student.graph.initializer]
    assert healed.opset_import == student.opset_import and healed.ir_version == student.ir_version
    changed = [t.name for t, s in zip(healed.graph.initializer, student.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(s))]
    assert set(changed) == set(trainable(student))


@pytest.mark.parametrize("make", [_classifier, _detector])
def test_distillation_on_smaller_views_heals_the_model_at_its_size(make):
    """--distill-scale 0.5: the teacher and the student see 8×8 views of 16×16 samples (the detector's dense
    output shrinks with them); the held-out checks, and the model returned, are at 16×16."""
    teacher = make(0) if make is _detector else make(0, side=16)
    student = _perturbed(teacher, 0.5)
    side = teacher.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    calibration = _calibration(300, side=side)
    probe = QualityProbe(teacher, calibration.held, "held-out test samples", 64)
    settings = DistillSettings(steps=150, lr=0.01, scale=0.5)
    healed, report = distill_module.distill(teacher, student, calibration, probe, {"x": (1, 3, side, side)},
                                            settings)
    assert report.view_size == [side // 2] * 2 and f"augmented {side // 2}×{side // 2} views" in report.summary()
    assert report.batch == distill_module.default_batch((1, 3, side, side))  # the input's, not the views'
    assert report.divergence_after < 0.5 * report.divergence_before, report.curve
    assert healed.graph.input == student.graph.input and healed.graph.output == student.graph.output
    out = ort.InferenceSession(healed.SerializeToString()).run(None, {"x": calibration.held["x"][:4]})[0]
    assert out.shape[2:] == tuple(d.dim_value for d in student.graph.output[0].type.tensor_type.shape.dim)[2:]


def test_never_worse_than_the_start():
    """A step far too large ruins every checkpoint: the start comes back, and the summary says so."""
    settings = DistillSettings(steps=12, batch=8, lr=50.0, warmup=0.0)
    student, distiller = _distiller(_classifier(0), 0.05, 80, settings)
    healed = distiller.run()
    assert distiller.report.best_step == 0
    assert "the start is returned" in distiller.report.summary()
    for a, b in zip(healed.graph.initializer, student.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_the_checkpoint_is_the_lowest_divergence_whose_agreement_is_not_below_the_start():
    _, distiller = _distiller(_classifier(0), 0.05, 80, DistillSettings(steps=1))
    distiller.timer = _Budget(distiller.settings, 0.0)
    scripted = iter([(0.80, 0.30), (0.80, 0.20), (0.85, 0.25), (0.78, 0.10), (0.80, 0.15), (None, None)])
    distiller._evaluate = lambda params, step, seconds, loss: next(scripted)
    params = [_Parameter("w", np.zeros(2, np.float32), np.ones(1, np.float32), None, False)]
    chosen = []
    for step in range(6):
        params[0].value[:] = step
        distiller._check(params, step, None)
        if step == 0:
            distiller.report.before = distiller.best_score
        chosen.append(distiller.report.best_step)
    # the agreement tie at a lower divergence wins; a higher agreement at a higher divergence does not; a lower
    # divergence whose agreement fell below the start's is passed over
    assert chosen == [0, 1, 1, 1, 4, 4]
    assert distiller.best_values["w"].tolist() == [4.0, 4.0]


def test_divergence_reads_logits_and_probabilities_alike():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 10)), rng.standard_normal((50, 10))
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(1, keepdims=True)
    expected = float((p * np.log(p / q)).sum(1).mean())
    kind = [OutputKind("classifier", 1)]
    assert divergence([a], [b], kind) == pytest.approx(expected)
    assert divergence([p], [q], kind) == pytest.approx(expected)
    assert divergence([a], [a + 3.0], kind) == pytest.approx(0.0, abs=1e-12)  # softmax ignores a shift
    dense = rng.standard_normal((20, 4, 3, 3))
    assert divergence([dense], [dense], [OutputKind("dense", 1)]) == 0.0
    assert divergence([dense], [np.zeros_like(dense)], [OutputKind("dense", 1)]) == pytest.approx(1.0, abs=0.15)
    assert divergence([np.zeros(3, np.int64)], [np.zeros(3, np.int64)], [OutputKind("integer")]) is None


def test_affine_training_scales_whole_filters_and_moves_biases():
    settings = DistillSettings(steps=20, batch=8, lr=0.05, parameters="affine", evaluations=1)
    student, distiller = _distiller(_classifier(0), 0.3, 60, settings)
    distiller._evaluate = lambda params, step, seconds, loss: (float(step), None)  # the last step is the best
    healed = distiller.run()
    before = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in healed.graph.initializer}
    axes = trainable(student)
    scaled = 0
    for name, axis in axes.items():
        if axis is None:
            continue
        w0 = np.moveaxis(before[name], axis, 0).reshape(before[name].shape[axis], -1)
        w1 = np.moveaxis(after[name], axis, 0).reshape(after[name].shape[axis], -1)
        ratio = w1 / np.where(w0 == 0, 1, w0)
        np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4, atol=1e-6)
        scaled += int(not np.allclose(ratio, 1))
    assert scaled >= 3
    biases = [n for n, a in axes.items() if a is None and before[n].ndim == 1]
    assert any(not np.array_equal(before[n], after[n]) for n in biases)
    # the values trained: one scale per filter, every value of a vector
    moved = sum(before[n].shape[a] if a is not None else before[n].size for n, a in axes.items())
    assert distiller.report.trained_values == moved < sum(before[n].size for n in axes)


def test_the_checks_and_the_returned_model_take_the_moving_average_of_the_weights(monkeypatch):
    """With `average`, the model returned is the exponential moving average of the trained weights, its time
    constant the given share of the budget's steps (here 0.5 of 20: decay 0.9, less over the first steps)."""
    settings = DistillSettings(steps=20, batch=8, lr=0.05, average=0.5, evaluations=1)
    student, distiller = _distiller(_classifier(0), 0.3, 60, settings)
    distiller._evaluate = lambda params, step, seconds, loss: (float(step), None)  # the last check is the best
    trained = []
    adam = distill_module._adam

    def recording(p, grad, lr, step):
        adam(p, grad, lr, step)
        trained.append((step, p.name, p.value.copy()))

    monkeypatch.setattr(distill_module, "_adam", recording)
    healed = distiller.run()
    after = {t.name: numpy_helper.to_array(t) for t in healed.graph.initializer}
    expected = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in student.graph.initializer
                if t.name in trainable(student)}
    for step, name, value in trained:
        decay = min(0.9, (step + 1) / (step + 10))
        expected[name] = decay * expected[name] + (1 - decay) * value
    last = {name: value for _, name, value in trained}
    assert len(trained) == 20 * len(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-5, atol=1e-6)
        assert not np.allclose(after[name], last[name])


def test_the_anchor_pulls_each_weight_back_toward_its_start(monkeypatch):
    """With `anchor`, each step takes lr × anchor of a weight's distance from its start: under a constant push of
    one per step, the distance follows d <- (d + 1)(1 - lr × anchor)."""
    settings = DistillSettings(steps=20, batch=8, lr=0.05, anchor=10.0, evaluations=1)
    student, distiller = _distiller(_classifier(0), 0.3, 60, settings)
    distiller._evaluate = lambda params, step, seconds, loss: (float(step), None)  # the last check is the best
    rates = []

    def pushing(p, grad, lr, step):
        p.value += 1.0
        rates.append(lr)

    monkeypatch.setattr(distill_module, "_adam", pushing)
    healed = distiller.run()
    start = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    trained = trainable(student)
    distance = 0.0
    for lr in rates[::len(trained)]:
        distance = (distance + 1.0) * (1 - lr * settings.anchor)
    assert len(rates) == 20 * len(trained) and distance < 0.5 * 20  # without the pull: 20
    for t in healed.graph.initializer:
        if t.name in trained:
            np.testing.assert_allclose(numpy_helper.to_array(t) - start[t.name], distance, rtol=1e-4)


def test_a_mirrored_teacher_answers_a_view_and_its_mirror_image_alike():
    """Averaged with its answer on the mirror image, the teacher's logits are the same for a view and its
    mirror, and its pooled map (the feature term's target) is mirrored with the view."""
    student, distiller = _distiller(_classifier(0, softmax=False), 0.3, 40,
                                    DistillSettings(steps=1, batch=4, mirrored_teacher=True))
    targets = distiller.targets([o.name for o in student.graph.output])
    assert sorted(t.role for t in targets) == ["features", "output"]
    teacher = with_batch(distiller._teacher_model(targets), {"x": (4, 3, 12, 12)})
    teacher_session = ort.InferenceSession(teacher.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    mirror = np.ascontiguousarray(x[..., ::-1])
    answers = dict(zip((t.role for t in targets), distiller._teach(teacher_session, targets, x)))
    mirrored = dict(zip((t.role for t in targets), distiller._teach(teacher_session, targets, mirror)))
    np.testing.assert_allclose(answers["output"], mirrored["output"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answers["features"], mirrored["features"][..., ::-1], rtol=1e-5, atol=1e-5)
    # the teacher alone tells a view from its mirror image: the equalities above are the averaging's
    logits = next(t.tensor for t in targets if t.role == "output")
    assert not np.allclose(*(teacher_session.run([logits], {"x": v})[0] for v in (x, mirror)), atol=1e-3)


def test_an_op_without_a_rule_moves_the_loss_to_what_it_reads():
    b = GraphBuilder(opset=17, seed=0)
    x = b.input("x", [1, 3, 8, 8])
    y = b.conv(b.relu(b.conv(x, 6, k=3, name="c1")), 4, k=1, name="c2")
    teacher = b.build(outputs=[b.op("Round", [y], name="rounding")])
    _, distiller = _distiller(teacher, 0.3, 40, DistillSettings(steps=4, batch=8), side=8)
    distiller.run()
    assert distiller.report.loss_on == [y]
    assert "Round node 'rounding'" in distiller.report.note and y in distiller.report.note


def test_views_from_files_and_arrays_have_the_input_shape(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    for mix in ("mixup", "cutmix", "none"):
        views = Views("x", (1, 3, 16, 16), Preprocess(), paths=paths, augment=Augment(mix=mix), seed=0)
        batch = views.batch(7)  # more than the images: each is used once before any again
        assert batch.shape == (7, 3, 16, 16) and batch.dtype == np.float32
        nhwc = Views("x", (1, 16, 16, 3), Preprocess(layout="NHWC"), paths=paths, augment=Augment(mix=mix))
        assert nhwc.batch(3).shape == (3, 16, 16, 3)
    arrays = rng.standard_normal((4, 3, 10, 10)).astype(np.float32)
    views = Views("x", (1, 3, 10, 10), arrays=arrays, augment=Augment(scale=(1.0, 1.0), ratio=(1, 1), flip=False,
                                                                       mix="none"))
    np.testing.assert_allclose(np.sort(views.batch(4).ravel()), np.sort(arrays.ravel()), rtol=1e-6, atol=1e-6)


def test_views_draw_files_and_arrays_as_one_pool(tmp_path):
    """Synthetic arrays beside image files: each of the pool once per pass, the arrays as they are."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(paths[-1])
    arrays = rng.standard_normal((2, 3, 10, 10)).astype(np.float32) + 100  # far from any image's values
    whole = Augment(scale=(1.0, 1.0), ratio=(1, 1), flip=False, mix="none")
    views = Views("x", (1, 3, 10, 10), Preprocess(mean=(0, 0, 0), std=(1, 1, 1)), paths=paths, arrays=arrays,
                  augment=whole)
    assert views.count == 5
    batch = views.batch(5)
    synthetic = batch[batch.mean((1, 2, 3)) > 50]
    np.testing.assert_allclose(np.sort(synthetic.ravel()), np.sort(arrays.ravel()), rtol=1e-6)
    files = batch[batch.mean((1, 2, 3)) < 50]
    np.testing.assert_allclose(np.sort(files[:, 0, 0, 0]), [0, 40 / 255, 80 / 255], rtol=1e-6)
    joined = Views("x", (1, 3, 10, 10), arrays=Joined(Samples.of(arrays[:1]), arrays[1:]), augment=whole)
    np.testing.assert_allclose(np.sort(joined.batch(2).ravel()), np.sort(arrays.ravel()), rtol=1e-6)


def test_distillation_trains_on_synthetic_images_beside_the_calibration(tmp_path):
    model = _classifier(0, softmax=False, side=16)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    _, report = prune(model, ratio=0.5, round_to=1, calib=str(calib), validate=False,
                      distill=DistillSettings(steps=3, batch=8, synthetic=True))
    fit = 40 - 40 // 5
    assert f"views of {fit} calibration samples and 256 built-in synthetic images" in report.summary()
    _, plain = prune(model, ratio=0.5, round_to=1, calib=str(calib), validate=False,
                     distill=DistillSettings(steps=3, batch=8))
    assert f"views of {fit} calibration samples, " in plain.summary()


def test_prune_with_distillation_reports_it(tmp_path):
    model = _classifier(0, softmax=False)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((60, 3, 12, 12)).astype(np.float32))
    pruned, report = prune(model, ratio=0.5, round_to=1, calib=str(calib), validate=False,
                           distill=DistillSettings(steps=6, batch=8))
    assert report.distill["steps"] == 6 and report.distill["views"] == 48
    assert report.distill["before"] is not None and report.distill["after"] >= report.distill["before"]
    assert "distill: 6 steps, 48 augmented 12×12 views of" in report.summary()
    assert "distill" in json.loads(report.to_json())
    assert "distilled" in report.seconds


def test_the_mix_follows_the_outputs_kind_unless_set():
    classifier, dense = OutputKind("classifier", 1), OutputKind("dense", 1)
    assert augment_for(DistillSettings(), {"logits": classifier, "boxes": dense}).mix == "cutmix"
    assert augment_for(DistillSettings(), {"boxes": dense}).mix == "mixup"
    assert augment_for(DistillSettings(augment=Augment(mix="none")), {"logits": classifier}).mix == "none"


def test_cli_prune_and_distill(tmp_path):
    original = tmp_path / "model.onnx"
    onnx.save(_classifier(0), original)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((60, 3, 12, 12)).astype(np.float32))
    runner = CliRunner()
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    result = runner.invoke(main, ["prune", str(original), "--ratio", "0.5", "--round-to", "1", "--calib", str(calib),
                                  "--distill-steps", "4", "--distill-batch", "8", "--report", str(report), "-o",
                                  str(out), "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "distill: 4 steps" in result.output
    written = json.loads(report.read_text())["distill"]
    assert (written["steps"], written["mix"]) == (4, "cutmix")  # cutmix: the default for a classifier
    assert (tmp_path / "report.distill.png").stat().st_size > 0
    healed = tmp_path / "healed.onnx"
    result = runner.invoke(main, ["distill", str(original), str(out), "--calib", str(calib), "--distill-steps", "3",
                                  "--distill-batch", "8", "--distill-lr", "5e-4", "--distill-mix", "mixup",
                                  "--distill-average", "0.25", "--report", str(report), "-o", str(healed)])
    assert result.exit_code == 0, result.output
    assert "distill: 3 steps, 24 augmented 12×12 views" in result.output
    written = json.loads(report.read_text())
    assert (written["lr"], written["mix"], written["average"]) == (5e-4, "mixup", 0.25)
    before, after = onnx.load(out), onnx.load(healed)
    assert [n.name for n in before.graph.node] == [n.name for n in after.graph.node]
    result = runner.invoke(main, ["distill", str(original), str(out), "--calib", str(calib), "-o", str(healed)])
    assert result.exit_code == 2 and "give --time" in result.output
    result = runner.invoke(main, ["distill", str(original), str(out), "--calib", str(calib), "--distill-steps", "3",
                                  "--distill-lr", "0", "-o", str(healed)])
    assert result.exit_code == 2 and "--distill-lr" in result.output
    result = runner.invoke(main, ["distill", str(original), str(out), "--calib", str(calib), "--distill-steps", "3",
                                  "--distill-average", "1.5", "-o", str(healed)])
    assert result.exit_code == 2 and "--distill-average" in result.output
    result = runner.invoke(main, ["distill", str(original), str(out), "--calib", str(calib), "--distill-steps", "3",
                                  "--distill-synthetic", "-o", str(healed)])  # 12 px: too small for the synthetic images
    assert result.exit_code == 2 and "--distill-synthetic: no synthetic images for this model" in result.output
    result = runner.invoke(main, ["distill", str(original), str(out), "--calib", str(calib), "--time", "soon", "-o",
                                  str(healed)])
    assert result.exit_code == 2 and "not a duration" in result.output


def test_cli_matches_sigmoid_scores_on_their_logits_when_asked(tmp_path):
    original, student = tmp_path / "model.onnx", tmp_path / "student.onnx"
    onnx.save(_scored_detector(0), original)
    onnx.save(_perturbed(_scored_detector(0), 0.3), student)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32))
    logits = []
    for flag in ("--distill-sigmoid-logits", "--no-distill-sigmoid-logits"):
        report = tmp_path / f"{flag}.json"
        result = CliRunner().invoke(main, ["distill", str(original), str(student), "--calib", str(calib),
                                           "--distill-steps", "2", flag, "--report", str(report), "-o",
                                           str(tmp_path / "healed.onnx")])
        assert result.exit_code == 0, result.output
        logits.append(json.loads(report.read_text())["logits"])
    assert len(logits[0]) == 1 and logits[1] == []


def test_distill_refuses_a_model_with_other_outputs(tmp_path):
    original = _classifier(0)
    other = _classifier(0)
    other.graph.output[0].name = "something_else"
    other.graph.node[-1].output[0] = "something_else"
    calib = np.random.default_rng(0).standard_normal((30, 3, 12, 12)).astype(np.float32)
    from onnx_whc.errors import UserInputError

    with pytest.raises(UserInputError, match="not the original's"):
        distill(original, other, calib={"x": calib}, distill=DistillSettings(steps=1))


def test_the_trunk_term_reads_residual_joins_the_prune_left_whole():
    settings = DistillSettings(steps=3, batch=8, trunks=1.0)
    _, distiller = _distiller(_classifier(0), 0.3, 40, settings)
    distiller.run()
    assert distiller.report.trunks == 1  # the Add of the depthwise output and its projection
    _, distiller = _distiller(_classifier(0), 0.3, 40, DistillSettings(steps=3, batch=8))
    distiller.run()
    assert distiller.report.trunks == 0


def test_the_feature_term_reads_what_the_global_pooling_reads_once():
    _, distiller = _distiller(_classifier(0), 0.3, 40, DistillSettings(steps=3, batch=8, features=1.0))
    distiller.run()
    pooled = next(n.input[0] for n in distiller.student.graph.node if n.op_type == "GlobalAveragePool")
    assert (distiller.report.features, distiller.report.trunks) == (1, 0)
    assert [t.tensor for t in distiller.targets([o.name for o in distiller.student.graph.output])
            if t.role == "features"] == [pooled]
    # the pooled map is the residual join too: a tensor is read by one term, not two
    _, distiller = _distiller(_classifier(0), 0.3, 40, DistillSettings(steps=3, batch=8, features=1.0, trunks=1.0))
    distiller.run()
    assert (distiller.report.features, distiller.report.trunks) == (0, 1)


def test_the_feature_term_reads_the_last_pooling_not_a_squeeze_and_excitation_one():
    b = GraphBuilder(opset=17, seed=0)
    y = b.relu(b.conv(b.input("x", [1, 3, 12, 12]), 8, k=3, stride=2, name="stem"))
    gate = b.sigmoid(b.conv(b.relu(b.conv(b.global_average_pool(y), 4, k=1, name="squeeze")), 8, k=1, name="excite"))
    y = b.relu(b.conv(b.op("Mul", [y, gate]), 8, k=3, name="last"))
    model = b.build(outputs=[b.gemm(b.flatten(b.global_average_pool(y)), 5, name="head")])
    distiller = _distiller_of(model, model, 40, DistillSettings(steps=1, batch=8))
    targets = distiller.targets([o.name for o in model.graph.output])
    last = [n for n in model.graph.node if n.op_type == "GlobalAveragePool"][-1]
    assert [t.tensor for t in targets if t.role == "features"] == [last.input[0]]


@pytest.mark.parametrize("opset", [17, 18])  # the Reduce axes an attribute, then an input
def test_the_feature_term_reads_a_reduce_mean_pooling_on_its_channel_axis(opset):
    """A tf2onnx-style head: squeeze-and-excitation by a ReduceMean over NCHW's spatial axes (not taken: its
    gate scales a map), then the map moved to NHWC and pooled by a ReduceMean over axes 1, 2."""
    b = GraphBuilder(opset=opset, seed=0)

    def mean(x, axes, keepdims):
        if opset >= 18:
            return b.op("ReduceMean", [x, b.const(np.array(axes, np.int64))], keepdims=keepdims)
        return b.op("ReduceMean", [x], axes=axes, keepdims=keepdims)

    y = b.relu(b.conv(b.input("x", [1, 3, 12, 12]), 8, k=3, stride=2, name="stem"))
    y = b.op("Mul", [y, b.sigmoid(b.conv(mean(y, [2, 3], 1), 8, k=1, name="excite"))])
    nhwc = b.op("Transpose", [b.relu(b.conv(y, 7, k=3, name="last"))], perm=[0, 2, 3, 1])
    model = b.build(outputs=[b.gemm(mean(nhwc, [1, 2], 0), 5, name="head")])
    distiller = _distiller(model, 0.3, 40, DistillSettings(steps=2, batch=8, features=1.0))[1]
    targets = [t for t in distiller.targets([o.name for o in model.graph.output]) if t.role == "features"]
    assert [(t.tensor, t.kind.axis) for t in targets] == [(nhwc, 3)]
    distiller.run()
    assert distiller.report.features == 1


def test_the_feature_term_skips_a_pooled_map_the_prune_narrowed():
    def pooled_classifier(width: int) -> onnx.ModelProto:
        b = GraphBuilder(opset=17, seed=0)
        y = b.relu(b.conv(b.input("x", [1, 3, 12, 12]), width, k=3, stride=2, name="last"))
        return b.build(outputs=[b.gemm(b.flatten(b.global_average_pool(y)), 5, name="head")])

    teacher, student = pooled_classifier(8), pooled_classifier(6)
    assert [n.input for n in teacher.graph.node] == [n.input for n in student.graph.node]
    for model, features in ((teacher, 1), (student, 0)):
        distiller = _distiller_of(teacher, model, 40, DistillSettings(steps=2, batch=8, features=1.0))
        distiller.run()
        assert distiller.report.features == features

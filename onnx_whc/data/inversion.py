"""Calibration images drawn out of the model itself: dead leaves refined by model inversion.

Dead-leaves images drive a classifier's early layers like photos do, but its last layers at a
fraction of their usual variance: nothing in them looks like an object. Refining each image by a
few steps of gradient descent on the pixels, towards a mix of classes the model is asked to see
(the "class impressions" of zero-shot distillation, with total-variation and jitter priors as in
DeepInversion) and towards deep channels that vary across each image, makes the deep layers fire
as they do on photos: on EfficientNet-Lite0 the last quarter of its convs gets 0.79 of the
photos' variance instead of 0.28, and the model pruned to 0.75 of its MACs without --calib keeps
66.2% top-1 instead of 16.0% (benchmarks/results/synthetic_gap.md).

ONNX Runtime computes no gradients, so the backward pass is written as ONNX nodes next to the
forward ones (`graph.backward`): a gradient model whose inputs are the image batch and the target
classes, and whose outputs are the logits and the gradient of the cross-entropy with respect to
the image. Only the ops in SUPPORTED are inverted; a model with any other op between its input and
its logits is not (the dead leaves are used as they are, and the reason is reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import first_line
from ..graph.backward import RULES, NoGradient, backpropagate, dependents, static_shapes, with_batch
from ..graph.runtime import session

SUPPORTED = ("Conv", "Relu", "Clip", "Add", "Sub", "Mul", "Sigmoid", "Pad", "GlobalAveragePool",
             "Gemm", "Reshape", "Flatten", "Concat", "Slice", "Identity")
# The ops inversion was measured with; graph.backward has rules for more (MaxPool, BatchNormalization, ...).
_RULES = {op: RULES[op] for op in SUPPORTED}


class NotInvertible(Exception):
    """The model has an op with no backward rule on the path to its logits."""


class _Writer:
    """The nodes and constants of the loss's own gradients, written before the backward pass."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = f"invert__{len(self.nodes) + len(self.initializers)}_{hint}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: float, hint: str) -> str:
        name = f"invert__{len(self.nodes) + len(self.initializers)}_{hint}"
        self.initializers.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name


def gradient_model(model: onnx.ModelProto, shape: tuple[int, ...], spread: float = 0.0) -> onnx.ModelProto:
    """The model at input `shape` with a `target` input (N×K one-hot) and an `input_grad` output.

    `input_grad` is d CE(softmax(logits), target) / d input, summed over the batch; an output
    that already is a Softmax is differentiated from its logits. With `spread`, the loss also
    subtracts `spread` times the mean log-variance of the deep channels (`_spread_gradients`).
    Raises NotInvertible when the model is not a one-input classifier or an op on the way has no
    rule here.
    """
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise NotInvertible("the model has several inputs or outputs")
    if model.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise NotInvertible("the model's input is not float32")
    model = with_batch(model, {model.graph.input[0].name: tuple(shape)})
    graph = model.graph
    try:
        shapes = static_shapes(model)
    except NoGradient as err:
        raise NotInvertible(str(err)) from None
    x, logits = graph.input[0].name, graph.output[0].name
    if len(shapes.get(logits, ())) != 2 or shapes[logits][1] < 2:
        raise NotInvertible(f"output '{logits}' is not N×classes")
    last = next((n for n in graph.node if logits in n.output), None)
    if last is not None and last.op_type in ("Softmax", "LogSoftmax"):
        logits = last.input[0]  # the gradient of the cross-entropy is taken from the logits
    writer = _Writer()
    probs = writer.add("Softmax", [logits], "softmax", axis=-1)
    seeds = {logits: writer.add("Sub", [probs, "target"], "dlogits")}
    if spread > 0:
        needed = dependents(graph, [x], getattr(shapes, "types", None))
        seeds.update(_spread_gradients(writer, graph, shapes, needed, spread))
    graph.node.extend(writer.nodes)
    graph.initializer.extend(writer.initializers)
    graph.input.append(helper.make_tensor_value_info("target", onnx.TensorProto.FLOAT, list(shapes[logits])))
    try:
        grads = backpropagate(model, seeds, [x], shapes, rules=_RULES)
    except NoGradient as err:
        raise NotInvertible(str(err)) from None
    if x not in grads:
        raise NotInvertible("the logits do not depend on the input")
    graph.node.append(helper.make_node("Identity", [grads[x]], ["input_grad"], name="grad__out"))
    graph.output.append(helper.make_tensor_value_info("input_grad", onnx.TensorProto.FLOAT, list(shapes[x])))
    return model


def _spread_gradients(w: _Writer, graph: onnx.GraphProto, shapes: dict, needed: set[str],
                      weight: float) -> dict[str, str]:
    """The gradients of -weight · mean over (activation, channel) of sum over the batch of log(Var + 1e-3),
    Var taken over each image's positions, for the 4-D Relu/Clip outputs of the network's deeper half.

    Class targets alone drive the deep channels they need and leave the rest quiet, and a quiet
    channel looks free to prune; this term makes every channel vary across each image. The log
    saturates: quiet channels are pushed most. d/dh log Var = 2 (h - mean) / (H·W·Var).
    """
    acts = [n.output[0] for n in graph.node if n.op_type in ("Relu", "Clip") and n.output[0] in needed
            and len(shapes.get(n.output[0], ())) == 4]
    acts = acts[len(acts) // 2:]
    grads = {}
    eps = w.const(1e-3, "spread_eps")
    for name in acts:
        _, channels, h, width = shapes[name]
        centred = w.add("Sub", [name, w.add("GlobalAveragePool", [name], "spread_mean")], "spread_centred")
        var = w.add("GlobalAveragePool", [w.add("Mul", [centred, centred], "spread_square")], "spread_var")
        var = w.add("Add", [var, eps], "spread_var")
        scale = w.const(-2 * weight / (h * width * channels * len(acts)), "spread_scale")
        grads[name] = w.add("Mul", [w.add("Div", [centred, var], "spread_ratio"), scale], "spread_grad")
    return grads


@dataclass(frozen=True)
class InversionSettings:
    steps: int = 20
    lr: float = 0.1  # Adam's step, in normalised input units
    tv: float = 1e-4  # total-variation prior: smooth regions, as photos have
    l2: float = 1e-5
    jitter: float = 1 / 28  # random shift, as a fraction of the side (8 px at 224)
    flip: bool = True  # and random mirror images: what the model sees must not hinge on left or right
    # Each image is pushed towards an equal mix of this many classes (fewer for models of under
    # ten classes per mixed class): more of the deep, class-selective channels are driven than by
    # one class each. EfficientNet-Lite0 at 0.75 of the MACs without --calib, top-1: 1 class
    # 50.6–55.8% (four draws, mean 52.5), 2 classes 53.6%, 4 classes 52.6–57.6% (four, mean 55.9),
    # 8 classes 51.0%.
    classes_per_image: int = 4
    # Weight of the deep channels' mean log-variance against the cross-entropy (`_spread_gradients`;
    # built into the gradient model). EfficientNet-Lite0 at 0.75 of the MACs without --calib, one
    # draw of the images: 0 (class targets only) 52.6% top-1, 1 59.0%, 3 65.4%, 10 66.2%.
    spread: float = 10.0


def refine(grad_model: onnx.ModelProto, images: np.ndarray, low: np.ndarray, high: np.ndarray, channels_last: bool,
           seed: int = 0, settings: InversionSettings = InversionSettings(), progress=list) -> np.ndarray:
    """`images` moved by gradient descent towards a mix of classes each (`inversion_targets`).

    `grad_model` is `gradient_model`'s, its batch the number of images per run. `low` and `high`
    bound each input value (the normalised image range), broadcastable to one image. `progress`
    wraps the iterable of steps. Raises NotInvertible when ONNX Runtime cannot run the gradient model.
    """
    try:
        grad_session = session(grad_model, ["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime refusing the written graph: invert nothing rather than fail the prune
        raise NotInvertible(f"its gradient model does not run ({first_line(err)})") from None
    name = grad_session.get_inputs()[0].name
    batch, classes = grad_session.get_inputs()[0].shape[0], grad_session.get_inputs()[1].shape[1]
    rng = np.random.default_rng([seed, 0x1A7E])
    targets = inversion_targets(len(images), classes, settings.classes_per_image, rng)
    axes = (1, 2) if channels_last else (2, 3)
    shift = round(settings.jitter * min(images.shape[a] for a in axes))
    x = np.array(images, np.float32)
    first = np.zeros_like(x)
    second = np.zeros_like(x)
    for step in progress(range(1, settings.steps + 1)):
        for start in range(0, len(x), batch):
            rows = slice(start, min(start + batch, len(x)))
            grad = _jittered_grad(grad_session, name, x[rows], targets[rows], classes, batch, axes, shift,
                                  settings.flip, rng)
            grad += settings.tv * _tv_grad(x[rows], axes) + settings.l2 * x[rows]
            first[rows] = 0.9 * first[rows] + 0.1 * grad
            second[rows] = 0.999 * second[rows] + 0.001 * grad * grad
            move = (first[rows] / (1 - 0.9 ** step)) / (np.sqrt(second[rows] / (1 - 0.999 ** step)) + 1e-8)
            x[rows] = np.clip(x[rows] - settings.lr * move, low, high)
    return x


def inversion_targets(count: int, classes: int, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """count × k class indices, k = per_image or fewer for models with under 10·k classes.

    Each image's first class is drawn from all the classes (distinct while count ≤ classes), the
    others follow it at equal spacing over the label space: labels come in semantic runs
    (ImageNet's 120 dog breeds are 151–268), so a mix spans distant kinds of object. On
    EfficientNet-Lite0 without --calib, before the spread term (single runs, 3 points apart): 52.6–57.6%
    top-1 over four draws; four classes drawn independently at random, 53.4 and 54.6%.
    """
    k = max(1, min(per_image, classes // 10))
    first = np.concatenate([rng.permutation(classes) for _ in range(-(-count // classes))])[:count]
    return (first[:, None] + np.arange(k) * (classes // k)) % classes


def _jittered_grad(grad_session, name: str, x: np.ndarray, targets: np.ndarray, classes: int, batch: int,
                   axes: tuple[int, int], shift: int, flip: bool, rng: np.random.Generator) -> np.ndarray:
    """The cross-entropy's gradient at a randomly shifted and flipped copy, mapped back.

    `targets` holds each image's classes (a row each), weighted equally in its target distribution.
    """
    offsets = tuple(int(v) for v in rng.integers(-shift, shift + 1, 2))
    flip = flip and bool(rng.random() < 0.5)
    moved = np.roll(x, offsets, axes)
    if flip:
        moved = np.flip(moved, axes[1])
    feed = np.zeros((batch, *x.shape[1:]), np.float32)
    feed[:len(x)] = moved
    target = np.zeros((batch, classes), np.float32)
    target[np.arange(len(x))[:, None], targets] = 1.0 / targets.shape[1]
    grad = grad_session.run(["input_grad"], {name: feed, "target": target})[0][:len(x)]
    if flip:
        grad = np.flip(grad, axes[1])
    return np.roll(grad, tuple(-v for v in offsets), axes)


def _tv_grad(x: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """Gradient of the squared differences between neighbouring values along both image axes."""
    grad = np.zeros_like(x)
    for axis in axes:
        diff = np.diff(x, axis=axis)
        lead = [slice(None)] * x.ndim
        lead[axis] = slice(1, None)
        grad[tuple(lead)] += diff
        lead[axis] = slice(None, -1)
        grad[tuple(lead)] -= diff
    return grad

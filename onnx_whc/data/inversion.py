"""Calibration images drawn out of the model itself: dead leaves refined by model inversion.

Dead-leaves images drive a classifier's early layers like photos do, but its last layers at a
fraction of their usual variance: nothing in them looks like an object. Refining each image by a
few steps of gradient descent on the pixels, towards a mix of classes the model is asked to see
(the "class impressions" of zero-shot distillation, with total-variation and jitter priors as in
DeepInversion) and towards deep channels that vary across each image, makes the deep layers fire
as they do on photos: on EfficientNet-Lite0 the last quarter of its convs gets 0.79 of the
photos' variance instead of 0.28, and the model pruned to 0.75 of its MACs without --calib keeps
66.2% top-1 instead of 16.0% (benchmarks/results/synthetic_gap.md).

ONNX Runtime computes no gradients, so this module writes the backward pass as ONNX nodes next to
the forward ones: a gradient model whose inputs are the image batch and the target classes, and
whose outputs are the logits and the gradient of the cross-entropy with respect to the image.
Only the ops below have a backward rule; a model with any other op between its input and its
logits is not inverted (the dead leaves are used as they are, and the reason is reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import first_line
from ..graph.constants import constant_arrays
from ..graph.runtime import session

SUPPORTED = ("Conv", "Relu", "Clip", "Add", "Sub", "Mul", "Sigmoid", "Pad", "GlobalAveragePool",
             "Gemm", "Reshape", "Flatten", "Concat", "Slice", "Identity")


class NotInvertible(Exception):
    """The model has an op with no backward rule on the path to its logits."""


class _Shapes(dict):
    """Static shapes; a tensor shape inference could not fix stops the inversion, not the prune."""

    def __missing__(self, name: str):
        raise NotInvertible(f"the shape of '{name}' is not static")


@dataclass
class _Builder:
    graph: onnx.GraphProto
    shapes: dict[str, tuple[int, ...]]
    constants: set[str]
    values: dict[str, np.ndarray]  # constant operands the backward rules read (pads, conv weights, slice bounds)
    nodes: list
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"grad__{self.count}_{hint.split('/')[-1][:24]}"

    def add(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def unbroadcast(self, grad: str, target: str, output: str) -> str:
        """Sum `grad` (shaped like `output`) over the axes `target` was broadcast along."""
        out_shape, in_shape = self.shapes[output], self.shapes[target]
        if out_shape == in_shape:
            return grad
        padded = (1,) * (len(out_shape) - len(in_shape)) + tuple(in_shape)
        axes = [i for i, (o, t) in enumerate(zip(out_shape, padded)) if t == 1 and o != 1]
        summed = self.add("ReduceSum", [grad, self.const(np.array(axes, np.int64), "axes")], target,
                          keepdims=1) if axes else grad
        return self.add("Reshape", [summed, self.const(np.array(in_shape, np.int64), "shape")], target)


def gradient_model(model: onnx.ModelProto, shape: tuple[int, ...], spread: float = 0.0) -> onnx.ModelProto:
    """The model at input `shape` with a `target` input (N×K one-hot) and an `input_grad` output.

    `input_grad` is d CE(softmax(logits), target) / d input, summed over the batch; an output
    that already is a Softmax is differentiated from its logits. With `spread`, the loss also
    subtracts `spread` times the mean log-variance of the deep channels (`_spread_gradients`).
    Raises NotInvertible when the model is not a one-input classifier or an op on the way has no
    rule here.
    """
    model = _with_shape(model, shape)
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise NotInvertible("the model has several inputs or outputs")
    if graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise NotInvertible("the model's input is not float32")
    shapes = _static_shapes(model)
    x, logits = graph.input[0].name, graph.output[0].name
    if len(shapes.get(logits, ())) != 2 or shapes[logits][1] < 2:
        raise NotInvertible(f"output '{logits}' is not N×classes")
    last = next((n for n in graph.node if logits in n.output), None)
    if last is not None and last.op_type in ("Softmax", "LogSoftmax"):
        logits = last.input[0]  # the gradient of the cross-entropy is taken from the logits
    constants = _constant_tensors(graph)
    operands = (name for node in graph.node if node.op_type in ("Pad", "Conv", "Slice") for name in node.input[1:])
    builder = _Builder(graph, shapes, constants, constant_arrays(graph, operands), [])
    probs = builder.add("Softmax", [logits], "softmax", axis=-1)
    grads: dict[str, list[str]] = {logits: [builder.add("Sub", [probs, "target"], "dlogits")]}
    needed = _on_path(graph, x, constants)
    if spread > 0:
        for name, grad in _spread_gradients(builder, graph, needed, spread).items():
            grads.setdefault(name, []).append(grad)
    for node in reversed(graph.node):
        outs = [o for o in node.output if o in grads]
        if not outs or not any(i in needed for i in node.input):
            continue
        if node.op_type not in SUPPORTED:
            raise NotInvertible(f"no gradient for {node.op_type} node '{node.name}'")
        upstream = {o: _sum(builder, grads[o], o) for o in outs}
        for name, grad in _backward(builder, node, upstream).items():
            if name in needed:
                grads.setdefault(name, []).append(grad)
    if x not in grads:
        raise NotInvertible("the logits do not depend on the input")
    builder.nodes.append(helper.make_node("Identity", [_sum(builder, grads[x], x)], ["input_grad"], name="grad__out"))
    graph.node.extend(builder.nodes)
    graph.input.append(helper.make_tensor_value_info("target", onnx.TensorProto.FLOAT, list(shapes[logits])))
    graph.output.append(helper.make_tensor_value_info("input_grad", onnx.TensorProto.FLOAT, list(shapes[x])))
    return model


def _spread_gradients(b: _Builder, graph: onnx.GraphProto, needed: set[str], weight: float) -> dict[str, str]:
    """The gradients of -weight · mean over (activation, channel) of sum over the batch of log(Var + 1e-3),
    Var taken over each image's positions, for the 4-D Relu/Clip outputs of the network's deeper half.

    Class targets alone drive the deep channels they need and leave the rest quiet, and a quiet
    channel looks free to prune; this term makes every channel vary across each image. The log
    saturates: quiet channels are pushed most. d/dh log Var = 2 (h - mean) / (H·W·Var).
    """
    acts = [n.output[0] for n in graph.node if n.op_type in ("Relu", "Clip") and n.output[0] in needed
            and len(b.shapes[n.output[0]]) == 4]
    acts = acts[len(acts) // 2:]
    grads = {}
    eps = b.const(np.array(1e-3, np.float32), "spread_eps")
    for name in acts:
        _, channels, h, w = b.shapes[name]
        centred = b.add("Sub", [name, b.add("GlobalAveragePool", [name], "spread_mean")], "spread_centred")
        var = b.add("GlobalAveragePool", [b.add("Mul", [centred, centred], "spread_square")], "spread_var")
        var = b.add("Add", [var, eps], "spread_var")
        scale = b.const(np.array(-2 * weight / (h * w * channels * len(acts)), np.float32), "spread_scale")
        grads[name] = b.add("Mul", [b.add("Div", [centred, var], "spread_ratio"), scale], "spread_grad")
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


def _sum(builder: _Builder, parts: list[str], hint: str) -> str:
    total = parts[0]
    for part in parts[1:]:
        total = builder.add("Add", [total, part], hint)
    return total


def _backward(b: _Builder, node, upstream: dict[str, str]) -> dict[str, str]:
    """Input tensor -> gradient name, for one node given its outputs' gradients."""
    op, ins, out = node.op_type, list(node.input), node.output[0]
    g = upstream.get(out)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op == "Identity":
        return {ins[0]: g}
    if op == "Relu":
        positive = b.add("Greater", [ins[0], b.const(np.float32(0), "zero")], "pos")
        return {ins[0]: b.add("Where", [positive, g, b.const(np.float32(0), "zero")], "drelu")}
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] else None
        hi = ins[2] if len(ins) > 2 and ins[2] else None
        inside = None
        for bound, cmp in ((lo, "Greater"), (hi, "Less")):
            if bound:
                m = b.add(cmp, [ins[0], bound], "cmp")
                inside = m if inside is None else b.add("And", [inside, m], "inside")
        return {ins[0]: b.add("Where", [inside, g, b.const(np.float32(0), "zero")], "dclip") if inside else g}
    if op == "Sigmoid":
        one_minus = b.add("Sub", [b.const(np.float32(1), "one"), out], "1-s")
        return {ins[0]: b.add("Mul", [g, b.add("Mul", [out, one_minus], "ds")], "dsig")}
    if op in ("Add", "Sub"):
        result = {}
        for k, name in enumerate(ins):
            if name in b.constants:
                continue
            grad = g if op == "Add" or k == 0 else b.add("Neg", [g], "neg")
            result[name] = b.unbroadcast(grad, name, out)
        return result
    if op == "Mul":
        result = {}
        for k, name in enumerate(ins):
            if name in b.constants:
                continue
            result[name] = b.unbroadcast(b.add("Mul", [g, ins[1 - k]], "dmul"), name, out)
        return result
    if op == "Pad":
        if attrs.get("mode", b"constant") not in (b"constant", "constant") or len(ins) < 2:
            raise NotInvertible(f"no gradient for Pad node '{node.name}' (mode or opset)")
        pads = b.values.get(ins[1])
        if pads is None or (pads < 0).any() or (len(ins) > 3 and ins[3]):
            raise NotInvertible(f"no gradient for Pad node '{node.name}' (pads)")
        rank = len(pads) // 2
        shape = b.shapes[out]
        starts, ends = pads[:rank], np.array(shape) - pads[rank:]
        return {ins[0]: b.add("Slice", [g, b.const(starts.astype(np.int64), "s"), b.const(ends.astype(np.int64), "e"),
                                        b.const(np.arange(rank, dtype=np.int64), "a")], "dpad")}
    if op == "GlobalAveragePool":
        shape = b.shapes[ins[0]]
        area = float(np.prod(shape[2:]))
        scaled = b.add("Mul", [g, b.const(np.float32(1 / area), "inv_area")], "dgap")
        return {ins[0]: b.add("Expand", [scaled, b.const(np.array(shape, np.int64), "shape")], "dgap")}
    if op in ("Reshape", "Flatten"):
        return {ins[0]: b.add("Reshape", [g, b.const(np.array(b.shapes[ins[0]], np.int64), "shape")], "dreshape")}
    if op == "Concat":
        axis = attrs["axis"] % len(b.shapes[out])
        sizes = [b.shapes[i][axis] for i in ins]
        parts = [b.name("dconcat") for _ in ins]
        b.nodes.append(helper.make_node("Split", [g, b.const(np.array(sizes, np.int64), "split")], parts,
                                        axis=axis, name=parts[0]))
        return {i: p for i, p in zip(ins, parts) if i not in b.constants}
    if op == "Gemm":
        if attrs.get("transA", 0) or ins[1] not in b.constants:
            raise NotInvertible(f"no gradient for Gemm node '{node.name}' (transA or a computed weight)")
        # Y = alpha * A @ op(B) + beta * C  ->  dA = alpha * dY @ op(B)^T
        grad = b.add("Gemm", [g, ins[1]], "dgemm", alpha=float(attrs.get("alpha", 1.0)),
                     transB=0 if attrs.get("transB", 0) else 1)
        return {ins[0]: grad}
    if op == "Conv":
        return {ins[0]: _conv_input_grad(b, node, attrs, g)}
    if op == "Slice":
        return {ins[0]: _slice_grad(b, node, g)}
    raise NotInvertible(f"no gradient for {op} node '{node.name}'")


def _conv_input_grad(b: _Builder, node, attrs: dict, g: str) -> str:
    """dX of a Conv, as a stride-1 Conv of the (zero-dilated) dY with the flipped, transposed weight.

    ONNX Runtime's ConvTranspose is several times slower than its Conv on depthwise kernels.
    """
    x, w = node.input[0], node.input[1]
    in_shape, out_shape = b.shapes[x], b.shapes[node.output[0]]
    spatial = len(in_shape) - 2
    weight = b.values.get(w)
    if weight is None:
        raise NotInvertible(f"no gradient for Conv node '{node.name}' (a computed weight)")
    kernel = list(weight.shape[2:])
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise NotInvertible(f"no gradient for Conv node '{node.name}' (auto_pad)")
    group = int(attrs.get("group", 1))
    c_out, c_in_g = weight.shape[:2]
    flipped = weight.reshape(group, c_out // group, c_in_g, *kernel).swapaxes(1, 2)
    flipped = flipped.reshape(group * c_in_g, c_out // group, *kernel)[(..., *[slice(None, None, -1)] * spatial)]
    if any(s > 1 for s in strides):
        g = _dilate(b, g, out_shape, [1, 1, *strides])
    begin, end = [], []
    for i in range(spatial):
        span = (kernel[i] - 1) * dilations[i]
        length = (out_shape[2 + i] - 1) * strides[i] + 1
        begin.append(span - pads[i])
        end.append(in_shape[2 + i] - length - begin[i] + span)
    if min(begin + end) < 0:
        raise NotInvertible(f"no gradient for Conv node '{node.name}' (its padding)")
    return b.add("Conv", [g, b.const(np.ascontiguousarray(flipped, np.float32), "wT")], "dconv",
                 kernel_shape=kernel, dilations=dilations, pads=begin + end, group=group)


def _dilate(b: _Builder, g: str, shape: tuple, steps: list[int]) -> str:
    """`g` with step-1 zeros after each value along every axis: (n-1)*step+1 values, as a stride skipped them."""
    inner = [v for size, step in zip(shape, steps) for v in ((size, 1) if step > 1 else (size,))]
    spread = b.add("Reshape", [g, b.const(np.array(inner, np.int64), "shape")], "dil")
    after = [v for step in steps for v in ((0, step - 1) if step > 1 else (0,))]
    spread = b.add("Pad", [spread, b.const(np.array([0] * len(inner) + after, np.int64), "pads")], "dil")
    wide = [size * step for size, step in zip(shape, steps)]
    spread = b.add("Reshape", [spread, b.const(np.array(wide, np.int64), "shape")], "dil")
    ends = [(size - 1) * step + 1 for size, step in zip(shape, steps)]
    return b.add("Slice", [spread, b.const(np.zeros(len(shape), np.int64), "s"), b.const(np.array(ends, np.int64), "e"),
                           b.const(np.arange(len(shape), dtype=np.int64), "a")], "dil")


def _slice_grad(b: _Builder, node, g: str) -> str:
    """dX of a Slice with constant positive steps: dY spread to its strided places, zeros elsewhere."""
    x, out = node.input[0], node.output[0]
    in_shape, out_shape = b.shapes[x], b.shapes[out]

    def operand(k: int):
        return b.values.get(node.input[k]) if len(node.input) > k and node.input[k] else None

    starts, ends, axes, steps = (operand(k) for k in range(1, 5))
    if starts is None or ends is None or (steps is not None and (steps <= 0).any()) or 0 in out_shape:
        raise NotInvertible(f"no gradient for Slice node '{node.name}' (bounds not constant, or negative steps)")
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    rank = len(in_shape)
    step_of, start_of = [1] * rank, [0] * rank
    for axis, start, step in zip(axes, starts, steps):
        axis = int(axis) % rank
        start = int(start) + in_shape[axis] if start < 0 else int(start)
        step_of[axis], start_of[axis] = int(step), min(max(start, 0), in_shape[axis])
    spread = _dilate(b, g, out_shape, step_of) if max(step_of) > 1 else g
    after = [size - begin - ((n - 1) * step + 1)
             for size, begin, n, step in zip(in_shape, start_of, out_shape, step_of)]
    if min(after) < 0:
        raise NotInvertible(f"no gradient for Slice node '{node.name}' (its bounds)")
    return b.add("Pad", [spread, b.const(np.array(start_of + after, np.int64), "pads")], "dslice")


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in names or not i for i in node.input)
                                         and node.op_type != "Shape"):
            names.update(node.output)
    return names


def _on_path(graph: onnx.GraphProto, x: str, constants: set[str]) -> set[str]:
    """Tensors computed from `x` (shape reads excluded): the only ones that need a gradient."""
    reached = {x}
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return reached - constants


def _with_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> onnx.ModelProto:
    """A copy whose input has `shape`; outputs get the batch, the rest is inferred again."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        wanted = shape if value in model.graph.input else shape[:1]
        for dim, size in zip(dims, wanted):
            dim.Clear()
            dim.dim_value = size
    del model.graph.value_info[:]
    return model


def _static_shapes(model: onnx.ModelProto) -> _Shapes:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # onnx raises several types on graphs it cannot infer
        raise NotInvertible(f"shape inference fails ({first_line(err)})") from None
    shapes = _Shapes()
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes

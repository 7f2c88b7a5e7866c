"""Distillation: the pruned model trained on ONNX Runtime to answer as its original does, without labels.

After least squares, what a mobile net or a detector still lacks needs its layers trained
together. The original is a perfect teacher and the user's images are enough when the student
sees many augmented views of them (`onnx_whc.data.views`): on each batch, the teacher's outputs
are the targets, and a training model (the pruned model with its kept weights as inputs, and the
backward pass written beside it as ONNX nodes by `onnx_whc.graph.backward`) gives the gradients.

The loss follows each output's kind (`onnx_whc.measure.quality`): for a classifier, the KL
divergence of temperature-softened outputs (T² · KL, Hinton's scaling); for a dense output, the
squared error of each channel divided by that channel's variance on the original, so that a
detector's class scores weigh as much as its box coordinates; optionally (`sigmoid_logits`), a
Sigmoid's probabilities in an output are matched on their logits by the binary KL divergence
instead, per channel over the divergence of the channel's mean. Where an op on the way has no
backward rule, the loss is taken on the tensors it reads instead, and the report says so.

The optimiser is Adam whose step for each weight is scaled by the RMS of its filter's original
weights (plain Adam, whose steps ignore a layer's scale, made BN-folded students worse within
ten steps), on a cosine schedule over the time or step budget. The held-out samples that the
quality figure uses decide which checkpoint is returned: never worse than the start.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..data.calibration import Calibration, Preprocess
from ..data.samples import Samples
from ..data.views import Augment, Joined, Views
from ..errors import UserInputError
from ..graph.backward import NoGradient, backpropagate, reduced_axes, static_shapes, with_batch
from ..graph.constants import attribute, constant_arrays, default_opset
from ..graph.runtime import best_providers, session
from ..measure.quality import OutputKind, Quality, QualityProbe
from ..progress import Meter

PARAMETERS = ("all", "affine")
TRAINED_OPS = {  # op type -> (input positions whose initializers train, the filter axis of input 1 or None)
    "Conv": ((1, 2), 0),
    "ConvTranspose": ((1, 2), 1),
    "Gemm": ((1, 2), None),  # the filter axis follows transB
    "MatMul": ((1,), -1),
    "PRelu": ((1,), None),
    "BatchNormalization": ((1, 2), None),
    "Mul": ((0, 1), None),
    "Add": ((0, 1), None),
}


@dataclass(frozen=True)
class DistillSettings:
    """How long and how the student trains. Set `seconds`, `steps`, or both (whichever ends first)."""

    seconds: float | None = None
    steps: int | None = None
    batch: int | None = None  # None: by the input's size (`default_batch`)
    # Adam's step, as a share of each filter's RMS. ResNet-20 at 0.665 of the MACs, 150 steps of 64
    # views (least squares alone 78.8%): 5e-4 79.6%, 1e-3 79.9%, 2e-3 79.4%, 5e-3 78.8%, 1e-2 78.45%,
    # 3e-2 diverges. EfficientNet-Lite0 at 2e-3 fell from 80.2% to 66.4% in its first 39 steps; at
    # 3e-4 for 60 minutes it and the YOLOv8n fell less early on but ended no better than at 1e-3.
    lr: float = 1e-3
    # Classifiers' softening. ResNet-56 at 0.549 of the MACs, 20 minutes with cutmix: 1 gave 81.64%
    # top-1 (the lowest held-out KL, 0.271, of any run), 4 81.96%, 2 82.00-82.27% (four runs).
    temperature: float = 2.0
    parameters: str = "all"  # all kept weights, or "affine": one scale per filter and the biases
    evaluations: int = 12  # held-out checks over the budget
    # Weight of a term on the residual trunks (the outputs of the Adds joining residual branches,
    # where the prune left their shape as it was), shared among them; 0: the outputs alone. ResNet-20
    # at 0.665 of the MACs, 400 steps: 1.0 gave 79.1% top-1, 0 79.45% (least squares alone 78.8%).
    trunks: float = 0.0
    # Weight of a term on the feature maps a global pooling reads (the original's last features,
    # where the prune left their shape), shared among them: mimicking them taught pruned nets more
    # than the outputs alone from few images (MiR, Wang et al., CVPR 2022). 0: the outputs alone.
    # EfficientNet-Lite0 at 0.778 of the MACs, 60 minutes with cutmix: held-out KL 0.247 -> 0.226 and
    # 81.6% top-1, where without it no checkpoint beat the start (80.2%); ResNet-56 at 0.549, 20
    # minutes: 82.11%, inside the 82.00-82.27% of the runs without it.
    features: float = 1.0
    augment: Augment | None = None  # None: by the outputs' kind (`augment_for`)
    # Train on views this share of the input's height and width (`view_shape`): a step costs about
    # its square, so the budget holds more of them; the held-out checks and the returned model run
    # at the input's size. Training below the test size also undoes random crops' zoom (Touvron et
    # al., "Fixing the train-test resolution discrepancy", NeurIPS 2019). EfficientNet-Lite0 at 0.778,
    # 60 minutes at 160×160: 1.7x the steps, held-out KL at 224×224 as low as at full size (0.220
    # against 0.211), agreement under the start's: no gain, hence off by default.
    scale: float = 1.0
    # Match the probabilities of a Sigmoid that is a dense output, or a part of one joined by a Concat
    # over the channels (a detector's class scores), on its logits by the binary KL divergence, each
    # channel over the divergence of its mean (as the squared error is over the variance): its
    # gradient, the difference of the probabilities, does not vanish where the student's sigmoid
    # saturates on a score the original gives, as the squared error's does. The YOLOv8n at 0.695, 60
    # minutes: class R² 0.756 against 0.717 (0.790 against 0.713 with the trunk term), but 65% of the
    # detections kept with 33% extra against 71% and 27% (67%/33% against 75%/24%): off by default.
    sigmoid_logits: bool = False
    # Also train on the built-in synthetic images (refined by inverting the original where it can
    # be), beside the calibration data: views of classes the user's images may lack.
    synthetic: bool = False
    warmup: float = 0.03  # share of the budget over which the step rises to lr
    # The held-out checks score, and the returned model takes, an exponential moving average of the
    # weights over about this share of the budget's steps (0: the weights as trained).
    average: float = 0.0
    # Pull each weight back toward its value before training, apart from Adam (AdamW's decay, but
    # toward the start: L2-SP, Li et al., ICML 2018): each step takes lr × anchor of its distance
    # from the start, so where the loss keeps pushing, a weight settles within about 1 / anchor of
    # its filter's RMS. ResNet-56 at 0.549, 20 minutes with cutmix: at 5, 81.66% top-1 and held-out
    # KL 0.312, against 82.00-82.27% and 0.283-0.299 without: 0, no pull.
    anchor: float = 0.0
    # The teacher answers each view by the mean of its answers on the view and on its mirror image (a
    # map's answer mirrored back): a target that treats both sides alike, for the many views of few
    # images. Costs a second teacher pass a step. Classifiers only (logits, and maps like the pooled one).
    # ResNet-56 at 0.549, 20 minutes with cutmix: 81.67% top-1 against 82.00-82.27% without: off.
    mirrored_teacher: bool = False
    seed: int = 0
    provider: str | None = None

    @property
    def budget(self) -> str:
        parts = ([f"{_duration(self.seconds)}"] if self.seconds else []) + ([f"{self.steps} steps"] if self.steps
                                                                             else [])
        return " or ".join(parts)


@dataclass
class DistillReport:
    steps: int = 0
    views: int = 0
    images: int = 0
    seconds: float = 0.0
    provider: str = ""
    batch: int = 0
    parameters: str = "all"
    lr: float = 0.0  # the peak step, as a share of each filter's RMS
    average: float = 0.0  # the weights' moving average's window, as a share of the steps (0: none)
    mix: str = ""  # how two images made one view (Augment.mix)
    view_size: list[int] = field(default_factory=list)  # height, width of the views trained on
    trained_tensors: int = 0
    trained_values: int = 0  # the values the optimiser moves: one per filter for affine weights
    measure: str = ""  # what the held-out figure is, e.g. "top-1 agreement"
    before: float | None = None
    after: float | None = None
    divergence: str = ""  # the finer held-out measure that chooses the checkpoint, e.g. "KL divergence"
    divergence_before: float | None = None
    divergence_after: float | None = None
    best_step: int = 0
    curve: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss", "held_out", "divergence"}
    loss_on: list[str] = field(default_factory=list)  # tensors the loss is taken on, trunks and features aside
    trunks: int = 0  # residual trunks the loss also reads
    features: int = 0  # pooled feature maps the loss also reads
    logits: list[str] = field(default_factory=list)  # Sigmoid logits matched by the binary KL divergence
    note: str = ""  # why the loss moved off an output, or why nothing was kept
    images_per_second: float = 0.0
    data: str = ""  # what the views were made from, e.g. "800 calibration images"

    def summary(self) -> str:
        moved = (f"held-out {self.measure} {self.before:.3f} -> {self.after:.3f}" if self.before is not None
                 else "no held-out measure")
        if self.divergence_before is not None:
            moved += f", {self.divergence} {self.divergence_before:.4f} -> {self.divergence_after:.4f}"
        kept = "" if self.best_step or self.before is None else "; no checkpoint beat the start: the start is returned"
        size = "×".join(map(str, self.view_size))
        line = (f"{self.steps:,} steps, {self.views:,} augmented {size} views of {self.data}, "
                f"{_duration(self.seconds)} on {self.provider} ({self.images_per_second:.1f} views/s); {moved}{kept}")
        return line + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def parse_duration(text: str) -> float:
    """Seconds in '15m', '90s', '1h30m', '2h' or a plain number of seconds; ValueError otherwise."""
    text = str(text).strip().lower()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    total, number = 0.0, ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        elif char in "hms" and number:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
        else:
            raise ValueError(f"'{text}' is not a duration such as 15m, 90s or 1h30m")
    if number:
        raise ValueError(f"'{text}' is not a duration such as 15m, 90s or 1h30m")
    return total


def augment_for(settings: DistillSettings, kinds: dict[str, OutputKind]) -> Augment:
    """The settings' augmentation, or by the outputs' kind: cutmix where a classifier answers, else mixup.

    Distilling ResNet-56 at 0.549 of the MACs for 20 minutes, cutmix reached held-out KL 0.287-0.299
    (three runs) where mixup reached 0.303-0.320 (four), and 81.89-82.27% top-1 against 81.70-81.84%;
    EfficientNet-Lite0 (60 minutes) ended at held-out KL 0.254 against 0.275. The YOLOv8n at 0.695
    (60 minutes) kept 67% of its detections with 31% extra and class R² 0.523 with cutmix, against
    71%, 27% and 0.717 with mixup.
    """
    if settings.augment is not None:
        return settings.augment
    return Augment(mix="cutmix" if any(k.kind == "classifier" for k in kinds.values()) else "mixup")


def default_batch(shape: tuple[int, ...]) -> int:
    """Views per step: 64 for CIFAR-sized inputs, 16 at 224×224, 8 at 320×320 and above."""
    pixels = int(np.prod(shape[1:])) / min(shape[1:])  # per channel, whichever axis holds them
    return int(np.clip(2 ** round(math.log2(16 * 224 * 224 / pixels)), 8, 64))


def view_shape(shape: tuple[int, ...], scale: float, channels_last: bool = False) -> tuple[int, ...]:
    """The input's shape with its height and width times `scale`: rounded to multiples of 32 where the input's
    are (strided nets' feature maps then join as at full size), else to whole pixels."""
    axes = (1, 2) if channels_last else (2, 3)
    out = list(shape)
    for axis in axes:
        side = shape[axis]
        out[axis] = max(32, 32 * round(side * scale / 32)) if side % 32 == 0 else max(1, round(side * scale))
    return tuple(out)


def distill(original: onnx.ModelProto, student: onnx.ModelProto, calibration: Calibration | None,
            probe: QualityProbe, input_shapes: dict[str, tuple[int, ...]], settings: DistillSettings,
            preprocess: Preprocess | None = None, progress: bool = False,
            on_checkpoint=None, synthetic: Samples | None = None) -> tuple[onnx.ModelProto, DistillReport]:
    """`student` trained towards `original` on augmented views of the calibration's fitting samples.

    Image files are read again for every view (`calibration.fit_paths`); other samples are cropped
    and mixed as arrays. `synthetic` samples (the built-in images, `DistillSettings.synthetic`), if
    given, join the pool. The probe's held-out samples choose the checkpoint returned.
    `on_checkpoint(point, model)`, if given, sees every evaluated checkpoint (its time is not
    counted against the budget): benchmarks measure accuracy along the way with it.
    """
    if calibration is None:
        raise UserInputError("distillation needs calibration data: give --calib DIR (or allow the synthetic images)")
    if len(input_shapes) != 1:
        raise UserInputError("distillation takes models with one input (an image batch)")
    name, shape = next(iter(input_shapes.items()))
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise UserInputError(f"distillation needs an image input of static size, not '{name}' {tuple(shape)}; "
                             "give --input-shape")
    if settings.parameters not in PARAMETERS:
        raise UserInputError(f"--distill-parameters must be one of {', '.join(PARAMETERS)}")
    if calibration.fit_paths is not None:
        paths, arrays = list(calibration.fit_paths), None
        data = f"{len(paths):,} calibration images"
    else:
        paths, arrays = None, calibration.fit[name]  # read a sample at a time
        data = f"{len(arrays):,} " + ("synthetic images" if calibration.synthetic else "calibration samples")
    if synthetic is not None and len(synthetic):
        arrays = synthetic if arrays is None else Joined(arrays, synthetic)
        data += f" and {len(synthetic):,} built-in synthetic images"
    settings = replace(settings, batch=settings.batch or default_batch(shape))  # by the input's size, not the views'
    channels_last = preprocess is not None and preprocess.layout == "NHWC"
    views = Views(name, view_shape(shape, settings.scale, channels_last), preprocess, paths=paths, arrays=arrays,
                  augment=augment_for(settings, probe.kinds), seed=settings.seed)
    meter = Meter(progress, f"distilling ({settings.budget})")
    distiller = Distiller(original, student, views, probe, settings, progress=meter, on_checkpoint=on_checkpoint,
                          data=data)
    try:
        model = distiller.run()
    except NoGradient as err:
        raise UserInputError(f"cannot distil this model: {err}") from None
    finally:
        meter.close()
    return model, distiller.report


# ---- the training model ---------------------------------------------------------------------------------------------
@dataclass
class _Target:
    tensor: str  # the tensor the loss reads, in the student and in the teacher alike
    kind: OutputKind
    weights: np.ndarray | None = None  # dense: 1 / channel variance (logits: 1 / mean's divergence), broadcastable
    scale: float = 1.0  # the term's weight in the loss
    # or "trunk" (a residual join), "features" (a map a global pooling reads) or "logits" (a Sigmoid's
    # input in an output, matched by the binary KL divergence of the probabilities)
    role: str = "output"

    @property
    def binary(self) -> bool:
        return self.role == "logits"


@dataclass
class _Parameter:
    name: str
    value: np.ndarray  # the current value (float32)
    scale: np.ndarray  # Adam's step multiplier: the filter's (or the vector's) RMS, broadcastable
    filter_axis: int | None  # the axis of the filters, None for a bias-like vector
    affine: bool  # trained as one scale per filter (the weights' directions kept)
    first: np.ndarray = None
    second: np.ndarray = None
    average: np.ndarray | None = None  # the moving average of `value` (DistillSettings.average)
    start: np.ndarray | None = None  # the value before training (DistillSettings.anchor)


def trainable(model: onnx.ModelProto) -> dict[str, int | None]:
    """Initializer name -> its filter axis (None: trained as a vector), for the weights distillation trains.

    Float initializers read at the positions `TRAINED_OPS` lists (per-channel Mul/Add constants, not
    scalars); the same set for `parameters="affine"`, which scales their filters instead of moving them.
    """
    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    found = {}
    for node in model.graph.node:
        positions, axis = TRAINED_OPS.get(node.op_type, ((), None))
        for k in positions:
            if k >= len(node.input) or node.input[k] not in inits:
                continue
            name = node.input[k]
            dims = tuple(inits[name].dims)
            if node.op_type in ("Mul", "Add") and int(np.prod(dims)) <= 1:
                continue  # a scalar constant (x * 0.5): part of the function, not a per-channel parameter
            if k == 1 and node.op_type == "Gemm":
                axis = 0 if attribute(node, "transB", 0) else 1
            found[name] = (axis % len(dims)) if k == 1 and axis is not None and len(dims) >= 2 else None
    return found


def training_model(student: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], targets: list[_Target],
                   wrt: list[str], temperature: float) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The student at a fixed batch with `wrt` as inputs, teacher targets as inputs, and the gradients as outputs.

    Inputs `target__<k>` hold, for classifier k, the teacher's probabilities at `temperature`; for a
    dense target, the teacher's values, and `weight__<k>` 2 / (channel variance · values per batch);
    for logits, the teacher's probabilities, and `weight__<k>` the channels' weights / values per batch.
    Returns the model and wrt name -> gradient output name.
    """
    model = with_batch(student, input_shapes)
    graph = model.graph
    _pads_into_convs(graph, {t.tensor for t in targets})
    moved = {t.name: t for t in graph.initializer if t.name in set(wrt)}
    kept = [t for t in graph.initializer if t.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = {i.name for i in graph.input}
    for name, tensor in moved.items():
        if name not in inputs:
            graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    model.ir_version = max(model.ir_version, 4)  # inputs that are not initializers
    shapes = static_shapes(model)
    opset = default_opset(model, 13)
    seeds, nodes, inits = {}, [], []
    for k, target in enumerate(targets):
        shape = shapes[target.tensor]
        feed = f"target__{k}"
        graph.input.append(helper.make_tensor_value_info(feed, onnx.TensorProto.FLOAT, list(shape)))
        diff = f"distill__diff_{k}"
        if target.kind.kind == "classifier":
            scaled = f"distill__scaled_{k}"
            inits.append(numpy_helper.from_array(np.array(1 / temperature, np.float32), f"distill__inv_t_{k}"))
            nodes.append(helper.make_node("Mul", [target.tensor, f"distill__inv_t_{k}"], [scaled]))
            soft = f"distill__soft_{k}"
            axis = target.kind.axis
            if opset < 13 and axis != len(shape) - 1:
                raise NoGradient(f"a softmax over axis {axis} needs opset 13")
            nodes.append(helper.make_node("Softmax", [scaled], [soft], axis=axis))
            nodes.append(helper.make_node("Sub", [soft, feed], [diff]))
            rows = int(np.prod(shape)) // shape[axis]
            factor = np.array(temperature / rows, np.float32)  # d(T² KL)/dz = T (p_s - p_t), mean over rows
            inits.append(numpy_helper.from_array(factor, f"weight__{k}"))
        else:
            compared = target.tensor
            if target.binary:  # d KL(p_t || sigmoid(z)) / dz = sigmoid(z) - p_t
                compared = f"distill__probability_{k}"
                nodes.append(helper.make_node("Sigmoid", [target.tensor], [compared]))
            nodes.append(helper.make_node("Sub", [compared, feed], [diff]))
            weight = [1] * len(shape)
            weight[target.kind.axis] = shape[target.kind.axis]
            graph.input.append(helper.make_tensor_value_info(f"weight__{k}", onnx.TensorProto.FLOAT, weight))
        nodes.append(helper.make_node("Mul", [diff, f"weight__{k}"], [f"distill__seed_{k}"]))
        seeds[target.tensor] = f"distill__seed_{k}"
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    grads = backpropagate(model, seeds, wrt, static_shapes(model))
    outputs = {}
    for name, grad in grads.items():
        out = f"grad__{name}"
        graph.node.append(helper.make_node("Identity", [grad], [out]))
        graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, list(shapes[name])))
        outputs[name] = out
    known = {o.name for o in graph.output}
    for target in targets:
        if target.tensor not in known:
            graph.output.append(helper.make_tensor_value_info(target.tensor, onnx.TensorProto.FLOAT,
                                                              list(shapes[target.tensor])))
    return model, outputs


def _pads_into_convs(graph: onnx.GraphProto, kept: set[str]) -> None:
    """Fold zero spatial Pads read only by Convs into the Convs' own pads (TF-style exports pad
    apart): the training graph then neither pads nor slices the padding off the gradient, and the
    weight gradient's unfolding pads as it goes. EfficientNet-Lite0's 17 Pads took 14% of its step."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    kept = kept | {o.name for o in graph.output}
    folded = []
    for node in graph.node:
        pads = _zero_spatial_pads(node, values)
        convs = readers.get(node.output[0], []) if pads is not None else []
        if not convs or node.output[0] in kept or any(
                c.op_type != "Conv" or list(c.input).count(node.output[0]) != 1 or c.input[0] != node.output[0]
                or attribute(c, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for c in convs):
            continue
        for conv in convs:
            own = attribute(conv, "pads", [0] * len(pads))
            conv.input[0] = node.input[0]
            _set_ints(conv, "pads", [int(a) + int(b) for a, b in zip(own, pads)])
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    gone = {node.output[0] for node in folded}
    infos = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _zero_spatial_pads(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[int] | None:
    """A Pad's non-negative pads over the spatial axes in Conv's order (begins, then ends), or None
    where it pads with anything but zeros, over the batch or channel axes, or not by constants."""
    if node.op_type != "Pad" or attribute(node, "mode", b"constant") not in (b"constant", "constant"):
        return None
    if len(node.input) > 1:
        pads = values.get(node.input[1])
        fill = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        if pads is None or fill is None or (len(node.input) > 3 and node.input[3]):
            return None
    else:
        pads, fill = np.array(attribute(node, "pads", [])), np.array(attribute(node, "value", 0.0))
    rank = len(pads) // 2
    if rank < 3 or fill.size != 1 or float(fill) != 0 or (pads < 0).any() or pads[[0, 1, rank, rank + 1]].any():
        return None
    return [int(v) for v in pads[2:rank]] + [int(v) for v in pads[rank + 2:]]


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, values)])


# ---- the loop -------------------------------------------------------------------------------------------------------
class Distiller:
    """One student, its teacher and its data, ready to train for a budget."""

    def __init__(self, original: onnx.ModelProto, student: onnx.ModelProto, views, probe: QualityProbe,
                 settings: DistillSettings, progress=None, on_checkpoint=None, data: str | None = None):
        self.original, self.student, self.views, self.probe, self.settings = original, student, views, probe, settings
        self.progress, self.on_checkpoint = progress, on_checkpoint
        self.timer: _Budget | None = None
        self.providers = best_providers(settings.provider)
        self.batch = settings.batch or default_batch(views.shape)
        self.input = views.name
        self.report = DistillReport(provider=self.providers[0], batch=self.batch, parameters=settings.parameters,
                                    lr=settings.lr, average=settings.average,
                                    mix=views.augment.mix, view_size=list(views.size_hw),
                                    data=data or f"{views.count:,} samples")
        self.best_score: float | None = None
        self.best_fit: float | None = None  # the held-out divergence of the best checkpoint
        self.best_values: dict[str, np.ndarray] = {}
        self.checked = -1  # the last step scored
        self._shape_cache: tuple[dict, dict] | None = None

    def targets(self, names: list[str]) -> list[_Target]:
        """The loss's tensors: each output, or for a Softmax output the logits before it."""
        producers = {o: n for n in self.student.graph.node for o in n.output}
        targets = []
        for name in names:
            kind = self.probe.kinds.get(name) or OutputKind("dense", 1)
            if kind.kind in ("integer",):
                continue
            tensor = name
            node = producers.get(name)
            if kind.kind == "classifier" and node is not None and node.op_type in ("Softmax", "LogSoftmax"):
                tensor = node.input[0]
            if kind.kind == "scalar":
                kind = OutputKind("dense", 1)
            if kind.kind == "dense" and self.settings.sigmoid_logits:
                targets += self._sigmoid_parts(name, kind, producers)
            else:
                targets.append(_Target(tensor, kind))
        taken = {t.tensor for t in targets}
        for role, weight in (("trunk", self.settings.trunks), ("features", self.settings.features)):
            found = self._inner(role, taken) if weight else []
            targets += [_Target(name, OutputKind("dense", axis), scale=weight / len(found), role=role)
                        for name, axis in found]
            taken.update(name for name, _ in found)
        return targets

    def _sigmoid_parts(self, name: str, kind: OutputKind, producers: dict) -> list[_Target]:
        """A dense output's targets where a Sigmoid computes it, or some of the parts a Concat over its
        channels joins: the logits of those, each part weighted by its share of the channels."""
        node = producers.get(name)
        if node is not None and node.op_type == "Sigmoid":
            return [_Target(node.input[0], kind, role="logits")]
        shapes = self._shapes()[1]
        rank = len(shapes.get(name, ()))
        if node is None or node.op_type != "Concat" or not rank or attribute(node, "axis") % rank != kind.axis % rank:
            return [_Target(name, kind)]
        channels = shapes[name][kind.axis]
        parts = []
        for part in node.input:
            if len(shapes.get(part, ())) != rank:
                return [_Target(name, kind)]
            share = shapes[part][kind.axis] / channels
            source = producers.get(part)
            parts.append(_Target(source.input[0], kind, scale=share, role="logits")
                         if source is not None and source.op_type == "Sigmoid" else _Target(part, kind, scale=share))
        return parts if any(t.binary for t in parts) else [_Target(name, kind)]

    def _inner(self, role: str, taken: set[str]) -> list[tuple[str, int]]:
        """(tensor, channel axis) of the 4-D tensors the loss reads beside the outputs, where the prune left
        their shape as the original's: for "trunk" the outputs of Adds of two computed tensors (residual
        joins), for "features" the maps the head's global poolings read."""
        original, student = self._shapes()
        constants = {t.name for t in self.student.graph.initializer}
        if role == "trunk":
            found = [(n.output[0], 1) for n in self.student.graph.node
                     if n.op_type == "Add" and len(n.input) == 2 and not set(n.input) & constants]
        else:
            found = self._head_poolings(student)
        kept = {}
        for name, axis in found:
            if name not in taken and len(student.get(name, ())) == 4 and original.get(name) == student.get(name):
                kept.setdefault(name, axis)
        return list(kept.items())

    def _head_poolings(self, shapes: dict) -> list[tuple[str, int]]:
        """(map, channel axis) for each global pooling after which no spatial map is computed (the features
        a classifier's head reads; a squeeze-and-excitation block's pooling, whose gate scales a map, is not
        one): GlobalAveragePool and GlobalMaxPool, or ReduceMean and ReduceMax over the spatial axes of a
        4-D map, NCHW's (2, 3) or NHWC's (1, 2)."""
        graph = self.student.graph
        opset = default_opset(self.student, 1)
        found = []
        for node in graph.node:
            if not node.input or len(shapes.get(node.input[0], ())) != 4:
                continue
            if node.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
                axis = 1
            elif node.op_type in ("ReduceMean", "ReduceMax"):
                axes = reduced_axes(node, opset, 4, lambda name: constant_arrays(graph, [name]).get(name))
                axis = {(2, 3): 1, (1, 2): 3}.get(tuple(axes or ()))
            else:
                continue
            spatial = (shapes.get(t, ()) for t in self._computed_from(node.name or node.output[0]))
            if axis is not None and not any(len(shape) >= 3 and sum(d > 1 for d in shape[1:]) >= 2
                                            for shape in spatial):
                found.append((node.input[0], axis))
        return found

    def _shapes(self) -> tuple[dict, dict]:
        """Static shapes at batch 1 of the original's and the student's tensors."""
        if self._shape_cache is None:
            batch_one = {self.input: (1, *self.views.shape[1:])}
            self._shape_cache = (static_shapes(with_batch(self.original, batch_one)),
                                 static_shapes(with_batch(self.student, batch_one)))
        return self._shape_cache

    def run(self) -> onnx.ModelProto:
        s = self.settings
        timer = self.timer = _Budget(s, time.perf_counter())
        shape = (self.batch, *self.views.shape[1:])
        names = [o.name for o in self.student.graph.output]
        wanted = trainable(self.student)
        targets, train_model, grads = self._training(names, wanted, shape)
        teacher = with_batch(self._teacher_model(targets), {self.input: shape})  # at the views' size
        teacher_session = session(teacher, self.providers)
        train_session = session(train_model, self.providers, layouts=False)
        self._set_weights(targets, teacher_session)
        params = self._parameters(wanted, grads)
        self.report.trained_tensors = len(params)
        self.report.trained_values = int(sum(p.first.size for p in params))  # affine: the filters' scales
        self.report.loss_on = [t.tensor for t in targets if t.role == "output"]
        self.report.logits = [t.tensor for t in targets if t.binary]
        self.report.trunks = sum(t.role == "trunk" for t in targets)
        self.report.features = sum(t.role == "features" for t in targets)
        self.report.images = self.views.count
        self._check(params, 0, None)
        self.report.before, self.report.divergence_before = self.best_score, self.best_fit
        fetch = [grads[p.name] for p in params] + [t.tensor for t in targets]
        step, losses = 0, []
        checks = _checkpoints(s.evaluations)
        train_begin = timer.elapsed()
        for step in self._steps(timer):
            x = self.views.batch(self.batch)
            teacher_out = self._teach(teacher_session, targets, x)
            feeds = {self.input: x}
            for k, (target, value) in enumerate(zip(targets, teacher_out)):
                feeds[f"target__{k}"] = self._target_feed(target, value)
                if target.kind.kind != "classifier":
                    feeds[f"weight__{k}"] = _difference_weight(target, value.size)
            feeds.update({p.name: p.value for p in params})
            outs = train_session.run(fetch, feeds)
            fed = [feeds[f"target__{k}"] for k in range(len(targets))]
            losses.append(self._loss(targets, outs[len(params):], fed))
            progress = timer.progress(step)
            lr, decay = s.lr * _schedule(progress, s.warmup), _decay(s.average, step, progress)
            for p, grad in zip(params, outs[:len(params)]):
                _adam(p, grad, lr, step)
                if p.start is not None:
                    p.value -= (lr * s.anchor) * (p.value - p.start)
                if p.average is not None:
                    p.average *= decay
                    p.average += (1 - decay) * p.value
            if checks and progress >= checks[0]:
                while checks and progress >= checks[0]:
                    checks.pop(0)
                self._check(params, step, float(np.mean(losses)))
                losses = []
        elapsed = timer.elapsed() - train_begin
        self.report.steps = step
        self.report.views = step * self.batch
        self.report.images_per_second = round(self.report.views / max(elapsed, 1e-9), 2)
        if self.checked != step:
            self._check(params, step, float(np.mean(losses)) if losses else None)
        self.report.after, self.report.divergence_after = self.best_score, self.best_fit
        self.report.seconds = round(timer.elapsed(), 2)
        if self.best_score is None and self.best_fit is None:  # nothing to choose by: the training's last step
            self.report.note = "; ".join(filter(None, [self.report.note, "no held-out measure: the last step"]))
            return self._with_values(_weights(params))
        return self._with_values(self.best_values)

    def _teach(self, teacher_session, targets: list[_Target], x: np.ndarray) -> list[np.ndarray]:
        """The teacher's answers on the views `x`, averaged with those on their mirror images if asked."""
        names = [t.tensor for t in targets]
        answers = teacher_session.run(names, {self.input: x})
        if not self.settings.mirrored_teacher:
            return answers
        width = 2 if self.views.channels_last else 3
        mirrored = teacher_session.run(names, {self.input: np.ascontiguousarray(np.flip(x, width))})
        out = []
        for target, answer, other in zip(targets, answers, mirrored):
            if answer.ndim == 4:  # a map: its width axis is the one after the channels' (NCHW) or before (NHWC)
                other = np.flip(other, 3 if target.kind.axis % 4 == 1 else 2)
            elif answer.ndim != 2:
                raise ValueError(f"a mirrored teacher needs logits or maps; '{target.tensor}' has {answer.ndim} axes")
            out.append((answer + other) / 2)
        return out

    def _check(self, params: list[_Parameter], step: int, loss: float | None) -> None:
        """Score the current weights on the held-out samples; keep them if they are the best so far.

        Best is the lowest held-out divergence among the checkpoints whose quality figure is no
        lower than the start's: agreement on 200 samples moves in steps of 0.005 and, on ResNet-56,
        chose a checkpoint 0.6 point of eval top-1 below the last. Without a divergence (integer or
        scalar outputs only), the highest quality figure.
        """
        score, fit = self._evaluate(params, step, self.timer.elapsed(), loss)
        self.checked = step
        if step == 0 or self._better(score, fit):
            self.best_score, self.best_fit = score, fit
            self.best_values = {name: value.copy() for name, value in _weights(params).items()}
            self.report.best_step = step

    def _better(self, score: float | None, fit: float | None) -> bool:
        start = self.report.before
        if fit is not None and self.best_fit is not None:
            return fit < self.best_fit and (score is None or start is None or score >= start)
        return score is not None and (self.best_score is None or score > self.best_score)

    def _steps(self, timer):
        step = 0
        while not timer.done(step):
            step += 1
            yield step
            if self.progress is not None:
                self.progress.update(timer.progress(step), self._status())

    def _status(self) -> str:
        curve = self.report.curve
        if not curve or curve[-1]["held_out"] is None:
            return ""
        return f"held-out {self.report.measure} {curve[0]['held_out']:.3f} -> {curve[-1]['held_out']:.3f}"

    def _training(self, names: list[str], wanted: dict, shape):
        """The targets and the training model; an op with no rule moves the loss to the tensors it reads."""
        targets = self.targets(names)
        notes = []
        for _ in range(8):
            try:
                model, grads = training_model(self.student, {self.input: shape}, targets, list(wanted),
                                              self.settings.temperature)
                self.report.note = "; ".join(notes)
                return targets, model, grads
            except NoGradient as err:
                if not err.node:
                    raise
                moved = self._before(err.node)
                if not moved:
                    raise
                notes.append(f"{err}: the loss is taken on {', '.join(t.tensor for t in moved)}")
                targets = [t for t in targets if t.tensor not in {m.tensor for m in moved}
                           and not self._reaches(err.node, t.tensor)] + moved
        raise NoGradient("too many ops without a backward rule before the outputs")

    def _before(self, node_name: str) -> list[_Target]:
        """Dense targets on the float inputs of `node_name` that the prune left at the original's shape."""
        node = next(n for n in self.student.graph.node if (n.name or n.output[0]) == node_name)
        original_shapes, student_shapes = self._shapes()
        inits = {t.name for t in self.student.graph.initializer}
        moved = []
        for name in node.input:
            if not name or name in inits or name not in student_shapes.types or \
                    student_shapes.types.get(name) != onnx.TensorProto.FLOAT:
                continue
            if original_shapes.get(name) != student_shapes.get(name) or len(student_shapes.get(name, ())) < 2:
                continue
            moved.append(_Target(name, OutputKind("dense", 1)))
        return moved

    def _computed_from(self, node_name: str) -> set[str]:
        """The tensors computed from the outputs of `node_name` (the graph is in topological order)."""
        node = next(n for n in self.student.graph.node if (n.name or n.output[0]) == node_name)
        reached = set(node.output)
        for n in self.student.graph.node:
            if any(i in reached for i in n.input):
                reached.update(n.output)
        return reached

    def _reaches(self, node_name: str, tensor: str) -> bool:
        """Whether `tensor` is computed from the output of `node_name`."""
        return tensor in self._computed_from(node_name)

    def _teacher_model(self, targets: list[_Target]) -> onnx.ModelProto:
        model = onnx.ModelProto.FromString(self.original.SerializeToString())
        known = {o.name for o in model.graph.output}
        for t in targets:
            if t.tensor not in known:
                model.graph.output.append(helper.make_tensor_value_info(t.tensor, onnx.TensorProto.FLOAT, None))
        return model

    def _set_weights(self, targets: list[_Target], teacher_session) -> None:
        """Each dense target's 1 / channel variance, from the teacher on a few batches of views."""
        dense = [t for t in targets if t.kind.kind != "classifier"]
        if not dense:
            return
        samples = [teacher_session.run([t.tensor for t in dense], {self.input: self.views.batch(self.batch)})
                   for _ in range(max(1, 64 // self.batch))]
        for k, target in enumerate(dense):
            values = np.concatenate([run[k] for run in samples])
            axis = target.kind.axis % values.ndim
            moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
            if target.binary:  # the divergence of the channel's mean: what the variance is to the squared error
                p = _sigmoid(moved)
                spread = _binary_kl(p, p.mean(1, keepdims=True)).mean(1)
            else:
                spread = moved.var(1)
            floor = max(float(spread.max()) * 1e-6, 1e-12)
            shape = [1] * values.ndim
            shape[axis] = -1
            target.weights = (1.0 / np.maximum(spread, floor)).astype(np.float32).reshape(shape)


    def _target_feed(self, target: _Target, value: np.ndarray) -> np.ndarray:
        if target.binary:
            return _sigmoid(value.astype(np.float32))
        if target.kind.kind != "classifier":
            return np.ascontiguousarray(value, np.float32)
        scaled = value.astype(np.float32) / self.settings.temperature
        scaled = scaled - scaled.max(target.kind.axis, keepdims=True)
        e = np.exp(scaled)
        return (e / e.sum(target.kind.axis, keepdims=True)).astype(np.float32)

    def _loss(self, targets, student_out, fed) -> float:
        """One step's loss from the student's outputs and the targets fed (a classifier's already softened)."""
        total = 0.0
        for target, s, t in zip(targets, student_out, fed):
            if target.kind.kind == "classifier":
                temp, axis, p = self.settings.temperature, target.kind.axis, t
                log_q = s / temp - s.max(axis, keepdims=True) / temp
                log_q = log_q - np.log(np.exp(log_q).sum(axis, keepdims=True))
                kl = (p * (np.log(np.maximum(p, 1e-30)) - log_q)).sum(axis)
                total += float(temp * temp * kl.mean())
            elif target.binary:
                total += target.scale * float(np.mean(_binary_kl(t, _sigmoid(s)) * target.weights))
            else:
                total += target.scale * float(np.mean((s - t) ** 2 * target.weights))
        return total

    def _parameters(self, wanted: dict, grads: dict) -> list[_Parameter]:
        values = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in self.student.graph.initializer
                  if t.name in grads}
        params = []
        for name, value in values.items():
            axis = wanted.get(name)
            affine = self.settings.parameters == "affine" and axis is not None
            moment = np.zeros_like(value) if not affine else np.zeros(_filter_shape(value, axis), np.float32)
            params.append(_Parameter(name, value.copy(), _rms_scale(value, axis), axis, affine, moment,
                                     moment.copy(), value.copy() if self.settings.average else None,
                                     value.copy() if self.settings.anchor else None))
        return params

    def _with_values(self, values: dict[str, np.ndarray]) -> onnx.ModelProto:
        """The student's graph with new initializer values: names, shapes, opset and metadata unchanged."""
        model = onnx.ModelProto.FromString(self.student.SerializeToString())
        for k, tensor in enumerate(model.graph.initializer):
            if tensor.name in values:
                model.graph.initializer[k].CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
        return model

    def _evaluate(self, params, step: int, seconds: float, loss: float | None):
        """The held-out score of the current weights (mean over outputs of agreement or R²) and their
        divergence from the original there, recorded."""
        model = self._with_values(_weights(params))
        outputs = self.probe.outputs(model)
        quality = self.probe.measure(model, outputs)
        score, measure = _score(quality)
        fit = self.probe.divergence(outputs)
        self.report.measure, self.report.divergence = measure, self.probe.divergence_name
        self.report.curve.append({"step": step, "seconds": round(seconds, 2),
                                  "loss": None if loss is None else round(loss, 6),
                                  "held_out": None if score is None else round(score, 6),
                                  "divergence": None if fit is None else round(fit, 6)})
        if self.on_checkpoint is not None:
            begin = time.perf_counter()
            self.on_checkpoint(self.report.curve[-1], model)
            if self.timer is not None:
                self.timer.start += time.perf_counter() - begin
        return score, fit


def _score(quality: Quality) -> tuple[float | None, str]:
    """One number to choose checkpoints by: the mean of the outputs' agreement or R² (higher is better)."""
    rated = [q for q in quality.outputs.values() if q.value is not None and q.metric in ("agreement", "r2", "match")]
    if not rated:
        errors = [q for q in quality.outputs.values() if q.value is not None]
        return (-float(np.mean([q.value for q in errors])), "negated relative error") if errors else (None, "n/a")
    metrics = sorted({q.metric for q in rated})
    name = {"agreement": "top-1 agreement", "r2": "mean R²", "match": "exact match"}
    return float(np.mean([q.value for q in rated])), " and ".join(name[m] for m in metrics)


def _difference_weight(target: _Target, values: int) -> np.ndarray:
    """What multiplies a dense target's difference (the student's minus the teacher's, probabilities for
    logits) into the loss's gradient, for a batch of `values` values: the squared error's derivative
    doubles it, the binary divergence's is the difference itself."""
    return (1 if target.binary else 2) * target.scale * target.weights / values


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1 + np.tanh(0.5 * z))).astype(z.dtype)  # no overflow for large |z|


def _binary_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(q)), elementwise."""
    p, q = p.astype(np.float64), np.clip(q.astype(np.float64), 1e-12, 1 - 1e-12)
    return (np.where(p > 0, p * np.log(np.maximum(p, 1e-300) / q), 0)
            + np.where(p < 1, (1 - p) * np.log(np.maximum(1 - p, 1e-300) / (1 - q)), 0))


def _weights(params: list[_Parameter]) -> dict[str, np.ndarray]:
    """The weights a check scores and a checkpoint keeps: the moving average where there is one."""
    return {p.name: p.value if p.average is None else p.average for p in params}


def _rms_scale(value: np.ndarray, axis: int | None) -> np.ndarray:
    """Each filter's RMS along `axis` (a vector's own RMS otherwise), zero filters given their layer's."""
    whole = float(np.sqrt(np.mean(value.astype(np.float64) ** 2))) or 1e-2
    if axis is None or value.ndim < 2:
        return np.array(whole, np.float32)
    others = tuple(a for a in range(value.ndim) if a != axis)
    rms = np.sqrt(np.mean(value.astype(np.float64) ** 2, axis=others, keepdims=True))
    return np.where(rms > 0, rms, whole).astype(np.float32)


def _filter_shape(value: np.ndarray, axis: int) -> tuple[int, ...]:
    return tuple(size if a == axis else 1 for a, size in enumerate(value.shape))


def _adam(p: _Parameter, grad: np.ndarray, lr: float, step: int, b1: float = 0.9, b2: float = 0.999) -> None:
    if p.affine:
        others = tuple(a for a in range(grad.ndim) if a != p.filter_axis)
        grad = np.sum(grad * p.value, axis=others, keepdims=True)  # d loss / d log-scale of each filter
    p.first *= b1
    p.first += (1 - b1) * grad
    p.second *= b2
    p.second += (1 - b2) * grad * grad
    move = (p.first / (1 - b1 ** step)) / (np.sqrt(p.second / (1 - b2 ** step)) + 1e-12)
    if p.affine:
        p.value *= np.exp(-lr * move).astype(np.float32)
    else:
        p.value -= (lr * p.scale * move).astype(np.float32)


def _schedule(progress: float, warmup: float) -> float:
    """Linear warm-up, then half a cosine down to zero."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))))


def _decay(window: float, step: int, progress: float) -> float:
    """The moving average's decay at `step`: a time constant of `window` of the steps the budget will
    take (estimated from the share spent), and no longer than the steps taken so far allow."""
    steps = window * step / max(progress, 1e-9)
    return min(1 - 1 / max(steps, 1.0), (step + 1) / (step + 10))


def _checkpoints(count: int) -> list[float]:
    return [k / count for k in range(1, count)]


class _Budget:
    """Where a run stands against its time and step budget, as a share in [0, 1]."""

    def __init__(self, settings: DistillSettings, start: float):
        self.seconds, self.steps, self.start = settings.seconds, settings.steps, start
        self.step_seconds = 0.0
        self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        shares = []
        if self.seconds:
            shares.append(self.elapsed() / self.seconds)
        if self.steps:
            shares.append(step / self.steps)
        return min(1.0, max(shares) if shares else 1.0)

    def done(self, step: int) -> bool:
        now = time.perf_counter()
        if step:
            self.step_seconds = 0.8 * self.step_seconds + 0.2 * (now - self.last) if self.step_seconds else now - self.last
        self.last = now
        if self.steps and step >= self.steps:
            return True
        # stop one step early rather than overrun the time given
        return bool(self.seconds) and now - self.start + self.step_seconds > self.seconds

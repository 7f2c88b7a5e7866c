"""How close a pruned model's outputs stay to the original's, in measures people read.

Each output gets the measure that fits what it is:
- classifier (N×K with K ≥ 2, or the output of a Softmax/LogSoftmax along its axis): top-1
  agreement, the share of samples (positions) whose argmax is unchanged, and top-5 overlap;
- dense (detection heads, maps, embeddings, landmarks): per-channel explained variance
  R²_c = 1 - MSE_c / Var_c of the original's channel c (axis 1, or the last axis of a
  channels-last output), as the mean and the worst channel, so 18 class-score channels weigh
  as much as they are, not as little as their values beside 4 pixel-valued box channels;
- one value per sample: relative error; empty outputs: n/a; integer outputs: exact matches.
The cosine of the whole output is kept beside it, and every figure says what inputs it was on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph.constants import attribute, default_opset
from ..graph.runtime import run_model
from .validate import cosine

MIN_AGREEMENT = 0.9  # below these the summary warns that the model no longer does its job
MIN_R2 = 0.8
MIN_WORST_R2 = 0.5  # one channel this poor (a detector's class score) breaks what reads it
MAX_RELATIVE_ERROR = 0.1
_PASS_THROUGH = ("Identity", "Cast")  # ops between a Softmax and the graph output that keep its meaning
# Synthetic images are not the user's data: on EfficientNet-Lite0 without --calib the agreement on
# held-out refined images read 0.59 where ImageNet images gave 0.70 (on plain dead leaves held out
# instead: 0.03 against 0.70; benchmarks/results/honest_quality.md). Said beside every such figure.
SYNTHETIC_CAVEAT = ("note: quality was measured on synthetic images, not on your data; it can be far from what "
                    "real inputs give (EfficientNet-Lite0: agreement 0.59 on synthetic images, 0.70 on ImageNet). "
                    "Give --calib DIR to fit and measure on real inputs, or --eval DIR for top-1.")


@dataclass(frozen=True)
class OutputKind:
    kind: str  # "classifier", "dense", "scalar", "integer"
    axis: int = 1  # the class axis (classifier) or the channel axis (dense)


@dataclass
class OutputQuality:
    kind: str
    metric: str  # "agreement", "r2", "relative_error", "match", or "n/a"
    value: float | None  # None: n/a
    cosine: float | None
    details: dict = field(default_factory=dict)  # top5, r2_worst, r2_worst_channel, why n/a

    @property
    def ok(self) -> bool:
        if self.value is None:
            return True
        if self.metric == "agreement":
            return self.value >= MIN_AGREEMENT
        if self.metric == "r2":
            return self.value >= MIN_R2 and self.details["r2_worst"] >= MIN_WORST_R2
        if self.metric == "relative_error":
            return self.value <= MAX_RELATIVE_ERROR
        return self.value >= MIN_AGREEMENT  # match

    def describe(self) -> str:
        if self.value is None:
            return f"n/a ({self.details.get('why', 'no value')})"
        if self.metric == "agreement":
            top5 = self.details.get("top5")
            return f"top-1 agreement {self.value:.3f}" + ("" if top5 is None else f", top-5 overlap {top5:.3f}")
        if self.metric == "r2":
            return (f"R² mean {self.value:.3f}, worst {self.details['r2_worst']:.3f} "
                    f"(channel {self.details['r2_worst_channel']})")
        if self.metric == "relative_error":
            return f"relative error {self.value:.4f}"
        return f"exact match {self.value:.3f}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "metric": self.metric,
                "value": None if self.value is None else round(self.value, 6),
                "cosine": None if self.cosine is None else round(self.cosine, 6),
                **{k: round(v, 6) if isinstance(v, float) else v for k, v in self.details.items()}}


@dataclass
class Quality:
    outputs: dict[str, OutputQuality]
    on: str  # what inputs it was measured on

    @property
    def worst(self) -> tuple[str, OutputQuality] | None:
        """The output furthest below its threshold (or nearest to it), None when nothing has a value."""
        rated = [(name, q) for name, q in self.outputs.items() if q.value is not None]
        return min(rated, key=lambda item: _margin(item[1]), default=None)

    @property
    def ok(self) -> bool:
        return all(q.ok for q in self.outputs.values())

    def headline(self) -> dict[str, float | None]:
        return {name: q.value for name, q in self.outputs.items()}

    def to_dict(self) -> dict:
        return {name: q.to_dict() for name, q in self.outputs.items()}

    def warning(self, own_data: bool = False, on: str | None = None) -> str | None:
        """One line for stderr when an output falls below its threshold, else None.

        `own_data`: measured on the user's calibration data, so more of it is not the fix. `on`: a
        shorter name for the samples than `self.on`, where the summary has just said what they are.
        """
        failing = [(name, q) for name, q in self.outputs.items() if not q.ok]
        if not failing:
            return None
        name, q = min(failing, key=lambda item: _margin(item[1]))
        what = {"agreement": "predictions change on many inputs", "r2": "its values no longer follow the original's",
                "relative_error": "its values drift", "match": "its values change"}[q.metric]
        floor = "--min-r2" if q.metric == "r2" else "--min-agreement"
        fix = f"Prune less (a larger --target-macs, or {floor})" if own_data else \
            "Add --calib DIR (a few hundred images like the deployment data) or prune less"
        return f"warning: output '{name}' {q.describe()} on {on or self.on}: {what}. {fix}."


def _margin(q: OutputQuality) -> float:
    """How far above its threshold an output is, in the threshold's own units (negative: below)."""
    if q.metric == "r2":
        return min(q.value - MIN_R2, q.details["r2_worst"] - MIN_WORST_R2)
    if q.metric == "relative_error":
        return MAX_RELATIVE_ERROR - q.value
    return q.value - MIN_AGREEMENT


def output_kinds(model: onnx.ModelProto, reference: dict[str, np.ndarray]) -> dict[str, OutputKind]:
    """What each graph output is, from the op that makes it and its shape on `reference`."""
    producers = {name: node for node in model.graph.node for name in node.output}
    opset = default_opset(model, 13)
    kinds = {}
    for name, value in reference.items():
        node = producers.get(name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producers.get(node.input[0])
        rank = value.ndim
        if not np.issubdtype(value.dtype, np.floating):
            kinds[name] = OutputKind("integer")
        elif node is not None and node.op_type in ("Softmax", "LogSoftmax") and rank >= 2:
            axis = attribute(node, "axis", -1 if opset >= 13 else 1)
            kinds[name] = OutputKind("classifier", axis % rank)
        elif rank <= 1 or int(np.prod(value.shape[1:])) == 1:  # shape, not value[0]: N may be 0
            kinds[name] = OutputKind("scalar")
        elif rank == 2:
            kinds[name] = OutputKind("classifier", 1)
        else:
            last = node is not None and node.op_type == "Transpose" and _channels_last(node, rank)
            kinds[name] = OutputKind("dense", rank - 1 if last else 1)
    return kinds


def _channels_last(node: onnx.NodeProto, rank: int) -> bool:
    perm = attribute(node, "perm", None)
    return perm is not None and len(perm) == rank and perm[-1] == 1


def compare(reference: np.ndarray, candidate: np.ndarray, kind: OutputKind) -> OutputQuality:
    """The measure of one output, `candidate` against `reference` (samples on axis 0)."""
    if reference.size == 0:
        return OutputQuality(kind.kind, "n/a", None, None, {"why": "empty on these inputs"})
    if kind.kind == "integer":
        return OutputQuality(kind.kind, "match", float(np.mean(reference == candidate)), None)
    cos = cosine(reference, candidate)
    if kind.kind == "classifier":
        value, top5 = _agreement(reference, candidate, kind.axis)
        rows = reference.size // reference.shape[kind.axis]
        details = {"rows": rows, **({} if top5 is None else {"top5": top5})}
        return OutputQuality(kind.kind, "agreement", value, cos, details)
    if kind.kind == "scalar":
        scale = np.linalg.norm(reference.astype(np.float64))
        if scale == 0:
            return OutputQuality(kind.kind, "n/a", None, cos, {"why": "zero on these inputs"})
        error = np.linalg.norm(reference.astype(np.float64) - candidate) / scale
        return OutputQuality(kind.kind, "relative_error", float(error), cos)
    r2 = channel_r2(reference, candidate, kind.axis)
    if r2 is None:
        return OutputQuality(kind.kind, "n/a", None, cos, {"why": "constant on these inputs"})
    worst = int(np.nanargmin(r2))
    return OutputQuality(kind.kind, "r2", float(np.nanmean(r2)), cos,
                         {"r2_worst": float(r2[worst]), "r2_worst_channel": worst, "channels": int(len(r2))})


def _agreement(reference: np.ndarray, candidate: np.ndarray, axis: int) -> tuple[float, float | None]:
    a = np.moveaxis(reference, axis, -1).reshape(-1, reference.shape[axis])
    b = np.moveaxis(candidate, axis, -1).reshape(-1, reference.shape[axis])
    top1 = float(np.mean(a.argmax(1) == b.argmax(1)))
    if a.shape[1] <= 5:
        return top1, None
    top_a, top_b = np.argsort(-a, 1)[:, :5], np.argsort(-b, 1)[:, :5]
    overlap = np.mean([len(np.intersect1d(x, y)) / 5 for x, y in zip(top_a, top_b)])
    return top1, float(overlap)


def channel_r2(reference: np.ndarray, candidate: np.ndarray, axis: int) -> np.ndarray | None:
    """R² of every channel along `axis` (NaN for channels constant on these inputs); None if all are."""
    a = np.moveaxis(reference, axis, 0).reshape(reference.shape[axis], -1).astype(np.float64)
    b = np.moveaxis(candidate, axis, 0).reshape(reference.shape[axis], -1).astype(np.float64)
    var = a.var(axis=1)
    mse = ((a - b) ** 2).mean(axis=1)
    live = var > 1e-12 * max(float(var.max()), 1e-30)
    if not live.any():
        return None
    return np.where(live, 1.0 - mse / np.where(live, var, 1.0), np.nan)


def damage(reference: list[np.ndarray], candidate: list[np.ndarray], kinds: list[OutputKind]) -> float:
    """A smooth loss for the allocator: 1 - mean R² of dense outputs, 1 - cosine of the others.

    Agreement on a few hundred samples moves in coarse steps and hardly sees one group pruned
    alone; for classifiers the cosine of the logits is its smooth stand-in.
    """
    losses = []
    for a, b, kind in zip(reference, candidate, kinds):
        if a.size == 0 or kind.kind == "integer":
            continue
        r2 = channel_r2(a, b, kind.axis) if kind.kind == "dense" else None
        losses.append(1.0 - float(np.nanmean(r2)) if r2 is not None else 1.0 - cosine(a, b))
    return float(np.mean(losses)) if losses else 0.0


class QualityProbe:
    """The original's outputs on fixed inputs, computed once; `measure` compares any candidate."""

    def __init__(self, original: onnx.ModelProto, feeds: dict[str, np.ndarray], on: str, chunk: int):
        self.names = [o.name for o in original.graph.output]
        self.feeds, self.on, self.chunk = feeds, on, chunk
        self.reference = dict(zip(self.names, run_model(original, feeds, chunk)))
        self.kinds = output_kinds(original, self.reference)
        self._last: tuple[onnx.ModelProto, Quality] | None = None

    def outputs(self, candidate: onnx.ModelProto) -> dict[str, np.ndarray]:
        return dict(zip(self.names, run_model(candidate, self.feeds, self.chunk)))

    def measure(self, candidate: onnx.ModelProto, outputs: dict[str, np.ndarray] | None = None) -> Quality:
        """`candidate`'s quality; `outputs`, if given, are its outputs on these inputs, already computed."""
        if self._last is not None and self._last[0] is candidate:  # recovery measured it already
            return self._last[1]
        outputs = outputs if outputs is not None else self.outputs(candidate)
        quality = Quality({name: compare(self.reference[name], outputs[name], self.kinds[name])
                           for name in self.names}, self.on)
        self._last = candidate, quality
        return quality

    def divergence(self, outputs: dict[str, np.ndarray]) -> float | None:
        """`divergence` of a candidate's `outputs` on these inputs from the original's."""
        return divergence([self.reference[n] for n in self.names], [outputs[n] for n in self.names],
                          [self.kinds[n] for n in self.names])

    @property
    def divergence_name(self) -> str:
        """What `divergence` is for these outputs, e.g. "KL divergence"."""
        found = {kind.kind for kind in self.kinds.values()}
        return " and ".join(name for kind, name in (("classifier", "KL divergence"), ("dense", "1 - R²"))
                            if kind in found)


def divergence(reference: list[np.ndarray], candidate: list[np.ndarray], kinds: list[OutputKind]) -> float | None:
    """How far `candidate` answers from `reference`, finely: the mean over outputs of a classifier's
    KL divergence (the reference's distribution against the candidate's) and a dense output's
    1 - mean R². Unlike agreement on a few hundred samples, it moves with every small change."""
    losses = []
    for a, b, kind in zip(reference, candidate, kinds):
        if a.size == 0 or kind.kind in ("integer", "scalar"):
            continue
        if kind.kind == "classifier":
            p, log_q = _log_probabilities(a, kind.axis), _log_probabilities(b, kind.axis)
            losses.append(float((np.exp(p) * (p - log_q)).sum(kind.axis).mean()))
        else:
            r2 = channel_r2(a, b, kind.axis)
            if r2 is not None:
                losses.append(1.0 - float(np.nanmean(r2)))
    return float(np.mean(losses)) if losses else None


def _log_probabilities(values: np.ndarray, axis: int) -> np.ndarray:
    """Log-probabilities from a classifier's output: probabilities already (a Softmax's), or logits."""
    values = values.astype(np.float64)
    if values.min() >= 0 and np.allclose(values.sum(axis), 1.0, atol=1e-3):
        return np.log(np.maximum(values, 1e-30))
    shifted = values - values.max(axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis, keepdims=True))

"""What each ONNX op does to the channel axis (axis 1, NCHW), as data.

Every op type maps to a rule kind; `dependency` says how each kind propagates and couples
channels, `surgery` how it is rewritten. Ops absent from this table block pruning of every
channel they touch, with the op type as the reason: never guess.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    kind: str
    params: tuple[int, ...] = ()  # inputs holding one value per channel, sliced with the channels
    reason: str = ""  # for blockers: why the channels cannot be removed


_ELEMENTWISE = (
    "Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Gelu Mish "
    "ThresholdedRelu Identity Dropout Cast Erf Exp Log Abs Neg Sqrt Reciprocal Floor Ceil Round Sign "
    "Sin Cos IsNaN IsInf Not"
).split()
POOLS = tuple("MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split())
_BROADCAST = "Add Sub Mul Div Max Min Sum Mean Pow Where Equal Greater Less GreaterOrEqual LessOrEqual And Or".split()
_REDUCE = "ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceSumSquare".split()

RULES: dict[str, Rule] = {
    **{op: Rule("elementwise") for op in _ELEMENTWISE + list(POOLS)},
    "PRelu": Rule("elementwise", params=(1,)),
    "BatchNormalization": Rule("elementwise", params=(1, 2, 3, 4)),
    "InstanceNormalization": Rule("elementwise", params=(1, 2)),
    **{op: Rule("broadcast") for op in _BROADCAST},
    **{op: Rule("reduce") for op in _REDUCE},
    "Conv": Rule("conv"),
    "ConvTranspose": Rule("conv_transpose"),
    "Resize": Rule("resize"),
    "Upsample": Rule("resize"),
    "Pad": Rule("pad"),
    "Concat": Rule("concat"),
    "Split": Rule("split"),
    "Slice": Rule("slice"),
    "Flatten": Rule("flatten"),
    "Reshape": Rule("reshape"),
    "Gemm": Rule("gemm"),
    "MatMul": Rule("matmul"),
    "Transpose": Rule("transpose"),
    "Squeeze": Rule("squeeze"),
    "Unsqueeze": Rule("squeeze"),
    "Softmax": Rule("softmax"),
    "LogSoftmax": Rule("softmax"),
    "Hardmax": Rule("softmax"),
    "LayerNormalization": Rule("layernorm"),
    "Shape": Rule("shape_only"),
    "Size": Rule("shape_only"),
    "LRN": Rule("blocker", reason="LRN mixes neighbouring channels"),
    "GroupNormalization": Rule("groupnorm"),
    "MeanVarianceNormalization": Rule("blocker", reason="MeanVarianceNormalization may normalise across channels"),
    "DepthToSpace": Rule("blocker", reason="DepthToSpace moves channels into space"),
    "SpaceToDepth": Rule("blocker", reason="SpaceToDepth moves space into channels"),
    "Gather": Rule("blocker", reason="Gather may index channels"),
    "ArgMax": Rule("blocker", reason="ArgMax may reduce over channels"),
    "TopK": Rule("blocker", reason="TopK may select across channels"),
    "Einsum": Rule("blocker", reason="Einsum may contract channels"),
}


def rule_for(op: str) -> Rule:
    return RULES.get(op) or Rule("blocker", reason=f"unknown op {op}")


def node_rule(node) -> Rule:
    """A node's rule; ops of other domains are unknown even when they borrow a standard name."""
    domain = getattr(node, "domain", "") or ""
    if domain not in ("", "ai.onnx"):
        return Rule("blocker", reason=f"unknown op {domain}.{node.op}")
    return rule_for(node.op)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# Consumers read channels through a weight: (weight input index, weight axis indexed by input channel).
def consumer_weight_axis(node) -> tuple[int, int] | None:
    """Where a consumer node's weight is indexed by the channels of its activation input."""
    if node.op == "Conv":
        return 1, 1
    if node.op == "ConvTranspose":
        return 1, 0
    if node.op == "Gemm":
        return 1, 1 if node.attrs.get("transB", 0) else 0
    if node.op == "MatMul":
        return 1, 0
    return None


def param_channel_axis(op: str, shape: tuple, rank: int, channel_axis: int = 1) -> int | None:
    """Axis of a constant operand that runs along the activation's channels, if any.

    Normalisation parameters are 1-D per channel; everything else broadcasts numpy-style,
    right-aligned against the activation's rank (whose channels run along `channel_axis`).
    """
    if op in ("BatchNormalization", "InstanceNormalization"):
        return 0
    axis = channel_axis - (rank - len(shape))
    if 0 <= axis < len(shape) and shape[axis] != 1:
        return axis
    return None

"""Prune to a MACs budget: find the smallest uniform ratio whose plan keeps at most a fraction F of the MACs.

Every probe runs only selection: the MACs a plan keeps follow from the channel masks, because a
Conv/ConvTranspose/Gemm/MatMul costs (output elements) x (input channels it reads), and pruning
scales each factor by the share of its channels that survive. Filter scores are computed once and
reused by every probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UserInputError
from ..graph.dependency import ChannelAnalysis, ChannelGroup
from ..graph.load import LoadedModel
from ..graph.plan import PrunePlan
from ..measure.metrics import node_macs
from .select import class_importance, select

# Ratios are searched on a grid of 1e-4, so the reported ratio reproduces the plan exactly.
_GRID = 10_000
_MAX_STEP = _GRID - 1  # ratio 0.9999: the most a uniform ratio can remove
MAX_UNIFORM_RATIO = _MAX_STEP / _GRID
_STEPS = 14  # ceil(log2(_GRID)): bisection over the grid needs this many probes


@dataclass(frozen=True)
class _CostTerm:
    macs: int
    reads: str | None  # tensor whose channels the node reads; None when pruning leaves them whole
    writes: str
    groups: int  # conv group count: the input mask splits into this many equal parts


@dataclass
class BudgetFit:
    ratio: float
    plan: PrunePlan
    macs_kept: float  # estimated share of the original MACs that the plan keeps


class MacsEstimator:
    """The MACs a plan keeps, from the original per-node MACs and the plan's channel masks."""

    def __init__(self, loaded: LoadedModel, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.terms = [t for t in (_term(n, loaded.shapes) for n in loaded.graph.nodes) if t.macs]
        self.total = sum(t.macs for t in self.terms)

    def macs(self, removed_roots: np.ndarray) -> float:
        return sum(t.macs * self._share(t.reads, removed_roots, t.groups) * self._share(t.writes, removed_roots, 1)
                   for t in self.terms)

    def kept(self, plan: PrunePlan) -> float:
        return self.macs(plan.removed_roots) / self.total if self.total else 1.0

    def _share(self, tensor: str | None, removed_roots: np.ndarray, groups: int) -> float:
        mask = self.analysis.keep_mask(tensor, removed_roots) if tensor else None
        if mask is None or len(mask) % groups:
            return 1.0
        return float(mask.reshape(groups, -1)[0].mean())  # per group, as the weight is sliced


def _term(node: gs.Node, shapes: dict) -> _CostTerm:
    macs = node_macs(node, shapes)
    if not macs:
        return _CostTerm(0, None, "", 1)
    groups = int(node.attrs.get("group", 1)) if node.op in ("Conv", "ConvTranspose") else 1
    weight_shape = shapes.get(node.inputs[1].name) or ()
    depthwise = node.op == "Conv" and groups > 1 and len(weight_shape) > 1 and weight_shape[1] == 1
    # A depthwise conv reads one channel per filter: its cost follows its outputs only.
    return _CostTerm(macs, None if depthwise else node.inputs[0].name, node.outputs[0].name, groups)


def fit_ratio(
    loaded: LoadedModel,
    analysis: ChannelAnalysis,
    target: float,
    criterion: str = "whc",
    round_to=1,
    exclude: tuple[str, ...] = (),
    seed: int = 0,
    progress: Callable | None = None,
    importance: Callable[[ChannelGroup], np.ndarray] | None = None,
) -> BudgetFit:
    """The smallest ratio (on a 1e-4 grid) whose plan keeps at most `target` of the MACs.

    `importance` replaces the criterion's class scores (as in `select`), e.g. for `whc+`.
    """
    if not 0.0 < target <= 1.0:
        raise UserInputError(f"--target-macs must be in (0, 1], got {target:g}")
    estimator = MacsEstimator(loaded, analysis)
    scores = _cached_importance(criterion, seed, importance)

    def probe(step: int) -> BudgetFit:
        plan = select(analysis, step / _GRID, criterion, round_to, exclude, seed, importance=scores)
        return BudgetFit(step / _GRID, plan, estimator.kept(plan))

    best = probe(0)
    if best.macs_kept <= target:
        return best
    best = probe(_MAX_STEP)
    if best.macs_kept > target:
        rounding = ("" if round_to == 1 else f" with --round-to {round_to}" if isinstance(round_to, int)
                    else " at the measured widths")
        raise UserInputError(
            f"--target-macs {target:g} is out of reach: pruning every group as far as it goes{rounding} keeps "
            f"{best.macs_kept:.1%} of the MACs (see `onnx-whc analyze` for the groups left whole)")
    low, high = 0, _MAX_STEP  # invariant: low misses the budget, high meets it
    for _ in progress(range(_STEPS)) if progress else range(_STEPS):
        if high - low <= 1:
            continue  # converged; keep iterating so the progress bar completes
        middle = (low + high) // 2
        fit = probe(middle)
        if fit.macs_kept <= target:
            high, best = middle, fit
        else:
            low = middle
    return best


def _cached_importance(criterion: str, seed: int,
                       given: Callable[[ChannelGroup], np.ndarray] | None = None) -> Callable[[ChannelGroup], np.ndarray]:
    """Each group's class scores, computed at first use and reused by every probe.

    One generator serves all groups, so the random criterion draws once per group, like `select`.
    """
    rng = np.random.default_rng(seed)
    cache: dict[int, np.ndarray] = {}

    def importance(group: ChannelGroup) -> np.ndarray:
        if group.id not in cache:
            cache[group.id] = given(group) if given else class_importance(group, criterion, rng)
        return cache[group.id]

    return importance

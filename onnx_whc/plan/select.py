"""Choose which channels of each group to remove.

A group's removable channel (class) may be written by several filters (residual adds couple
several convs; a depthwise conv follows its input): each producer's scores are scaled to a
maximum of 1 and a class's importance is the mean over its filters (Torch-Pruning's 'mean'
group reduction). The lowest floor(ratio * N) classes go, rounded so the kept count is a
multiple of `round_to`, never emptying any tensor.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable

import numpy as np

from ..errors import UserInputError
from ..graph.dependency import ChannelAnalysis, ChannelGroup
from ..graph.ops import consumer_weight_axis
from ..graph.plan import GroupDecision, PrunePlan
from .criteria import CRITERIA


def class_importance(group: ChannelGroup, criterion: str, rng: np.random.Generator) -> np.ndarray:
    """Importance of each class of a group from its producers' filter scores."""
    total = np.zeros(group.channels)
    count = np.zeros(group.channels)
    for producer, class_index in group.producers:
        scores = np.asarray(CRITERIA[criterion](producer.filters(), rng), dtype=np.float64)
        peak = scores.max() if scores.size else 0.0
        scores = scores / peak if peak > 0 else scores
        total += np.bincount(class_index, weights=scores, minlength=group.channels)
        count += np.bincount(class_index, minlength=group.channels)
    return total / np.maximum(count, 1)


# Consumer-aware criteria: a base criterion's class scores times the norm of the consumer weights
# that read each class. A filter whose output the next layer barely reads matters little however
# large it is; the product approximates the channel's contribution to the consumers' outputs.
CONSUMER_AWARE = {"whc+": "whc"}


def consumer_weight_norms(analysis: ChannelAnalysis, graph,
                          variances: dict[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Per group id, the L2 norm of all consumer weights (Conv/Gemm/MatMul inputs) reading each class.

    With `variances` (tensor -> per-channel variance on calibration data), each consumer's squared
    weights on a channel are scaled by that channel's variance: the channel's share of the
    variance of the consumers' outputs, as far as channels are uncorrelated.
    """
    position = {root: (group.id, index) for group in analysis.groups for index, root in enumerate(group.classes.tolist())}
    squares = {group.id: np.zeros(group.channels) for group in analysis.groups}
    for node in graph.nodes:
        where = consumer_weight_axis(node)
        atoms = analysis.maps.get(node.inputs[0].name) if where and analysis.reads_channels(node) else None
        if atoms is None or not hasattr(node.inputs[where[0]], "values"):
            continue
        weight = np.asarray(node.inputs[where[0]].values, dtype=np.float64)
        groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        if groups > 1 and weight.shape[1] == 1:
            continue  # depthwise passes each channel on; the next reader's weights count
        per_input = np.moveaxis(weight, where[1], 0)
        per_input = (per_input.reshape(per_input.shape[0], -1) ** 2).sum(axis=1)
        if groups > 1:  # grouped: input j of the tensor is input j % n of group j // n
            n = per_input.shape[0]
            per_input = (np.moveaxis(weight, 1, 0).reshape(n, groups, -1) ** 2).sum(axis=2).T.ravel()
        if variances is not None:
            per_input = per_input * variances[node.inputs[0].name]
        for root, value in zip(analysis.roots[atoms].tolist(), per_input.tolist()):
            if root in position:
                gid, index = position[root]
                squares[gid][index] += value
    return {gid: np.sqrt(values) for gid, values in squares.items()}


def consumer_aware_importance(analysis: ChannelAnalysis, graph, criterion: str,
                              seed: int = 0) -> Callable[[ChannelGroup], np.ndarray]:
    """Importance for a CONSUMER_AWARE criterion: base scores times normalised consumer norms."""
    base, rng = CONSUMER_AWARE[criterion], np.random.default_rng(seed)
    norms = consumer_weight_norms(analysis, graph)

    def importance(group: ChannelGroup) -> np.ndarray:
        scores = class_importance(group, base, rng)
        weights = norms.get(group.id, np.zeros(0))
        peak = weights.max() if weights.size else 0.0
        return scores * (weights / peak) if peak > 0 else scores

    return importance


# Data-aware criteria need calibration data (`channel_stats.ChannelStats`).
DATA_AWARE = ("energy",)


def energy_importance(analysis: ChannelAnalysis, graph, variances: dict[str, np.ndarray]
                      ) -> Callable[[ChannelGroup], np.ndarray]:
    """`energy`: how much of its readers' output variance each channel carries on calibration data,
    sqrt(sum over reading layers of Var(x_c) * ||W[:, c]||^2).

    Recovery refits the readers by least squares, which restores a removed channel's mean but not
    its variation: the channels whose variation the readers weigh least are the cheapest to lose.
    """
    energy = consumer_weight_norms(analysis, graph, variances)
    return lambda group: energy.get(group.id, np.zeros(group.channels))


def channels_to_keep(n: int, ratio: float, round_to: int) -> int:
    """Kept channel count: n - floor(ratio * n), rounded up to a multiple of round_to, at least 1."""
    keep = n - math.floor(ratio * n + 1e-9)
    if round_to > 1:
        keep = min(n, -(-keep // round_to) * round_to)
    return max(1, keep)


def group_keeps(group: ChannelGroup, ratio: float, round_to) -> int:
    """A group's kept count; `round_to` is a multiple or measured steps (`widths.WidthSteps`)."""
    if isinstance(round_to, int):
        return channels_to_keep(group.channels, ratio, round_to)
    return max(1, round_to.keep(group.id, channels_to_keep(group.channels, ratio, 1), group.channels))


def _constraints(analysis: ChannelAnalysis) -> dict[int, list[np.ndarray]]:
    """Per group, the sets of classes of which at least one must survive (one per tensor)."""
    position = {}
    for group in analysis.groups:
        for index, root in enumerate(group.classes.tolist()):
            position[root] = (group.id, index)
    found: dict[int, dict[bytes, np.ndarray]] = {}
    for atoms in analysis.maps.values():
        roots = np.unique(analysis.roots[atoms])
        by_group: dict[int, list[int]] = {}
        for root in roots.tolist():
            if root in position:
                gid, index = position[root]
                by_group.setdefault(gid, []).append(index)
        for gid, indices in by_group.items():
            arr = np.asarray(indices, dtype=np.int64)
            found.setdefault(gid, {})[arr.tobytes()] = arr
    return {gid: list(sets.values()) for gid, sets in found.items()}


def _quotas(group: ChannelGroup, rate: float, round_to) -> list[tuple[np.ndarray, int]]:
    """Each filter-carrying layer loses its own share, no more: the paper's per-layer rate.

    Matters where groups of different widths are coupled (option-A shortcuts join all stages of
    a CIFAR ResNet): without it, removals would pile up in one narrow stage. Measured steps are
    the whole group's: a narrower layer in it keeps its plain share.
    """
    quotas = {}
    for _, class_index in group.producers:
        classes = np.unique(class_index)
        if len(classes) == group.channels:
            keep = group_keeps(group, rate, round_to)
        else:
            keep = channels_to_keep(len(classes), rate, round_to if isinstance(round_to, int) else 1)
        quotas[classes.tobytes()] = (classes, len(classes) - keep)
    return list(quotas.values())


def _greedy_remove(order: np.ndarray, n_remove: int, keep_one_of: list[np.ndarray],
                   quotas: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Remove classes in `order` while every tensor keeps a channel and every layer stays in quota.

    Layers are filled narrowest first, each with its own lowest classes up to its quota: a narrow
    layer coupled to wider ones (a CIFAR option-A trunk) then loses exactly its share and keeps
    a multiple of round_to, instead of whatever the wider layers' removals leave it.
    """
    room = [len(c) - 1 for c in keep_one_of] + [q for _, q in quotas]
    member_of: dict[int, list[int]] = {}
    for cid, classes in enumerate(keep_one_of + [c for c, _ in quotas]):
        for index in classes.tolist():
            member_of.setdefault(index, []).append(cid)
    removed: dict[int, None] = {}

    def try_remove(index: int) -> None:
        cids = member_of.get(index, [])
        if index in removed or any(room[cid] <= 0 for cid in cids):
            return
        for cid in cids:
            room[cid] -= 1
        removed[index] = None

    for q in sorted(range(len(quotas)), key=lambda q: len(quotas[q][0])):
        layer = len(keep_one_of) + q
        for index in order[np.isin(order, quotas[q][0])].tolist():
            if room[layer] <= 0 or len(removed) == n_remove:
                break
            try_remove(index)
    for index in order.tolist():  # classes no layer writes (padding), if any removal is left
        if len(removed) == n_remove:
            break
        try_remove(index)
    return np.sort(np.asarray(list(removed), dtype=np.int64))


def excluded_by(group: ChannelGroup, patterns: tuple[str, ...]) -> str:
    for producer, _ in group.producers:
        for pattern in patterns:
            if fnmatch.fnmatchcase(producer.node.name, pattern):
                return f"excluded by --exclude '{pattern}' ({producer.node.name})"
    return ""


def select(
    analysis: ChannelAnalysis,
    ratio: float | dict[int, float],
    criterion: str = "whc",
    round_to=1,
    exclude: tuple[str, ...] = (),
    seed: int = 0,
    importance: Callable[[ChannelGroup], np.ndarray] | None = None,
    progress: Callable | None = None,
) -> PrunePlan:
    """Decide the removed classes of every group; `ratio` may be one rate or one per group id.

    `importance` (consumer- and data-aware criteria) scores the classes itself; otherwise the
    filter criterion named `criterion` does. `round_to` is a multiple for kept counts or the
    measured latency steps of each group (`widths.WidthSteps`).
    """
    if importance is None and criterion not in CRITERIA:
        raise UserInputError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERIA)})")
    if isinstance(round_to, int) and round_to < 1:
        raise UserInputError("--round-to must be at least 1")
    rng = np.random.default_rng(seed)
    constraints = _constraints(analysis)
    decisions = []
    groups = progress(analysis.groups) if progress else analysis.groups
    for group in groups:
        rate = ratio.get(group.id, 0.0) if isinstance(ratio, dict) else ratio
        skipped = "; ".join(group.reasons) or excluded_by(group, exclude)
        n_remove = group.channels - group_keeps(group, rate, round_to)
        if skipped or n_remove <= 0:
            decisions.append(GroupDecision(group, np.zeros(0, dtype=np.int64), skipped))
            continue
        scores = importance(group) if importance else class_importance(group, criterion, rng)
        order = np.argsort(scores, kind="stable")
        removed = _greedy_remove(order, n_remove, constraints.get(group.id, []), _quotas(group, rate, round_to))
        decisions.append(GroupDecision(group, removed))
    return PrunePlan(decisions)

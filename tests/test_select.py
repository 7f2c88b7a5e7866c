"""Selection: kept-count arithmetic, per-layer quotas in coupled groups, never-empty tensors."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_whc.errors import UserInputError
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load
from onnx_whc.plan.select import channels_to_keep, select

from .builder import GraphBuilder
from .test_patterns import option_a_block


@pytest.mark.parametrize("n,ratio,round_to,kept", [
    (16, 0.4, 1, 10),   # 16 - floor(6.4)
    (16, 0.0, 1, 16),
    (10, 0.3, 1, 7),    # 0.3 * 10 = 3.0000000000000004 in floats: still floor 3
    (100, 0.29, 1, 71),  # 0.29 * 100 = 28.999999999999996: counts as 29, not 28
    (5, 0.99, 1, 1),    # 5 - floor(4.95)
    (1, 0.6, 1, 1),     # never empty
    (2, 0.6, 1, 1),
    (3, 0.6, 1, 2),
    (64, 0.5, 8, 32),
    (20, 0.4, 8, 16),   # 12 rounds up to 16
    (32, 0.2, 8, 32),   # 26 rounds up to 32: nothing removed
    (12, 0.5, 8, 8),
    (4, 0.9, 8, 4),     # fewer channels than round_to: the layer stays whole
])
def test_channels_to_keep(n, ratio, round_to, kept):
    assert channels_to_keep(n, ratio, round_to) == kept


def _analysis(model):
    analysis = analyze_channels(load(model))
    return analysis, {p.node.name: (g, idx) for g in analysis.groups for p, idx in g.producers}


def cifar_trunk():
    """stem (16) -> option-A block (32) -> option-A block (64): one group spanning three widths."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 16, 16])
    y = b.relu(b.conv(x, 16, name="stem"))
    y = option_a_block(b, y, "stage2")
    y = option_a_block(b, y, "stage3")
    return b.build([b.gemm(b.flatten(b.global_average_pool(y)), 10, name="fc")])


def _removed_from(plan, producers, name) -> int:
    group, class_index = producers[name]
    decision = next(d for d in plan.decisions if d.group is group)
    return int(np.isin(class_index, decision.removed).sum())


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_quotas_spread_a_coupled_trunk_over_its_layers(ratio):
    analysis, producers = _analysis(cifar_trunk())
    trunk, stem_classes = producers["stem"]
    assert trunk is producers["stage2.conv2"][0] is producers["stage3.conv2"][0] and trunk.channels == 64
    # Rank the stem's channels lowest, then the rest of stage 2's: without quotas every removal
    # would land in the narrow early layers.
    importance = np.full(trunk.channels, 1000.0)
    importance[producers["stage2.conv2"][1]] = 100
    importance[stem_classes] = 0
    plan = select(analysis, ratio, importance=lambda group: importance if group is trunk else np.ones(group.channels))
    removed = {name: _removed_from(plan, producers, name) for name in ("stem", "stage2.conv2", "stage3.conv2")}
    assert removed["stem"] == 16 - channels_to_keep(16, ratio, 1)
    assert removed["stage2.conv2"] == 32 - channels_to_keep(32, ratio, 1)
    assert removed["stage3.conv2"] == 64 - channels_to_keep(64, ratio, 1)
    assert plan.removed_channels - sum(len(d.removed) for d in plan.decisions if d.group is not trunk) \
        == removed["stage3.conv2"]


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("seed", range(4))
def test_every_layer_of_a_coupled_trunk_keeps_its_rounded_share(seed, round_to):
    """Whatever the scores, stem/stage2/stage3 keep exactly channels_to_keep of their own width."""
    analysis, producers = _analysis(cifar_trunk())
    rng = np.random.default_rng(seed)
    for ratio in (0.3, 0.5, 0.7):
        plan = select(analysis, ratio, round_to=round_to, importance=lambda g: rng.random(g.channels))
        for name, (group, class_index) in producers.items():
            kept = len(class_index) - _removed_from(plan, producers, name)
            want = channels_to_keep(len(class_index), ratio, round_to) if group.prunable else len(class_index)
            assert kept == want, (name, ratio)  # the classifier's outputs feed the graph output: whole


def test_per_group_ratios():
    analysis, producers = _analysis(cifar_trunk())
    narrow = producers["stage2.conv1"][0]
    plan = select(analysis, {narrow.id: 0.5})
    assert [len(d.removed) for d in plan.decisions if d.group is narrow] == [16]
    assert plan.removed_channels == 16


def split_model(first: int):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    small, rest = b.op("Split", [b.relu(b.conv(x, 16, name="c1")), b.ints([first, 16 - first])], outputs=2, axis=1)
    return b.build([b.op("Add", [b.conv(small, 4, name="h0"), b.conv(rest, 4, name="h1")])])


@pytest.mark.parametrize("first", [1, 2, 3])
def test_keeps_one_channel_of_every_tensor(first):
    analysis, producers = _analysis(split_model(first))
    group, _ = producers["c1"]
    lowest_first = np.arange(group.channels, dtype=float)  # the small segment ranks lowest
    plan = select(analysis, 0.6, importance=lambda g: lowest_first)
    decision = next(d for d in plan.decisions if d.group is group)
    assert len(decision.removed) == 16 - channels_to_keep(16, 0.6, 1)
    assert len(np.intersect1d(decision.removed, np.arange(first))) == first - 1
    kept = analysis.keep_mask(analysis_tensor(analysis, first), plan.removed_roots)
    assert kept.sum() == 1


def analysis_tensor(analysis, width: int) -> str:
    """The Split output of the given width."""
    return next(name for name, atoms in analysis.maps.items() if name.startswith("split") and len(atoms) == width)


def test_one_channel_conv_is_never_emptied():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    model = b.build([b.conv(b.relu(b.conv(x, 1, name="c1")), 4, name="c2")])
    analysis, _ = _analysis(model)
    plan = select(analysis, 0.99)
    assert plan.removed_channels == 0


def test_bad_arguments_are_user_errors():
    analysis, _ = _analysis(split_model(2))
    with pytest.raises(UserInputError, match="unknown criterion 'nope'"):
        select(analysis, 0.4, criterion="nope")
    with pytest.raises(UserInputError, match="--round-to must be at least 1"):
        select(analysis, 0.4, round_to=0)


@pytest.mark.parametrize("criterion", ["whc", "l1", "l2", "fpgm", "random"])
def test_same_seed_same_plan(criterion):
    analysis, _ = _analysis(cifar_trunk())
    first = select(analysis, 0.4, criterion, seed=5).removed_roots
    again = select(analysis, 0.4, criterion, seed=5).removed_roots
    np.testing.assert_array_equal(first, again)
    if criterion == "random":
        assert not np.array_equal(first, select(analysis, 0.4, criterion, seed=6).removed_roots)

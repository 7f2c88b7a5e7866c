"""The exactness oracle on every real model in ../shared at the issue's ratios."""

import pytest

from .conftest import SHARED_MODELS, shared_model
from .oracle import prune_and_compare


@pytest.mark.parametrize("name", SHARED_MODELS)
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_pruned_equals_zeroed_original(name, ratio):
    _, plan = prune_and_compare(shared_model(name), ratio)
    assert plan.removed_channels > 0


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "random"])
def test_other_criteria_are_exact_too(criterion):
    _, plan = prune_and_compare(shared_model("resnet20_cifar10.onnx"), 0.4, criterion=criterion)
    assert plan.removed_channels > 0


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_the_allocators_masked_model_builds_and_runs(name):
    """The masks, channel statistics and a probe on every shared model (2 random samples), on the
    whole masked model and on the segment the allocator runs: cheap, and what an allocation runs first."""
    import numpy as np

    from onnx_whc.graph.dependency import analyze_channels
    from onnx_whc.graph.load import load
    from onnx_whc.plan.allocate import MaskedModel
    from onnx_whc.plan.channel_stats import channel_stats

    loaded = load(shared_model(name))
    analysis = analyze_channels(loaded)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, *s[1:])).astype(np.float32) for n, s in loaded.input_shapes.items()}
    stats = channel_stats(loaded, analysis, feeds)
    masked = MaskedModel(loaded, analysis, feeds, stats.mean)
    assert masked.damage(np.zeros(0, np.int64)) == pytest.approx(0.0, abs=1e-6)
    groups = [g for g in analysis.groups if g.prunable]
    middle = groups[len(groups) // 2]
    half = middle.classes[: max(1, middle.channels // 2)]
    assert masked.damage(half) > 0
    # the allocator's probes run the segment downstream of the masks: the same damage
    probed = MaskedModel(loaded, analysis, feeds, stats.mean, probes=[middle.classes])
    assert probed.damage(half) == pytest.approx(masked.damage(half), rel=1e-4)
    assert probed._open[0].nodes < len(probed.graph.nodes)

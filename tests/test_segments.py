"""The allocator's probes run only the part of a model downstream of their masks, fed from one
cached run of the whole: every probe must measure exactly what the whole masked model measures."""

import numpy as np
import pytest

import onnx_whc.plan.allocate as allocate
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load
from onnx_whc.plan.allocate import MaskedModel

from .builder import GraphBuilder


def _two_headed(opset: int, dynamic_batch: bool):
    """A residual trunk read by two heads; one head flattens with a batch read from the stem's Shape
    (an int64 tensor outside that head's segment, so it is cached per run), the other adds a
    Constant node's output and flattens by a Shape of its own input."""
    b = GraphBuilder(opset=opset, dynamic_batch=dynamic_batch, weights_as="constant")
    x = b.input("x", [1, 3, 12, 12])
    stem = b.relu(b.conv(x, 8, name="stem"))
    trunk = b.op("Add", [stem, b.conv(b.relu(b.conv(stem, 6, name="inner")), 8, name="back")])

    def flat(y, batch_of):
        batch = b.op("Gather", [b.op("Shape", [batch_of]), b.ints([0])], axis=0)
        return b.op("Reshape", [y, b.op("Concat", [batch, b.ints([-1])], axis=0)])

    a = b.conv(b.relu(b.conv(trunk, 5, name="a1")), 4, name="a2")
    c = b.op("Add", [b.conv(b.sigmoid(b.conv(trunk, 6, name="c1")), 3, name="c2"),
                     b.const(np.ones((1, 3, 1, 1), np.float32))])
    return b.build(outputs=[flat(a, stem), flat(c, c)])


@pytest.fixture
def small_runs(monkeypatch):
    """Two samples per ONNX Runtime run, so five samples make a short last run."""
    monkeypatch.setattr(allocate, "samples_per_run", lambda model, shapes: 2)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_each_probe_measures_on_its_segment_what_the_whole_model_measures(opset, dynamic_batch, small_runs):
    model = _two_headed(opset, dynamic_batch)
    loaded = load(model)
    analysis = analyze_channels(loaded)
    groups = [g for g in analysis.groups if g.prunable]
    assert len(groups) >= 4  # the trunk, inner, a1, c1
    rng = np.random.default_rng(1)
    count = 5 if dynamic_batch else 1
    feeds = {"x": rng.standard_normal((count, 3, 12, 12)).astype(np.float32)}
    means = {name: rng.standard_normal(len(atoms)).astype(np.float32) for name, atoms in analysis.maps.items()}
    whole = MaskedModel(loaded, analysis, feeds, means)
    probed = MaskedModel(loaded, analysis, feeds, means, probes=[g.classes for g in groups])
    assert len(probed.segments) == len(groups) and probed.cut
    smaller = 0
    for group in groups:
        for share in (0.34, 1.0):
            removed = group.classes[: max(1, int(share * group.channels))]
            expected = whole.damage(removed)
            assert expected > 0
            assert probed.damage(removed) == pytest.approx(expected, rel=1e-5, abs=1e-9)
            assert probed._open is not None  # measured on a segment, not on the whole model
        smaller += probed._open[0].nodes < len(probed.graph.nodes)
    assert smaller >= len(groups) - 1  # only the stem's segment is (nearly) everything
    both = np.concatenate([groups[0].classes[:1], groups[-1].classes[:1]])  # no segment covers it
    assert probed.damage(both) == pytest.approx(whole.damage(both), rel=1e-5)

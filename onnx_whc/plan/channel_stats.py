"""Per-channel mean and variance, on calibration data, of every tensor a prunable layer reads.

Computed once on the original model and shared: `--allocate` replaces a removed channel by its
mean in its probes, and the `energy` criterion weighs each channel by its variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.samples import subset
from ..graph.dependency import ChannelAnalysis
from ..graph.equivalence import export
from ..graph.load import LoadedModel
from ..graph.ops import consumer_weight_axis
from ..graph.runtime import samples_per_run, session

MAX_SAMPLES = 256  # calibration images: channel moments settle well before this


@dataclass
class ChannelStats:
    mean: dict[str, np.ndarray]  # tensor name -> (channels,)
    var: dict[str, np.ndarray]


def consumer_inputs(loaded: LoadedModel, analysis: ChannelAnalysis) -> list[str]:
    """Tensors read by a layer with channel weights (Conv, Gemm, MatMul...) whose channels can go."""
    names = {node.inputs[0].name for node in loaded.graph.nodes
             if consumer_weight_axis(node) and node.inputs and analysis.reads_channels(node)}
    return sorted(names)


def channel_stats(loaded: LoadedModel, analysis: ChannelAnalysis, feeds: dict[str, np.ndarray]) -> ChannelStats:
    names = consumer_inputs(loaded, analysis)
    graph = loaded.graph.copy()
    tensors = graph.tensors()
    graph.outputs += [tensors[name] for name in names if tensors[name] not in graph.outputs]
    model = export(graph, loaded)
    feeds = subset(feeds, slice(None, MAX_SAMPLES))  # already in the inputs' types (Calibration); read per chunk
    sess, chunk = session(model), samples_per_run(model, loaded.shapes)
    sums = {n: 0.0 for n in names}
    squares = {n: 0.0 for n in names}
    positions = {n: 0 for n in names}
    total = len(next(iter(feeds.values())))
    for lo in range(0, total, chunk):
        values = sess.run(names, {k: v[lo:lo + chunk] for k, v in feeds.items()}) if names else []
        for name, x in zip(names, values):
            x = x.astype(np.float64)
            channel_axis = analysis.axis(name)
            axes = tuple(a for a in range(x.ndim) if a != channel_axis)
            sums[name] = sums[name] + x.sum(axis=axes)
            squares[name] = squares[name] + (x * x).sum(axis=axes)
            positions[name] += x.size // x.shape[channel_axis]
    means = {name: sums[name] / positions[name] for name in names}
    variances = {name: np.maximum(squares[name] / positions[name] - means[name] ** 2, 0.0) for name in names}
    return ChannelStats(means, variances)

"""Visit the changed layers in topological order and refit each one against the original.

Both models step forward together (`Replay`): the original up to and through the layer (its
outputs are the targets), the pruned model up to the layer. With `sequential`, the layer's
inputs come from the pruned model as already recovered upstream, so each layer also absorbs
the error accumulated before it; otherwise they are the original's activations on the kept
channels. Groups of grouped/depthwise convs are independent maps, solved in blocks to bound
memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .layers import Affine, Layer, geometry_of, out_spatial, outputs, patches, read_affine, sample_positions, \
    write_affine
from .moments import Moments
from .replay import Replay

Update = Callable[[Moments, Affine], Affine]


@dataclass
class FitSettings:
    samples: int = 20000  # sampled output positions per layer
    sequential: bool = True
    residual: bool = True  # targets include the residual branch's drift (fit the Add's output)
    seed: int = 0
    block_elements: int = 24_000_000  # patch values gathered at once (float32)
    ahead_bytes: int = 256 << 20  # original-model outputs held while the pruned model catches up


def _ahead(layers: list[Layer], start: int, sizes: dict[str, int], samples: int, budget: int) -> int:
    """The last layer whose outputs, held from `start` on, fit in `budget` bytes.

    The original model runs in these larger steps (fewer, better-optimised ONNX Runtime
    sessions); its layers' outputs wait in memory until their layer is fitted.
    """
    total, end = 0, start
    for index in range(start, len(layers)):
        total += 4 * samples * sizes.get(layers[index].output, 1 << 40)
        if total > budget and index > start:
            break
        end = index
    return end


def fit_layers(original: Replay, pruned: Replay, layers: list[Layer], update: Update, settings: FitSettings,
               sizes: dict[str, int] | None = None, progress: Callable = lambda items: items) -> list[dict]:
    """Refit every layer in order; returns one record per layer (relative output error before/after).

    `sizes` gives the elements per sample of tensors (for stepping the original ahead).
    """
    wanted = [[layer.output, *layer.residual] + ([] if settings.sequential else [layer.input]) for layer in layers]
    waiting = Counter(name for names in wanted for name in names)
    original.held = set(waiting)
    records = []
    reached = -1
    for number, layer in enumerate(progress(layers)):
        if number > reached:
            reached = _ahead(layers, number, sizes or {}, original.samples, settings.ahead_bytes)
            original.run_to(layers[reached].node, through=True)
        pruned.run_to(layer.node)
        records.append(_fit_one(original, pruned, layer, update, settings, number))
        waiting.subtract(wanted[number])
        original.held = {name for name, count in waiting.items() if count > 0}
    return records


def _fit_one(original: Replay, pruned: Replay, layer: Layer, update: Update, settings: FitSettings,
             number: int) -> dict:
    geometry = geometry_of(pruned, layer)
    rng = np.random.default_rng([settings.seed, number])
    size = out_spatial(pruned, layer, geometry)
    sample = sample_positions(pruned.samples, size, settings.samples, rng)
    affine = read_affine(pruned, layer)
    groups, dim, width = affine.weights.shape
    kernel = int(np.prod(geometry.kernel)) if geometry else 1
    per_group_in = dim // kernel
    source = pruned if settings.sequential else original
    in_channels = np.arange(groups * per_group_in)
    if source is original and layer.in_keep is not None:
        in_channels = np.flatnonzero(layer.in_keep)
    out_channels = np.flatnonzero(layer.out_keep) if layer.out_keep is not None else np.arange(groups * width)
    block = max(1, settings.block_elements // max(1, len(sample.image) * dim))
    before = after = spread = 0.0
    for g0 in range(0, groups, block):
        g1 = min(groups, g0 + block)
        x = patches(source, layer.input, sample, geometry, in_channels[g0 * per_group_in:g1 * per_group_in], size)
        x = x.reshape(len(sample.image), g1 - g0, dim).transpose(1, 0, 2)
        y = outputs(original, layer.output, sample, out_channels[g0 * width:g1 * width])
        if settings.residual and settings.sequential:
            y += _residual_drift(original, pruned, layer, sample, out_channels[g0 * width:g1 * width],
                                 np.arange(g0 * width, g1 * width))
        y = y.reshape(len(sample.image), g1 - g0, width).transpose(1, 0, 2)
        moments = Moments.of(np.ascontiguousarray(x), np.ascontiguousarray(y))
        current = Affine(affine.weights[g0:g1], None if affine.bias is None else affine.bias[g0:g1])
        fitted = update(moments, current)
        before += moments.squared_error(current)
        after += moments.squared_error(fitted)
        spread += moments.spread
        affine.weights[g0:g1] = fitted.weights
        if affine.bias is not None:
            affine.bias[g0:g1] = fitted.bias
    write_affine(pruned, layer, affine)
    spread = max(spread, 1e-30)
    return {"layer": layer.node, "rows": int(len(sample.image)), "groups": int(groups),
            "error_before": round(before / spread, 6), "error_after": round(after / spread, 6)}


def _residual_drift(original: Replay, pruned: Replay, layer: Layer, sample, channels: np.ndarray,
                    kept: np.ndarray) -> np.ndarray | float:
    """How far the residual operands of the layer's Add drifted from the original's.

    Adding it to the target makes the layer fit the original *sum*, so each block also
    corrects the error its shortcut carries instead of passing it on.
    """
    drift = 0.0
    for name in layer.residual:
        if name not in pruned.cache or name not in original.cache:
            continue  # computed after the layer: nothing to correct yet
        if original.cache[name][0].shape != original.cache[layer.output][0].shape:
            continue  # a broadcast operand
        drift = drift + outputs(original, name, sample, channels) - outputs(pruned, name, sample, kept)
    return drift
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

from .layers import (
    Affine,
    Layer,
    geometry_of,
    out_spatial,
    outputs,
    patches,
    read_affine,
    sample_positions,
    write_affine,
)
from .moments import Moments
from .replay import Replay

Update = Callable[[Moments, Affine], Affine]


@dataclass
class FitSettings:
    samples: int = 20000  # sampled output positions per layer, at least (see `rows_for`)
    sequential: bool = True
    residual: bool = True  # targets include the residual branch's drift (fit the Add's output)
    seed: int = 0
    block_elements: int = 24_000_000  # patch values gathered at once (float32)
    ahead_bytes: int = 256 << 20  # original-model outputs held while the pruned model catches up
    rectified: int = 3  # refits of a layer read by a Relu/Clip against the rectifier's output, as RecoverySettings


ROWS_PER_INPUT = 100


def rows_for(inputs: int, samples: int) -> int:
    """Sampled positions for a map with `inputs` inputs per output: 100 per input, within [samples, 4 x samples].

    Rows in proportion to the unknowns: with the rectified refits, 80,000 rows instead of 20,000 lifted
    every CIFAR ResNet cell by 0.1-0.3 point; the rule does as well where it matters (the wide layers)
    at less cost (benchmarks/results/recovery.md).
    """
    return max(samples, min(ROWS_PER_INPUT * inputs, 4 * samples))


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
    affine = read_affine(pruned, layer)
    groups, dim, width = affine.weights.shape
    sample = sample_positions(pruned.samples, size, rows_for(dim, settings.samples), rng)
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
        y = outputs(original, layer.output, sample, out_channels[g0 * width:g1 * width], layer.channels_last)
        shortcut = None
        if settings.residual and settings.sequential:
            drift, shortcut = _residual_terms(original, pruned, layer, sample, out_channels[g0 * width:g1 * width],
                                              np.arange(g0 * width, g1 * width))
            y += drift
        bounds = layer.bounds if settings.rectified else None
        if bounds and layer.residual:  # the rectifier reads the sum: the bounds move by the shortcut
            bounds = None if shortcut is None else tuple(b - _by_group(shortcut, g1 - g0, width) for b in bounds)
        y = _by_group(y, g1 - g0, width)
        current = Affine(affine.weights[g0:g1], None if affine.bias is None else affine.bias[g0:g1])
        fitted, errors = _fit_block(np.ascontiguousarray(x), np.ascontiguousarray(y), current, update, bounds,
                                    settings.rectified)
        before, after, spread = before + errors[0], after + errors[1], spread + errors[2]
        affine.weights[g0:g1] = fitted.weights
        if affine.bias is not None:
            affine.bias[g0:g1] = fitted.bias
    write_affine(pruned, layer, affine)
    spread = max(spread, 1e-30)
    return {"layer": layer.node, "rows": int(len(sample.image)), "groups": int(groups),
            "error_before": round(before / spread, 6), "error_after": round(after / spread, 6)}


def _fit_block(x: np.ndarray, y: np.ndarray, current: Affine, update: Update, bounds: tuple | None,
               rounds: int) -> tuple[Affine, tuple[float, float, float]]:
    """The fitted maps and (error before, error after, target spread), x and y (G, S, ·) centred in place.

    With `bounds` (low, high: numbers, or arrays shaped like y where a residual Add moves them per
    position), what the next layer sees is the rectifier's output, so a prediction beyond a
    bound the original also passed costs nothing. Each round refits against the target moved to
    the current prediction there (to the bound where the prediction is inside): a majorisation of
    the error after the rectifier, which therefore never grows from round to round.
    """
    moments = Moments.of(x, y)
    fitted = update(moments, current)
    if bounds is None:
        return fitted, (moments.squared_error(current), moments.squared_error(fitted), moments.spread)
    low, high = bounds
    y += moments.y_mean[:, None, :].astype(y.dtype)  # x stays centred: predictions add the offset
    for _ in range(rounds):
        predicted = _predict(x, moments, fitted)
        target = np.where(y <= low, np.minimum(predicted, low), np.where(y >= high, np.maximum(predicted, high), y))
        fitted = update(moments.retargeted(x, target), current)
    clipped = np.clip(y, low, high)
    errors = [float(np.square(np.clip(_predict(x, moments, a), low, high) - clipped).sum()) for a in (current, fitted)]
    spread = float(np.square(clipped - clipped.mean(axis=1, keepdims=True)).sum())
    return fitted, (errors[0], errors[1], spread)


def _predict(x_centred: np.ndarray, moments: Moments, affine: Affine) -> np.ndarray:
    offset = np.einsum("gd,gdm->gm", moments.x_mean, affine.weights)
    if affine.bias is not None:
        offset = offset + affine.bias
    return np.matmul(x_centred, affine.weights.astype(np.float32)) + offset[:, None, :].astype(np.float32)


def _by_group(values: np.ndarray, groups: int, width: int) -> np.ndarray:
    """(S, groups·width) -> (groups, S, width)."""
    return values.reshape(len(values), groups, width).transpose(1, 0, 2)


def _residual_terms(original: Replay, pruned: Replay, layer: Layer, sample, channels: np.ndarray,
                    kept: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | None]:
    """How far the residual operands of the layer's Add drifted from the original's, and their sum
    in the pruned model (None unless every operand is known and full-sized).

    Adding the drift to the target makes the layer fit the original *sum*, so each block also
    corrects the error its shortcut carries instead of passing it on.
    """
    drift, shortcut = 0.0, 0.0
    for name in layer.residual:
        if name not in pruned.cache or name not in original.cache:
            shortcut = None  # computed after the layer: nothing to correct yet
            continue
        if original.cache[name][0].shape != original.cache[layer.output][0].shape:
            shortcut = None  # a broadcast operand
            continue
        now = outputs(pruned, name, sample, kept, layer.channels_last)
        drift = drift + outputs(original, name, sample, channels, layer.channels_last) - now
        shortcut = None if shortcut is None else shortcut + now
    return drift, shortcut

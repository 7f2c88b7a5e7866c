"""The recovery stage: give back accuracy lost to pruning, without training.

Runs after surgery and before validation, on the exported pruned model, against the original:

- `lsq`: each changed layer's weights and bias solved by ridge least squares so its outputs on
  calibration data match the original model's outputs of that layer, layer after layer on the
  pruned model's own (already recovered) activations; a layer read by a Relu or Clip (directly,
  or through a residual Add) is matched after the rectifier, where the next layer reads it;
- `stats`: each changed layer's output channels shifted and scaled to the original's mean and
  std on calibration data;
- `bias`: data-free; the expected value of every removed channel, estimated from the graph
  alone, folded into the biases of the layers that read it;
- `none`.

`auto` picks `lsq` whenever there is calibration data, the user's or the built-in synthetic
images, and `none` without: on the shared BN-folded models the data-free estimate made accuracy
worse (see benchmarks/results/recovery.md).
The report records the method, its settings, the time, and the quality (`onnx_whc.measure.quality`:
agreement for classifiers, per-channel R² for dense outputs) on held-out samples before and after.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx

from ..data.calibration import Calibration
from ..data.samples import evenly_spread, subset
from ..errors import UserInputError
from ..graph.memory import held_bytes, live_sizes, most_samples
from ..measure.quality import QualityProbe
from . import bias as data_free
from .fit import FitSettings, fit_layers
from .layers import find_layers
from .lsq import ridge_fit
from .replay import COMPACT_BYTES, Replay
from .stats import renormalise

METHODS = ("auto", "none", "bias", "stats", "lsq")
# What the replay holds besides the samples' activations: the original's outputs waiting for their
# layer (FitSettings.ahead_bytes), the sampled patches and targets of a layer, one chunk's run.
REPLAY_OVERHEAD = 768 << 20


@dataclass
class RecoverySettings:
    method: str = "auto"
    samples: int = 20000  # sampled output positions per layer (lsq, stats): at least, 100 per input up to 4x
    ridge: float = 1e-3  # ridge = this * trace(Gram) / dimension
    sequential: bool = True  # inputs from the recovered pruned model, not the original
    residual: bool = True  # a layer feeding a residual Add also corrects its shortcut's drift
    # lsq: refits of each layer read by a Relu/Clip against the rectifier's output (0: plain least
    # squares). Top-1 against 0: ResNet-56 at 0.61 of the MACs 81.80% (81.70%), ResNet-20 76.08%
    # (75.64%), EfficientNet-Lite0 at 0.60 68.2% (65.4%), at 0.75 79.8% (80.0%); 1 or 8 rounds
    # within 0.1 point of 3 on the ResNets.
    rectified: int = 3
    seed: int = 0


def resolve_method(method: str, has_calibration: bool) -> str:
    if method not in METHODS:
        raise UserInputError(f"--recover must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "auto":  # data-free bias compensation measured no gain on BN-folded models: not a default
        return "lsq" if has_calibration else "none"
    if method in ("stats", "lsq") and not has_calibration:
        raise UserInputError(f"--recover {method} needs calibration data: give --calib")
    return method


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, keep: Callable[[str], np.ndarray | None],
            calibration: Calibration | None, probe: QualityProbe | None, chunk: int,
            settings: RecoverySettings = RecoverySettings(), shapes: dict | None = None,
            progress: Callable = lambda items: items, room: int | None = None) -> tuple[onnx.ModelProto, dict | None]:
    """Recover `pruned` towards `original`; `keep(tensor)` gives a tensor's surviving channels.

    `probe` measures quality before and after (on the held-out samples); `chunk` is the
    number of samples per ONNX Runtime run; `room` the bytes the replay may hold (None: no limit),
    which bounds how many of the calibration samples it fits on.
    """
    method = resolve_method(settings.method, calibration is not None)
    if method == "none":
        return pruned, None
    if settings.samples < 1 or settings.ridge < 0:
        raise UserInputError("recovery needs samples >= 1 and ridge >= 0")
    start = time.perf_counter()
    before = probe.measure(pruned) if probe else None
    layers = find_layers(pruned, keep)
    if method == "bias":
        recovered, records = data_free.compensate(original, pruned, layers)
    else:
        update = ridge_fit_with(settings.ridge) if method == "lsq" else renormalise
        fit_settings = FitSettings(samples=settings.samples, sequential=settings.sequential,
                                   residual=settings.residual, seed=settings.seed,
                                   rectified=settings.rectified if method == "lsq" else 0)
        feeds, held = replayed_samples(original, calibration.fit, shapes or {}, room, settings.seed)
        source, target = Replay(original, feeds, chunk), Replay(pruned, feeds, chunk)
        sizes = {name: int(np.prod(s[1:])) for name, s in (shapes or {}).items()
                 if s and all(isinstance(d, int) for d in s)}
        records = fit_layers(source, target, layers, update, fit_settings, sizes, progress)
        recovered = target.export()
    after = probe.measure(recovered) if probe else None
    report = {
        "method": method,
        "settings": {k: v for k, v in asdict(settings).items() if k != "method"},
        "calibration": "none (data-free)" if calibration is None else calibration.source,
        "calibration_samples": 0 if calibration is None else calibration.fit_count,
        "samples_fitted": 0 if calibration is None or method == "bias" else held,
        "layers": len(records),
        "quality_on": probe.on if probe else "n/a",
        "quality_before": before.headline() if before else {},
        "quality_after": after.headline() if after else {},
        "seconds": round(time.perf_counter() - start, 3),
        "per_layer": records,
    }
    report["summary"] = _summary(report, before, after)
    return recovered, report


def replayed_samples(original: onnx.ModelProto, fit: dict, shapes: dict, room: int | None,
                     seed: int) -> tuple[dict, int]:
    """The calibration samples the replay holds (all, or as many as `room` bytes hold, spread over
    the set) and how many.

    The replay keeps every held sample's live activations in both models, so its memory grows with
    the samples; the rows each layer is fitted on are drawn from those it holds.
    """
    count = len(next(iter(fit.values())))
    if room is None:
        return fit, count
    positions = live_sizes(original, shapes)
    held = max(1, most_samples(lambda n: 2 * held_bytes(positions, n, COMPACT_BYTES) + REPLAY_OVERHEAD,
                               room, count))
    return (fit, count) if held == count else (subset(fit, evenly_spread(count, held, seed)), held)


def ridge_fit_with(ridge: float):
    return lambda moments, current: ridge_fit(moments, current, ridge)


def _summary(report: dict, before, after) -> str:
    change = "quality n/a (nothing to measure on)"
    if before is not None and before.worst is not None:
        name, q = before.worst
        change = f"'{name}' {q.describe()} -> {after.outputs[name].describe()}"
    samples = report["samples_fitted"]
    if samples < report["calibration_samples"]:
        samples = f"{samples} of the {report['calibration_samples']} samples (as many as the memory budget holds)"
    else:
        samples = f"{samples} samples"
    return f"{report['layers']} layers fitted on {samples}, {report['seconds']:.1f} s; {change}"

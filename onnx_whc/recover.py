"""The recovery stage: give back accuracy lost to pruning, without training.

Runs after surgery and before validation, on the exported pruned model, against the original:

- `lsq`: each changed layer's weights and bias solved by ridge least squares so its outputs on
  calibration data match the original model's outputs of that layer, layer after layer on the
  pruned model's own (already recovered) activations;
- `stats`: each changed layer's output channels shifted and scaled to the original's mean and
  std on calibration data;
- `bias`: data-free; the expected value of every removed channel, estimated from the graph
  alone, folded into the biases of the layers that read it;
- `none`.

`auto` picks `lsq` with calibration data and `none` without: on the shared BN-folded models the
data-free estimate made accuracy worse (see benchmarks/results/recovery.md).
The report records the method, its settings, the time, and the fidelity (cosine similarity of
the outputs to the original's) on held-out calibration samples before and after.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx

from .calibration import Preprocess, load_calibration
from .errors import UserInputError
from .recovery import bias as data_free
from .recovery.fit import FitSettings, fit_layers
from .recovery.layers import find_layers
from .recovery.lsq import ridge_fit
from .recovery.replay import Replay, cast_to_inputs, run_model, samples_per_run
from .recovery.stats import renormalise
from .validate import cosine

METHODS = ("auto", "none", "bias", "stats", "lsq")


@dataclass
class RecoverySettings:
    method: str = "auto"
    samples: int = 20000  # sampled output positions per layer (lsq, stats)
    ridge: float = 1e-3  # ridge = this * trace(Gram) / dimension
    sequential: bool = True  # inputs from the recovered pruned model, not the original
    residual: bool = True  # a layer feeding a residual Add also corrects its shortcut's drift
    holdout: int = 64  # calibration samples kept apart to measure fidelity (at most a fifth)
    seed: int = 0


def resolve_method(method: str, has_calibration: bool) -> str:
    if method not in METHODS:
        raise UserInputError(f"--recover must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "auto":  # data-free bias compensation measured no gain on BN-folded models: not a default
        return "lsq" if has_calibration else "none"
    if method in ("stats", "lsq") and not has_calibration:
        raise UserInputError(f"--recover {method} needs calibration data: give --calib")
    return method


def check_calibration(calib: dict[str, np.ndarray], input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Calibration arrays keyed by input name, checked against the model's inputs."""
    if not isinstance(calib, dict):
        if len(input_shapes) != 1:
            raise UserInputError(f"calibration data must be keyed by input name ({', '.join(input_shapes)})")
        calib = {next(iter(input_shapes)): calib}
    missing = [name for name in input_shapes if name not in calib]
    if missing:
        raise UserInputError(f"calibration data has no array for model input '{missing[0]}'")
    counts = set()
    checked = {}
    for name, shape in input_shapes.items():
        array = np.asarray(calib[name])
        if not np.issubdtype(array.dtype, np.floating):
            raise UserInputError(f"calibration array '{name}' has dtype {array.dtype}, expected float32")
        if array.ndim != len(shape) or tuple(array.shape[1:]) != tuple(shape[1:]):
            want = "x".join(["N", *map(str, shape[1:])])
            raise UserInputError(f"calibration array '{name}' has shape {'x'.join(map(str, array.shape))}, "
                                 f"the model input needs {want}")
        counts.add(array.shape[0])
        checked[name] = array.astype(np.float32, copy=False)
    if len(counts) != 1 or 0 in counts:
        raise UserInputError("calibration arrays must hold the same, non-zero number of samples")
    return checked


def calibration_data(calib, input_shapes: dict[str, tuple[int, ...]], size: int | None = None,
                     preprocess: Preprocess | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration inputs from a path (folder of images, .npy, .npz) or from arrays, checked."""
    if isinstance(calib, (str, os.PathLike)):
        return load_calibration(calib, input_shapes, size, preprocess or Preprocess(), seed)
    checked = check_calibration(calib, input_shapes)
    return {name: array[:size] for name, array in checked.items()}


def _split(calib: dict, holdout: int) -> tuple[dict, dict]:
    count = len(next(iter(calib.values())))
    held = min(holdout, count // 5)
    fit = {k: v[:count - held] for k, v in calib.items()}
    return fit, ({k: v[count - held:] for k, v in calib.items()} if held else {})


def fidelity(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict, chunk: int) -> dict[str, float]:
    names = [o.name for o in original.graph.output]
    a, b = run_model(original, feeds, chunk), run_model(pruned, feeds, chunk)
    return {name: round(cosine(x, y), 6) for name, x, y in zip(names, a, b)}


def _random_feeds(input_shapes: dict, count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((count, *shape[1:])).astype(np.float32) for name, shape in input_shapes.items()}


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, keep: Callable[[str], np.ndarray | None],
            input_shapes: dict[str, tuple[int, ...]], calib: dict | None = None,
            settings: RecoverySettings = RecoverySettings(), shapes: dict | None = None,
            progress: Callable = lambda items: items) -> tuple[onnx.ModelProto, dict | None]:
    """Recover `pruned` towards `original`; `keep(tensor)` gives a tensor's surviving channels."""
    method = resolve_method(settings.method, calib is not None)
    if method == "none":
        return pruned, None
    if settings.samples < 1 or settings.ridge < 0 or settings.holdout < 0:
        raise UserInputError("recovery needs samples >= 1, ridge >= 0 and holdout >= 0")
    start = time.perf_counter()
    chunk = samples_per_run(original, shapes)
    if calib is not None:
        calib = cast_to_inputs(original, check_calibration(calib, input_shapes))
        fit, held = _split(calib, settings.holdout)
        measured_on = f"{len(next(iter(held.values())))} held-out calibration samples" if held else "nothing"
    else:
        fit, held = None, cast_to_inputs(original, _random_feeds(input_shapes, 16, settings.seed))
        measured_on = "16 random normal inputs (no calibration data)"
    before = fidelity(original, pruned, held, chunk) if held else {}
    layers = find_layers(pruned, keep)
    if method == "bias":
        recovered, records = data_free.compensate(original, pruned, layers)
    else:
        update = ridge_fit_with(settings.ridge) if method == "lsq" else renormalise
        fit_settings = FitSettings(samples=settings.samples, sequential=settings.sequential,
                                   residual=settings.residual, seed=settings.seed)
        source, target = Replay(original, fit, chunk), Replay(pruned, fit, chunk)
        sizes = {name: int(np.prod(s[1:])) for name, s in (shapes or {}).items()
                 if s and all(isinstance(d, int) for d in s)}
        records = fit_layers(source, target, layers, update, fit_settings, sizes, progress)
        recovered = target.export()
    after = fidelity(original, recovered, held, chunk) if held else {}
    seconds = time.perf_counter() - start
    report = {
        "method": method,
        "settings": {k: v for k, v in asdict(settings).items() if k != "method"},
        "calibration_samples": 0 if fit is None else len(next(iter(fit.values()))),
        "layers": len(records),
        "fidelity_on": measured_on,
        "fidelity_before": before,
        "fidelity_after": after,
        "seconds": round(seconds, 3),
        "per_layer": records,
    }
    report["summary"] = _summary(report)
    return recovered, report


def ridge_fit_with(ridge: float):
    return lambda moments, current: ridge_fit(moments, current, ridge)


def _worst(fidelity: dict[str, float]) -> float:
    return min(fidelity.values()) if fidelity else float("nan")


def _summary(report: dict) -> str:
    return (f"{report['layers']} layers, {report['calibration_samples']} calibration samples, "
            f"fidelity {_worst(report['fidelity_before']):.4f} -> {_worst(report['fidelity_after']):.4f} "
            f"on {report['fidelity_on']}, {report['seconds']:.1f} s")

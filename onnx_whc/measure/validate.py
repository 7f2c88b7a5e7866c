"""Check a pruned model against its original with ONNX Runtime.

The checker, identical output names and shapes on the same random input, and latency medians
(CUDA when it really runs, else CPU). How close the outputs stay is `onnx_whc.measure.quality`'s job,
on data that looks like real inputs.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ValidationError
from ..graph.runtime import best_providers, random_inputs, session
from ..graph.storage import fits_protobuf, save_external  # models over protobuf's 2 GB go through a file


@dataclass
class Validation:
    provider: str
    latency_ms_before: float
    latency_ms_after: float
    output_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.latency_ms_before / self.latency_ms_after if self.latency_ms_after else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / denom)


def check(model: onnx.ModelProto) -> None:
    try:
        if fits_protobuf(model):
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model.onnx")
                save_external(model, path, "model.data")
                onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ValidationError(f"the pruned model fails the ONNX checker: {str(err).splitlines()[0]}") from None


def time_pair(before: ort.InferenceSession, after: ort.InferenceSession, feeds: dict, runs: int,
              warmup: int = 3) -> tuple[list[float], list[float]]:
    """Interleaved timings (ms) so drifting clocks and other load hit both models alike."""
    for _ in range(warmup):
        before.run(None, feeds)
        after.run(None, feeds)
    times_before, times_after = [], []
    for _ in range(runs):
        for sess, times in ((before, times_before), (after, times_after)):
            start = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - start) * 1000)
    return times_before, times_after


def validate(original: onnx.ModelProto | str, pruned: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
             runs: int = 20, provider: str | None = None) -> Validation:
    """Raise ValidationError when the pruned model is broken; else measure it."""
    check(pruned)
    providers = best_providers(provider)
    try:
        before = session(original, providers)
        after = session(pruned, providers)
    except Exception as err:  # ORT raises several exception types on load
        raise ValidationError(f"ONNX Runtime cannot load a model: {str(err).splitlines()[0]}") from None
    names_before = [o.name for o in before.get_outputs()]
    names_after = [o.name for o in after.get_outputs()]
    if names_before != names_after:
        raise ValidationError(f"output names changed: {names_before} -> {names_after}")
    feeds = random_inputs(before, input_shapes)
    try:
        out_before = before.run(None, feeds)
        out_after = after.run(None, feeds)
    except Exception as err:
        raise ValidationError(f"the pruned model does not run: {str(err).splitlines()[0]}") from None
    for name, a, b in zip(names_before, out_before, out_after):
        if a.shape != b.shape:
            raise ValidationError(f"output '{name}' changed shape: {a.shape} -> {b.shape}")
    times_before, times_after = time_pair(before, after, feeds, runs)
    return Validation(
        provider=after.get_providers()[0],
        latency_ms_before=float(np.median(times_before)),
        latency_ms_after=float(np.median(times_after)),
        output_shapes={name: list(a.shape) for name, a in zip(names_before, out_after)},
    )

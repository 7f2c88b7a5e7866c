"""Side-by-side latency of an original and a pruned model in ONNX Runtime.

Both models run on the same inputs, interleaved run by run (so clock drift and other load hit
both alike), at several batch sizes; the measured speedup is set against the ideal one, the
ratio of their MACs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..errors import UserInputError, ValidationError, first_line
from ..graph.load import load
from ..graph.runtime import best_providers, random_inputs, session
from ..measure.metrics import model_cost
from ..measure.validate import time_pair
from ..progress import progress_bar
from .profile import LayerTime, by_layer, layer_macs, layer_times, node_names, node_times


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, times_ms: list[float]) -> Timing:
        return cls(float(np.median(times_ms)), float(np.min(times_ms)), float(np.max(times_ms)))


@dataclass
class BatchTiming:
    batch: int
    original: Timing
    pruned: Timing

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms if self.pruned.median_ms else 0.0


@dataclass
class BenchResult:
    original: str
    pruned: str
    provider: str
    threads: int | None  # ONNX Runtime intra-op threads; None: its default (one per physical core)
    runs: int
    warmup: int
    macs_original: int
    macs_pruned: int
    params_original: int
    params_pruned: int
    batches: list[BatchTiming] = field(default_factory=list)
    layers: list[LayerTime] = field(default_factory=list)  # --layers: the slowest nodes, profiled
    layers_batch: int | None = None

    @property
    def ideal_speedup(self) -> float:
        """What the MACs promise: the speedup if latency were proportional to them."""
        return self.macs_original / self.macs_pruned if self.macs_pruned else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ideal_speedup"] = self.ideal_speedup
        for row, timing in zip(data["batches"], self.batches):
            row["speedup"] = timing.speedup
            row["of_ideal"] = timing.speedup / self.ideal_speedup if self.ideal_speedup else 0.0
        for row, layer in zip(data["layers"], self.layers):
            row["speedup"], row["ideal"] = layer.speedup, layer.ideal
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        threads = f"{self.threads} intra-op threads" if self.threads else "default threads"
        lines = [
            f"{self.provider} ({threads}), median of {self.runs} interleaved runs after {self.warmup} warm-up runs "
            "(min-max)",
            f"MACs {self.macs_original / 1e6:.1f} M -> {self.macs_pruned / 1e6:.1f} M: "
            f"ideal speedup {self.ideal_speedup:.2f}x",
            f"{'batch':>5}  {'original ms':>23}  {'pruned ms':>23}  {'speedup':>7}  {'of ideal':>8}",
        ]
        for row in self.batches:
            lines.append(f"{row.batch:5d}  {_fmt(row.original):>23}  {_fmt(row.pruned):>23}  "
                         f"{row.speedup:6.2f}x  {row.speedup / self.ideal_speedup if self.ideal_speedup else 0:8.0%}")
        if self.layers:
            lines += [f"slowest {len(self.layers)} layers of the original at batch {self.layers_batch} "
                      "(ONNX Runtime profiler, mean kernel ms; ideal = MACs ratio)",
                      f"{'layer':<40}  {'op':<14}  {'original':>8}  {'pruned':>8}  {'speedup':>7}  {'ideal':>6}"]
            for layer in self.layers:
                lines.append(f"{_short(layer.node):<40}  {layer.op:<14}  {layer.ms_original:8.3f}  "
                             f"{_opt(layer.ms_pruned, '8.3f')}  {_opt(layer.speedup, '6.2f', 'x')}  "
                             f"{_opt(layer.ideal, '5.2f', 'x')}")
        return "\n".join(lines)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _opt(value: float | None, spec: str, unit: str = "") -> str:
    """A number, or n/a where there is none (a node fused away, a layer without MACs)."""
    width = int(spec.split(".")[0]) + len(unit)
    return f"{value:{spec}}{unit}" if value is not None else "n/a".rjust(width)


def _fmt(t: Timing) -> str:
    return f"{t.median_ms:.2f} ({t.min_ms:.2f}-{t.max_ms:.2f})"


def compare(
    original,
    pruned,
    batches: tuple[int, ...] = (1, 8, 32),
    provider: str | None = None,
    runs: int = 20,
    warmup: int = 3,
    progress: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    threads: int | None = None,
    layers: int = 0,
) -> BenchResult:
    """Time both models (paths or ModelProtos) at each batch size; raise UserInputError when one fails.

    `threads` pins ONNX Runtime's intra-op threads: on a busy machine one thread gives steadier numbers.
    `layers` > 0 profiles both models at the first batch size and reports the slowest nodes.
    """
    batches = _check_counts(batches, runs, warmup)
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads must be at least 1, got {threads}")
    models = {"original": original, "pruned": pruned}
    loaded = {role: load(model, input_shapes) for role, model in models.items()}
    inputs = {role: m.input_shapes for role, m in loaded.items()}
    if _without_batch(inputs["original"]) != _without_batch(inputs["pruned"]):
        raise UserInputError(f"the models take different inputs: {_describe(inputs['original'])} (original) vs "
                             f"{_describe(inputs['pruned'])} (pruned)")
    for model in loaded.values():
        _check_batch_dims(model, batches)
    costs = {role: model_cost(m.graph, m.shapes) for role, m in loaded.items()}
    macs = {role: layer_macs(m) for role, m in loaded.items()} if layers else {}
    names = {role: node_names(m) for role, m in loaded.items()} if layers else {}
    del loaded  # the graphs hold every weight; ONNX Runtime is about to load its own copy
    try:
        providers = best_providers(provider)
    except ValidationError as err:
        raise UserInputError(str(err)) from None
    sessions = {role: _open(model, providers, role, threads) for role, model in models.items()}
    result = BenchResult(
        original=_label(original, "original"), pruned=_label(pruned, "pruned"),
        provider=sessions["pruned"].get_providers()[0], threads=threads, runs=runs, warmup=warmup,
        macs_original=costs["original"].macs, macs_pruned=costs["pruned"].macs,
        params_original=costs["original"].params, params_pruned=costs["pruned"].params)
    for batch in progress_bar(progress, "timing batches")(batches):
        feeds = random_inputs(sessions["original"], inputs["original"], batch)
        for role, sess in sessions.items():
            _run_once(sess, feeds, role, batch)
        times_original, times_pruned = time_pair(sessions["original"], sessions["pruned"], feeds, runs, warmup)
        result.batches.append(BatchTiming(batch, Timing.of(times_original), Timing.of(times_pruned)))
    if layers > 0:
        feeds = random_inputs(sessions["original"], inputs["original"], batches[0])
        del sessions  # profiling sessions of their own: profiling slows every run it records
        times = {role: by_layer(node_times(model, providers, feeds, runs, warmup, threads), names[role])
                 for role, model in progress_bar(progress, "profiling layers")(list(models.items()))}
        result.layers = layer_times(times["original"], times["pruned"], macs["original"], macs["pruned"], layers)
        result.layers_batch = batches[0]
    return result


def _check_counts(batches, runs: int, warmup: int) -> tuple[int, ...]:
    batches = tuple(int(b) for b in batches)
    if not batches or min(batches) < 1:
        raise UserInputError(f"--batch needs positive batch sizes, got {','.join(map(str, batches)) or 'none'}")
    if runs < 1 or warmup < 0:
        raise UserInputError(f"--runs must be at least 1 and --warmup at least 0 (got {runs} and {warmup})")
    return batches


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32), for the command line."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserInputError(f"--batch '{text}' is not a comma-separated list of integers (e.g. 1,8,32)") from None


def _without_batch(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(shape[1:]) for name, shape in shapes.items()}


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name}:{'x'.join(map(str, ('N',) + tuple(s[1:])))}" for name, s in shapes.items())


def _check_batch_dims(loaded, batches: tuple[int, ...]) -> None:
    """A model exported with a fixed batch runs only at that batch: say so instead of failing in ORT."""
    for tensor in loaded.graph.inputs:
        fixed = tensor.shape[0] if tensor.shape and isinstance(tensor.shape[0], int) and tensor.shape[0] > 0 else None
        wrong = [b for b in batches if fixed is not None and b != fixed]
        if wrong:
            raise UserInputError(f"input '{tensor.name}' has a fixed batch of {fixed}: use --batch {fixed}")


def _label(model, role: str) -> str:
    return role if isinstance(model, onnx.ModelProto) else os.fspath(model)


def _open(model, providers: list[str], role: str, threads: int | None):
    try:
        return session(model, providers, threads)
    except Exception as err:  # ORT raises several exception types on load
        raise UserInputError(f"ONNX Runtime cannot load the {role} model ({first_line(err)})") from None


def _run_once(sess, feeds: dict, role: str, batch: int) -> None:
    try:
        sess.run(None, feeds)
    except Exception as err:
        raise UserInputError(f"the {role} model does not run at batch {batch} ({first_line(err)})") from None

"""Measured channel widths: keep the counts at which a layer really gets faster on the target runtime.

Latency falls in steps as channels go: ONNX Runtime's CPU kernels work in blocks of 8 or 16
channels, GPUs in tensor-core tiles, and a narrow depthwise conv off a block boundary can be
slower than a wider one. For every prunable group the nodes that read or write its channels are
cut out as a small model of their own (real weights, real shapes), pruned by the usual surgery to
each candidate width and timed on the chosen provider, all widths interleaved run by run. A width
is a *step* when it is measurably faster than every wider one; selection then rounds each kept
count up to the next step, keeping channels that would cost no time (HALP and NetAdapt measure
latency the same way, per layer, on the device).

Measurements are cached on disk, keyed by the runtime (provider, processor, ONNX Runtime version,
threads, batch) and the cut-out's structure and shapes: repeated blocks of one model, and the same
layers in another, are measured once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..errors import first_line
from ..graph.dependency import ChannelAnalysis, ChannelGroup
from ..graph.load import LoadedModel
from ..graph.plan import GroupDecision, PrunePlan

MEASURED = "measured"  # the --round-to value that asks for measured widths
CANDIDATES = 24  # widths timed per group, at most
SMALLEST_KEPT = 0.1  # no plan keeps less of a group than this share: no need to time narrower widths
STEP = 0.03  # a width is a step when it is this much faster than every wider one
ROUNDS, WARMUP = 9, 2
CACHE_VERSION = 1


@dataclass
class WidthSteps:
    """Per group id, the kept widths that are steps (ascending); groups without measurement absent."""

    steps: dict[int, np.ndarray] = field(default_factory=dict)
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # id -> (widths up, ms)
    measured: int = 0  # groups timed now
    cached: int = 0  # groups read from the cache
    failed: dict[int, str] = field(default_factory=dict)  # group id -> why it could not be timed
    seconds: float = 0.0
    runtime: str = ""

    def keep(self, group_id: int, wanted: int, channels: int) -> int:
        """The smallest step at or above `wanted` kept channels (all of them past the last step)."""
        steps = self.steps.get(group_id)
        if steps is None:
            return wanted
        above = steps[steps >= wanted]
        return int(above[0]) if len(above) else channels

    def ms(self, group_id: int, width: int) -> float:
        """The group's cut-out latency at a kept width (interpolated between timed widths)."""
        widths, ms = self.tables[group_id]
        return float(np.interp(width, widths, ms))

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "groups_measured": self.measured, "groups_cached": self.cached,
                "groups_failed": self.failed, "seconds": round(self.seconds, 2),
                "steps": {str(gid): steps.tolist() for gid, steps in self.steps.items()}}


def candidate_widths(channels: int) -> list[int]:
    """Widths to time, widest first: every width for narrow groups, an even ladder for wide ones."""
    low = max(1, math.ceil(channels * SMALLEST_KEPT))
    stride = max(1, 2 ** math.ceil(math.log2(max(1.0, (channels - low) / (CANDIDATES - 1)))))
    ladder = set(range(stride * math.ceil(low / stride), channels, stride)) | {channels}
    return sorted(ladder, reverse=True)


def steps_of(widths: list[int], ms: list[float]) -> np.ndarray:
    """Widths faster by more than STEP than every wider width (the widest always kept), ascending."""
    best, steps = math.inf, []
    for width, t in sorted(zip(widths, ms), reverse=True):
        if t < best * (1 - STEP):
            steps.append(width)
            best = t
    return np.asarray(sorted(steps), dtype=np.int64)


def runtime_key(provider: str, threads: int | None, batch: int) -> str:
    return (f"{provider}|{processor()}|onnxruntime {ort.__version__}|threads {threads or 'default'}|batch {batch}")


def measure_widths(loaded: LoadedModel, analysis: ChannelAnalysis, providers: list[str], threads: int | None = None,
                   batch: int = 1, cache: Path | None = None, progress: Callable = lambda items: items
                   ) -> WidthSteps:
    """The latency steps of every prunable group on `providers[0]` (read from `cache` where known)."""
    start = time.perf_counter()
    runtime = runtime_key(providers[0], threads, batch)
    path = cache if cache is not None else default_cache()
    stored = _read_cache(path)
    found = WidthSteps(runtime=runtime)
    for group in progress([g for g in analysis.groups if g.prunable and g.channels > 1]):
        cut = _cut_out(loaded, analysis, group)
        if cut is None:
            found.failed[group.id] = "its channels reach no node"
            continue
        key = hashlib.sha1(f"{runtime}|{_signature(cut, loaded.shapes)}".encode()).hexdigest()
        if key in stored:
            entry = stored[key]
            found.cached += 1
        else:
            try:
                widths = candidate_widths(group.channels)
                entry = {"widths": widths, "ms": _time_widths(loaded, analysis, group, cut, widths, providers,
                                                              threads, batch)}
            except Exception as err:  # ORT raises several types: a cut-out that will not run is not timed
                found.failed[group.id] = first_line(err)[:200]
                continue
            stored[key] = entry
            found.measured += 1
        found.steps[group.id] = steps_of(entry["widths"], entry["ms"])
        order = np.argsort(entry["widths"])
        found.tables[group.id] = (np.asarray(entry["widths"])[order], np.asarray(entry["ms"])[order])
    if found.measured:
        _write_cache(path, stored)
    found.seconds = time.perf_counter() - start
    return found


def default_cache() -> Path:
    base = os.environ.get("ONNX_WHC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "onnx-whc")
    return Path(base) / "widths.json"


def processor() -> str:
    """The CPU's model name (what the cache and the benchmarks key timings by)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _carriers(analysis: ChannelAnalysis, group: ChannelGroup) -> set[str]:
    """Tensors holding some of the group's channels."""
    return {name for name, atoms in analysis.maps.items() if np.isin(analysis.roots[atoms], group.classes).any()}


def _cut_out(loaded: LoadedModel, analysis: ChannelAnalysis, group: ChannelGroup) -> gs.Graph | None:
    """A copy of the nodes that read or write the group's channels, as a graph of their own.

    Its inputs are the tensors those nodes read from elsewhere, its outputs those they hand on.
    """
    carriers = _carriers(analysis, group)
    graph = loaded.graph.copy()
    nodes = [n for n in graph.nodes if any(t.name in carriers for t in n.inputs + n.outputs
                                           if isinstance(t, gs.Variable))]
    if not nodes:
        return None
    inside = {id(n) for n in nodes}
    produced = {t.name for n in nodes for t in n.outputs}
    inputs, outputs, seen = [], [], set()
    for node in nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Variable) and tensor.name not in produced and tensor.name not in seen:
                seen.add(tensor.name)
                inputs.append(tensor)
        for tensor in node.outputs:
            readers = tensor.outputs
            if tensor in graph.outputs or not readers or any(id(r) not in inside for r in readers):
                outputs.append(tensor)
    for tensor in inputs:
        tensor.inputs.clear()  # cut from its producer, which stays out
        tensor.dtype = tensor.dtype or np.float32
    graph.inputs, graph.outputs = inputs, outputs
    for tensor in outputs:
        tensor.shape, tensor.dtype = None, tensor.dtype or np.float32
    graph.cleanup().toposort()
    return graph


def _signature(cut: gs.Graph, shapes: dict) -> str:
    """The cut-out's ops, attributes, wiring and shapes: equal for repeated blocks."""
    index = {t.name: i for i, t in enumerate(cut.inputs)}
    parts = [f"in {tuple(shapes.get(t.name) or ())}" for t in cut.inputs]
    for node in cut.nodes:
        args = []
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                args.append(f"c{tuple(tensor.values.shape)}")
            else:
                args.append(f"v{index.setdefault(tensor.name, len(index))}")
        for tensor in node.outputs:
            index.setdefault(tensor.name, len(index))
        attrs = sorted((k, repr(v)) for k, v in node.attrs.items())
        parts.append(f"{node.op}{attrs}({','.join(args)})->{[index[t.name] for t in node.outputs]}")
    return ";".join(parts)


def _pruned_cut(loaded: LoadedModel, analysis: ChannelAnalysis, group: ChannelGroup, cut: gs.Graph, width: int,
                batch: int):
    """The cut-out with the group narrowed to `width` channels, exported with its input shapes.

    The removed channels are spread evenly, so every tensor of a concatenated group keeps some.
    """
    from ..graph.equivalence import export
    from ..graph.surgery import apply_plan

    graph = cut.copy()
    work = LoadedModel(graph, loaded.shapes, loaded.input_shapes, loaded.ir_version, loaded.opset,
                       loaded.initializers_as_inputs)
    kept = np.unique(np.round(np.linspace(0, group.channels - 1, width)).astype(np.int64))
    removed = np.setdiff1d(np.arange(group.channels), kept)
    plan = PrunePlan([GroupDecision(group, removed)])
    inputs = list(graph.inputs)
    apply_plan(work, analysis, plan)
    for tensor in inputs:
        shape = list(loaded.shapes[tensor.name])
        shape[0] = batch
        mask = analysis.keep_mask(tensor.name, group.classes[removed])
        if mask is not None:
            shape[analysis.axis(tensor.name)] = int(mask.sum())
        tensor.shape = shape
    graph.inputs = inputs
    return export(graph, work), {t.name: tuple(t.shape) for t in inputs}


def _time_widths(loaded, analysis, group, cut, widths, providers, threads, batch) -> list[float]:
    """Median ms of the cut-out at each width, the widths timed in turn, round after round."""
    from ..graph.runtime import random_inputs, session

    sessions, feeds = [], []
    for width in widths:
        model, shapes = _pruned_cut(loaded, analysis, group, cut, width, batch)
        sess = session(model, providers, threads)
        sessions.append(sess)
        feeds.append(random_inputs(sess, shapes, batch))
    times = [[] for _ in widths]
    for round_ in range(WARMUP + ROUNDS):
        for sess, feed, record in zip(sessions, feeds, times):
            begin = time.perf_counter()
            sess.run(None, feed)
            if round_ >= WARMUP:
                record.append((time.perf_counter() - begin) * 1000)
    return [round(float(np.median(t)), 5) for t in times]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path, entries: dict) -> None:
    """Atomically, so two runs at once never leave half a file; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".widths-")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f)
        os.replace(tmp, path)
    except OSError:
        pass

"""The memory budget of a prune, and what holding a model's activations costs per sample.

The passes over calibration data (the allocator's probes, recovery's replay, quality) hold
activations for many samples at once; each sizes how many it holds from the room the budget leaves
once the model is loaded, so peak memory follows the budget, not the number of images.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UserInputError

DEFAULT_SHARE = 0.25  # of the memory available when the prune starts
GB = 1e9
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def available_bytes() -> int:
    """Memory the system can give without swapping (MemAvailable), or the physical memory."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def parse_size(text: str) -> int:
    """'4G', '500M', '2.5GB', '1e9' -> bytes (powers of ten, as memory is sold)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserInputError(f"--memory {text}: give a size such as 4G or 500M")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(size: float) -> str:
    return f"{size / GB:.1f} GB" if size >= GB else f"{size / 1e6:.0f} MB"


@dataclass(frozen=True)
class MemoryBudget:
    """The most memory a prune may hold, and where that figure came from."""

    total: int
    source: str

    @classmethod
    def of(cls, size: int | str | None) -> MemoryBudget:
        if size is None:
            available = available_bytes()
            return cls(int(DEFAULT_SHARE * available), f"a quarter of the {format_size(available)} available")
        total = parse_size(size) if isinstance(size, str) else int(size)
        if total <= 0:
            raise UserInputError(f"--memory {size}: the budget must be positive")
        return cls(total, f"--memory {format_size(total)}")


def sample_bytes(shapes: dict, names, itemsize: int = 4) -> int:
    """Bytes of the tensors `names` for one sample (shapes with batch 1; unknown sizes count nothing)."""
    return sum(itemsize * elements_per_sample(shapes.get(name)) for name in names)


def elements_per_sample(shape) -> int:
    """Values per sample of a tensor of `shape` (batch first), or 0 when a dimension is not a fixed size."""
    if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return 0
    return int(np.prod(shape[1:], dtype=np.int64))


def live_sizes(model, shapes: dict) -> list[list[int]]:
    """For every position between nodes, the elements per sample of each tensor alive across it.

    `model` is an onnx ModelProto or an onnx-graphsurgeon Graph, its nodes in topological order. A
    tensor is alive from its producer until its last reader (graph outputs until the end): what a
    model stepped forward node by node over all samples holds at once.
    """
    nodes, inputs, outputs = _io(model)
    last_use = {name: index for index, (reads, _) in enumerate(nodes) for name in reads}
    live = {name: elements_per_sample(shapes.get(name)) for name in inputs}
    positions = []
    for index, (_, writes) in enumerate(nodes):
        live.update({name: elements_per_sample(shapes.get(name)) for name in writes if name})
        live = {name: size for name, size in live.items() if last_use.get(name, -1) > index or name in outputs}
        positions.append(list(live.values()))
    return positions


def _io(model) -> tuple[list[tuple[list[str], list[str]]], list[str], set[str]]:
    """(each node's input and output tensor names, the graph's data inputs, its outputs), weights left out."""
    if isinstance(model, onnx.ModelProto):
        graph = model.graph
        weights = {t.name for t in graph.initializer}
        nodes = [([n for n in node.input if n not in weights], list(node.output)) for node in graph.node]
        return nodes, [i.name for i in graph.input if i.name not in weights], {o.name for o in graph.output}
    variables = [[t.name for t in ts if not hasattr(t, "values")] for node in model.nodes
                 for ts in (node.inputs, node.outputs)]
    nodes = list(zip(variables[::2], variables[1::2]))
    return nodes, [t.name for t in model.inputs], {t.name for t in model.outputs}


def held_bytes(positions: list[list[int]], samples: int, compact_bytes: int) -> int:
    """The most bytes held at any position for `samples` samples, a tensor over `compact_bytes` in all
    held in float16 (as recovery's replay does)."""
    def at(sizes):
        return sum(size * samples * (2 if 4 * size * samples > compact_bytes else 4) for size in sizes)
    return max((at(sizes) for sizes in positions), default=0)


def check_fits(budget: MemoryBudget, graph, shapes: dict, weight_bytes: int) -> None:
    """One `error:` line, before any work, when the model cannot run one sample within `budget`.

    Running needs the process as it is now, ONNX Runtime's copy of the weights per session (two
    models side by side at most), and one sample's live activations in each.
    """
    needed = current_rss() + 2 * weight_bytes + 2 * held_bytes(live_sizes(graph, shapes), 1, 1 << 62)
    if needed > budget.total:
        raise UserInputError(
            f"the memory budget ({budget.source}) is too small for this model: running it on one sample needs "
            f"about {format_size(needed)}; give --memory {int(np.ceil(2 * needed / GB))}G or more")


def most_samples(cost, room: int, count: int) -> int:
    """The most samples, at most `count`, whose `cost(samples)` fits in `room` (0 when one does not)."""
    if cost(count) <= room:
        return count
    low, high = 0, count  # cost(low) fits, cost(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= room else (low, middle)
    return low

"""Where the time goes: ONNX Runtime's per-node profile of an original and a pruned model.

Each model runs in its own profiling session (profiling slows every run, so these runs are not
the ones `bench` times); node kernel times are averaged over the runs after a warm-up. Nodes are
matched by name, which pruning keeps; a node ONNX Runtime fused into another (a Relu into its
Conv) shows up under the surviving node's name. The MACs of each layer (`metrics.node_macs`)
say what speedup it should have had.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..graph.load import LoadedModel
from ..measure.metrics import node_macs

_SUFFIX = "_kernel_time"


@dataclass
class LayerTime:
    node: str
    op: str
    ms_original: float
    ms_pruned: float | None  # None: no node of that name ran in the pruned model
    macs_original: int
    macs_pruned: int

    @property
    def speedup(self) -> float | None:
        return self.ms_original / self.ms_pruned if self.ms_pruned else None

    @property
    def ideal(self) -> float | None:
        return self.macs_original / self.macs_pruned if self.macs_pruned else None


def node_times(model, providers: list[str], feeds: dict, runs: int, warmup: int, threads: int | None
               ) -> dict[str, tuple[str, float]]:
    """{node name: (op type, mean kernel milliseconds per run)} from ONNX Runtime's profiler."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        if threads:
            options.intra_op_num_threads = threads
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        sess = ort.InferenceSession(source, options, providers=providers)
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as file:
            events = json.load(file)
    durations: dict[str, list[float]] = defaultdict(list)  # in run order
    ops: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith(_SUFFIX):
            node = name[: -len(_SUFFIX)]
            durations[node].append(event.get("dur", 0) / 1000.0)
            ops[node] = event.get("args", {}).get("op_name", "")
    # A node runs once per run: its last `runs` events are the timed runs, the warm-up ones come first.
    return {node: (ops[node], float(np.mean(times[-runs:]))) for node, times in durations.items()}


def layer_macs(loaded: LoadedModel) -> dict[str, int]:
    return {node.name: node_macs(node, loaded.shapes) for node in loaded.graph.nodes}


_FUSED_INTO_PRODUCER = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Sum"}


def node_names(loaded: LoadedModel) -> dict[str, str]:
    """Profiler node name -> the model's layer it times.

    ONNX Runtime's CPU layout pass renames a Conv (with the activation or residual Add it fused)
    after its output tensor, '<tensor>_nchwc'; such a name is traced back to the layer that made
    the tensor, through the ops fused into it.
    """
    layer_of: dict[str, str] = {}
    names = {node.name: node.name for node in loaded.graph.nodes}
    for node in loaded.graph.nodes:
        upstream = [layer_of[t.name] for t in node.inputs if t.name in layer_of]
        fused = node.op in _FUSED_INTO_PRODUCER and upstream
        for tensor in node.outputs:
            layer_of[tensor.name] = upstream[0] if fused else node.name
    names.update({f"{tensor}_nchwc": layer for tensor, layer in layer_of.items()})
    return names


def by_layer(times: dict[str, tuple[str, float]], names: dict[str, str]) -> dict[str, tuple[str, float]]:
    """Profiled nodes summed per layer of the model (unknown names, e.g. layout reorders, stay as they are)."""
    layers: dict[str, tuple[str, float]] = {}
    for name, (op, ms) in times.items():
        layer = names.get(name, name)
        previous = layers.get(layer, (op, 0.0))
        layers[layer] = (previous[0], previous[1] + ms)
    return layers


def layer_times(times_original: dict, times_pruned: dict, macs_original: dict[str, int],
                macs_pruned: dict[str, int], top: int) -> list[LayerTime]:
    """The `top` layers by original time, with their pruned time and MACs on both sides."""
    ranked = sorted(times_original.items(), key=lambda item: -item[1][1])[:top]
    rows = []
    for node, (op, ms) in ranked:
        after = times_pruned.get(node)
        rows.append(LayerTime(node, op, ms, after[1] if after else None, macs_original.get(node, 0),
                              macs_pruned.get(node, 0)))
    return rows

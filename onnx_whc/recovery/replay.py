"""Run an ONNX model forward in segments with ONNX Runtime, keeping the live activations.

Recovery visits the layers in topological order and needs each layer's input on every
calibration sample, computed with the weights already recovered upstream. Running the whole
model once per layer would cost a pass per layer; a `Replay` instead runs only the nodes between
the last stop and the next, as a small ONNX model whose inputs are the cached tensors, and drops
each tensor after its last reader. Samples are split into fixed chunks once, so tensors that are
not per-sample (a Shape feeding a Reshape) stay consistent with the chunk they came from.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.constants import list_initializers_as_inputs
from ..graph.runtime import elem_types, session


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (If/Loop/Scan body) reads from the enclosing graph."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads = set()
    for node in graph.node:
        defined |= set(node.output)
        reads |= {name for name in node.input if name}
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                reads |= _subgraph_reads(sub)
    return reads - defined


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads, including those captured by its subgraphs."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names += sorted(_subgraph_reads(sub) - set(names))
    return names


# An activation larger than this over all samples is held in float16: the two models' early
# expansions of a 224x224 mobile net are 2 GB each in float32 for 400 images. Its readers compute
# in float32 again (a relative rounding of 5e-4, below what the fits can use).
COMPACT_BYTES = 256 << 20
class Weights:
    """A model's nodes and initializers, editable one node input at a time."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.weights = {t.name: t for t in model.graph.initializer}
        self.reads = [node_reads(node) for node in self.nodes]
        self.index = {node.name: i for i, node in enumerate(self.nodes)}

    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[self.index[name]]

    def weight(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.weights[name])

    def set_input(self, node_name: str, index: int, values: np.ndarray, dtype) -> None:
        """Give a node's input `index` new constant values (appending the input when absent)."""
        node = self.nodes[self.index[node_name]]
        old = node.input[index] if index < len(node.input) else ""
        shared = sum(old in n.input for n in self.nodes) > 1 if old else False
        name = old if old and not shared and old in self.weights else f"{node_name}.recovered_{index}"
        self.weights[name] = numpy_helper.from_array(np.ascontiguousarray(values, dtype=dtype), name)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        self.reads[self.index[node_name]] = node_reads(node)

    def export(self) -> onnx.ModelProto:
        """The model with every weight change applied; unused weights dropped."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        used = {name for names in self.reads for name in names}
        del model.graph.node[:]
        model.graph.node.extend(self.nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(t for name, t in self.weights.items() if name in used)
        former = {t.name for t in self.model.graph.initializer}
        if model.ir_version < 4 or any(i.name in former for i in self.model.graph.input):
            list_initializers_as_inputs(model, former)  # the model's own convention, new weights too
        return model


class Replay(Weights):
    """A model stepped forward node range by node range over a fixed set of samples."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], chunk: int,
                 providers: list[str] | None = None):
        super().__init__(model)
        self.types = elem_types(model)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.providers = providers
        self.last_use: dict[str, int] = {}
        for index, names in enumerate(self.reads):
            for name in names:
                self.last_use[name] = index
        count = len(next(iter(feeds.values())))
        self.bounds = [(lo, min(lo + chunk, count)) for lo in range(0, count, chunk)]
        self.cache = {name: [value[lo:hi] for lo, hi in self.bounds] for name, value in feeds.items()}
        self.position = 0
        self.held: set[str] = set()
        self.compacted: set[str] = set()  # float32 tensors held in float16

    @property
    def samples(self) -> int:
        return self.bounds[-1][1]

    def chunks(self, name: str) -> list[np.ndarray]:
        return self.cache[name]

    def tensor(self, name: str) -> np.ndarray:
        return np.concatenate(self.cache[name])

    def run_to(self, node_name: str, through: bool = False) -> None:
        """Compute everything before the node (and the node itself when `through`)."""
        stop = self.index[node_name] + int(through)
        if stop > self.position:
            self._run(self.position, stop)
            self.position = stop

    def _run(self, start: int, stop: int) -> None:
        nodes = self.nodes[start:stop]
        produced = {name for node in nodes for name in node.output if name}
        inputs, weights = [], []
        for names in self.reads[start:stop]:
            for name in names:
                if name in produced or name in inputs or name in weights:
                    continue
                (weights if name in self.weights else inputs).append(name)
        outputs = [name for node in nodes for name in node.output if name and (
            self.last_use.get(name, -1) >= stop or name in self.graph_outputs or name in self.held)]
        if outputs:
            segment = self._segment(nodes, inputs, weights, outputs)
            sess = session(segment, self.providers)
            results = []
            for c in range(len(self.bounds)):
                feeds = {n: self.cache[n][c].astype(np.float32) if n in self.compacted else self.cache[n][c]
                         for n in inputs}
                run = sess.run(outputs, feeds)
                if c == 0:  # chunks are alike: the first decides which outputs are held in float16
                    self.compacted |= {name for name, value in zip(outputs, run) if value.dtype == np.float32
                                       and value.nbytes * len(self.bounds) > COMPACT_BYTES}
                results.append([value.astype(np.float16) if name in self.compacted else value
                                for name, value in zip(outputs, run)])
            for j, name in enumerate(outputs):
                self.cache[name] = [r[j] for r in results]
        for name in list(self.cache):
            if self.last_use.get(name, -1) < stop and name not in self.graph_outputs and name not in self.held:
                del self.cache[name]
                self.compacted.discard(name)

    def _segment(self, nodes, inputs, weights, outputs) -> onnx.ModelProto:
        def info(name, dtype=None):
            elem = helper.np_dtype_to_tensor_dtype(dtype) if dtype is not None else self.types.get(name, 1)
            return helper.make_tensor_value_info(name, elem, None)

        types = [np.dtype(np.float32) if n in self.compacted else self.cache[n][0].dtype for n in inputs]
        graph = helper.make_graph(nodes, "segment", [info(n, t) for n, t in zip(inputs, types)],
                                  [info(n) for n in outputs], initializer=[self.weights[w] for w in weights])
        segment = helper.make_model(graph, opset_imports=self.model.opset_import)
        segment.ir_version = self.model.ir_version
        return segment

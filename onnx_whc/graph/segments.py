"""Sub-models that recompute only the part of a model downstream of some tensors.

A probe that changes a few tensors leaves everything upstream of them, and every branch that does
not read them, as it was: those values come from one cached run of the whole model, and each
probe runs only the nodes that depend on what it changes (on the shared models about half the
MACs of the whole model, averaged over their channel groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Segment:
    """The nodes downstream of `starts`, and what they read from outside."""
    starts: frozenset[str]  # graph inputs whose readers begin the segment
    inputs: tuple[str, ...]  # graph inputs the segment reads (the starts among them)
    cut: tuple[str, ...]  # tensors computed upstream of it: fed from the whole model's cached run
    outputs: tuple[str, ...]  # the graph outputs it recomputes; the others keep their cached values
    nodes: int  # how many nodes it runs


def downstream(graph: gs.Graph, starts: set[str]) -> Segment | None:
    """The segment of `graph` that depends on the graph inputs named `starts`, or None where one
    cannot be cut out (a node with a subgraph may read outer tensors its inputs do not list)."""
    if any(isinstance(v, gs.Graph) for node in graph.nodes for v in node.attrs.values()):
        return None
    graph_inputs = {t.name for t in graph.inputs}
    inside: set[int] = set()
    frontier = [node for t in graph.inputs if t.name in starts for node in t.outputs]
    while frontier:
        node = frontier.pop()
        if id(node) not in inside:
            inside.add(id(node))
            frontier += [reader for out in node.outputs for reader in out.outputs]
    nodes = [node for node in graph.nodes if id(node) in inside]
    produced = {out.name for node in nodes for out in node.outputs}
    read = {t.name: t for node in nodes for t in node.inputs if isinstance(t, gs.Variable) and t.name}
    # constants computed by Constant nodes are recomputed: they are not per-sample values
    cut = [name for name, t in read.items() if name not in produced and name not in graph_inputs
           and not (t.inputs and t.inputs[0].op == "Constant")]
    return Segment(frozenset(starts), tuple(n for n in read if n in graph_inputs), tuple(sorted(cut)),
                   tuple(t.name for t in graph.outputs if t.name in produced), len(nodes))


def cut_out(graph: gs.Graph, segment: Segment, dtypes: dict) -> gs.Graph:
    """A copy of `graph` that computes only the segment's outputs, from its inputs and cut tensors
    (of these `dtypes`: an intermediate tensor need not declare its type, an input must)."""
    part = graph.copy()  # weights are shared, not copied
    tensors = part.tensors()
    for name in segment.cut:  # shapes as the runtime finds them: a declared batch of 1 would not hold
        tensors[name].dtype, tensors[name].shape = dtypes[name], None
    part.inputs = [tensors[name] for name in segment.inputs + segment.cut]
    part.outputs = [tensors[name] for name in segment.outputs]
    return part.cleanup()  # cleanup drops every node upstream of the new inputs


def with_outputs(graph: gs.Graph, names) -> gs.Graph:
    """A copy of `graph` that also outputs the named tensors (to cache them)."""
    whole = graph.copy()
    tensors = whole.tensors()
    known = {t.name for t in whole.outputs}
    whole.outputs = whole.outputs + [tensors[name] for name in names if name not in known]
    return whole


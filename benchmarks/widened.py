"""A YOLOv8 export made wider: the shared YOLOv8n at twice its width has YOLOv8s's structure.

Every convolution followed by SiLU gets `factor` times the filters; the head's output
convolutions (box distribution and class scores) and the DFL keep theirs, and the C2f splits
grow with their inputs. Each new channel is a copy of an original channel (channel c becomes
c·factor .. c·factor + factor - 1), its readers' weights divided among the copies and perturbed by
a few percent, so the wider model computes nearly what the original does: its detections stay
meaningful, and filter criteria do not see exact duplicates.

    python -m benchmarks.widened /work/shared/models/yolov8n_nudenet.onnx --factor 2 -o /tmp/yolov8s_like.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

NOISE = 0.05  # relative perturbation of the copied weights


def widened(model: onnx.ModelProto, factor: int = 2, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    # For each channelled tensor: the original channel each of its channels copies.
    origin = {graph.input[0].name: np.arange(3)}
    for node in graph.node:
        x = origin.get(node.input[0]) if node.input else None
        if node.op_type == "Conv" and x is not None:
            w = numpy_helper.to_array(weights[node.input[1]])
            wider = any(r.op_type == "Sigmoid" for r in readers.get(node.output[0], []))
            out_origin = np.repeat(np.arange(w.shape[0]), factor) if wider else np.arange(w.shape[0])
            copies = np.bincount(x, minlength=w.shape[1])[x]  # how many channels share an input's origin
            new = w[out_origin][:, x] / copies[None, :, None, None]
            new = new * (1 + NOISE * rng.standard_normal(new.shape))
            _set(graph, weights, node, 1, new.astype(np.float32))
            if len(node.input) > 2:
                _set(graph, weights, node, 2, numpy_helper.to_array(weights[node.input[2]])[out_origin])
            origin[node.output[0]] = out_origin
        elif node.op_type == "Split" and x is not None:
            sizes = numpy_helper.to_array(weights[node.input[1]])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            parts = [np.flatnonzero((x >= s) & (x < s + n)) for s, n in zip(starts, sizes)]
            _set(graph, weights, node, 1, np.array([len(p) for p in parts], np.int64))
            for name, part, start in zip(node.output, parts, starts):
                origin[name] = x[part] - start
        elif node.op_type == "Concat" and x is not None and _attribute(node, "axis") == 1:
            sizes = [len(origin[n]) for n in node.input]
            olds = [int(origin[n].max()) + 1 for n in node.input]
            offsets = np.concatenate([[0], np.cumsum(olds)[:-1]])
            origin[node.output[0]] = np.concatenate([origin[n] + o for n, o in zip(node.input, offsets)])
            assert sum(sizes) == len(origin[node.output[0]])
        elif node.op_type in ("Sigmoid", "Mul", "Add", "MaxPool", "Resize") and x is not None:
            origin[node.output[0]] = x
    for name in list(origin):  # shapes inferred from the old widths would be wrong now
        for info in list(graph.value_info):
            if info.name == name:
                graph.value_info.remove(info)
    return out


def _attribute(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _set(graph: onnx.GraphProto, weights: dict, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    """Give the node's input `index` its own initializer holding `value` (initializers may be shared)."""
    name = f"{node.name}.widened_{index}"
    tensor = numpy_helper.from_array(value, name)
    graph.initializer.append(tensor)
    weights[name] = tensor
    node.input[index] = name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.widened", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    model = widened(onnx.load(args.model), args.factor)
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, args.output)
    print(f"{args.output}: {sum(int(np.prod(t.dims)) for t in kept) / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()

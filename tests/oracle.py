"""Prune a model through the stages and compare it with the consumer-zeroed original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.equivalence import export, zeroed_reference
from onnx_whc.graph.load import load
from onnx_whc.graph.surgery import apply_plan
from onnx_whc.plan.select import select


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(loaded, batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in loaded.graph.inputs:
        static_batch = tensor.shape[0] if tensor.shape and isinstance(tensor.shape[0], int) else None
        shape = (static_batch or batch,) + tuple(loaded.input_shapes[tensor.name][1:])
        dtype = np.float16 if tensor.dtype == np.float16 else np.float32
        feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def float_params(model) -> int:
    """Weights of a model (a path or a ModelProto): float values in its initializers and Constant nodes."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    tensors = list(model.graph.initializer) + [a.t for node in model.graph.node if node.op_type == "Constant"
                                               for a in node.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors
               if onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f")


def unused_weights(model: onnx.ModelProto) -> set[str]:
    """Initializers no node reads (subgraphs included) and no output names."""
    read = {o.name for o in model.graph.output}
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            read.update(node.input)
            stack += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    return {t.name for t in model.graph.initializer} - read


def prune_and_compare(model, ratio: float, criterion: str = "whc", round_to: int = 1, seed: int = 0,
                      rtol: float = 1e-4, atol: float = 1e-5, input_shapes=None, exclude=()):
    """Prune; assert checker, output shapes, the zeroed-consumer oracle, and no more weights than the
    original (none unused). Returns (pruned, plan)."""
    loaded = load(model, input_shapes)
    analysis = analyze_channels(loaded)
    plan = select(analysis, ratio, criterion, round_to, tuple(exclude), seed=seed)
    reference = zeroed_reference(loaded, analysis, plan.removed_roots)
    feeds = random_feeds(loaded)
    apply_plan(loaded, analysis, plan)
    pruned = export(loaded.graph, loaded)
    onnx.checker.check_model(pruned, full_check=True)
    expected, actual = run(reference, feeds), run(pruned, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    assert float_params(pruned) <= float_params(model), "the pruned model carries more weights than its original"
    assert not unused_weights(pruned)
    return pruned, plan

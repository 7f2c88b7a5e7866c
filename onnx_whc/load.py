"""Load an ONNX model into an onnx-graphsurgeon graph ready for channel analysis.

Loading folds everything that does not depend on the model's inputs (Constant and
ConstantOfShape weights, PyTorch's 'same'-padding Shape/Slice/Concat chains), gives
every node a unique name, and infers static shapes with a batch of one.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError

from .errors import UserInputError

ort.set_default_logger_severity(3)  # constant folding runs ORT; its warnings are noise here

QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}
# Constants larger than this are weights: shape inference only needs their shapes.
_WEIGHT_ELEMENTS = 1024


@dataclass
class LoadedModel:
    """A folded graph plus what later stages need to know about the original file."""

    graph: gs.Graph
    shapes: dict[str, tuple]  # tensor name -> static shape with batch 1 (ints, or None where unknown)
    input_shapes: dict[str, tuple[int, ...]]
    ir_version: int
    opset: int
    initializers_as_inputs: bool = False  # IR < 4 models list initializers among the inputs
    metadata: dict[str, str] = field(default_factory=dict)


def read_model(source) -> onnx.ModelProto:
    """Read a path or pass a ModelProto through; every failure is one clear line."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise UserInputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserInputError(f"{path}: is a folder, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise UserInputError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.graph.node and not model.graph.output:
        raise UserInputError(f"{path}: not an ONNX model (no graph found)")
    _load_external_data(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    base = os.path.dirname(os.path.abspath(path))
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if not os.path.exists(os.path.join(base, location)):
                raise UserInputError(
                    f"{path}: external data file '{location}' for tensor '{tensor.name}' is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path}: cannot read external data ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load(source, input_shapes: dict[str, tuple[int, ...]] | None = None) -> LoadedModel:
    """Read, check and fold a model; `input_shapes` fixes dynamic input dimensions."""
    model = read_model(source)
    quantized = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
    if quantized or _has_integer_conv_weights(model):
        what = ", ".join(quantized) if quantized else "integer Conv weights"
        raise UserInputError(f"the model is quantized ({what}): prune before quantization")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UserInputError("the model imports no default ONNX opset")
    init_names = {t.name for t in model.graph.initializer}
    as_inputs = any(i.name in init_names for i in model.graph.input)
    if as_inputs:
        # Old IR: initializers doubled as inputs; they are weights, not inputs.
        kept = [i for i in model.graph.input if i.name not in init_names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    try:
        graph = gs.import_onnx(model)
    except Exception as err:  # gs raises bare exceptions on malformed graphs
        raise UserInputError(f"the model graph cannot be read ({_first_line(err)})") from None
    _name_nodes(graph)
    graph.fold_constants(error_ok=True).cleanup().toposort()
    static_inputs = _static_input_shapes(graph, input_shapes or {})
    shapes = infer_static_shapes(graph, static_inputs)
    meta = {p.key: p.value for p in model.metadata_props}
    return LoadedModel(graph, shapes, static_inputs, model.ir_version, opset, as_inputs, meta)


def _has_integer_conv_weights(model: onnx.ModelProto) -> bool:
    ints = {t.name for t in model.graph.initializer if t.data_type in
            (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    return any(n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in ints for n in model.graph.node)


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed and duplicate-named nodes unique names: reports and --exclude need them."""
    seen = Counter()
    for node in graph.nodes:
        base = node.name or f"{node.op}_{len(seen)}"
        name = base
        while name in seen:
            seen[base] += 1
            name = f"{base}_{seen[base]}"
        seen[name] += 1
        node.name = name


def _static_input_shapes(graph: gs.Graph, given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    unknown = set(given) - {t.name for t in graph.inputs}
    if unknown:
        names = ", ".join(t.name for t in graph.inputs)
        raise UserInputError(f"--input-shape names no model input: {', '.join(sorted(unknown))} (inputs: {names})")
    shapes = {}
    for tensor in graph.inputs:
        if tensor.name in given:
            shape = tuple(int(d) for d in given[tensor.name])
            if tensor.shape is not None and len(tensor.shape) != len(shape):
                raise UserInputError(
                    f"--input-shape {tensor.name}: rank {len(shape)} does not match the model's {len(tensor.shape)}")
            for dim, want in zip(tensor.shape or (), shape):
                if isinstance(dim, int) and dim > 0 and dim != want:
                    raise UserInputError(
                        f"--input-shape {tensor.name}: {_fmt(shape)} conflicts with the model's {_fmt(tensor.shape)}")
            shapes[tensor.name] = shape
            continue
        if tensor.shape is None:
            raise UserInputError(f"input '{tensor.name}' has no shape; give --input-shape {tensor.name}:1x3x224x224")
        dims = list(tensor.shape)
        if dims and not _is_static(dims[0]):
            dims[0] = 1  # the batch: any size works for analysis
        if not all(_is_static(d) for d in dims):
            raise UserInputError(
                f"input '{tensor.name}' has dynamic dimensions {_fmt(tensor.shape)}; "
                f"give --input-shape {tensor.name}:{'x'.join(str(d) if _is_static(d) else '?' for d in dims)}")
        shapes[tensor.name] = tuple(int(d) for d in dims)
    return shapes


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim > 0


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def infer_static_shapes(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Static shape of every tensor, on a weightless copy with the inputs fixed.

    Weights become shape-only graph inputs, so this costs little even for models over 2 GB.
    """
    skeleton = graph.copy()
    weights = []
    for node in skeleton.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.values.size > _WEIGHT_ELEMENTS:
                stub = gs.Variable(tensor.name, dtype=tensor.values.dtype, shape=tensor.shape)
                node.inputs[i] = stub
                weights.append(stub)
    unique = {t.name: t for t in weights}
    for tensor in skeleton.inputs:
        tensor.shape = list(input_shapes[tensor.name])
    skeleton.inputs = list(skeleton.inputs) + list(unique.values())
    for tensor in skeleton.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in skeleton.inputs:
            tensor.shape = None  # stale symbolic shapes would override inference
    skeleton.fold_constants(error_ok=True).cleanup()
    model = gs.export_onnx(skeleton, do_type_check=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:
        raise UserInputError(f"shape inference failed on this model ({_first_line(err)})") from None
    shapes: dict[str, tuple] = {}
    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            shapes[tensor.name] = tuple(tensor.values.shape)
    return shapes

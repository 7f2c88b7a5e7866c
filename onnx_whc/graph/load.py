"""Load an ONNX model into an onnx-graphsurgeon graph ready for channel analysis.

Loading folds everything that does not depend on the model's inputs (Constant and
ConstantOfShape weights, PyTorch's 'same'-padding Shape/Slice/Concat chains), gives
every node a unique name, and infers static shapes with a batch of one.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.logger import G_LOGGER

from ..errors import UserInputError, first_line
from . import storage
from .constants import default_opset
from .expansions import Expansion, find_expansions
from .storage import fits_protobuf

ort.set_default_logger_severity(3)  # constant folding runs ORT; its warnings are noise here
G_LOGGER.colors = False  # no colour codes, and no note that the colour package is missing


@contextlib.contextmanager
def graphsurgeon_to_stderr():
    """Send what onnx-graphsurgeon prints to stderr (it prints its warnings on stdout: large
    folded weights, folds that failed), so stdout carries only what the tool itself writes
    (`analyze --json`). Works as a decorator too."""
    with contextlib.redirect_stdout(sys.stderr):
        yield

QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}
# Graph inputs/outputs declared without a shape break the letter of the spec, yet run everywhere.
_TOLERATED_CHECK = "Field 'shape' of 'type' is required but missing"
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
    probe_sizes: dict[str, str] = field(default_factory=dict)  # input -> why it was measured at its size
    expansions: dict[str, Expansion] = field(default_factory=dict)  # folded constants export writes back


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
    except (DecodeError, RuntimeError, ValueError, OSError):
        raise UserInputError(f"{path}: {_unparsable(path)}") from None
    if not model.graph.node and not model.graph.output:
        raise UserInputError(f"{path}: not an ONNX model (no graph found)")
    _load_external_data(model, path)
    return model


def _unparsable(path: str) -> str:
    """Why a file that protobuf cannot parse is not a model, in the user's terms."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "a text file, not an ONNX model"
    return "not an ONNX model (it does not parse as one: truncated, corrupt or another format)"


def _load_external_data(model: onnx.ModelProto, path: str) -> None:
    base = os.path.dirname(os.path.abspath(path))
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            problem = storage.external_location_problem(base, location)
            if problem:  # checked here, before onnx opens anything
                raise UserInputError(f"{path}: its external data {_quote(location)} (tensor {_quote(tensor.name)}) "
                                     f"{problem}; onnx refuses to read it")
            if not os.path.exists(os.path.join(base, location)):
                raise UserInputError(
                    f"{path}: external data file {_quote(location)} for tensor {_quote(tensor.name)} is missing")
    try:
        onnx.load_external_data_for_model(model, base)
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path}: cannot read external data ({first_line(err)})") from None
    except onnx.checker.ValidationError as err:  # onnx's own refusal: a link, a path it will not follow
        raise UserInputError(f"{path}: onnx refuses to read its external data ({_one_line(err)})") from None


def _quote(text: str) -> str:
    """Text from the model, quoted on one line (control characters escaped)."""
    return f"'{text}'" if text.isprintable() else ascii(text)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


_UNCHECKED = object()


def checker_problem(subject) -> str | None:
    """The ONNX checker's complaint about a model or a model file, or None.

    A file is checked from disk: any size (external data), and no serialised copy in memory.
    """
    try:
        if not isinstance(subject, onnx.ModelProto):
            onnx.checker.check_model(os.fspath(subject))
        elif fits_protobuf(subject):
            onnx.checker.check_model(subject)
    except (onnx.checker.ValidationError, ValueError, UnicodeError) as err:
        if _TOLERATED_CHECK not in str(err):
            return " ".join(str(err).split())[:300]  # the checker spreads one finding over lines
    return None


def check_input(model: onnx.ModelProto, source, file_problem=_UNCHECKED) -> None:
    """Refuse a corrupt or malformed model up front, naming the input as the culprit.

    `file_problem` is `checker_problem(path)` when the caller ran it already.
    """
    where = "the model" if isinstance(source, onnx.ModelProto) else os.fspath(source)
    if file_problem is _UNCHECKED:
        file_problem = checker_problem(model if where == "the model" else where)
    if file_problem:
        raise UserInputError(f"{where}: not a valid ONNX model ({file_problem})")
    bad = _undecodable(model)
    if bad:
        raise UserInputError(f"{where}: not a valid ONNX model (a {bad} is not UTF-8 text)")


def _undecodable(message) -> str | None:
    """The first text field that is not UTF-8 (protobuf hands such text back as bytes), if any."""
    for descriptor, value in message.ListFields():
        if message.DESCRIPTOR.name == "TensorProto" and descriptor.name != "name":
            continue  # weights: nothing to decode, and copying them out would cost memory
        repeated = descriptor.is_repeated if hasattr(descriptor, "is_repeated") else descriptor.label == descriptor.LABEL_REPEATED
        values = value if repeated else [value]
        if descriptor.type == descriptor.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            return f"{message.DESCRIPTOR.name}.{descriptor.name}"
        if descriptor.type == descriptor.TYPE_MESSAGE:
            found = next((f for f in map(_undecodable, values) if f), None)
            if found:
                return found
    return None


@graphsurgeon_to_stderr()
def load(source, input_shapes: dict[str, tuple[int, ...]] | None = None) -> LoadedModel:
    """Read, check and fold a model; `input_shapes` fixes dynamic input dimensions."""
    # The checker parses a file into its own copy: run it before Python parses the file, so the
    # two copies never coexist (peak memory ~2x the model rather than 3x).
    is_file = not isinstance(source, onnx.ModelProto) and os.path.isfile(os.fspath(source))
    file_problem = checker_problem(source) if is_file else _UNCHECKED
    model = read_model(source)
    check_input(model, source, file_problem)
    quantized = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
    if quantized or _has_integer_conv_weights(model):
        what = ", ".join(quantized) if quantized else "integer Conv weights"
        raise UserInputError(f"the model is quantized ({what}): prune before quantization")
    opset = default_opset(model)
    if opset is None:
        raise UserInputError("the model imports no default ONNX opset")
    init_names = {t.name for t in model.graph.initializer}
    as_inputs = any(i.name in init_names for i in model.graph.input)
    ir_version = model.ir_version
    if as_inputs:
        # Old IR: initializers doubled as inputs; they are weights, not inputs. Work on a copy (the
        # caller's model is never modified) marked IR 4, under which shape inference and constant
        # folding see initializers that are not inputs; export restores the original IR.
        model = _copy(model)
        kept = [i for i in model.graph.input if i.name not in init_names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(ir_version, 4)
    try:
        graph = gs.import_onnx(model)
    except Exception as err:  # gs raises bare exceptions on malformed graphs
        raise UserInputError(f"the model graph cannot be read ({first_line(err)})") from None
    _name_nodes(graph)
    graph.fold_constants(error_ok=True).cleanup().toposort()
    _materialize(graph)
    expansions = find_expansions(model, graph)
    meta = {p.key: p.value for p in model.metadata_props}
    static_inputs, probe_sizes = _static_input_shapes(graph, input_shapes or {}, meta)
    try:
        shapes = infer_static_shapes(graph, static_inputs)
    except UserInputError as err:
        if not probe_sizes:
            raise
        name = next(iter(probe_sizes))
        dims = next(t.shape for t in graph.inputs if t.name == name)
        fixed = "x".join(str(d) if _is_static(d) else "1" if i == 0 else "?" for i, d in enumerate(dims))
        raise UserInputError(f"input '{name}' has a dynamic size and the model does not run at "
                             f"{_fmt(static_inputs[name])} ({err}); give --input-shape {name}:{fixed} "
                             "with the size it runs at") from None
    if _fold_static_shape_reads(graph, static_inputs, shapes):
        shapes = infer_static_shapes(graph, static_inputs)
    return LoadedModel(graph, shapes, static_inputs, ir_version, opset, as_inputs, meta, probe_sizes, expansions)


def _fold_static_shape_reads(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]],
                             shapes: dict[str, tuple]) -> bool:
    """Fold Shape computations that read only dimensions the model fixes (PyTorch 'same' padding
    computed from x.shape[2:]). A second shape inference with every dynamic input dimension
    doubled tells which dimensions follow the inputs; those stay symbolic and are never baked in.
    """
    readers = [n for n in graph.nodes if n.op == "Shape" and isinstance(n.inputs[0], gs.Variable)
               and n.inputs[0] not in graph.inputs]
    if not readers:
        return False
    declared = {t.name: list(t.shape) if t.shape is not None else [None] * len(input_shapes[t.name])
                for t in graph.inputs}
    probe = {name: tuple(d if _is_static(declared[name][i]) else 2 * d for i, d in enumerate(dims))
             for name, dims in input_shapes.items()}
    try:
        doubled = infer_static_shapes(graph, probe)
    except UserInputError:
        return False
    restore = []
    for node in readers:
        tensor = node.inputs[0]
        one, two = shapes.get(tensor.name), doubled.get(tensor.name)
        if one is None or two is None or len(one) != len(two) or None in one + two:
            continue
        restore.append((tensor, tensor.shape))
        tensor.shape = [a if a == b else f"{tensor.name}:{i}" for i, (a, b) in enumerate(zip(one, two))]
    count = len(graph.nodes)
    if restore:
        graph.fold_constants(error_ok=True).cleanup().toposort()
    for tensor, shape in restore:
        tensor.shape = shape  # the symbolic shapes were only for folding
    return len(graph.nodes) != count


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def return_freed_memory() -> None:
    """Hand memory freed by the parsed protobuf back to the system (glibc keeps it otherwise).

    Loading peaks at the protobuf plus its numpy copy; later large allocations (export, saving)
    cannot reuse those freed heap pages, so without this they would stack on top of them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _materialize(graph: gs.Graph) -> None:
    """Read every weight into numpy now, so nothing references the parsed protobuf any more.

    Protobuf frees a field's memory only with its whole message: once the graph holds plain
    arrays, the parsed file is released when loading returns, and peak memory stays near twice
    the model instead of the protobuf plus a numpy copy of every weight for the whole run.
    """
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            tensor.values  # noqa: B018 - the property replaces the lazy protobuf reference
    # The importer keeps the model's own opset list, which would hold all of it alive.
    graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains or ()]


_INTEGER_WEIGHTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                    onnx.TensorProto.INT16, onnx.TensorProto.UINT16}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _has_integer_conv_weights(model: onnx.ModelProto) -> bool:
    """Whether a layer's weights are computed from small integers (e.g. int8 -> Cast -> Mul -> Conv)."""
    graph = model.graph
    ints = {t.name for t in graph.initializer if t.data_type in _INTEGER_WEIGHTS}
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and value.data_type in _INTEGER_WEIGHTS:
            ints.update(node.output)
    if not ints:
        return False
    made_by = {out: node for node in graph.node for out in node.output}
    stack = [n.input[1] for n in graph.node if n.op_type in _WEIGHTED_OPS and len(n.input) > 1]
    seen = set()
    while stack:
        name = stack.pop()
        if name in ints:
            return True
        if name in seen or name not in made_by:
            continue
        seen.add(name)
        stack.extend(made_by[name].input)
    return False


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


DEFAULT_IMAGE_SIZE = 224  # a dynamic image input with no size in its metadata is measured at this


def _image_size(metadata: dict[str, str]) -> tuple[tuple[int, int], str]:
    """(height, width) to measure a dynamic image input at, and where it comes from.

    Exporters that know the training size record it (ultralytics: imgsz '[320, 320]' or '640').
    """
    try:
        value = ast.literal_eval(metadata.get("imgsz", ""))
        size = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
        if len(size) == 2 and min(size) > 0:
            return size, "the model's imgsz metadata"
    except (ValueError, SyntaxError, TypeError):
        pass
    return (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE), "the default"


def _spatial_axes(dims: list) -> tuple[int, int] | None:
    """The height and width axes of a rank-4 image input, when its only dynamic dimensions are those."""
    if len(dims) != 4:
        return None
    for axes, channel in (((2, 3), 1), ((1, 2), 3)):  # NCHW, then NHWC
        others = [d for i, d in enumerate(dims[1:], 1) if i not in axes]
        if _is_static(dims[channel]) and all(_is_static(d) for d in others):
            return axes
    return None


def _static_input_shapes(graph: gs.Graph, given: dict[str, tuple[int, ...]], metadata: dict[str, str]
                         ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every input's shape with batch 1, and for image inputs of dynamic size the size chosen.

    Channel analysis needs no spatial size; MACs, calibration and validation are measured at
    the given size, or the model's recorded one, or the default. The pruned model keeps the
    dynamic dimensions.
    """
    probe_sizes = {}
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
        spatial = _spatial_axes(dims)
        if spatial and not all(_is_static(dims[a]) for a in spatial):
            size, origin = _image_size(metadata)
            for axis, value in zip(spatial, size):
                dims[axis] = dims[axis] if _is_static(dims[axis]) else value
            probe_sizes[tensor.name] = (f"input '{tensor.name}' is {_fmt(tensor.shape)}: measured at {_fmt(dims)} "
                                        f"({origin}; --input-shape to choose); the pruned model keeps the dynamic size")
        if not all(_is_static(d) for d in dims):
            raise UserInputError(
                f"input '{tensor.name}' has dynamic dimensions {_fmt(tensor.shape)}; "
                f"give --input-shape {tensor.name}:{'x'.join(str(d) if _is_static(d) else '?' for d in dims)}")
        shapes[tensor.name] = tuple(int(d) for d in dims)
    return shapes, probe_sizes


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim > 0


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as err:
        raise UserInputError(f"shape inference failed on this model ({first_line(err)})") from None


@graphsurgeon_to_stderr()
def infer_static_shapes(graph: gs.Graph, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Static shape of every tensor, on a weightless copy with the inputs fixed.

    Weights become shape-only graph inputs, so this costs little even for models over 2 GB.
    """
    skeleton = graph.copy()
    for node in skeleton.nodes:
        if node.op == "GroupNormalization":  # ONNX infers no shape for it (a function op): it keeps its input's
            node.op, node.attrs = "Identity", {}
            while len(node.inputs) > 1:
                node.inputs.pop()
    unique = {}  # one stub per weight, however many nodes share it
    for node in skeleton.nodes:
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and np.prod(tensor.shape, dtype=np.int64) > _WEIGHT_ELEMENTS:
                if tensor.name not in unique:
                    unique[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=tensor.shape)
                node.inputs[i] = unique[tensor.name]
    for tensor in skeleton.inputs:
        tensor.shape = list(input_shapes[tensor.name])
    skeleton.inputs = list(skeleton.inputs) + list(unique.values())
    for tensor in skeleton.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in skeleton.inputs:
            tensor.shape = None  # stale symbolic shapes would override inference
    skeleton.fold_constants(error_ok=True).cleanup()
    model = _infer(gs.export_onnx(skeleton, do_type_check=False))
    for _ in range(3):
        # Shapes computed from shapes (Shape -> Slice -> Pad): ONNX inference stops at them, but at
        # these fixed input sizes the inferred shapes let constant folding settle them.
        if not any(n.op_type == "Shape" for n in model.graph.node):
            break
        again = gs.import_onnx(model)
        count = len(again.nodes)
        again.fold_constants(error_ok=True).cleanup()
        if len(again.nodes) == count:
            break
        model = _infer(gs.export_onnx(again, do_type_check=False))
    shapes: dict[str, tuple] = {}
    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            shapes[tensor.name] = tuple(tensor.shape)  # .shape, not .values: no weight is read here
    return shapes

"""Synthetic CNN ONNX models for benchmarking filter pruning.

The models mimic a PyTorch export of an eval-mode network whose BatchNorm
layers were folded into the preceding convolutions: every Conv carries a
bias, there are no BatchNormalization nodes, node and tensor names follow the
``torch.onnx.export`` scope scheme, opset 17, IR version 8, a dynamic batch
dimension, input ``"input"`` and output ``"logits"``.

Weights are random but He-scaled, with a per-filter scale spread (as a folded
BatchNorm produces), so activations stay finite and filter-ranking criteria
see non-degenerate norms. Models are built directly into one ``ModelProto``
and tensors are written as ``raw_data`` so that multi-gigabyte models need
little more memory than their own size.

Command line::

    python -m benchmarks.synthetic resnet50 --width 1.0 -o /tmp/r50.onnx
    python -m benchmarks.synthetic mobilenet_v2 --width 0.5 -o /tmp/mbv2.onnx
    python -m benchmarks.synthetic size 500 -o /tmp/m500.onnx
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_whc.storage import copy_fields

__all__ = [
    "resnet50",
    "mobilenet_v2",
    "model_of_size",
    "save",
    "count_params",
    "count_macs",
    "weight_bytes",
    "resnet50_width_for",
]

OPSET = 17
IR_VERSION = 8
MB = 1_000_000
# Protobuf cannot serialize a message of 2 GiB or more; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_PROTOBUF_LIMIT = 2**31

# Standard deviation of the folded BatchNorm shift that ends up in the bias.
_BIAS_STD = 0.05
# Log-normal spread of per-filter scales (folded gamma / sqrt(var)).
_FILTER_SCALE_SIGMA = 0.3
# Scale of the last conv of a residual branch; trained nets keep that BN's
# gamma small, and it stops activations from doubling at every Add.
_RESIDUAL_GAIN = 0.2
# Tensors at least this big go to the external file, the onnx default.
_EXTERNAL_MIN_BYTES = 1024
# Page-aligned offsets let onnxruntime memory-map large initializers.
_PAGE = 4096
_PAGE_ALIGN_MIN_BYTES = 1 << 20

_RESNET50_BLOCKS = (3, 4, 6, 3)
# (expand ratio t, channels c, repeats n, first stride s), as in torchvision.
_MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class _Builder:
    """Appends nodes and initializers straight into one ModelProto.

    With ``with_data=False`` initializers get shapes but no bytes, which is
    enough to count parameters cheaply while solving for a width.
    """

    def __init__(self, name: str, seed: int, with_data: bool = True):
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        self.graph.name = name
        self.rng = np.random.default_rng(seed)
        self.with_data = with_data
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r}")
        self._names.add(name)
        return name

    def initializer(self, name: str, array: np.ndarray | None, shape) -> str:
        """Adds a float32 initializer; bytes go straight into raw_data."""
        tensor = self.graph.initializer.add()
        tensor.name = self._claim(name)
        tensor.data_type = TensorProto.FLOAT
        tensor.dims.extend(int(d) for d in shape)
        if array is not None:
            # One transient bytes copy per tensor; no full-model duplicate.
            tensor.raw_data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return name

    def weight(self, name: str, shape, gain: float) -> str:
        """He-initialised weight with a per-output-filter scale spread."""
        if not self.with_data:
            return self.initializer(name, None, shape)
        fan_in = int(np.prod(shape[1:]))
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(math.sqrt(gain / fan_in))
        w *= self._filter_scales(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
        return self.initializer(name, w, shape)

    def _filter_scales(self, count: int) -> np.ndarray:
        # exp(sigma*z - sigma^2) has E[s^2] == 1, so variance is preserved.
        z = self.rng.standard_normal(count)
        s = np.exp(_FILTER_SCALE_SIGMA * z - _FILTER_SCALE_SIGMA**2)
        return s.astype(np.float32)

    def bias(self, name: str, count: int, std: float = _BIAS_STD) -> str:
        """Small random bias, the shift a folded BatchNorm leaves behind."""
        if not self.with_data:
            return self.initializer(name, None, (count,))
        b = self.rng.standard_normal(count, dtype=np.float32) * np.float32(std)
        return self.initializer(name, b, (count,))

    def scalar(self, name: str, value: float) -> str:
        return self.initializer(name, np.array(value, dtype=np.float32), ())

    def node(self, op: str, inputs, name: str, output: str | None = None, **attrs) -> str:
        """Adds a node named like torch does; returns its output tensor."""
        output = self._claim(output or f"{name}_output_0")
        self.graph.node.append(
            helper.make_node(op, list(inputs), [output], name=self._claim(name), **attrs)
        )
        return output

    def conv(self, x: str, scope: str, param: str, cin: int, cout: int, kernel: int,
             stride: int = 1, group: int = 1, gain: float = 2.0) -> str:
        """Conv with bias (BatchNorm folded in), 'same'-style padding."""
        w = self.weight(f"{param}.weight", (cout, cin // group, kernel, kernel), gain)
        b = self.bias(f"{param}.bias", cout)
        pad = kernel // 2
        return self.node(
            "Conv", [x, w, b], f"{scope}/Conv",
            dilations=[1, 1], group=group, kernel_shape=[kernel, kernel],
            pads=[pad] * 4, strides=[stride, stride],
        )

    def head(self, x: str, cin: int, num_classes: int, pool: str, gemm_scope: str, param: str) -> str:
        """GlobalAveragePool -> Flatten -> Gemm producing 'logits'."""
        x = self.node("GlobalAveragePool", [x], f"{pool}/GlobalAveragePool")
        x = self.node("Flatten", [x], "/Flatten", axis=1)
        w = self.weight(f"{param}.weight", (num_classes, cin), gain=1.0)
        b = self.bias(f"{param}.bias", num_classes, std=0.01)
        return self.node("Gemm", [x, w, b], f"{gemm_scope}/Gemm", output="logits",
                         alpha=1.0, beta=1.0, transB=1)

    def finish(self, image_size: int, num_classes: int) -> onnx.ModelProto:
        """Declares I/O and model metadata."""
        self.graph.input.append(helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, ["batch", 3, image_size, image_size]))
        self.graph.output.append(helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", num_classes]))
        self.model.ir_version = IR_VERSION
        self.model.opset_import.append(helper.make_opsetid("", OPSET))
        self.model.producer_name = "pytorch"
        self.model.producer_version = "2.1.0"
        return self.model


# --------------------------------------------------------------------- ResNet-50


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


def _bottleneck(b: _Builder, x: str, stage: int, index: int, cin: int,
                planes: int, cout: int, stride: int) -> str:
    """torchvision Bottleneck (v1.5: stride on the 3x3 conv)."""
    scope, param = f"/layer{stage}/layer{stage}.{index}", f"layer{stage}.{index}"
    y = b.conv(x, f"{scope}/conv1", f"{param}.conv1", cin, planes, 1)
    y = b.node("Relu", [y], f"{scope}/relu/Relu")
    y = b.conv(y, f"{scope}/conv2", f"{param}.conv2", planes, planes, 3, stride)
    y = b.node("Relu", [y], f"{scope}/relu_1/Relu")
    y = b.conv(y, f"{scope}/conv3", f"{param}.conv3", planes, cout, 1,
               gain=2.0 * _RESIDUAL_GAIN**2)
    if index == 0:
        x = b.conv(x, f"{scope}/downsample/downsample.0", f"{param}.downsample.0",
                   cin, cout, 1, stride, gain=1.0)
    y = b.node("Add", [y, x], f"{scope}/Add")
    return b.node("Relu", [y], f"{scope}/relu_2/Relu")


def _build_resnet50(b: _Builder, width: float, num_classes: int, image_size: int) -> onnx.ModelProto:
    stem = _scaled(64, width)
    x = b.conv("input", "/conv1", "conv1", 3, stem, 7, 2)
    x = b.node("Relu", [x], "/relu/Relu")
    x = b.node("MaxPool", [x], "/maxpool/MaxPool", ceil_mode=0, dilations=[1, 1],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    cin = stem
    for stage, blocks in enumerate(_RESNET50_BLOCKS, start=1):
        planes = _scaled(64 * 2 ** (stage - 1), width)
        cout = _scaled(256 * 2 ** (stage - 1), width)
        for index in range(blocks):
            stride = 2 if stage > 1 and index == 0 else 1
            x = _bottleneck(b, x, stage, index, cin, planes, cout, stride)
            cin = cout
    b.head(x, cin, num_classes, "/avgpool", "/fc", "fc")
    return b.finish(image_size, num_classes)


def resnet50(width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
             seed: int = 0) -> onnx.ModelProto:
    """torchvision ResNet-50 with BatchNorm folded; channels = round(base * width)."""
    if width <= 0:
        raise ValueError("width must be positive")
    return _build_resnet50(_Builder("main_graph", seed), width, num_classes, image_size)


# ------------------------------------------------------------------ MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's rounding: nearest multiple, never more than 10% down."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _relu6(b: _Builder, x: str, scope: str) -> str:
    return b.node("Clip", [x, "relu6.min", "relu6.max"], f"{scope}/Clip")


def _inverted_residual(b: _Builder, x: str, index: int, cin: int, cout: int,
                       stride: int, expand: int) -> str:
    """torchvision InvertedResidual with torch's module numbering."""
    scope, param = f"/features/features.{index}/conv", f"features.{index}.conv"
    hidden = int(round(cin * expand))
    y, j = x, 0
    if expand != 1:
        y = b.conv(y, f"{scope}/conv.0/conv.0.0", f"{param}.0.0", cin, hidden, 1)
        y = _relu6(b, y, f"{scope}/conv.0/conv.0.2")
        j = 1
    y = b.conv(y, f"{scope}/conv.{j}/conv.{j}.0", f"{param}.{j}.0",
               hidden, hidden, 3, stride, group=hidden)
    y = _relu6(b, y, f"{scope}/conv.{j}/conv.{j}.2")
    residual = stride == 1 and cin == cout
    gain = _RESIDUAL_GAIN**2 if residual else 1.0
    y = b.conv(y, f"{scope}/conv.{j + 1}", f"{param}.{j + 1}", hidden, cout, 1, gain=gain)
    if residual:
        y = b.node("Add", [x, y], f"/features/features.{index}/Add")
    return y


def mobilenet_v2(width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
                 seed: int = 0) -> onnx.ModelProto:
    """torchvision MobileNetV2 with BatchNorm folded and Clip(0, 6) as ReLU6."""
    if width <= 0:
        raise ValueError("width must be positive")
    b = _Builder("main_graph", seed)
    # torch de-duplicates the constant Clip bounds into two shared initializers.
    b.scalar("relu6.min", 0.0)
    b.scalar("relu6.max", 6.0)
    cin = _make_divisible(32 * width)
    x = b.conv("input", "/features/features.0/features.0.0", "features.0.0", 3, cin, 3, 2)
    x = _relu6(b, x, "/features/features.0/features.0.2")
    index = 1
    for t, c, n, s in _MOBILENET_V2_SETTING:
        cout = _make_divisible(c * width)
        for i in range(n):
            x = _inverted_residual(b, x, index, cin, cout, s if i == 0 else 1, t)
            cin, index = cout, index + 1
    last = _make_divisible(1280 * max(1.0, width))
    x = b.conv(x, f"/features/features.{index}/features.{index}.0", f"features.{index}.0",
               cin, last, 1)
    x = _relu6(b, x, f"/features/features.{index}/features.{index}.2")
    b.head(x, last, num_classes, "", "/classifier/classifier.1", "classifier.1")
    return b.finish(image_size, num_classes)


# ------------------------------------------------------------ sized ResNet-50


def _resnet50_params(width: float, num_classes: int) -> int:
    b = _Builder("probe", 0, with_data=False)
    return count_params(_build_resnet50(b, width, num_classes, 64))


def resnet50_width_for(target_mb: float, num_classes: int = 1000) -> float:
    """Width whose float32 ResNet-50 weights come closest to target_mb (1e6 bytes)."""
    target = target_mb * MB / 4
    lo, hi = 1e-4, 1.0
    while _resnet50_params(hi, num_classes) < target:
        hi *= 2
    # Parameter count is monotone in width; bisect to the step that crosses target.
    for _ in range(60):
        mid = (lo + hi) / 2
        if _resnet50_params(mid, num_classes) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    return min((lo, hi), key=lambda w: abs(_resnet50_params(w, num_classes) - target))


def model_of_size(target_mb: float, seed: int = 0, image_size: int = 64,
                  num_classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50 widened or narrowed so its float32 weights total ~target_mb MB.

    MB means 1e6 bytes. A small image_size keeps very wide models cheap to run.
    """
    width = resnet50_width_for(target_mb, num_classes)
    got = _resnet50_params(width, num_classes) * 4 / MB
    if abs(got - target_mb) > 0.1 * target_mb:
        raise ValueError(f"cannot reach {target_mb} MB with a ResNet-50 (closest {got:.3f} MB)")
    model = resnet50(width, num_classes, image_size, seed)
    model.doc_string = f"synthetic ResNet-50, width {width:.6g}, target {target_mb:g} MB"
    return model


# -------------------------------------------------------------------- metrics


def _numel(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def count_params(model: onnx.ModelProto) -> int:
    """Number of scalars in the main graph's initializers (data not needed)."""
    return sum(_numel(t) for t in model.graph.initializer)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, computed from shapes and types."""
    return sum(
        _numel(t) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )


def _copy_except(dst, src, skip: str) -> None:
    """Copies every set field of src into dst except the one named skip."""
    copy_fields(dst, src, lambda field: field.name != skip)


def _stub_of(stub: TensorProto, tensor: TensorProto) -> None:
    """Copies a tensor's name, type and shape but not its data."""
    # Field by field on purpose: ListFields() would materialize raw_data.
    stub.name, stub.data_type, stub.doc_string = tensor.name, tensor.data_type, tensor.doc_string
    stub.dims.extend(tensor.dims)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of model whose large initializers keep shapes but drop their bytes."""
    skel = onnx.ModelProto()
    _copy_except(skel, model, "graph")
    _copy_except(skel.graph, model.graph, "initializer")
    for tensor in model.graph.initializer:
        if _numel(tensor) <= 16:
            skel.graph.initializer.add().CopyFrom(tensor)
        else:
            _stub_of(skel.graph.initializer.add(), tensor)
    return skel


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates per sample of the Conv and Gemm nodes.

    Shapes come from onnx shape inference on a data-free skeleton, so this
    works for models beyond the 2 GiB protobuf limit.
    """
    inferred = onnx.shape_inference.infer_shapes(_skeleton(model))
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out:
            # Per output element: (Cin / group) * kH * kW multiply-adds.
            macs += int(np.prod(out[1:])) * int(np.prod(dims[node.input[1]][1:]))
        elif node.op_type == "Gemm" and out:
            macs += int(np.prod(dims[node.input[1]]))
    return macs


# ----------------------------------------------------------------------- save


def _mark_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    # onnx's set_external_data insists on raw_data being present; this stub has none.
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _write_external(model: onnx.ModelProto, data_path: Path) -> onnx.ModelProto:
    """Writes large initializers to data_path; returns a model referencing them.

    Unlike onnx.save_model this leaves ``model`` untouched, and only ever
    holds one tensor's bytes twice.
    """
    skel = onnx.ModelProto()
    _copy_except(skel, model, "graph")
    _copy_except(skel.graph, model.graph, "initializer")
    # "wb" truncates: onnx's own writer appends to an existing file instead.
    with open(data_path, "wb") as f:
        for tensor in model.graph.initializer:
            stub = skel.graph.initializer.add()
            # Each access to raw_data copies the bytes, so read it once.
            raw = tensor.raw_data
            if len(raw) < _EXTERNAL_MIN_BYTES:
                stub.CopyFrom(tensor)
                continue
            align = _PAGE if len(raw) >= _PAGE_ALIGN_MIN_BYTES else 64
            f.seek(-f.tell() % align, 1)
            offset = f.tell()
            f.write(raw)
            _stub_of(stub, tensor)
            _mark_external(stub, data_path.name, offset, len(raw))
            del raw
    return skel


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_prefix(field_number: int, length: int) -> bytes:
    """Wire-format key and length of a length-delimited field."""
    return _varint(field_number << 3 | 2) + _varint(length)


def _split_around(message, field_name: str) -> tuple[bytes, bytes]:
    """Serialized fields numbered below and above field_name, which is left out."""
    number = message.DESCRIPTOR.fields_by_name[field_name].number
    head, tail = type(message)(), type(message)()
    copy_fields(head, message, lambda f: f.number < number)
    copy_fields(tail, message, lambda f: f.number > number)
    return head.SerializeToString(), tail.SerializeToString()


def _save_streamed(model: onnx.ModelProto, path: Path) -> None:
    """Writes the same bytes as model.SerializeToString(), one tensor at a time.

    Serializing in one go holds the model about three times over (proto,
    serializer buffer, Python bytes); streaming holds it once.
    """
    graph, tensors = model.graph, model.graph.initializer
    init_number = graph.DESCRIPTOR.fields_by_name["initializer"].number
    graph_number = model.DESCRIPTOR.fields_by_name["graph"].number
    model_head, model_tail = _split_around(model, "graph")
    graph_head, graph_tail = _split_around(graph, "initializer")
    sizes = [t.ByteSize() for t in tensors]
    graph_len = len(graph_head) + len(graph_tail) + sum(
        len(_length_prefix(init_number, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(model_head)
        f.write(_length_prefix(graph_number, graph_len))
        f.write(graph_head)
        for tensor, size in zip(tensors, sizes):
            f.write(_length_prefix(init_number, size))
            f.write(tensor.SerializeToString())
        f.write(graph_tail)
        f.write(model_tail)


def save(model: onnx.ModelProto, path, external_data: bool | None = None) -> Path:
    """Saves model to path; weights go to ``<stem>.data`` beside it when
    external_data is true, or by default when they reach 1.8 GB.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = weight_bytes(model)
    if external_data is None:
        external_data = size >= EXTERNAL_DATA_THRESHOLD
    if not external_data:
        if size >= _PROTOBUF_LIMIT:
            raise ValueError(f"{size / MB:.0f} MB of weights needs external_data=True")
        _save_streamed(model, path)
        return path
    onnx.save_model(_write_external(model, path.with_name(path.stem + ".data")), path)
    return path


# ------------------------------------------------------------------------ CLI


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic",
                                     description="Build a synthetic CNN ONNX model.")
    sub = parser.add_subparsers(dest="kind", required=True)
    for name in ("resnet50", "mobilenet_v2"):
        p = sub.add_parser(name, help=f"{name} at a given width")
        p.add_argument("--width", type=float, default=1.0)
        p.add_argument("--image-size", type=int, default=224)
    p = sub.add_parser("size", help="ResNet-50 with about TARGET_MB MB of weights")
    p.add_argument("target_mb", type=float)
    p.add_argument("--image-size", type=int, default=64)
    for p in sub.choices.values():
        p.add_argument("-o", "--output", required=True, type=Path)
        p.add_argument("--num-classes", type=int, default=1000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--external-data", action="store_true", default=None,
                       help="force external data (default: only at >= 1.8 GB)")
    return parser.parse_args(argv)


def _build_from_args(args: argparse.Namespace) -> onnx.ModelProto:
    if args.kind == "size":
        return model_of_size(args.target_mb, args.seed, args.image_size, args.num_classes)
    build = resnet50 if args.kind == "resnet50" else mobilenet_v2
    return build(args.width, args.num_classes, args.image_size, args.seed)


def main(argv=None) -> None:
    args = _parse_args(argv)
    start = time.perf_counter()
    model = _build_from_args(args)
    built = time.perf_counter()
    save(model, args.output, args.external_data)
    saved = time.perf_counter()
    print(f"{args.output}: {count_params(model) / 1e6:.3f} M params, "
          f"{weight_bytes(model) / MB:.1f} MB weights, {count_macs(model) / 1e9:.3f} GMACs/sample, "
          f"built in {built - start:.1f} s, saved in {saved - built:.1f} s")


if __name__ == "__main__":
    main()

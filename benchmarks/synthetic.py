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
    python -m benchmarks.synthetic shufflenet_v2 --runtime-batch -o /tmp/snv2.onnx
    python -m benchmarks.synthetic shufflenet_v1 --groups 3 -o /tmp/snv1.onnx
    python -m benchmarks.synthetic vgg11 --width 0.25 --image-size 64 -o /tmp/vgg11.onnx
    python -m benchmarks.synthetic convnext_tiny -o /tmp/convnext_t.onnx
    python -m benchmarks.synthetic resnetv2_50x1_bit -o /tmp/resnetv2_50x1_bit.onnx
    python -m benchmarks.synthetic resnest14d --runtime-batch -o /tmp/resnest14d.onnx
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

from onnx_whc.graph.storage import copy_fields

__all__ = [
    "resnet50",
    "mobilenet_v2",
    "shufflenet_v2",
    "shufflenet_v1",
    "vgg11",
    "convnext_tiny",
    "resnetv2_50x1_bit",
    "resnest14d",
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
# torchvision ShuffleNetV2 channels (conv1, stage2..4, conv5) by width multiplier.
_SHUFFLENET_V2_CHANNELS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
# ShuffleNet v1 stage 2..4 output channels by group count, as in the paper's Table 1.
_SHUFFLENET_V1_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                           4: (272, 544, 1088), 8: (384, 768, 1536)}
_SHUFFLENET_REPEATS = (4, 8, 4)
# VGG-11 ("A"): conv widths, "M" for a 2x2 max pool.
_VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
# ConvNeXt-T: blocks and channels per stage.
_CONVNEXT_TINY = ((3, 96), (3, 192), (9, 384), (3, 768))
# timm's resnetv2_50x1_bit: pre-activation bottlenecks per stage, GroupNorm groups, StdConv2d's eps.
_RESNETV2_50_BLOCKS = (3, 4, 6, 3)
_GN_GROUPS = 32
_STD_CONV_EPS = 1e-8
# timm's resnest14d: one ResNeStBottleneck per stage, radix 2, cardinality 1.
_RESNEST14_BLOCKS = (1, 1, 1, 1)
_RADIX = 2


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
        self._counts: dict[tuple[str, str], int] = {}

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

    def numbered(self, scope: str, op: str) -> str:
        """torch's name for the next op of a kind in a scope: Reshape, Reshape_1, ..."""
        count = self._counts.get((scope, op), 0)
        self._counts[scope, op] = count + 1
        return f"{scope}/{op}" + (f"_{count}" if count else "")

    def constant(self, scope: str, values) -> str:
        """int64 Constant node, the way torch exports shape and split arguments."""
        value = helper.make_tensor("value", TensorProto.INT64, np.shape(values),
                                   np.asarray(values, dtype=np.int64).ravel().tolist())
        return self.node("Constant", [], self.numbered(scope, "Constant"), value=value)

    def split(self, x: str, scope: str, sizes) -> list[str]:
        """Split along channels with the sizes as an input (opset 13+), as x.chunk exports."""
        split = self.constant(scope, sizes)
        name = self._claim(self.numbered(scope, "Split"))
        outputs = [self._claim(f"{name}_output_{i}") for i in range(len(sizes))]
        self.graph.node.append(helper.make_node("Split", [x, split], outputs, name=name, axis=1))
        return outputs

    def node(self, op: str, inputs, name: str, output: str | None = None, **attrs) -> str:
        """Adds a node named like torch does; returns its output tensor."""
        output = self._claim(output or f"{name}_output_0")
        self.graph.node.append(
            helper.make_node(op, list(inputs), [output], name=self._claim(name), **attrs)
        )
        return output

    def conv(self, x: str, scope: str, param: str, cin: int, cout: int, kernel: int,
             stride: int = 1, group: int = 1, gain: float = 2.0, pad: int | None = None) -> str:
        """Conv with bias (BatchNorm folded in), 'same'-style padding unless `pad` says otherwise."""
        w = self.weight(f"{param}.weight", (cout, cin // group, kernel, kernel), gain)
        b = self.bias(f"{param}.bias", cout)
        pad = kernel // 2 if pad is None else pad
        return self.node(
            "Conv", [x, w, b], f"{scope}/Conv",
            dilations=[1, 1], group=group, kernel_shape=[kernel, kernel],
            pads=[pad] * 4, strides=[stride, stride],
        )

    def linear(self, x: str, scope: str, param: str, cin: int, cout: int, gain: float,
               output: str | None = None, bias_std: float = _BIAS_STD) -> str:
        """nn.Linear as torch exports it: Gemm with transB=1."""
        w = self.weight(f"{param}.weight", (cout, cin), gain)
        b = self.bias(f"{param}.bias", cout, std=bias_std)
        return self.node("Gemm", [x, w, b], f"{scope}/Gemm", output=output,
                         alpha=1.0, beta=1.0, transB=1)

    def head(self, x: str, cin: int, num_classes: int, pool: str, gemm_scope: str, param: str) -> str:
        """GlobalAveragePool -> Flatten -> Gemm producing 'logits'."""
        x = self.node("GlobalAveragePool", [x], f"{pool}/GlobalAveragePool")
        x = self.node("Flatten", [x], "/Flatten", axis=1)
        return self.linear(x, gemm_scope, param, cin, num_classes, gain=1.0, output="logits",
                           bias_std=0.01)

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


# ------------------------------------------------------------------ ShuffleNets


def _halved(size: int) -> int:
    """Spatial size after a 3x3 stride-2 conv or pool with padding 1."""
    return (size - 1) // 2 + 1


def _batch_and(b: _Builder, batch: str, scope: str, dims) -> str:
    """Concat(Unsqueeze(batch), dims...): a view's shape with the batch read at run time."""
    pieces = [b.node("Unsqueeze", [batch, b.constant(scope, [0])], b.numbered(scope, "Unsqueeze"))]
    pieces += [b.constant(scope, [d]) for d in dims]
    return b.node("Concat", pieces, b.numbered(scope, "Concat"), axis=0)


def _channel_shuffle(b: _Builder, x: str, scope: str, channels: int, groups: int, size: int,
                     runtime_batch: bool = False) -> str:
    """x.view(N, g, C/g, H, W).transpose(1, 2).view(N, C, H, W), with H and W static.

    The batch is 0 (copy the input's) in constant targets, or with runtime_batch read from
    Shape -> Gather(0) as a dynamic-batch torch export does.
    """
    grouped, merged = [groups, channels // groups, size, size], [channels, size, size]
    if runtime_batch:
        batch = b.node("Shape", [x], b.numbered(scope, "Shape"))
        batch = b.node("Gather", [batch, b.constant(scope, 0)], b.numbered(scope, "Gather"), axis=0)
        grouped_shape = _batch_and(b, batch, scope, grouped)
        merged_shape = _batch_and(b, batch, scope, merged)
    else:
        grouped_shape, merged_shape = b.constant(scope, [0] + grouped), b.constant(scope, [0] + merged)
    x = b.node("Reshape", [x, grouped_shape], b.numbered(scope, "Reshape"))
    x = b.node("Transpose", [x], b.numbered(scope, "Transpose"), perm=[0, 2, 1, 3, 4])
    return b.node("Reshape", [x, merged_shape], b.numbered(scope, "Reshape"))


def _shufflenet_v2_unit(b: _Builder, x: str, scope: str, param: str, cin: int, cout: int,
                        stride: int, size: int, runtime_batch: bool) -> str:
    """torchvision ShuffleNetV2 InvertedResidual; size is the output's height and width."""
    half = cout // 2

    def pointwise(y: str, branch: str, index: int, c_in: int) -> str:
        """1x1 conv + ReLU; the ReLU is the module after the BatchNorm folded into the conv."""
        y = b.conv(y, f"{scope}/{branch}/{branch}.{index}", f"{param}.{branch}.{index}", c_in, half, 1)
        return b.node("Relu", [y], f"{scope}/{branch}/{branch}.{index + 2}/Relu")

    def depthwise(y: str, branch: str, index: int, channels: int) -> str:
        # No ReLU follows, so no factor 2 in the gain.
        return b.conv(y, f"{scope}/{branch}/{branch}.{index}", f"{param}.{branch}.{index}",
                      channels, channels, 3, stride, group=channels, gain=1.0)

    if stride == 1:
        x1, x2 = b.split(x, scope, [cin // 2, cin // 2])
    else:
        x1 = pointwise(depthwise(x, "branch1", 0, cin), "branch1", 2, cin)
        x2 = x
    y = pointwise(x2, "branch2", 0, cin // 2 if stride == 1 else cin)
    y = pointwise(depthwise(y, "branch2", 3, half), "branch2", 5, half)
    y = b.node("Concat", [x1, y], b.numbered(scope, "Concat"), axis=1)
    return _channel_shuffle(b, y, scope, cout, 2, size, runtime_batch)


def shufflenet_v2(width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
                  seed: int = 0, runtime_batch: bool = False) -> onnx.ModelProto:
    """torchvision ShuffleNetV2 (x0.5, x1.0, x1.5, x2.0) with BatchNorm folded.

    Channel shuffles reshape to constant targets, or with runtime_batch to targets whose
    batch is read from the tensor's Shape, as a dynamic-batch export writes them.
    """
    if width not in _SHUFFLENET_V2_CHANNELS:
        raise ValueError(f"width must be one of {sorted(_SHUFFLENET_V2_CHANNELS)}")
    stem, *stages, last = _SHUFFLENET_V2_CHANNELS[width]
    b = _Builder("main_graph", seed)
    x = b.conv("input", "/conv1/conv1.0", "conv1.0", 3, stem, 3, 2)
    x = b.node("Relu", [x], "/conv1/conv1.2/Relu")
    x = b.node("MaxPool", [x], "/maxpool/MaxPool", ceil_mode=0, dilations=[1, 1],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    cin, size = stem, _halved(_halved(image_size))
    for stage, (repeats, cout) in enumerate(zip(_SHUFFLENET_REPEATS, stages), start=2):
        size = _halved(size)
        for index in range(repeats):
            scope, param = f"/stage{stage}/stage{stage}.{index}", f"stage{stage}.{index}"
            x = _shufflenet_v2_unit(b, x, scope, param, cin, cout, 2 if index == 0 else 1,
                                    size, runtime_batch)
            cin = cout
    x = b.conv(x, "/conv5/conv5.0", "conv5.0", cin, last, 1)
    x = b.node("Relu", [x], "/conv5/conv5.2/Relu")
    # torchvision pools with x.mean([2, 3]).
    x = b.node("ReduceMean", [x], "/ReduceMean", axes=[2, 3], keepdims=0)
    b.linear(x, "/fc", "fc", last, num_classes, gain=1.0, output="logits", bias_std=0.01)
    return b.finish(image_size, num_classes)


def _shufflenet_v1_unit(b: _Builder, x: str, scope: str, param: str, cin: int, cout: int,
                        groups: int, first_groups: int, stride: int, size: int) -> str:
    """ShuffleNet v1 unit; size is the input's height and width.

    Grouped 1x1 + ReLU, shuffle, depthwise 3x3, grouped 1x1; then Add the input (stride 1) or
    Concat its 3x3 average pool (stride 2, the branch making up the missing channels); ReLU.
    """
    bottleneck = cout // 4
    residual = stride == 1
    y = b.conv(x, f"{scope}/g_conv_1x1_compress/conv1x1", f"{param}.g_conv_1x1_compress.conv1x1",
               cin, bottleneck, 1, group=first_groups)
    y = b.node("Relu", [y], f"{scope}/g_conv_1x1_compress/relu/Relu")
    y = _channel_shuffle(b, y, scope, bottleneck, groups, size)
    y = b.conv(y, f"{scope}/depthwise_conv3x3", f"{param}.depthwise_conv3x3",
               bottleneck, bottleneck, 3, stride, group=bottleneck, gain=1.0)
    y = b.conv(y, f"{scope}/g_conv_1x1_expand/conv1x1", f"{param}.g_conv_1x1_expand.conv1x1",
               bottleneck, cout if residual else cout - cin, 1, group=groups,
               gain=2.0 * _RESIDUAL_GAIN**2 if residual else 2.0)
    if residual:
        y = b.node("Add", [x, y], f"{scope}/Add")
    else:
        pooled = b.node("AveragePool", [x], f"{scope}/AveragePool", ceil_mode=0,
                        count_include_pad=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
        y = b.node("Concat", [pooled, y], f"{scope}/Concat", axis=1)
    return b.node("Relu", [y], f"{scope}/Relu")


def shufflenet_v1(groups: int = 3, num_classes: int = 1000, image_size: int = 224,
                  seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet v1 (1x) with BatchNorm folded, the ONNX model zoo's topology at groups=3."""
    if groups not in _SHUFFLENET_V1_CHANNELS:
        raise ValueError(f"groups must be one of {sorted(_SHUFFLENET_V1_CHANNELS)}")
    b = _Builder("main_graph", seed)
    cin = 24
    x = b.conv("input", "/conv1", "conv1", 3, cin, 3, 2)
    x = b.node("Relu", [x], "/relu/Relu")
    x = b.node("MaxPool", [x], "/maxpool/MaxPool", ceil_mode=0, dilations=[1, 1],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    size = _halved(_halved(image_size))
    for stage, (repeats, cout) in enumerate(zip(_SHUFFLENET_REPEATS, _SHUFFLENET_V1_CHANNELS[groups]),
                                            start=2):
        for index in range(repeats):
            scope, param = f"/stage{stage}/stage{stage}.{index}", f"stage{stage}.{index}"
            stride = 2 if index == 0 else 1
            # The 24-channel stem output is too narrow to split into groups.
            first_groups = 1 if stage == 2 and index == 0 else groups
            x = _shufflenet_v1_unit(b, x, scope, param, cin, cout, groups, first_groups, stride, size)
            cin = cout
            size = _halved(size) if stride == 2 else size
    b.head(x, cin, num_classes, "/avgpool", "/fc", "fc")
    return b.finish(image_size, num_classes)


# ----------------------------------------------------------------------- VGG-11


def _build_vgg11(b: _Builder, width: float, num_classes: int, image_size: int) -> onnx.ModelProto:
    x, cin, size, index = "input", 3, image_size, 0
    for item in _VGG11_CONFIG:
        if item == "M":
            x = b.node("MaxPool", [x], f"/features/features.{index}/MaxPool", ceil_mode=0,
                       dilations=[1, 1], kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2])
            size, index = size // 2, index + 1
            continue
        cout = _scaled(item, width)
        x = b.conv(x, f"/features/features.{index}", f"features.{index}", cin, cout, 3)
        x = b.node("Relu", [x], f"/features/features.{index + 1}/Relu")
        cin, index = cout, index + 2
    # AdaptiveAvgPool2d((7, 7)) is the identity at 224x224 and left out: at other sizes the
    # classifier reads the last feature map as it is.
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    hidden, features = _scaled(4096, width), cin * size * size
    x = b.linear(x, "/classifier/classifier.0", "classifier.0", features, hidden, gain=2.0)
    x = b.node("Relu", [x], "/classifier/classifier.1/Relu")
    x = b.linear(x, "/classifier/classifier.3", "classifier.3", hidden, hidden, gain=2.0)
    x = b.node("Relu", [x], "/classifier/classifier.4/Relu")
    b.linear(x, "/classifier/classifier.6", "classifier.6", hidden, num_classes, gain=1.0,
             output="logits", bias_std=0.01)
    return b.finish(image_size, num_classes)


def vgg11(width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
          seed: int = 0) -> onnx.ModelProto:
    """torchvision VGG-11 (no BatchNorm); conv and hidden widths = round(base * width).

    Dropout vanishes in an eval-mode export. At width 1.0 this is ~133 M params (~530 MB).
    """
    if width <= 0:
        raise ValueError("width must be positive")
    if image_size < 32:
        raise ValueError("image_size must be at least 32 (five 2x2 max pools)")
    return _build_vgg11(_Builder("main_graph", seed), width, num_classes, image_size)


# ------------------------------------------------------------------ ConvNeXt


def _layer_norm(b: _Builder, x: str, scope: str, param: str, channels: int) -> str:
    """nn.LayerNorm over the last axis (opset 17's LayerNormalization)."""
    scale = b.initializer(f"{param}.weight", b.rng.uniform(0.5, 1.5, channels).astype(np.float32), (channels,))
    shift = b.bias(f"{param}.bias", channels)
    return b.node("LayerNormalization", [x, scale, shift], f"{scope}/LayerNormalization", axis=-1, epsilon=1e-6)


def _layer_norm_2d(b: _Builder, x: str, scope: str, param: str, channels: int) -> str:
    """torchvision's LayerNorm2d: permute to channels last, LayerNorm, permute back."""
    x = b.node("Transpose", [x], f"{scope}/Transpose", perm=[0, 2, 3, 1])
    x = _layer_norm(b, x, scope, param, channels)
    return b.node("Transpose", [x], f"{scope}/Transpose_1", perm=[0, 3, 1, 2])


def _matmul_linear(b: _Builder, x: str, scope: str, param: str, cin: int, cout: int, gain: float) -> str:
    """nn.Linear on a channels-last map, as torch exports it: MatMul with the transposed weight, then Add."""
    w = b.weight(f"{param}.weight", (cout, cin), gain)
    if b.with_data:  # torch stores the transposed copy the MatMul reads
        tensor = b.graph.initializer[-1]
        values = np.frombuffer(tensor.raw_data, dtype="<f4").reshape(cout, cin)
        tensor.raw_data, tensor.dims[:] = np.ascontiguousarray(values.T).tobytes(), [cin, cout]
    else:
        b.graph.initializer[-1].dims[:] = [cin, cout]
    y = b.node("MatMul", [x, w], f"{scope}/MatMul")
    return b.node("Add", [y, b.bias(f"{param}.bias", cout)], f"{scope}/Add")


def _gelu(b: _Builder, x: str, scope: str) -> str:
    """GELU as exported before opset 20: x * 0.5 * (1 + erf(x / sqrt 2))."""
    y = b.node("Div", [x, "gelu.sqrt2"], f"{scope}/Div")
    y = b.node("Add", [b.node("Erf", [y], f"{scope}/Erf"), "gelu.one"], f"{scope}/Add")
    return b.node("Mul", [b.node("Mul", [x, y], f"{scope}/Mul"), "gelu.half"], f"{scope}/Mul_1")


def _convnext_block(b: _Builder, x: str, stage: int, index: int, dim: int) -> str:
    """torchvision CNBlock: depthwise 7x7 -> NHWC -> LayerNorm -> Linear 4C -> GELU -> Linear C -> NCHW,
    times the layer scale, plus the input."""
    scope, param = f"/features/features.{stage}/features.{stage}.{index}/block", \
        f"features.{stage}.{index}.block"
    y = b.conv(x, f"{scope}/block.0", f"{param}.0", dim, dim, 7, group=dim)
    y = b.node("Transpose", [y], f"{scope}/block.1/Transpose", perm=[0, 2, 3, 1])
    y = _layer_norm(b, y, f"{scope}/block.2", f"{param}.2", dim)
    y = _matmul_linear(b, y, f"{scope}/block.3", f"{param}.3", dim, 4 * dim, gain=2.0)
    y = _gelu(b, y, f"{scope}/block.4")
    y = _matmul_linear(b, y, f"{scope}/block.5", f"{param}.5", 4 * dim, dim, gain=1.0)
    y = b.node("Transpose", [y], f"{scope}/block.6/Transpose", perm=[0, 3, 1, 2])
    gamma = b.initializer(f"features.{stage}.{index}.layer_scale", np.full((dim, 1, 1), 0.1, np.float32),
                          (dim, 1, 1))
    y = b.node("Mul", [gamma, y], f"/features/features.{stage}/features.{stage}.{index}/Mul")
    return b.node("Add", [y, x], f"/features/features.{stage}/features.{stage}.{index}/Add")


def convnext_tiny(num_classes: int = 1000, image_size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """torchvision ConvNeXt-T (28.6 M params): a Linear per position after a LayerNorm over channels."""
    if image_size < 32 or image_size % 32:
        raise ValueError("image_size must be a multiple of 32")
    b = _Builder("main_graph", seed)
    for name, value in (("gelu.sqrt2", math.sqrt(2.0)), ("gelu.one", 1.0), ("gelu.half", 0.5)):
        b.scalar(name, value)
    dim = _CONVNEXT_TINY[0][1]
    x = b.conv("input", "/features/features.0/features.0.0", "features.0.0", 3, dim, 4, 4, pad=0)
    x = _layer_norm_2d(b, x, "/features/features.0/features.0.1", "features.0.1", dim)
    for stage, (blocks, channels) in enumerate(_CONVNEXT_TINY):
        if stage:
            index = 2 * stage
            x = _layer_norm_2d(b, x, f"/features/features.{index}/features.{index}.0", f"features.{index}.0", dim)
            x = b.conv(x, f"/features/features.{index}/features.{index}.1", f"features.{index}.1", dim, channels,
                       2, 2, pad=0)
            dim = channels
        for i in range(blocks):
            x = _convnext_block(b, x, 2 * stage + 1, i, dim)
    x = b.node("GlobalAveragePool", [x], "/avgpool/GlobalAveragePool")
    x = _layer_norm_2d(b, x, "/classifier/classifier.0", "classifier.0", dim)
    x = b.node("Flatten", [x], "/classifier/classifier.1/Flatten", axis=1)
    b.linear(x, "/classifier/classifier.2", "classifier.2", dim, num_classes, gain=1.0, output="logits",
             bias_std=0.01)
    return b.finish(image_size, num_classes)


# ---------------------------------------------------------- ResNetV2 (BiT)


def _group_norm(b: _Builder, x: str, scope: str, param: str, channels: int, groups: int = _GN_GROUPS) -> str:
    """F.group_norm as torch exports it before opset 18, then timm's GroupNormAct ReLU: Reshape (0, G, -1),
    InstanceNormalization (unit scale, zero shift per group), Reshape back to Shape(x), Mul and Add per
    channel."""
    y = b.node("Reshape", [x, b.constant(scope, [0, groups, -1])], b.numbered(scope, "Reshape"))
    ones = b.initializer(f"{param}.gn_ones", np.ones(groups, np.float32) if b.with_data else None, (groups,))
    zeros = b.initializer(f"{param}.gn_zeros", np.zeros(groups, np.float32) if b.with_data else None, (groups,))
    y = b.node("InstanceNormalization", [y, ones, zeros], b.numbered(scope, "InstanceNormalization"), epsilon=1e-5)
    y = b.node("Reshape", [y, b.node("Shape", [x], b.numbered(scope, "Shape"))], b.numbered(scope, "Reshape"))
    scale = b.rng.uniform(0.5, 1.5, (channels, 1, 1)).astype(np.float32) if b.with_data else None
    y = b.node("Mul", [y, b.initializer(f"{param}.weight", scale, (channels, 1, 1))], b.numbered(scope, "Mul"))
    shift = (b.rng.standard_normal((channels, 1, 1)) * _BIAS_STD).astype(np.float32) if b.with_data else None
    y = b.node("Add", [y, b.initializer(f"{param}.bias", shift, (channels, 1, 1))], b.numbered(scope, "Add"))
    return b.node("Relu", [y], f"{scope}/act/Relu")


def _std_conv(b: _Builder, x: str, scope: str, param: str, cin: int, cout: int, kernel: int,
              stride: int = 1) -> str:
    """timm's StdConv2d: each filter standardised at run time (its mean subtracted, divided by the root
    of its variance plus eps: ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div on the weight), then a
    Conv without bias. The loader folds the standardisation into a constant weight."""
    w = b.weight(f"{param}.weight", (cout, cin, kernel, kernel), 2.0)
    mean = b.node("ReduceMean", [w], f"{scope}/ReduceMean", axes=[1, 2, 3], keepdims=1)
    centred = b.node("Sub", [w, mean], f"{scope}/Sub")
    square = b.node("Mul", [centred, centred], f"{scope}/Mul")
    var = b.node("ReduceMean", [square], f"{scope}/ReduceMean_1", axes=[1, 2, 3], keepdims=1)
    std = b.node("Sqrt", [b.node("Add", [var, "std_conv.eps"], f"{scope}/Add")], f"{scope}/Sqrt")
    w = b.node("Div", [centred, std], f"{scope}/Div")
    pad = ((stride - 1) + (kernel - 1)) // 2  # timm's get_padding
    return b.node("Conv", [x, w], f"{scope}/Conv", dilations=[1, 1], group=1, kernel_shape=[kernel, kernel],
                  pads=[pad] * 4, strides=[stride, stride])


def _preact_bottleneck(b: _Builder, x: str, stage: int, index: int, cin: int, cout: int, stride: int) -> str:
    """timm's PreActBottleneck: GroupNorm+ReLU first; the projection (a strided 1x1 StdConv) reads the
    normalised input; 1x1, 3x3 (strided), 1x1 StdConvs, each behind a GroupNorm+ReLU; plus the shortcut."""
    scope, param = f"/stages/stages.{stage}/blocks/blocks.{index}", f"stages.{stage}.blocks.{index}"
    mid = cout // 4
    pre = _group_norm(b, x, f"{scope}/norm1", f"{param}.norm1", cin)
    shortcut = x
    if index == 0:
        shortcut = _std_conv(b, pre, f"{scope}/downsample/conv", f"{param}.downsample.conv", cin, cout, 1, stride)
    y = _std_conv(b, pre, f"{scope}/conv1", f"{param}.conv1", cin, mid, 1)
    y = _group_norm(b, y, f"{scope}/norm2", f"{param}.norm2", mid)
    y = _std_conv(b, y, f"{scope}/conv2", f"{param}.conv2", mid, mid, 3, stride)
    y = _group_norm(b, y, f"{scope}/norm3", f"{param}.norm3", mid)
    y = _std_conv(b, y, f"{scope}/conv3", f"{param}.conv3", mid, cout, 1)
    return b.node("Add", [y, shortcut], f"{scope}/Add")


def resnetv2_50x1_bit(width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
                      seed: int = 0) -> onnx.ModelProto:
    """timm's resnetv2_50x1_bit (BiT-M R50x1, 25.5 M params): a pre-activation ResNetV2 whose convs are
    weight-standardised at run time and whose norms are GroupNorms of 32 groups, exported before opset 18
    (Reshape, InstanceNormalization, Reshape, Mul, Add). `width` scales every width (a multiple of 32 each)."""
    stem = _scaled(64, width)
    if stem % _GN_GROUPS or _scaled(256, width) % (4 * _GN_GROUPS):
        raise ValueError(f"width {width} leaves channel counts that {_GN_GROUPS} GroupNorm groups do not divide")
    b = _Builder("main_graph", seed)
    b.scalar("std_conv.eps", _STD_CONV_EPS)
    x = _std_conv(b, "input", "/stem/conv", "stem.conv", 3, stem, 7, 2)
    pads = b.constant("/stem/pad", [0, 0, 1, 1, 0, 0, 1, 1])
    x = b.node("Pad", [x, pads, b.scalar("stem.pad.value", 0.0)], "/stem/pad/Pad", mode="constant")
    x = b.node("MaxPool", [x], "/stem/pool/MaxPool", ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3],
               pads=[0, 0, 0, 0], strides=[2, 2])
    cin = stem
    for stage, blocks in enumerate(_RESNETV2_50_BLOCKS):
        cout = _scaled(256 * 2 ** stage, width)
        for index in range(blocks):
            x = _preact_bottleneck(b, x, stage, index, cin, cout, 2 if stage and not index else 1)
            cin = cout
    x = _group_norm(b, x, "/norm", "norm", cin)
    x = b.node("GlobalAveragePool", [x], "/head/global_pool/pool/GlobalAveragePool")
    w = b.weight("head.fc.weight", (num_classes, cin, 1, 1), 1.0)
    x = b.node("Conv", [x, w, b.bias("head.fc.bias", num_classes, std=0.01)], "/head/fc/Conv", dilations=[1, 1],
               group=1, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
    b.node("Flatten", [x], "/head/flatten/Flatten", output="logits", axis=1)
    return b.finish(image_size, num_classes)


# ---------------------------------------------------------------- ResNeSt


def _timm_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """timm's make_divisible: nearest multiple, at least min_value, never more than 10% down."""
    new_v = max(min_value or divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _batch_of(b: _Builder, x: str, scope: str) -> str:
    """x.size(0) read at run time: Shape -> Gather(0)."""
    shape = b.node("Shape", [x], b.numbered(scope, "Shape"))
    return b.node("Gather", [shape, b.constant(scope, 0)], b.numbered(scope, "Gather"), axis=0)


def _view(b: _Builder, x: str, scope: str, dims, batch: str | None) -> str:
    """x.view(B, *dims): a constant target (0 copies the batch) or the batch read at run time."""
    target = b.constant(scope, [0, *dims]) if batch is None else _batch_and(b, batch, scope, dims)
    return b.node("Reshape", [x, target], b.numbered(scope, "Reshape"))


def _split_attn(b: _Builder, x: str, scope: str, param: str, channels: int, size: int,
                runtime_batch: bool) -> str:
    """timm's SplitAttn (radix 2, cardinality 1), BatchNorms folded: a 3x3 conv to radix * C channels in
    radix groups, viewed as (B, radix, C, H, W) and summed over the radix, pooled; fc1 (+ReLU) and fc2 to
    radix * C; RadixSoftmax (view (B, 1, radix, -1), transpose(1, 2), softmax over the radix, reshape
    (B, -1)); view (B, -1, 1, 1) and reshape (B, radix, C, 1, 1); the slices weighed and summed."""
    mid, attn = _RADIX * channels, _timm_divisible(channels * _RADIX * 0.25, min_value=32)
    y = b.conv(x, f"{scope}/conv", f"{param}.conv", channels, mid, 3, group=_RADIX)
    y = b.node("Relu", [y], f"{scope}/act0/Relu")
    batch = _batch_of(b, y, scope) if runtime_batch else None
    y = _view(b, y, scope, [_RADIX, channels, size, size], batch)
    gap = b.node("ReduceSum", [y, b.constant(scope, [1])], b.numbered(scope, "ReduceSum"), keepdims=0)
    gap = b.node("ReduceMean", [gap], b.numbered(scope, "ReduceMean"), axes=[2, 3], keepdims=1)
    a = b.conv(gap, f"{scope}/fc1", f"{param}.fc1", channels, attn, 1)
    a = b.node("Relu", [a], f"{scope}/act1/Relu")
    a = b.conv(a, f"{scope}/fc2", f"{param}.fc2", attn, mid, 1, gain=1.0)
    rs = f"{scope}/rsoftmax"
    a = _view(b, a, rs, [1, _RADIX, -1], _batch_of(b, a, rs) if runtime_batch else None)
    a = b.node("Transpose", [a], b.numbered(rs, "Transpose"), perm=[0, 2, 1, 3])
    a = b.node("Softmax", [a], b.numbered(rs, "Softmax"), axis=1)
    a = _view(b, a, rs, [-1], _batch_of(b, a, rs) if runtime_batch else None)
    a = _view(b, a, scope, [-1, 1, 1], batch)
    a = _view(b, a, scope, [_RADIX, channels, 1, 1], batch)
    y = b.node("Mul", [y, a], b.numbered(scope, "Mul"))
    return b.node("ReduceSum", [y, b.constant(scope, [1])], b.numbered(scope, "ReduceSum"), keepdims=0)


def _resnest_bottleneck(b: _Builder, x: str, stage: int, cin: int, planes: int, stride: int, size: int,
                        runtime_batch: bool) -> str:
    """timm's ResNestBottleneck (avd, avd_first False; avg_down): 1x1, split attention at the input's size,
    a 3x3 average pool for the stride, 1x1; the projection average-pools, then a 1x1 conv; Add, ReLU."""
    scope, param = f"/layer{stage}/layer{stage}.0", f"layer{stage}.0"
    y = b.conv(x, f"{scope}/conv1", f"{param}.conv1", cin, planes, 1)
    y = b.node("Relu", [y], f"{scope}/act1/Relu")
    y = _split_attn(b, y, f"{scope}/conv2", f"{param}.conv2", planes, size, runtime_batch)
    shortcut = x
    if stride > 1:
        y = b.node("AveragePool", [y], f"{scope}/avd_last/AveragePool", ceil_mode=0, count_include_pad=1,
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
        shortcut = b.node("AveragePool", [x], f"{scope}/downsample/downsample.0/AveragePool", ceil_mode=1,
                          count_include_pad=0, kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[stride, stride])
    y = b.conv(y, f"{scope}/conv3", f"{param}.conv3", planes, 4 * planes, 1, gain=2.0 * _RESIDUAL_GAIN**2)
    shortcut = b.conv(shortcut, f"{scope}/downsample/downsample.1", f"{param}.downsample.1", cin, 4 * planes, 1,
                      gain=1.0)
    y = b.node("Add", [y, shortcut], f"{scope}/Add")
    return b.node("Relu", [y], f"{scope}/act3/Relu")


def resnest14d(width: float = 1.0, num_classes: int = 1000, image_size: int = 224, seed: int = 0,
               runtime_batch: bool = False) -> onnx.ModelProto:
    """timm's resnest14d (10.6 M params): a deep stem (three 3x3 convs), one ResNeSt bottleneck per stage
    with split attention (radix 2), BatchNorm folded. Views reshape to constant targets, or with
    runtime_batch to targets whose batch is read from Shape. `width` scales every width."""
    if image_size < 32 or image_size % 32:
        raise ValueError("image_size must be a multiple of 32")
    b = _Builder("main_graph", seed)
    stem = _scaled(32, width)
    x = b.conv("input", "/conv1/conv1.0", "conv1.0", 3, stem, 3, 2)
    x = b.node("Relu", [x], "/conv1/conv1.2/Relu")
    x = b.conv(x, "/conv1/conv1.3", "conv1.3", stem, stem, 3)
    x = b.node("Relu", [x], "/conv1/conv1.5/Relu")
    cin = 2 * stem
    x = b.conv(x, "/conv1/conv1.6", "conv1.6", stem, cin, 3)
    x = b.node("Relu", [x], "/act1/Relu")
    x = b.node("MaxPool", [x], "/maxpool/MaxPool", ceil_mode=0, dilations=[1, 1], kernel_shape=[3, 3],
               pads=[1, 1, 1, 1], strides=[2, 2])
    size = image_size // 4
    for stage, blocks in enumerate(_RESNEST14_BLOCKS, start=1):
        planes, stride = _scaled(64 * 2 ** (stage - 1), width), 2 if stage > 1 else 1
        x = _resnest_bottleneck(b, x, stage, cin, planes, stride, size, runtime_batch)
        cin, size = 4 * planes, size // stride
    b.head(x, cin, num_classes, "/global_pool/pool", "/fc", "fc")
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
    """Multiply-accumulates per sample of the Conv, Gemm and MatMul nodes.

    Shapes come from onnx shape inference on a data-free skeleton, so this
    works for models beyond the 2 GiB protobuf limit. Data propagation follows
    reshape targets computed from Shape at run time (dynamic-batch exports).
    """
    inferred = onnx.shape_inference.infer_shapes(_skeleton(model), data_prop=True)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    # Weights are initializers, or computed from them (a StdConv's standardised weight): inferred.
    dims = {**shapes, **{t.name: list(t.dims) for t in model.graph.initializer}}
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out:
            # Per output element: (Cin / group) * kH * kW multiply-adds.
            macs += int(np.prod(out[1:])) * int(np.prod(dims[node.input[1]][1:]))
        elif node.op_type == "Gemm" and out:
            macs += int(np.prod(dims[node.input[1]]))
        elif node.op_type == "MatMul" and out and node.input[1] in dims:
            # Per output element: one multiply-add per row of the weight.
            macs += int(np.prod(out[1:])) * dims[node.input[1]][0]
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
    for name in ("resnet50", "mobilenet_v2", "shufflenet_v2", "vgg11"):
        p = sub.add_parser(name, help=f"{name} at a given width")
        p.add_argument("--width", type=float, default=1.0)
        p.add_argument("--image-size", type=int, default=224)
    sub.choices["shufflenet_v2"].add_argument(
        "--runtime-batch", action="store_true", help="shuffle targets read the batch from Shape")
    p = sub.add_parser("shufflenet_v1", help="ShuffleNet v1 with a given group count")
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p = sub.add_parser("convnext_tiny", help="torchvision ConvNeXt-T")
    p.add_argument("--image-size", type=int, default=224)
    for name, what in (("resnetv2_50x1_bit", "timm's pre-activation ResNetV2-50 (GroupNorm, StdConv)"),
                       ("resnest14d", "timm's ResNeSt-14d (split attention)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--width", type=float, default=1.0)
        p.add_argument("--image-size", type=int, default=224)
    sub.choices["resnest14d"].add_argument(
        "--runtime-batch", action="store_true", help="view targets read the batch from Shape")
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
    if args.kind == "convnext_tiny":
        return convnext_tiny(args.num_classes, args.image_size, args.seed)
    if args.kind == "resnetv2_50x1_bit":
        return resnetv2_50x1_bit(args.width, args.num_classes, args.image_size, args.seed)
    if args.kind == "resnest14d":
        return resnest14d(args.width, args.num_classes, args.image_size, args.seed, args.runtime_batch)
    if args.kind == "shufflenet_v1":
        return shufflenet_v1(args.groups, args.num_classes, args.image_size, args.seed)
    if args.kind == "shufflenet_v2":
        return shufflenet_v2(args.width, args.num_classes, args.image_size, args.seed, args.runtime_batch)
    build = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "vgg11": vgg11}[args.kind]
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

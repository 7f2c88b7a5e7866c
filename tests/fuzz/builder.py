"""A small builder for CNN test graphs, written the way each opset (7 to 21) requires.

`Net` tracks every tensor's shape without the batch, (C, H, W) or (F,), so random graphs stay
valid. Ops whose signature changed across opsets (Pad, Split, ReduceMean, Slice, Clip,
Upsample/Resize) are written in the form of the net's opset; `model()` sets the smallest IR
version that opset needs and, for IR 3, lists the initializers among the graph inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ACTIVATIONS = ("Relu", "Sigmoid", "LeakyRelu", "HardSigmoid", "Clip", "HardSwish", "Tanh")


class Net:
    def __init__(self, opset: int = 17, seed: int = 0, batch="N"):
        self.opset = opset
        self.batch = batch  # a symbol (dynamic batch) or an int
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shape: dict[str, tuple[int, ...]] = {}
        self._count = 0

    # ---- plumbing ----------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, values, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def ints(self, values, prefix: str = "i") -> str:
        return self.const(np.asarray(values, dtype=np.int64), prefix)

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], outputs: int = 1, name: str | None = None,
             **attrs) -> str | list[str]:
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name if name is not None else names[0], **attrs))
        for out in names:
            self.shape[out] = shape
        return names[0] if outputs == 1 else names

    def weight(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)

    # ---- graph edges -------------------------------------------------------------------------
    def input(self, c: int, h: int, w: int, name: str = "input", dims=None) -> str:
        dims = dims if dims is not None else [self.batch, c, h, w]
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        self.shape[name] = (c, h, w)
        return name

    def output(self, x: str) -> str:
        self.outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [self.batch, *self.shape[x]]))
        return x

    def model(self, ir_version: int | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "net", self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = ir_version or helper.find_min_ir_version_for(opsets)
        if model.ir_version < 4:  # IR 3: every initializer must also be a graph input
            model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                     for t in model.graph.initializer)
        return model

    # ---- layers ------------------------------------------------------------------------------
    def conv(self, x: str, c_out: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True,
             weight: str | None = None, name: str | None = None) -> str:
        c, h, w = self.shape[x]
        pad = k // 2
        fan_in = c // group * k * k
        w_name = weight or self.const(self.weight((c_out, c // group, k, k), fan_in), "w")
        inputs = [x, w_name] + ([self.const(self.rng.normal(0, 0.1, c_out).astype(np.float32), "b")] if bias else [])
        out = ((h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
        return self.node("Conv", inputs, (c_out, *out), name=name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, group=group)

    def act(self, x: str, kind: str = "Relu") -> str:
        if kind == "HardSwish" and self.opset < 14:
            kind = "HardSigmoid"
        if kind == "Clip":
            if self.opset < 11:
                return self.node("Clip", [x], self.shape[x], min=0.0, max=6.0)
            bounds = [self.const(np.float32(0.0), "lo"), self.const(np.float32(6.0), "hi")]
            return self.node("Clip", [x, *bounds], self.shape[x])
        return self.node(kind, [x], self.shape[x])

    def bn(self, x: str) -> str:
        c = self.shape[x][0]
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c)]
        names = [self.const(p.astype(np.float32), "bn") for p in params]
        return self.node("BatchNormalization", [x, *names], self.shape[x])

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b], self.shape[a])

    def mul(self, a: str, b: str) -> str:
        return self.node("Mul", [a, b], self.shape[a])

    def concat(self, xs: list[str]) -> str:
        c = sum(self.shape[x][0] for x in xs)
        return self.node("Concat", xs, (c, *self.shape[xs[0]][1:]), axis=1)

    def split(self, x: str, sizes: list[int], by_count: bool = False) -> list[str]:
        """Split channels; `by_count` writes an equal split the opset-18 way (num_outputs)."""
        rest = self.shape[x][1:]
        shapes = [(s, *rest) for s in sizes]
        if self.opset < 13:
            outs = self.node("Split", [x], shapes[0], outputs=len(sizes), axis=1, split=list(sizes))
        elif by_count and self.opset >= 18:
            outs = self.node("Split", [x], shapes[0], outputs=len(sizes), axis=1, num_outputs=len(sizes))
        else:
            outs = self.node("Split", [x, self.ints(sizes, "split")], shapes[0], outputs=len(sizes), axis=1)
        outs = outs if isinstance(outs, list) else [outs]
        for out, shape in zip(outs, shapes):
            self.shape[out] = shape
        return outs

    def pad_channels(self, x: str, before: int, after: int, with_axes: bool = False) -> str:
        """Zero channels around a tensor: the option-A shortcut of CIFAR ResNets."""
        c, h, w = self.shape[x]
        shape = (c + before + after, h, w)
        pads = [0, before, 0, 0, 0, after, 0, 0]
        if self.opset < 11:
            return self.node("Pad", [x], shape, mode="constant", pads=pads, value=0.0)
        if with_axes and self.opset >= 18:
            return self.node("Pad", [x, self.ints([before, after], "pads"), "", self.ints([1], "axes")], shape)
        return self.node("Pad", [x, self.ints(pads, "pads")], shape, mode="constant")

    def subsample(self, x: str) -> str:
        """x[:, :, ::2, ::2]: a strided Slice, or a 1x1 stride-2 pool before Slice had steps (opset 10)."""
        c, h, w = self.shape[x]
        shape = (c, (h + 1) // 2, (w + 1) // 2)
        if self.opset < 10:
            return self.node("MaxPool", [x], shape, kernel_shape=[1, 1], strides=[2, 2])
        big = np.iinfo(np.int64).max
        args = [self.ints([0, 0]), self.ints([big, big]), self.ints([2, 3]), self.ints([2, 2])]
        return self.node("Slice", [x, *args], shape)

    def pool(self, x: str, kind: str = "MaxPool") -> str:
        c, h, w = self.shape[x]
        return self.node(kind, [x], (c, h // 2, w // 2), kernel_shape=[2, 2], strides=[2, 2])

    def global_pool(self, x: str, reduce: bool = False) -> str:
        """GlobalAveragePool, or ReduceMean over H and W (axes attribute before opset 18, input from 18)."""
        c = self.shape[x][0]
        if not reduce:
            return self.node("GlobalAveragePool", [x], (c, 1, 1))
        if self.opset < 18:
            return self.node("ReduceMean", [x], (c, 1, 1), axes=[2, 3], keepdims=1)
        return self.node("ReduceMean", [x, self.ints([2, 3], "axes")], (c, 1, 1), keepdims=1)

    def se(self, x: str, squeeze: int, reduce: bool = False) -> str:
        """Squeeze-and-excitation: a per-channel gate computed from the tensor itself."""
        c = self.shape[x][0]
        gate = self.global_pool(x, reduce)
        gate = self.act(self.conv(gate, squeeze, k=1), "Relu")
        gate = self.act(self.conv(gate, c, k=1), "Sigmoid")
        return self.mul(x, gate)

    def upsample(self, x: str) -> str:
        """Nearest x2: Upsample before opset 10, Resize after, each in its opset's signature."""
        c, h, w = self.shape[x]
        shape = (c, 2 * h, 2 * w)
        scales = [1.0, 1.0, 2.0, 2.0]
        if self.opset < 9:
            return self.node("Upsample", [x], shape, mode="nearest", scales=scales)
        scale_name = self.const(np.asarray(scales, dtype=np.float32), "scales")
        if self.opset == 9:
            return self.node("Upsample", [x, scale_name], shape, mode="nearest")
        if self.opset == 10:
            return self.node("Resize", [x, scale_name], shape, mode="nearest")
        roi = self.const(np.zeros(0, dtype=np.float32), "roi") if self.opset < 13 else ""
        return self.node("Resize", [x, roi, scale_name], shape, mode="nearest")

    def group_norm(self, x: str, groups: int, native: bool = False) -> str:
        """GroupNorm: the GroupNormalization op (opset 21), or as exporters write it before: Reshape to
        (N, G, -1), InstanceNormalization, Reshape back to the input's shape, per-channel Mul and Add."""
        c = self.shape[x][0]
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        shift = self.rng.normal(0, 0.1, c).astype(np.float32)
        if native:
            return self.node("GroupNormalization", [x, self.const(scale, "gn"), self.const(shift, "gn")],
                             self.shape[x], num_groups=groups, epsilon=1e-5)
        rest = int(np.prod(self.shape[x])) // groups
        y = self.node("Reshape", [x, self.ints([0, groups, -1], "gn_split")], (groups, rest))
        y = self.node("InstanceNormalization", [y, self.const(np.ones(groups, np.float32), "gn"),
                                                self.const(np.zeros(groups, np.float32), "gn")], (groups, rest),
                      epsilon=1e-5)
        y = self.node("Reshape", [y, self.node("Shape", [x], (4,))], self.shape[x])
        y = self.node("Mul", [y, self.const(scale.reshape(c, 1, 1), "gn")], self.shape[x])
        return self.node("Add", [y, self.const(shift.reshape(c, 1, 1), "gn")], self.shape[x])

    def reduce_sum(self, x: str, axes: list[int], shape: tuple[int, ...]) -> str:
        """ReduceSum without keepdims: axes as an attribute before opset 13, as an input from 13."""
        if self.opset < 13:
            return self.node("ReduceSum", [x], shape, axes=axes, keepdims=0)
        return self.node("ReduceSum", [x, self.ints(axes, "axes")], shape, keepdims=0)

    def split_attention(self, x: str, channels: int, radix: int = 2, cardinality: int = 1, attn: int = 4,
                        cut: bool = False) -> str:
        """Split attention (ResNeSt) as timm's SplitAttn exports it: a conv to radix * C channels (groups
        cardinality * radix), Reshape (N, r, C, H, W), ReduceSum over the radix, pooled, fc1, fc2 to r * C;
        RadixSoftmax: Reshape (N, card, r, -1), Transpose(0, 2, 1, 3), Softmax over the radix, flattened;
        Reshape (N, -1, 1, 1) then (N, r, C, 1, 1), Mul and ReduceSum over the radix. `cut`: ResNeSt's own
        form, the slices and their attention cut with Split and summed with Add."""
        _, h, w = self.shape[x]
        mid = radix * channels
        y = self.act(self.conv(x, mid, k=3, group=cardinality * radix), "Relu")
        if cut:
            slices = self.split(y, [channels] * radix)
            gap = slices[0]
            for part in slices[1:]:
                gap = self.add(gap, part)
        else:
            y = self.node("Reshape", [y, self.ints([0, radix, channels, h, w], "sa_split")], (radix, channels, h, w))
            gap = self.reduce_sum(y, [1], (channels, h, w))
        gap = self.global_pool(gap, reduce=not cut)
        a = self.act(self.conv(gap, attn, k=1, group=cardinality), "Relu")
        a = self.conv(a, mid, k=1, group=cardinality)
        a = self.node("Reshape", [a, self.ints([0, cardinality, radix, -1], "rs_view")],
                      (cardinality, radix, channels // cardinality))
        a = self.node("Transpose", [a], (radix, cardinality, channels // cardinality), perm=[0, 2, 1, 3])
        a = self.node("Softmax", [a], self.shape[a], axis=1)
        a = self.node("Reshape", [a, self.ints([0, -1], "rs_flat")], (mid,))
        a = self.node("Reshape", [a, self.ints([0, -1, 1, 1], "attn_view")], (mid, 1, 1))
        if cut:
            out = None
            for part, weight in zip(slices, self.split(a, [channels] * radix)):
                product = self.mul(part, weight)
                out = product if out is None else self.add(out, product)
            return out
        a = self.node("Reshape", [a, self.ints([0, radix, channels, 1, 1], "attn_split")], (radix, channels, 1, 1))
        return self.reduce_sum(self.mul(y, a), [1], (channels, h, w))

    def flatten(self, x: str) -> str:
        return self.node("Flatten", [x], (int(np.prod(self.shape[x])),), axis=1)

    def gemm(self, x: str, n: int, matmul: bool = False) -> str:
        f = self.shape[x][0]
        weight = self.const(self.weight((f, n), f), "fc")
        if matmul:
            return self.node("MatMul", [x, weight], (n,))
        return self.node("Gemm", [x, weight, self.const(np.zeros(n, np.float32), "fcb")], (n,))

    def head(self, x: str, classes: int = 5, reduce: bool = False, matmul: bool = False) -> str:
        return self.gemm(self.flatten(self.global_pool(x, reduce)), classes, matmul)

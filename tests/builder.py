"""A tiny builder for test graphs: a few lines per graph, random weights, on onnx.helper only.

    b = GraphBuilder(opset=17)
    x = b.input("x", [1, 8, 16, 16])
    y = b.relu(b.conv(x, 16, name="c1"))
    model = b.build(outputs=[b.conv(y, 4, name="c2")])

Every method returns the name of the tensor it produced; node names are given or generated
(`relu_0`, `conv_1`, ...) and tensors are named after their node. The batch is dynamic by
default (the oracle feeds a batch of two). Channel counts are read back with ONNX shape
inference, so any op can sit between two convs. Ops without a helper are `b.op("LRN", [x], size=3)`,
or for CamelCase names `b.leaky_relu(x, alpha=0.1)` (snake case -> LeakyRelu; acronyms need b.op).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, opset: int = 17, seed: int = 0, dtype=np.float32, dynamic_batch: bool = True,
                 weights_as: str = "initializer", ir_version: int | None = None):
        assert weights_as in ("initializer", "constant")
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.elem_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.dynamic_batch = dynamic_batch
        self.weights_as = weights_as
        self.ir_version = ir_version
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.custom_domains: set[str] = set()
        self._counter = Counter()
        self._shape_cache: dict[str, tuple] = {}

    # ---- names, inputs, constants ------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        name = f"{prefix}_{sum(self._counter.values())}"
        self._counter[prefix] += 1
        return name

    def input(self, name: str, shape: list[int], dtype=None) -> str:
        dims = list(shape)
        if self.dynamic_batch:
            dims[0] = "N"
        elem = self.elem_type if dtype is None else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.inputs.append(helper.make_tensor_value_info(name, elem, dims))
        return name

    def const(self, values, name: str | None = None, dtype=None) -> str:
        """A constant tensor: an initializer, or a Constant node when built with weights_as='constant'."""
        array = np.asarray(values, dtype=dtype if dtype is not None else None)
        if dtype is None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(self.dtype)
        name = name or self.fresh("const")
        tensor = numpy_helper.from_array(array, name)
        if self.weights_as == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_node", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values, name: str | None = None) -> str:
        return self.const(np.asarray(values, dtype=np.int64), name)

    def random(self, shape, scale: float = 1.0, name: str | None = None) -> str:
        return self.const(self.rng.standard_normal(shape) * scale, name)

    def positive(self, shape, name: str | None = None) -> str:
        return self.const(self.rng.uniform(0.5, 1.5, shape), name)

    # ---- generic node ------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], outputs: int = 1, name: str | None = None,
           domain: str = "", **attrs):
        """Add a node; returns its output name (or the list of names when outputs > 1)."""
        name = name or self.fresh(op_type.lower())
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        if domain:
            self.custom_domains.add(domain)
        self._shape_cache.clear()
        return outs[0] if outputs == 1 else outs

    def __getattr__(self, op_name: str):
        """Single-input ops without parameters: b.relu(x), b.sigmoid(x), b.hard_swish(x, ...)."""
        if op_name.startswith("_"):
            raise AttributeError(op_name)
        op_type = "".join(part.capitalize() for part in op_name.split("_"))
        return lambda x, name=None, **attrs: self.op(op_type, [x], name=name, **attrs)

    # ---- shapes ------------------------------------------------------------------------------
    def shape(self, tensor: str) -> tuple:
        """Static shape of a tensor (the batch as 'N' when dynamic), by ONNX shape inference."""
        if tensor not in self._shape_cache:
            model = self._model(outputs=[])
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
            for info in list(inferred.graph.value_info) + list(inferred.graph.input):
                dims = info.type.tensor_type.shape.dim
                self._shape_cache[info.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                                     for d in dims)
            for init in self.initializers:
                self._shape_cache[init.name] = tuple(init.dims)
        return self._shape_cache.get(tensor, ())  # () where inference cannot tell (GroupNormalization)

    def channels(self, tensor: str) -> int:
        return self.static_shape(tensor)[1]

    def static_shape(self, tensor: str) -> tuple[int, ...]:
        """Shape with a batch of one; runs the partial graph when inference cannot tell."""
        shape = self.shape(tensor)
        if shape and all(isinstance(d, int) for d in shape[1:]):
            return (1,) + tuple(int(d) for d in shape[1:])
        model = self._model(outputs=[tensor])
        feeds = {}
        for info in self.inputs:
            dims = [1 if not d.HasField("dim_value") else d.dim_value for d in info.type.tensor_type.shape.dim]
            feeds[info.name] = np.zeros(dims, helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return tuple(session.run(None, feeds)[0].shape)

    # ---- layers ------------------------------------------------------------------------------
    def conv(self, x: str, c_out: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = True,
             pad: int | None = None, name: str | None = None, c_in: int | None = None) -> str:
        c_in = c_in or self.channels(x)  # give c_in after ops that shape inference does not know
        name = name or self.fresh("conv")
        fan_in = c_in // group * k * k
        inputs = [x, self.random([c_out, c_in // group, k, k], 1 / math.sqrt(fan_in), f"{name}.weight")]
        if bias:
            inputs.append(self.random([c_out], 0.1, f"{name}.bias"))
        p = k // 2 if pad is None else pad
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[p, p, p, p], group=group)

    def conv_transpose(self, x: str, c_out: int, k: int = 2, stride: int = 2, bias: bool = True,
                       name: str | None = None) -> str:
        c_in = self.channels(x)
        name = name or self.fresh("convt")
        inputs = [x, self.random([c_in, c_out, k, k], 1 / math.sqrt(c_in * k * k), f"{name}.weight")]
        if bias:
            inputs.append(self.random([c_out], 0.1, f"{name}.bias"))
        return self.op("ConvTranspose", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride])

    def batch_norm(self, x: str, name: str | None = None) -> str:
        c = self.channels(x)
        name = name or self.fresh("bn")
        params = [self.positive([c], f"{name}.scale"), self.random([c], 0.1, f"{name}.bias"),
                  self.random([c], 0.1, f"{name}.mean"), self.positive([c], f"{name}.var")]
        return self.op("BatchNormalization", [x, *params], name=name, epsilon=1e-5)

    def instance_norm(self, x: str, name: str | None = None) -> str:
        c = self.channels(x)
        name = name or self.fresh("in")
        params = [self.positive([c], f"{name}.scale"), self.random([c], 0.1, f"{name}.bias")]
        return self.op("InstanceNormalization", [x, *params], name=name, epsilon=1e-5)

    def flatten(self, x: str, name: str | None = None) -> str:
        return self.op("Flatten", [x], name=name, axis=1)

    def gemm(self, x: str, n_out: int, trans_b: int = 1, name: str | None = None) -> str:
        features = self.static_shape(x)[-1]
        name = name or self.fresh("gemm")
        shape = [n_out, features] if trans_b else [features, n_out]
        weight = self.random(shape, 1 / math.sqrt(features), f"{name}.weight")
        bias = self.random([n_out], 0.1, f"{name}.bias")
        return self.op("Gemm", [x, weight, bias], name=name, transB=trans_b)

    def matmul(self, x: str, n_out: int, name: str | None = None) -> str:
        features = self.static_shape(x)[-1]
        name = name or self.fresh("matmul")
        weight = self.random([features, n_out], 1 / math.sqrt(features), f"{name}.weight")
        return self.op("MatMul", [x, weight], name=name)

    def torch_pad(self, x: str, pads: list[int], name: str | None = None) -> str:
        """F.pad(x, [left, right, top, bottom]) as PyTorch exports it: a constant chain into Pad.

        pads -> ConstantOfShape zeros -> Concat -> Reshape(-1, 2) -> reversed Slice -> Transpose
        -> Reshape(-1) -> Cast; loading must fold it into one constant.
        """
        name = name or self.fresh("torch_pad")
        rank = len(self.shape(x))
        given = self.ints(pads, f"{name}.given")
        zeros = self.op("ConstantOfShape", [self.ints([2 * rank - len(pads)], f"{name}.n")], name=f"{name}.zeros",
                        value=numpy_helper.from_array(np.zeros(1, np.int64)))
        joined = self.op("Concat", [given, zeros], name=f"{name}.concat", axis=0)
        pairs = self.op("Reshape", [joined, self.ints([-1, 2], f"{name}.pairs_shape")], name=f"{name}.pairs")
        reversed_ = self.op("Slice", [pairs, self.ints([-1], f"{name}.s"), self.ints([-(2 ** 62)], f"{name}.e"),
                                      self.ints([0], f"{name}.a"), self.ints([-1], f"{name}.st")],
                            name=f"{name}.reverse")
        swapped = self.op("Transpose", [reversed_], name=f"{name}.transpose", perm=[1, 0])
        flat = self.op("Reshape", [swapped, self.ints([-1], f"{name}.flat_shape")], name=f"{name}.flat")
        amounts = self.op("Cast", [flat], name=f"{name}.cast", to=TensorProto.INT64)
        return self.op("Pad", [x, amounts], name=name, mode="constant")

    # ---- output ------------------------------------------------------------------------------
    def _model(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs,
                                  [helper.make_tensor_value_info(o, self.elem_type, None) for o in outputs],
                                  initializer=self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(domain, 1) for domain in sorted(self.custom_domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = self.ir_version or helper.find_min_ir_version_for(opsets[:1])
        if model.ir_version < 4:  # IR 3 requires every initializer to be listed among the inputs too
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in self.initializers)
            model.graph.CopyFrom(graph)
        return model

    def build(self, outputs: list[str], check: bool = True) -> onnx.ModelProto:
        model = self._model(outputs)
        if not self.custom_domains:
            del model.graph.output[:]
            for name in outputs:
                dims = list(self.static_shape(name))
                if self.dynamic_batch and dims:
                    dims[0] = "N"
                model.graph.output.append(helper.make_tensor_value_info(name, self.elem_type, dims))
        if check and not self.custom_domains:
            onnx.checker.check_model(model, full_check=True)
        return model

"""Running models in ONNX Runtime: the provider that really loads, sessions, and runs in chunks.

Every stage runs models (calibration's inversion, the allocator's probes, recovery, quality,
timing), so these helpers sit at the bottom of the package.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import UserInputError
from .memory import elements_per_sample
from .storage import fits_protobuf, save_external  # models over protobuf's 2 GB go through a file


@functools.lru_cache(maxsize=1)
def cuda_works() -> bool:
    """Whether the CUDA provider really loads: the GPU package lists it even without CUDA libraries.

    CUDA and cuDNN installed as pip packages (`pip install onnxruntime-gpu[cuda,cudnn]`) are not on the
    loader's path, so the provider fails to load until `onnxruntime.preload_dlls()` (1.21+) loads them:
    try that before falling back to the CPU.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if _cuda_session_loads():
        return True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every library it cannot find
            preload()
    except Exception:
        return False
    return _cuda_session_loads()


def _cuda_session_loads() -> bool:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    ort.set_default_logger_severity(4)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return sess.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(3)


def best_providers(requested: str | None = None) -> list[str]:
    available = [p for p in ort.get_available_providers() if p != "CUDAExecutionProvider" or cuda_works()]
    if requested:
        name = requested if requested.endswith("ExecutionProvider") else f"{requested.upper()}ExecutionProvider"
        name = {"CUDAEXECUTIONPROVIDER": "CUDAExecutionProvider", "CPUEXECUTIONPROVIDER": "CPUExecutionProvider"}.get(
            name.upper(), name)
        if name not in available:
            raise UserInputError(f"--provider {requested} is not available (available: {', '.join(available)})")
        return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(model: onnx.ModelProto | str, providers: list[str] | None = None,
            threads: int | None = None, layouts: bool = True) -> ort.InferenceSession:
    """An ORT session from a path or a ModelProto (through a temporary file when over 2 GB).

    `providers` defaults to the CPU; `threads` sets ONNX Runtime's intra-op thread count (default: one
    per physical core). `layouts=False` leaves out the CPU's blocked-layout (NCHWc) rewrite: where
    weights are inputs and most conv outputs are read again by other nodes (a training graph), its
    reorders cost more than it saves (distilling EfficientNet-Lite0, 12% of the step).
    """
    options = ort.SessionOptions()
    if not layouts:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    # Models are timed interleaved, and recovery alternates ONNX Runtime with numpy: idle runtime
    # threads must not spin on the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), options, providers=providers or ["CPUExecutionProvider"])
    if fits_protobuf(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        save_external(model, path, "model.data")  # onnx.save would move the weights out of `model`
        return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def random_inputs(sess: ort.InferenceSession, shapes: dict[str, tuple[int, ...]], batch: int = 1,
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in sess.get_inputs():
        shape = (batch,) + tuple(shapes[info.name][1:])
        dtype = _NP_TYPES.get(info.type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[info.name] = np.zeros(shape, dtype=dtype)
    return feeds


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference rejects still runs; types then default to float
        inferred = model
    infos = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {i.name: i.type.tensor_type.elem_type for i in infos if i.type.tensor_type.elem_type}


_RUN_BYTES = 64 << 20  # bytes of the largest activation per ONNX Runtime run


_MAX_RUN = 256  # samples per run: larger batches only cost memory


def samples_per_run(model: onnx.ModelProto, shapes: dict | None) -> int:
    """A static batch when the model has one, else as many samples as fit the memory budget.

    `shapes` (tensor name -> shape with batch 1) sizes the largest activation.
    """
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    sizes = [size for size in map(elements_per_sample, (shapes or {}).values()) if size]
    largest = 4 * max(sizes, default=1 << 20)
    return int(np.clip(_RUN_BYTES // largest, 1, _MAX_RUN))


def cast_to_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds in the element types the model's inputs declare (float16 models take float16)."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    return {name: value.astype(helper.tensor_dtype_to_np_dtype(types[name]), copy=False) if types.get(name) else value
            for name, value in feeds.items()}


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], chunk: int,
              providers: list[str] | None = None) -> list[np.ndarray]:
    """All outputs of a whole model over many samples, `chunk` samples per run."""
    sess = session(model, providers)
    count = len(next(iter(feeds.values())))
    return concatenated(sess.run(None, {k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, count, chunk))


def concatenated(runs) -> list[np.ndarray]:
    """The outputs of runs over consecutive chunks of samples, joined along the batch."""
    runs = list(runs)
    return [np.concatenate([run[j] for run in runs]) for j in range(len(runs[0]))]

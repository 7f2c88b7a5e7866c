"""Check a pruned model against its original with ONNX Runtime.

The checker, identical output names and shapes on the same random input, and latency medians
(CUDA when it really runs, else CPU). How close the outputs stay is `onnx_whc.quality`'s job,
on data that looks like real inputs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UserInputError, ValidationError
from .storage import fits_protobuf, save_external  # models over protobuf's 2 GB go through a file


@dataclass
class Validation:
    provider: str
    latency_ms_before: float
    latency_ms_after: float
    output_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.latency_ms_before / self.latency_ms_after if self.latency_ms_after else 0.0


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


def session(model: onnx.ModelProto | str, providers: list[str], threads: int | None = None) -> ort.InferenceSession:
    """An ORT session from a path or a ModelProto (through a temporary file when over 2 GB).

    `threads` sets ONNX Runtime's intra-op thread count (default: one per physical core).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Models are timed interleaved: an idle session's spinning threads would steal the cores from the other.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), options, providers=providers)
    if fits_protobuf(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        save_external(model, path, "model.data")  # onnx.save would move the weights out of `model`
        return ort.InferenceSession(path, options, providers=providers)


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


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / denom)


def check(model: onnx.ModelProto) -> None:
    try:
        if fits_protobuf(model):
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model.onnx")
                save_external(model, path, "model.data")
                onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ValidationError(f"the pruned model fails the ONNX checker: {str(err).splitlines()[0]}") from None


def time_pair(before: ort.InferenceSession, after: ort.InferenceSession, feeds: dict, runs: int,
              warmup: int = 3) -> tuple[list[float], list[float]]:
    """Interleaved timings (ms) so drifting clocks and other load hit both models alike."""
    for _ in range(warmup):
        before.run(None, feeds)
        after.run(None, feeds)
    times_before, times_after = [], []
    for _ in range(runs):
        for sess, times in ((before, times_before), (after, times_after)):
            start = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - start) * 1000)
    return times_before, times_after


def validate(original: onnx.ModelProto | str, pruned: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
             runs: int = 20, provider: str | None = None) -> Validation:
    """Raise ValidationError when the pruned model is broken; else measure it."""
    check(pruned)
    providers = best_providers(provider)
    try:
        before = session(original, providers)
        after = session(pruned, providers)
    except Exception as err:  # ORT raises several exception types on load
        raise ValidationError(f"ONNX Runtime cannot load a model: {str(err).splitlines()[0]}") from None
    names_before = [o.name for o in before.get_outputs()]
    names_after = [o.name for o in after.get_outputs()]
    if names_before != names_after:
        raise ValidationError(f"output names changed: {names_before} -> {names_after}")
    feeds = random_inputs(before, input_shapes)
    try:
        out_before = before.run(None, feeds)
        out_after = after.run(None, feeds)
    except Exception as err:
        raise ValidationError(f"the pruned model does not run: {str(err).splitlines()[0]}") from None
    for name, a, b in zip(names_before, out_before, out_after):
        if a.shape != b.shape:
            raise ValidationError(f"output '{name}' changed shape: {a.shape} -> {b.shape}")
    times_before, times_after = time_pair(before, after, feeds, runs)
    return Validation(
        provider=after.get_providers()[0],
        latency_ms_before=float(np.median(times_before)),
        latency_ms_after=float(np.median(times_after)),
        output_shapes={name: list(a.shape) for name, a in zip(names_before, out_after)},
    )

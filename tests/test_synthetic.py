"""Tests for the synthetic benchmark model builders."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

# benchmarks/ is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic  # noqa: E402


def _run(model: onnx.ModelProto, batch: int = 2) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def small_resnet():
    return synthetic.resnet50(width=0.25, image_size=64)


def test_resnet50_small_is_valid(small_resnet):
    onnx.checker.check_model(small_resnet, full_check=True)
    assert small_resnet.ir_version == 8
    assert small_resnet.opset_import[0].version == 17
    names = [n.name for n in small_resnet.graph.node]
    assert len(names) == len(set(names))
    assert "/layer1/layer1.0/conv1/Conv" in names
    assert "/layer4/layer4.0/downsample/downsample.0/Conv" in names
    assert not any(n.op_type == "BatchNormalization" for n in small_resnet.graph.node)


def test_resnet50_small_runs(small_resnet):
    y = _run(small_resnet)
    assert y.shape == (2, 1000)
    assert np.isfinite(y).all()
    assert y.std() > 0


def test_resnet50_full_size_counts():
    model = synthetic.resnet50()
    assert synthetic.count_params(model) == pytest.approx(25.5e6, rel=0.01)
    assert synthetic.count_macs(model) == pytest.approx(4.1e9, rel=0.02)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 53
    assert all(len(n.input) == 3 for n in convs)


def test_mobilenet_v2_runs():
    model = synthetic.mobilenet_v2(width=0.5, image_size=64)
    onnx.checker.check_model(model)
    y = _run(model)
    assert y.shape == (2, 1000)
    assert np.isfinite(y).all()
    depthwise = [n for n in model.graph.node
                 if n.op_type == "Conv" and next(a.i for a in n.attribute if a.name == "group") > 1]
    assert len(depthwise) == 17


def test_mobilenet_v2_channels_divisible_by_8():
    model = synthetic.mobilenet_v2(width=0.35)
    for t in model.graph.initializer:
        if t.name.endswith(".weight") and not t.name.startswith("classifier"):
            assert t.dims[0] % 8 == 0, t.name


def test_model_of_size_small():
    model = synthetic.model_of_size(5)
    assert synthetic.weight_bytes(model) / 1e6 == pytest.approx(5, rel=0.1)
    serialized = len(model.SerializeToString()) / 1e6
    assert serialized == pytest.approx(5, rel=0.1)


def test_same_seed_same_weights():
    a = synthetic.resnet50(width=0.1, image_size=32, seed=3)
    b = synthetic.resnet50(width=0.1, image_size=32, seed=3)
    c = synthetic.resnet50(width=0.1, image_size=32, seed=4)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.graph.initializer[0].raw_data != c.graph.initializer[0].raw_data


def test_save_external_data_roundtrip(tmp_path, small_resnet):
    path = synthetic.save(small_resnet, tmp_path / "r50.onnx", external_data=True)
    data = tmp_path / "r50.data"
    assert data.exists() and data.stat().st_size >= synthetic.weight_bytes(small_resnet) * 0.99
    assert path.stat().st_size < 100_000
    # The in-memory model keeps its weights.
    assert small_resnet.graph.initializer[0].HasField("raw_data")
    # Saving twice must not append to the old data file.
    synthetic.save(small_resnet, path, external_data=True)
    reloaded = onnx.load(str(path))
    assert synthetic.count_params(reloaded) == synthetic.count_params(small_resnet)
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 3, 64, 64), dtype=np.float32)
    expected = _run_on(small_resnet, x)
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], expected, rtol=1e-5, atol=1e-5)


def _run_on(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_save_inline_by_default(tmp_path):
    model = synthetic.model_of_size(1)
    synthetic.save(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.data").exists()
    assert synthetic.count_params(onnx.load(str(tmp_path / "m.onnx"))) == synthetic.count_params(model)


def test_streamed_save_matches_onnx_serialization(tmp_path, small_resnet):
    path = synthetic.save(small_resnet, tmp_path / "r50.onnx")
    assert path.read_bytes() == small_resnet.SerializeToString()

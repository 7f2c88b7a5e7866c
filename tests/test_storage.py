"""Saving with external data leaves the model in memory untouched and loads back identically."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from onnx_whc import api
from onnx_whc.graph import storage

from .test_bench import conv_net


def _outputs(model_or_path, x: np.ndarray) -> np.ndarray:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_save_external_writes_weights_beside_and_leaves_the_model(tmp_path):
    model = conv_net()
    before = model.SerializeToString()
    storage.save_external(model, str(tmp_path / "m.onnx"), "m.onnx.data")
    assert model.SerializeToString() == before
    written = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    external = [t.name for t in written.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert external and "stem.weight" in external
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(tmp_path / "m.onnx", x), _outputs(model, x))


def test_api_save_takes_the_external_path_for_models_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PROTO_LIMIT", 1000)
    model = conv_net()
    assert not storage.fits_protobuf(model)
    api.save(model, str(tmp_path / "big.onnx"))
    assert (tmp_path / "big.onnx.data").stat().st_size > 1000
    assert not list(tmp_path.glob(".onnx-whc-*"))  # the staging folder is gone
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(tmp_path / "big.onnx", x), _outputs(model, x))
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)

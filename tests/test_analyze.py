"""`onnx-whc analyze`: JSON alone on stdout, whatever onnx-graphsurgeon says while loading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings

from onnx_whc.cli import main

from .builder import GraphBuilder
from .conftest import SHARED_MODELS, shared_model
from .fuzz.strategies import cnn_models


def analyze_json(path) -> dict:
    """`analyze --json` through the CLI; stdout must parse as JSON with nothing else on it."""
    result = CliRunner().invoke(main, ["analyze", "--json", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def standardised_weights() -> onnx.ModelProto:
    """A Conv whose weight is standardised at run time (timm's StdConv2d: nf_resnet, BiT): loading
    folds ReduceMean/Sub/Div over the initializer into a weight over 1 MiB, and onnx-graphsurgeon
    prints a warning about large folded tensors."""
    b = GraphBuilder(opset=13, seed=3)
    x = b.input("x", [1, 256, 4, 4])
    w = b.random([256, 256, 3, 3], name="w")
    centred = b.op("Sub", [w, b.op("ReduceMean", [w], axes=[1, 2, 3], keepdims=1)])
    var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[1, 2, 3], keepdims=1)
    weight = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-5))])])])
    y = b.relu(b.op("Conv", [x, weight], name="std_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    return b.build([b.conv(b.relu(b.conv(y, 16, name="c2")), 4, name="c3")])


def test_graphsurgeon_warnings_go_to_stderr(tmp_path):
    path = tmp_path / "std_conv.onnx"
    onnx.save(standardised_weights(), path)
    # A fresh process: what onnx-graphsurgeon prints once per process is printed here too.
    result = subprocess.run([sys.executable, "-m", "onnx_whc.cli", "analyze", "--json", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "foldable nodes that produce large outputs" in result.stderr  # the warning still reaches the user
    assert "colored" not in result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert any("std_conv" in g["producers"] for g in report["groups"])
    assert analyze_json(path)["groups"] == report["groups"]


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_shared_models_analyse_to_json(name):
    report = analyze_json(shared_model(name))
    assert report["groups"] and report["macs"] > 0


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=cnn_models())
def test_fuzzer_graphs_analyse_to_json(case, tmp_path):
    model, _ = case
    path = tmp_path / "fuzz.onnx"
    onnx.save(model, path)
    report = analyze_json(path)
    assert report["groups"]


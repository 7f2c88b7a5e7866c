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

from onnx_whc import analyze
from onnx_whc.cli import main
from onnx_whc.reports.report import AnalysisReport

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


# ---- the groups' share of the MACs ---------------------------------------------------------------

def shares(model) -> tuple[dict[str, float], float, AnalysisReport]:
    """Each group's macs_share keyed by its first producer, and the prunable share."""
    report = analyze(model)
    return {(g.producers or g.nodes)[0]: g.macs_share for g in report.groups}, report.prunable_macs_share, report


def assert_adds_up(report: AnalysisReport, total: float = 1.0) -> None:
    """The shares add up to `total` (at most 1), the prunable groups' to no more than the prunable share."""
    assert sum(g.macs_share for g in report.groups) == pytest.approx(total, abs=1e-9)
    assert sum(g.macs_share for g in report.groups if g.prunable) <= report.prunable_macs_share + 1e-9
    assert report.prunable_macs_share <= 1 + 1e-9


def test_each_layer_counts_once_in_the_group_it_writes():
    """c1 (prunable) -> c2 -> LRN (fixes c2's group) -> c3 (feeds the output): MACs by hand."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("LRN", [b.relu(b.conv(b.relu(b.conv(x, 8, name="c1")), 6, name="c2"))], size=3)
    model = b.build([b.conv(y, 4, k=1, name="c3")])
    c1, c2, c3 = 8 * 64 * 3 * 9, 6 * 64 * 8 * 9, 4 * 64 * 6
    total = c1 + c2 + c3
    by_group, prunable, report = shares(model)
    assert by_group == pytest.approx({"c1": c1 / total, "c2": c2 / total, "c3": c3 / total})
    assert [g.prunable for g in report.groups] == [True, False, False]
    assert prunable == pytest.approx((c1 + c2) / total)  # c2 reads c1's prunable channels; c3 nothing prunable
    assert_adds_up(report)
    assert "96.4% of the MACs in layers with prunable channels" in report.summary()
    assert report.to_dict()["prunable_macs_share"] == prunable


def test_residual_and_depthwise_layers_count_once():
    """A residual trunk read and written by several convs, and a depthwise Conv over a Concat of two
    groups (its MACs split between them by channel count): the shares add up to 1."""
    b = GraphBuilder(opset=13)
    x = b.input("x", [1, 3, 8, 8])
    trunk = b.relu(b.conv(x, 8, name="stem"))
    for i in range(2):
        trunk = b.relu(b.op("Add", [trunk, b.conv(b.relu(b.conv(trunk, 12, name=f"a{i}")), 8, name=f"b{i}")]))
    left, right = b.relu(b.conv(trunk, 4, k=1, name="left")), b.relu(b.conv(trunk, 12, k=1, name="right"))
    joined = b.op("Concat", [left, right], axis=1)
    depthwise = b.relu(b.conv(joined, 16, group=16, name="dw"))
    model = b.build([b.gemm(b.flatten(b.op("GlobalAveragePool", [depthwise])), 5, name="fc")])
    by_group, _, report = shares(model)
    assert_adds_up(report)
    dw = 16 * 64 * 9
    total = report.macs
    trunk_macs = 8 * 64 * 27 + 2 * 8 * 64 * 12 * 9
    assert by_group["stem"] == pytest.approx(trunk_macs / total)
    assert by_group["left"] == pytest.approx((4 * 64 * 8 + dw * 4 / 16) / total)
    assert by_group["right"] == pytest.approx((12 * 64 * 8 + dw * 12 / 16) / total)


def test_layers_writing_no_group_count_in_none():
    """A MatMul of two activations (attention scores) writes channels no group holds: the shares add
    up to less than 1, by its MACs."""
    b = GraphBuilder(opset=13)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 8, name="c1"))
    scores = b.op("MatMul", [a, a], name="scores")
    model = b.build([b.conv(b.relu(b.conv(scores, 6, name="c2")), 4, name="c3")])
    _, _, report = shares(model)
    assert_adds_up(report, 1 - 8 * 8 * 8 * 8 / report.macs)


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_shared_models_shares_add_up(name):
    report = analyze(shared_model(name))
    covered = sum(g.macs_share for g in report.groups)
    assert 0.99 < covered <= 1 + 1e-9
    assert_adds_up(report, covered)
    assert report.prunable_macs_share > 0.9


# Groups and prunable groups of the shared models: changing what a share counts changes no group.
SHARED_GROUPS = {
    "efficientnet_lite0_imagenet.onnx": (25, 24), "facenet_mtcnn_onet_torch.onnx": (8, 5),
    "fer_emotion_minixception_tf2onnx.onnx": (11, 10), "resnet20_cifar10.onnx": (11, 10),
    "resnet56_cifar10.onnx": (29, 28), "yolov8n_nudenet.onnx": (57, 51),
}


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_shared_models_keep_their_groups(name):
    report = analyze(shared_model(name))
    assert (len(report.groups), sum(g.prunable for g in report.groups)) == SHARED_GROUPS[name]

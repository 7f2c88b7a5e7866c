"""Tests for the ShuffleNet, VGG, ResNetV2 and ResNeSt synthetic builders: valid, runnable, and pruned exactly."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

# benchmarks/ is a top-level folder of the repository, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import synthetic  # noqa: E402
from onnx_whc.api import analyze  # noqa: E402
from onnx_whc.graph.load import load  # noqa: E402

from .oracle import prune_and_compare  # noqa: E402

# Small versions: a 32x32 input leaves 1x1 maps after the last stage, so each builds and prunes fast.
SMALL = {
    "shufflenet_v2": lambda: synthetic.shufflenet_v2(width=0.5, image_size=32),
    "shufflenet_v2_runtime_batch": lambda: synthetic.shufflenet_v2(width=0.5, image_size=32, runtime_batch=True),
    "shufflenet_v1": lambda: synthetic.shufflenet_v1(groups=3, image_size=32),
    "vgg11": lambda: synthetic.vgg11(width=0.125, image_size=32),
    "resnetv2_50x1_bit": lambda: synthetic.resnetv2_50x1_bit(width=0.5, image_size=32),
    "resnest14d": lambda: synthetic.resnest14d(width=0.25, image_size=32),
    "resnest14d_runtime_batch": lambda: synthetic.resnest14d(width=0.25, image_size=32, runtime_batch=True),
}


@pytest.fixture(scope="module", params=sorted(SMALL))
def small_model(request):
    return SMALL[request.param]()


def test_small_model_is_valid_and_runs(small_model):
    onnx.checker.check_model(small_model, full_check=True)
    names = [n.name for n in small_model.graph.node]
    assert len(names) == len(set(names))
    assert not any(n.op_type == "BatchNormalization" for n in small_model.graph.node)
    sess = ort.InferenceSession(small_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    y = sess.run(None, {"input": x})[0]
    assert y.shape == (1, 1000)
    assert np.isfinite(y).all() and y.std() > 0


def test_small_model_prunes_exactly(small_model):
    _, plan = prune_and_compare(small_model, 0.4)
    assert plan.removed_channels


def _shuffles(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 2, 1, 3, 4]]


def test_shufflenet_v2_full_size_topology():
    model = synthetic.shufflenet_v2()
    # torchvision's shufflenet_v2_x1_0: 146 M MACs; 16 units, each ending in a channel shuffle.
    assert synthetic.count_macs(model) == pytest.approx(146e6, rel=0.02)
    assert len(_shuffles(model)) == 16
    assert sum(n.op_type == "Split" for n in model.graph.node) == 13
    names = {n.name for n in model.graph.node}
    assert "/stage2/stage2.0/branch2/branch2.0/Conv" in names
    assert "/stage4/stage4.3/Reshape_1" in names


def test_shufflenet_v2_runtime_batch_reads_the_shape():
    model = synthetic.shufflenet_v2(runtime_batch=True)
    assert sum(n.op_type == "Shape" for n in model.graph.node) == 16
    # Data propagation through Shape -> Concat still finds every conv's shape.
    assert synthetic.count_macs(model) == synthetic.count_macs(synthetic.shufflenet_v2())


def test_shufflenet_v1_full_size_topology():
    model = synthetic.shufflenet_v1(groups=3)
    # The paper's ShuffleNet 1x (g = 3): 140 MFLOPs (multiply-adds).
    assert synthetic.count_macs(model) == pytest.approx(140e6, rel=0.03)
    assert len(_shuffles(model)) == 16
    groups = [next(a.i for a in n.attribute if a.name == "group") for n in model.graph.node if n.op_type == "Conv"]
    # conv1, the first unit's compress conv, and the 16 depthwise convs are not 3-grouped.
    assert groups.count(3) == 31


def test_vgg11_full_size_counts_without_weights():
    # Shapes only: the real model is ~530 MB of weights.
    model = synthetic._build_vgg11(synthetic._Builder("probe", 0, with_data=False), 1.0, 1000, 224)
    assert synthetic.count_params(model) == 132_863_336  # torchvision's vgg11
    assert synthetic.count_macs(model) == pytest.approx(7.6e9, rel=0.01)


def test_resnetv2_50x1_bit_full_size_counts():
    model = synthetic.resnetv2_50x1_bit()
    # timm's resnetv2_50x1_bit: 25.55 M params; its convs are ResNet-50's, 4.09 G MACs.
    assert synthetic.count_params(model) == pytest.approx(25.55e6, rel=0.001)
    assert synthetic.count_macs(model) == pytest.approx(4.09e9, rel=0.01)
    ops = {n.op_type for n in model.graph.node}
    assert {"InstanceNormalization", "ReduceMean", "Sqrt", "Div"} <= ops and "BatchNormalization" not in ops


def test_resnest14d_full_size_counts():
    model = synthetic.resnest14d()
    # timm's resnest14d: 10.61 M params, 2.76 G MACs; four split-attention blocks.
    assert synthetic.count_params(model) == pytest.approx(10.61e6, rel=0.002)
    assert synthetic.count_macs(model) == pytest.approx(2.76e9, rel=0.01)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 4


def test_weight_standardisation_is_folded_at_loading():
    """StdConv2d's run-time standardisation of its weight depends on no input: the loader folds it into a
    constant weight, each filter of mean 0 and variance 1, which the pruning then slices like any other."""
    loaded = load(SMALL["resnetv2_50x1_bit"]())
    ops = {n.op for n in loaded.graph.nodes}
    assert not {"ReduceMean", "Sqrt", "Div", "Sub"} & ops
    for node in (n for n in loaded.graph.nodes if n.op == "Conv" and "head" not in n.name):
        filters = np.asarray(node.inputs[1].values, np.float64).reshape(node.inputs[1].values.shape[0], -1)
        np.testing.assert_allclose(filters.mean(axis=1), 0, atol=1e-5)
        np.testing.assert_allclose(filters.var(axis=1), 1, rtol=1e-3)


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "resnest14d", "resnest14d_runtime_batch"])
def test_every_mac_is_in_prunable_groups(name):
    """GroupNorms prune by whole groups and split attention by radix positions: only the logits stay."""
    report = analyze(SMALL[name]())
    assert report.prunable_macs_share == 1.0
    assert [g.reasons for g in report.groups if not g.prunable] == [["feeds graph output 'logits'"]]


def test_unknown_shufflenet_sizes_are_refused():
    with pytest.raises(ValueError):
        synthetic.shufflenet_v2(width=0.75)
    with pytest.raises(ValueError):
        synthetic.shufflenet_v1(groups=5)

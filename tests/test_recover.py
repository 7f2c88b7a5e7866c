"""Post-training recovery: exact least squares, statistics and bias corrections, wiring and errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnx_whc.api import prune
from onnx_whc.cli import main
from onnx_whc.data.calibration import Calibration
from onnx_whc.errors import UserInputError
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.equivalence import export
from onnx_whc.graph.load import infer_static_shapes, load
from onnx_whc.graph.runtime import run_model
from onnx_whc.graph.surgery import apply_plan
from onnx_whc.measure.metrics import model_cost
from onnx_whc.measure.quality import QualityProbe
from onnx_whc.measure.validate import cosine
from onnx_whc.plan.allocate import Allocator, allocated_plan
from onnx_whc.plan.channel_stats import channel_stats
from onnx_whc.plan.select import consumer_aware_importance, select
from onnx_whc.recovery.layers import ConvGeometry, Sample, find_layers, patches
from onnx_whc.recovery.recover import RecoverySettings
from onnx_whc.recovery.recover import recover as recover_stage
from onnx_whc.recovery.replay import Replay

from .builder import GraphBuilder


def _set(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _make_dependent(model: onnx.ModelProto, conv: str, dependent: list[int], seed: int = 0) -> None:
    """Rewrite filters (and biases) `dependent` of a conv as linear combinations of two others."""
    rng = np.random.default_rng(seed)
    w, b = _get(model, f"{conv}.weight").copy(), _get(model, f"{conv}.bias").copy()
    for channel in dependent:
        i, j = rng.choice([c for c in range(len(w)) if c not in dependent], 2, replace=False)
        a, c = rng.normal(size=2)
        w[channel], b[channel] = a * w[i] + c * w[j], a * b[i] + c * b[j]
    _set(model, f"{conv}.weight", w)
    _set(model, f"{conv}.bias", b)


def recover(original, pruned, keep, shapes, calib, settings, hold_out: bool = True):
    """The recovery stage on arrays: calibration split as the API splits it, quality on the held-out part."""
    calibration = None
    if calib is not None:
        samples = {next(iter(shapes)): calib}
        calibration = Calibration.of(samples, "test data") if hold_out else Calibration(samples, {}, "test data")
    feeds = calibration.quality_feeds if calibration else {
        name: np.random.default_rng(9).standard_normal((16, *shape[1:])).astype(np.float32)
        for name, shape in shapes.items()}
    probe = QualityProbe(original, feeds, "test inputs", 64)
    return recover_stage(original, pruned, keep, calibration, probe, 64, settings)


def _pruned_pair(model: onnx.ModelProto, ratio, lowest: dict[str, list[int]] | None = None):
    """(original, pruned, keep, input shapes) with the channels in `lowest` (per conv) removed first."""
    loaded = load(model)
    analysis = analyze_channels(loaded)
    def lowest_first(group):
        scores = np.ones(group.channels)
        for producer, class_index in group.producers:
            scores[class_index[lowest.get(producer.node.name, [])]] = 0.0
        return scores

    plan = select(analysis, ratio, importance=lowest_first if lowest else None)
    original = export(loaded.graph.copy(), loaded)
    apply_plan(loaded, analysis, plan)
    pruned = export(loaded.graph, loaded)
    return original, pruned, lambda name: analysis.keep_mask(name, plan.removed_roots), loaded.input_shapes


def _max_error(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    (ya,), (yb,) = run_model(a, {"x": x}, 64), run_model(b, {"x": x}, 64)
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def _linear_convs() -> onnx.ModelProto:
    b = GraphBuilder(seed=1)
    x = b.input("x", [1, 4, 8, 8])
    y = b.conv(b.conv(x, 8, name="c1"), 6, stride=2, name="c2")
    return b.build([b.gemm(b.flatten(b.global_average_pool(b.conv(y, 6, k=1, name="c3"))), 5, name="fc")])


def test_lsq_recovers_linear_model_exactly():
    """Removed filters that are combinations of kept ones leave nothing to lose: LSQ must undo the pruning."""
    model = _linear_convs()
    _make_dependent(model, "c1", [6, 7])
    _make_dependent(model, "c3", [4, 5], seed=2)
    original, pruned, keep, shapes = _pruned_pair(model, {0: 0.25, 2: 0.34}, {"c1": [6, 7], "c3": [4, 5]})
    calib = np.random.default_rng(0).standard_normal((48, 4, 8, 8)).astype(np.float32)
    held = np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)
    assert _max_error(original, pruned, held) > 0.05  # pruning alone does change the outputs
    recovered, report = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq", ridge=0.0))
    assert _max_error(original, recovered, held) < 1e-4
    assert {r["layer"] for r in report["per_layer"]} >= {"c2", "fc"}  # a Conv and a Gemm consumer
    onnx.checker.check_model(recovered, full_check=True)


def test_lsq_non_sequential_is_exact_on_the_linear_model_too():
    model = _linear_convs()
    _make_dependent(model, "c1", [6, 7])
    original, pruned, keep, shapes = _pruned_pair(model, {0: 0.25}, {"c1": [6, 7]})
    calib = np.random.default_rng(0).standard_normal((48, 4, 8, 8)).astype(np.float32)
    settings = RecoverySettings(method="lsq", ridge=0.0, sequential=False)
    recovered, _ = recover(original, pruned, keep, shapes, calib, settings)
    held = np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)
    assert _max_error(original, recovered, held) < 1e-4


def test_lsq_refits_linear_layers_at_every_position_of_a_channels_last_map():
    """A Linear per position (MatMul over the last axis of an NHWC map): rows are the map's positions."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 4, 6, 6])
    y = b.transpose(b.conv(x, 8, name="c1"), perm=[0, 2, 3, 1])
    y = b.matmul(b.op("Add", [b.matmul(y, 8, name="fc1"), b.random([8], 0.1, "fc1.bias")]), 6, name="fc2")
    model = b.build([b.conv(b.transpose(y, perm=[0, 3, 1, 2]), 5, name="c2")])
    w, bias = _get(model, "fc1.weight").copy(), _get(model, "fc1.bias").copy()
    for feature, (i, j, a, c) in {6: (0, 1, 0.5, -1.0), 7: (2, 3, 1.0, 2.0)}.items():
        w[:, feature], bias[feature] = a * w[:, i] + c * w[:, j], a * bias[i] + c * bias[j]
    _set(model, "fc1.weight", w)
    _set(model, "fc1.bias", bias)
    group = next(g.id for g in analyze_channels(load(model)).groups if g.producers[0][0].node.name == "fc1")
    original, pruned, keep, shapes = _pruned_pair(model, {group: 0.25}, {"fc1": [6, 7]})
    calib = np.random.default_rng(0).standard_normal((48, 4, 6, 6)).astype(np.float32)
    held = np.random.default_rng(1).standard_normal((16, 4, 6, 6)).astype(np.float32)
    assert _max_error(original, pruned, held) > 0.05
    recovered, report = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq", ridge=0.0))
    assert _max_error(original, recovered, held) < 1e-4
    fc2 = next(r for r in report["per_layer"] if r["layer"] == "fc2")
    assert fc2["rows"] == 39 * 36  # every position of the 6x6 maps of the 48 samples less the 9 held out


def test_each_layer_samples_rows_in_proportion_to_its_inputs():
    """100 sampled positions per input of a layer's map, within [samples, 4 x samples] and what the data holds."""
    model = _linear_convs()
    original, pruned, keep, shapes = _pruned_pair(model, {0: 0.25})
    calib = np.random.default_rng(0).standard_normal((80, 4, 8, 8)).astype(np.float32)
    _, report = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq", samples=200))
    rows = {r["layer"]: r["rows"] for r in report["per_layer"]}
    fitted = 64  # the 80 images less the held-out fifth
    assert rows["c2"] == 4 * 200  # 9 x 6 kept inputs: 5,400 wanted, 4 x samples at most (of 64 x 16 positions)
    assert rows["c3"] == 100 * 6  # a 1x1 conv on 6 channels: 600 of its 64 x 16 positions, over `samples`
    assert rows["fc"] == fitted  # one row per image


def test_large_activations_are_held_in_float16_and_recovery_stays_close(monkeypatch):
    """Held in float16 (every activation here, with the size limit at zero), LSQ is exact to fp16 rounding."""
    import onnx_whc.recovery.replay as replay_module

    model = _linear_convs()
    _make_dependent(model, "c1", [6, 7])
    original, pruned, keep, shapes = _pruned_pair(model, {0: 0.25}, {"c1": [6, 7]})
    calib = np.random.default_rng(0).standard_normal((48, 4, 8, 8)).astype(np.float32)
    held = np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)
    monkeypatch.setattr(replay_module, "COMPACT_BYTES", 0)
    replay = Replay(original, {"x": calib}, 16)
    replay.run_to(replay.nodes[-1].name)
    assert replay.compacted and all(replay.cache[n][0].dtype == np.float16 for n in replay.compacted)
    recovered, _ = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq", ridge=0.0))
    assert _max_error(original, recovered, held) < 2e-2


def _relu_net(batch_norm: bool) -> onnx.ModelProto:
    """conv -> [BatchNorm] -> Relu -> conv -> ... whose first conv has channels of large positive mean."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 10, 10])
    h = b.conv(x, 12, name="c1")
    h = b.relu(b.batch_norm(h, name="bn") if batch_norm else h)
    h = b.relu(b.conv(h, 10, name="c2"))
    return b.build([b.conv(h, 4, k=1, name="c3")])


def _calibrate_batch_norm(model: onnx.ModelProto, x: np.ndarray) -> None:
    """Running statistics that match the data, as training leaves them, and large shifts."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, None))
    (_, c1) = run_model(probe, {"x": x}, 64)
    _set(model, "bn.mean", c1.mean(axis=(0, 2, 3)))
    _set(model, "bn.var", c1.var(axis=(0, 2, 3)))
    _set(model, "bn.bias", np.linspace(0.5, 2.0, 12))


def test_data_free_bias_improves_fidelity_with_batch_norm():
    x = np.random.default_rng(0).standard_normal((64, 3, 10, 10)).astype(np.float32)
    model = _relu_net(batch_norm=True)
    _calibrate_batch_norm(model, x)
    original, pruned, keep, shapes = _pruned_pair(model, {0: 0.5})
    recovered, report = recover(original, pruned, keep, shapes, None, RecoverySettings(method="bias"))
    assert report["method"] == "bias" and report["layers"] >= 1
    before, after = cosine(*[run_model(m, {"x": x}, 64)[0] for m in (original, pruned)]), \
        cosine(*[run_model(m, {"x": x}, 64)[0] for m in (original, recovered)])
    assert after > before + 0.01, (before, after)


def test_stats_improves_fidelity_on_held_out_samples():
    model = _relu_net(batch_norm=False)
    original, pruned, keep, shapes = _pruned_pair(model, 0.5)
    calib = np.random.default_rng(0).standard_normal((200, 3, 10, 10)).astype(np.float32) + 0.5
    recovered, report = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="stats"))
    before, after = report["quality_before"]["c3"], report["quality_after"]["c3"]
    assert after > before + 0.01, (before, after)
    assert all(r["error_after"] <= r["error_before"] + 1e-9 for r in report["per_layer"])


def test_lsq_beats_stats_on_a_nonlinear_model():
    model = _relu_net(batch_norm=False)
    original, pruned, keep, shapes = _pruned_pair(model, 0.5)
    calib = np.random.default_rng(0).standard_normal((200, 3, 10, 10)).astype(np.float32)
    _, lsq = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq"))
    _, stats = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="stats"))
    assert lsq["quality_after"]["c3"] > max(stats["quality_after"]["c3"], lsq["quality_before"]["c3"])


def test_grouped_and_depthwise_consumers_are_fitted_per_group():
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 4, 9, 9])
    h = b.relu(b.conv(x, 8, name="c1"))
    h = b.relu(b.conv(h, 8, k=3, group=8, name="dw"))  # depthwise follows c1's channels
    h = b.relu(b.conv(h, 8, k=3, stride=2, group=2, name="grouped"))
    model = b.build([b.conv(h, 3, k=1, name="head")])
    original, pruned, keep, shapes = _pruned_pair(model, 0.25)
    calib = np.random.default_rng(0).standard_normal((120, 4, 9, 9)).astype(np.float32)
    recovered, report = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq"))
    fitted = {r["layer"]: r for r in report["per_layer"]}
    assert fitted["dw"]["groups"] > 1 and fitted["grouped"]["groups"] == 2
    assert report["quality_after"]["head"] > report["quality_before"]["head"]


def test_sampled_patches_reproduce_the_convolution():
    """im2col at sampled positions, times the weights, equals ONNX Runtime's conv (stride, pads, dilation, groups)."""
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((6, 2, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", strides=[2, 1], pads=[1, 2, 0, 1],
                            dilations=[2, 1], group=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((5, 4, 9, 8)).astype(np.float32)
    (y,) = run_model(model, {"x": x}, 5)
    replay = Replay(model, {"x": x}, chunk=2)  # several chunks
    geometry = ConvGeometry.of(node, w.shape, x.shape[2:])
    image = np.repeat(np.arange(5), 6)
    coords = np.stack([rng.integers(0, y.shape[2], 30), rng.integers(0, y.shape[3], 30)], axis=1)
    cols = patches(replay, "x", Sample(image, coords), geometry, np.arange(4), y.shape[2:])
    for g in range(2):
        got = cols[:, 2 * g:2 * g + 2].reshape(30, -1) @ w[3 * g:3 * g + 3].reshape(3, -1).T + bias[3 * g:3 * g + 3]
        want = y[image, 3 * g:3 * g + 3][np.arange(30), :, coords[:, 0], coords[:, 1]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_replay_in_segments_matches_a_full_run():
    """Stopping at every node, with a Shape -> Reshape chain crossing segments, changes nothing."""
    b = GraphBuilder(seed=7)
    x = b.input("x", [1, 3, 6, 6])
    h = b.relu(b.conv(x, 5, name="c1"))
    shape = b.op("Shape", [h], name="shape")
    flat = b.op("Reshape", [b.conv(h, 4, name="c2"), b.op("Concat", [b.op("Slice", [shape, b.ints([0]), b.ints([1])]),
                                                                       b.ints([-1])], axis=0)], name="flat")
    model = b.build([b.gemm(flat, 3, name="fc")], check=False)
    feeds = {"x": np.random.default_rng(0).standard_normal((7, 3, 6, 6)).astype(np.float32)}
    replay = Replay(model, feeds, chunk=3)
    for node in model.graph.node:
        replay.run_to(node.name, through=True)
    np.testing.assert_allclose(replay.tensor("fc"), run_model(model, feeds, 7)[0], rtol=1e-5, atol=1e-5)


# ---- the API and the command line -------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    b = GraphBuilder(seed=11)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 8, name="c1"))
    h = b.relu(b.conv(h, 8, name="c2"))
    return b.build([b.gemm(b.flatten(b.global_average_pool(h)), 4, name="fc")])


@pytest.mark.parametrize("method", ["lsq", "stats", "bias"])
def test_report_records_the_method(small_model, method):
    calib = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    _, report = prune(small_model, ratio=0.25, round_to=1, recover=method, calib=None if method == "bias" else calib,
                      allocate=False, validate=False)
    data = report.to_dict()["recovery"]
    assert data["method"] == method
    assert set(data) >= {"settings", "seconds", "quality_before", "quality_after", "layers"}
    assert data["quality_after"], "quality is measured before and after"
    assert f"recovery {method}" in report.summary()


def test_auto_picks_lsq_with_calibration_and_nothing_without(small_model):
    calib = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    _, with_data = prune(small_model, ratio=0.25, round_to=1, calib=calib, allocate=False, validate=False)
    _, without = prune(small_model, ratio=0.25, round_to=1, validate=False, synthetic=False)
    assert with_data.recovery["method"] == "lsq" and without.recovery is None


@pytest.mark.parametrize("calib, message", [
    (np.zeros((4, 3, 5, 5), np.float32), "shape 4x3x5x5"),
    (np.zeros((4, 3, 8), np.float32), "shape 4x3x8"),
    (np.zeros((4, 3, 8, 8), np.int64), "dtype int64"),
    ({"other": np.zeros((4, 3, 8, 8), np.float32)}, "no array for model input 'x'"),
])
def test_wrong_calibration_data_is_a_user_error(small_model, calib, message):
    with pytest.raises(UserInputError, match=message):
        prune(small_model, ratio=0.25, calib=calib, validate=False)


def test_calibration_methods_need_data(small_model):
    for method in ("lsq", "stats"):
        with pytest.raises(UserInputError, match="needs calibration data"):
            prune(small_model, ratio=0.25, recover=method, validate=False, synthetic=False)
    with pytest.raises(UserInputError, match="--allocate needs calibration data"):
        prune(small_model, ratio=0.25, allocate=True, validate=False, synthetic=False)


def test_cli_recovers_from_an_npy_and_reports_it(small_model, tmp_path):
    source, calib = tmp_path / "m.onnx", tmp_path / "calib.npy"
    onnx.save(small_model, source)
    np.save(calib, np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(main, ["prune", str(source), "-r", "0.25", "--round-to", "1", "--calib", str(calib),
                                       "--no-allocate",
                                       "--recover-samples", "500", "-o", str(tmp_path / "out.onnx"),
                                       "--report", str(tmp_path / "r.json"), "--no-validate"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["recovery"]["method"] == "lsq" and report["recovery"]["settings"]["samples"] == 500
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_cli_rejects_a_calibration_file_of_the_wrong_shape(small_model, tmp_path):
    source, calib = tmp_path / "m.onnx", tmp_path / "calib.npy"
    onnx.save(small_model, source)
    np.save(calib, np.zeros((4, 3, 6, 6), np.float32))
    result = CliRunner().invoke(main, ["prune", str(source), "--calib", str(calib)])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


# ---- consumer-aware criterion and allocation ---------------------------------------------------

def test_whc_plus_removes_filters_the_consumer_barely_reads():
    b = GraphBuilder(seed=13)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 8, name="c1"))
    model = b.build([b.conv(h, 4, name="c2")])
    w2 = _get(model, "c2.weight").copy()
    w2[:, 0] *= 1e-3  # c2 hardly reads channel 0 of c1, however strong its filter
    _set(model, "c2.weight", w2)
    w1 = _get(model, "c1.weight").copy()
    w1[0] *= 10
    _set(model, "c1.weight", w1)
    loaded = load(model)
    analysis = analyze_channels(loaded)
    plain = select(analysis, {0: 0.125}, "whc")
    aware = select(analysis, {0: 0.125}, "whc", importance=consumer_aware_importance(analysis, loaded.graph, "whc+"))
    assert 0 not in plain.decisions[0].removed.tolist()
    assert aware.decisions[0].removed.tolist() == [0]


def test_allocation_meets_the_budget_and_spares_the_sensitive_group():
    b = GraphBuilder(seed=17)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 8, name="a"))
    model = b.build([b.conv(b.relu(b.conv(a, 8, name="b")), 4, name="c")])
    w, bias = _get(model, "b.weight").copy(), _get(model, "b.bias").copy()
    w[4:], bias[4:] = 0.0, 0.0  # half of b's channels are dead: removing them costs nothing
    _set(model, "b.weight", w)
    _set(model, "b.bias", bias)
    loaded = load(model)
    analysis = analyze_channels(loaded)
    calib = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    before = model_cost(loaded.graph, loaded.shapes).macs
    select_args = dict(criterion="whc", round_to=1, exclude=(), seed=0)
    allocator = Allocator(loaded, analysis, calib, select_args, channel_stats(loaded, analysis, calib))
    plan, allocation = allocated_plan(loaded, analysis, allocator, None, 0.8, select_args)
    ratios = {d.group.producers[0][0].node.name: len(d.removed) / d.group.channels for d in plan.decisions}
    assert ratios["b"] > ratios["a"]
    apply_plan(loaded, analysis, plan)
    after = model_cost(loaded.graph, infer_static_shapes(loaded.graph, loaded.input_shapes)).macs
    assert after <= 0.8 * before and allocation.macs_kept == pytest.approx(after / before, abs=1e-6)


def test_allocation_and_channel_statistics_read_channels_last_features_along_their_last_axis():
    """An NHWC MLP whose hidden features 8-15 are dead: the allocator's masks and the statistics must
    run along the last axis to see it."""
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 3, 6, 6])
    y = b.transpose(b.relu(b.conv(x, 8, name="c1")), perm=[0, 2, 3, 1])
    hidden = b.relu(b.op("Add", [b.matmul(y, 16, name="fc1"), b.random([16], 0.1, "fc1.bias")]))
    y = b.transpose(b.matmul(hidden, 8, name="fc2"), perm=[0, 3, 1, 2])
    model = b.build([b.conv(b.relu(y), 4, name="c2")])
    w, bias = _get(model, "fc1.weight").copy(), _get(model, "fc1.bias").copy()
    w[:, 8:], bias[8:] = 0.0, -1.0
    _set(model, "fc1.weight", w)
    _set(model, "fc1.bias", bias)
    loaded = load(model)
    analysis = analyze_channels(loaded)
    calib = {"x": np.random.default_rng(0).standard_normal((48, 3, 6, 6)).astype(np.float32)}
    stats = channel_stats(loaded, analysis, calib)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    h = run_model(probe, calib, 64)[1].astype(np.float64)
    np.testing.assert_allclose(stats.mean[hidden], h.mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.var[hidden], h.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-9)
    select_args = dict(criterion="whc", round_to=1, exclude=(), seed=0)
    allocator = Allocator(loaded, analysis, calib, select_args, stats)
    plan, allocation = allocated_plan(loaded, analysis, allocator, None, 0.85, select_args)
    removed = {d.group.producers[0][0].node.name: d.removed for d in plan.decisions}
    fc1 = next(g for g in analysis.groups if g.producers[0][0].node.name == "fc1")
    assert allocation.damage[fc1.id][:2] == pytest.approx([0.0, 0.0], abs=1e-6)  # a quarter, a half: all dead
    assert allocation.damage[fc1.id][2] > 0.05
    assert removed["fc1"].tolist() == list(range(8, 16))


def _energy_model() -> onnx.ModelProto:
    """c1's filter 0 is the strongest but reads only input channel 0, which the data holds constant."""
    b = GraphBuilder(seed=19)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 8, k=1, name="c1"))  # 1x1: no zero padding to make the constant vary
    model = b.build([b.conv(h, 4, name="c2")])
    w1 = _get(model, "c1.weight").copy()
    w1[0] = 0.0
    w1[0, 0] = 5.0
    _set(model, "c1.weight", w1)
    return model


def _constant_first_channel(count: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((count, 3, 8, 8)).astype(np.float32)
    x[:, 0] = 1.0
    return x


def test_channel_stats_match_numpy():
    model = _energy_model()
    loaded = load(model)
    analysis = analyze_channels(loaded)
    x = _constant_first_channel(40)
    stats = channel_stats(loaded, analysis, {"x": x})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    probe.graph.output.append(helper.make_tensor_value_info(relu, onnx.TensorProto.FLOAT, None))
    h = run_model(probe, {"x": x}, 64)[1].astype(np.float64)
    assert set(stats.mean) == {"x", relu}  # every tensor a conv reads
    assert stats.var["x"][0] == pytest.approx(0.0, abs=1e-12) and stats.mean["x"][0] == pytest.approx(1.0)
    np.testing.assert_allclose(stats.mean[relu], h.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.var[relu], h.var(axis=(0, 2, 3)), rtol=1e-5, atol=1e-9)


def test_energy_removes_the_channel_that_never_varies():
    """WHC keeps c1's strongest filter; on data where its input is constant, energy removes it."""
    model = _energy_model()
    calib = _constant_first_channel(32)
    _, plain = prune(model, ratio=0.125, criterion="whc", round_to=1, validate=False, recover="none")
    _, aware = prune(model, ratio=0.125, round_to=1, validate=False, recover="none", allocate=False,
                     calib={"x": calib})
    assert aware.criterion == "energy" and plain.criterion == "whc"  # auto picks energy given data
    def removed(report):
        return next(g.removed for g in report.groups if g.producers == ["c1"])

    assert removed(plain) != [0]
    assert removed(aware) == [0]


def test_energy_needs_calibration_data():
    with pytest.raises(UserInputError, match="needs calibration data"):
        prune(_energy_model(), ratio=0.25, criterion="energy", validate=False)


def test_lsq_keeps_weights_the_data_cannot_determine():
    """A classifier fitted on fewer rows than inputs would interpolate them: only its bias moves."""
    b = GraphBuilder(seed=23)
    x = b.input("x", [1, 3, 8, 8])
    h = b.flatten(b.global_average_pool(b.relu(b.conv(x, 16, name="c1"))))
    model = b.build([b.gemm(h, 5, name="fc")])
    original, pruned, keep, shapes = _pruned_pair(model, 0.25)
    calib = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    recovered, _ = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq"), hold_out=False)
    weights = {t.name: numpy_helper.to_array(t) for t in recovered.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    fc = next(n for n in recovered.graph.node if n.name == "fc")
    np.testing.assert_array_equal(weights[fc.input[1]], before[fc.input[1]])  # 12 inputs, 10 rows
    assert not np.allclose(weights[fc.input[2]], before[fc.input[2]])


@pytest.mark.parametrize("low, high", [(0.0, np.inf), (0.0, 6.0), (-1.0, 0.5)])
def test_clipped_gaussian_moments_match_sampling(low, high):
    from onnx_whc.recovery.bias import Stats, clipped

    mean, var = np.array([-1.0, 0.3, 2.0, 5.0]), np.array([1.0, 0.25, 4.0, 0.0])
    got = clipped(Stats(mean, var), low, high)
    z = np.random.default_rng(0).normal(mean, np.sqrt(var), size=(400_000, 4)).clip(low, high)
    np.testing.assert_allclose(got.mean, z.mean(axis=0), atol=0.01)
    np.testing.assert_allclose(got.var, z.var(axis=0), atol=0.02)


def test_float16_models_recover_too():
    b = GraphBuilder(seed=11, dtype=np.float16)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(b.relu(b.conv(x, 8, name="c1")), 8, name="c2"))
    model = b.build([b.gemm(b.flatten(b.global_average_pool(h)), 4, name="fc")])
    calib = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    pruned, report = prune(model, ratio=0.25, round_to=1, calib=calib, validate=False)
    assert report.allocation is not None and report.recovery["method"] == "lsq"
    assert report.recovery["quality_after"]["fc"] >= report.recovery["quality_before"]["fc"]
    assert all(r["error_after"] < r["error_before"] for r in report.recovery["per_layer"])
    assert next(t for t in pruned.graph.initializer if t.name.startswith("c2")).data_type == onnx.TensorProto.FLOAT16


def test_lsq_recovers_a_pruned_hidden_fully_connected_layer_exactly():
    """fc1's removed rows are combinations of kept ones (no ReLU between): refitting fc2 undoes the pruning."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 4, 6, 6])
    y = b.flatten(b.global_average_pool(b.relu(b.conv(x, 8, name="c1"))))
    model = b.build([b.gemm(b.gemm(y, 12, name="fc1"), 5, name="fc2")])
    rng = np.random.default_rng(0)
    w, bias = _get(model, "fc1.weight").copy(), _get(model, "fc1.bias").copy()
    for row in (10, 11):
        a, c = rng.normal(size=2)
        w[row], bias[row] = a * w[0] + c * w[1], a * bias[0] + c * bias[1]
    _set(model, "fc1.weight", w)
    _set(model, "fc1.bias", bias)
    group = next(g for g in analyze_channels(load(model)).groups
                 if any(p.node.name == "fc1" for p, _ in g.producers))
    original, pruned, keep, shapes = _pruned_pair(model, {group.id: 0.17}, {"fc1": [10, 11]})
    assert _get(pruned, next(n.input[1] for n in pruned.graph.node if n.name == "fc1")).shape == (10, 8)
    calib = rng.standard_normal((64, 4, 6, 6)).astype(np.float32)
    held = rng.standard_normal((16, 4, 6, 6)).astype(np.float32)
    assert _max_error(original, pruned, held) > 0.05
    recovered, report = recover(original, pruned, keep, shapes, calib, RecoverySettings(method="lsq", ridge=0.0))
    assert "fc2" in {r["layer"] for r in report["per_layer"]}
    assert _max_error(original, recovered, held) < 1e-4


def test_allocation_and_energy_skip_a_conv_that_reads_moved_channels():
    """YOLOv8's DFL: Reshape (N, 4, 16, A) -> Transpose -> Softmax -> Conv: the Conv's 16 inputs are not the
    traced 4 channels (which the Transpose moved to axis 2); masks and channel statistics must not mix them up."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(b.relu(b.conv(x, 16, name="c1")), 64, k=1, name="box"))
    y = b.op("Reshape", [y, b.ints([0, 4, 16, 64])])
    y = b.softmax(b.transpose(y, perm=[0, 2, 1, 3]), axis=1)
    model = b.build([b.conv(y, 1, k=1, name="dfl", c_in=16)])
    calib = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    pruned, report = prune(model, target_macs=0.8, calib=calib, validate=True)
    assert report.allocation is not None and report.removed_channels > 0
    onnx.checker.check_model(pruned, full_check=True)


def test_rectified_fit_lowers_the_error_after_the_rectifier():
    """Refits against the rectifier's output beat the plain fit on what the next layer reads."""
    from onnx_whc.recovery.fit import _fit_block
    from onnx_whc.recovery.layers import Affine
    from onnx_whc.recovery.lsq import ridge_fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2000, 6)).astype(np.float32)
    hidden = rng.normal(size=(3, 2000, 2)).astype(np.float32)  # removed inputs: what the fit cannot see
    y = (np.concatenate([x, hidden], 2) @ rng.normal(size=(3, 8, 4)) + 0.5).astype(np.float32)
    current = Affine(0.1 * rng.normal(size=(3, 6, 4)), np.zeros((3, 4)))
    update = lambda moments, now: ridge_fit(moments, now, 1e-3)

    def after_clip(affine, low, high):
        return float(np.square(np.clip(affine.apply(x), low, high) - np.clip(y, low, high)).sum())

    plain, _ = _fit_block(x.copy(), y.copy(), current, update, None, 0)
    for low, high, rounds in ((0.0, 6.0, 3), (0.0, np.inf, 1)):
        fitted, (before, after, _) = _fit_block(x.copy(), y.copy(), current, update, (low, high), rounds)
        assert after == pytest.approx(after_clip(fitted, low, high), rel=1e-4)
        assert before == pytest.approx(after_clip(current, low, high), rel=1e-4)
        assert after < 0.97 * after_clip(plain, low, high)
    # per-position bounds (a residual Add's shortcut moves them) give the same fit as shifting the data
    shift = rng.normal(size=y.shape).astype(np.float32)
    moved, _ = _fit_block(x.copy(), y.copy(), current, update, (-shift, np.inf - shift), 3)
    assert after_clip(moved, -shift, np.inf) < after_clip(plain, -shift, np.inf)


def test_layers_read_by_a_rectifier_carry_its_bounds():
    b = GraphBuilder(seed=2)
    first = b.conv(b.input("x", [1, 4, 8, 8]), 4, name="c0")
    clipped = b.op("Clip", [b.conv(first, 8, name="c1"), b.const(np.float32(0)), b.const(np.float32(6))])
    h = b.relu(b.conv(clipped, 8, name="c2"))
    s = b.relu(b.op("Add", [b.conv(h, 8, name="c3"), h]))  # residual: the rectifier reads the sum
    gated = b.sigmoid(b.conv(s, 8, name="c4"))
    model = b.build([b.conv(gated, 3, k=1, name="c5")])
    lost = np.array([False, True, True, True])  # c0 lost a channel: every layer after it is fitted
    layers = {layer.node: layer for layer in find_layers(model, lambda name: lost if name == first else None)}
    assert layers["c1"].bounds == (0.0, 6.0) and layers["c2"].bounds == (0.0, np.inf)
    assert layers["c3"].bounds == (0.0, np.inf) and layers["c3"].residual == [h]
    assert layers["c4"].bounds is None and layers["c5"].bounds is None

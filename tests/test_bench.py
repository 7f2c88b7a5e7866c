"""`onnx-whc bench` (side-by-side latency) and pruning to a MACs budget (`--target-macs`)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from onnx_whc import api
from onnx_whc.cli import main
from onnx_whc.errors import UserInputError
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import infer_static_shapes, load
from onnx_whc.graph.surgery import apply_plan
from onnx_whc.measure.metrics import model_cost
from onnx_whc.plan.budget import MacsEstimator, fit_ratio
from onnx_whc.plan.select import select
from onnx_whc.reports.bench import compare

from .builder import GraphBuilder

RESNET20 = Path(__file__).resolve().parents[1] / "models" / "resnet20_cifar10.onnx"


def conv_net(size: int = 16, dynamic_batch: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Conv, depthwise conv, pointwise conv, pooled into a Gemm head: every kind of MACs term."""
    b = GraphBuilder(seed=seed, dynamic_batch=dynamic_batch)
    x = b.input("x", [1, 3, size, size])
    y = b.relu(b.conv(x, 16, name="stem"))
    y = b.relu(b.conv(y, 16, group=16, name="depthwise"))
    y = b.relu(b.conv(y, 24, k=1, name="pointwise"))
    y = b.flatten(b.global_average_pool(y))
    return b.build(outputs=[b.gemm(y, 10, name="head")])


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("bench")
    original = folder / "net.onnx"
    onnx.save(conv_net(), original)
    pruned, report = api.prune(original, ratio=0.5, round_to=1, validate=False)
    api.save(pruned, str(folder / "net_pruned.onnx"))
    return original, folder / "net_pruned.onnx", report.to_dict()


# ---- bench ------------------------------------------------------------------------------------

def test_compare_times_every_batch_and_counts_macs_like_prune(pair):
    original, pruned, report = pair
    result = compare(original, pruned, batches=(1, 3), provider="cpu", runs=4, warmup=1)
    assert [row.batch for row in result.batches] == [1, 3]
    assert result.provider == "CPUExecutionProvider"
    for row in result.batches:
        for timing in (row.original, row.pruned):
            assert 0 < timing.min_ms <= timing.median_ms <= timing.max_ms
        assert row.speedup == pytest.approx(row.original.median_ms / row.pruned.median_ms)
    assert (result.macs_original, result.macs_pruned) == (report["before"]["macs"], report["after"]["macs"])
    assert result.ideal_speedup == pytest.approx(report["before"]["macs"] / report["after"]["macs"])
    assert result.ideal_speedup > 1.5
    lines = result.summary().splitlines()
    assert f"ideal speedup {result.ideal_speedup:.2f}x" in lines[1]
    assert [line.split()[0] for line in lines[3:]] == ["1", "3"]


def test_compare_accepts_model_protos(pair):
    original, pruned, _ = pair
    result = compare(onnx.load(original), onnx.load(pruned), batches=(2,), provider="cpu", runs=2, warmup=0)
    assert (result.original, result.pruned) == ("original", "pruned")
    assert result.to_dict()["batches"][0]["batch"] == 2


def test_layers_are_profiled_per_layer_of_the_model_with_their_macs(pair):
    """The slowest layers by name (ONNX Runtime's renamed, fused nodes traced back), with the MACs ratio."""
    original, pruned, report = pair
    result = compare(original, pruned, batches=(4,), provider="cpu", runs=3, warmup=1, threads=1, layers=20)
    assert result.layers_batch == 4
    layers = {layer.node: layer for layer in result.layers}
    assert {"stem", "depthwise", "pointwise", "head"} <= set(layers)
    assert all(layer.ms_original > 0 for layer in result.layers)
    assert [layer.ms_original for layer in result.layers] == sorted((l.ms_original for l in result.layers), reverse=True)
    pointwise = layers["pointwise"]  # 16 -> 8 inputs and 24 -> 12 outputs: a quarter of the MACs
    assert pointwise.macs_original == 4 * pointwise.macs_pruned and pointwise.ideal == pytest.approx(4.0)
    assert pointwise.speedup == pytest.approx(pointwise.ms_original / pointwise.ms_pruned)
    table = result.summary().splitlines()
    assert table[4].startswith(f"slowest {len(result.layers)} layers of the original at batch 4")
    assert json.loads(result.to_json())["layers"][0]["node"] == result.layers[0].node
    top = compare(original, pruned, batches=(4,), provider="cpu", runs=2, warmup=0, threads=1, layers=2)
    assert len(top.layers) == 2


def test_cli_bench_writes_json(pair, tmp_path):
    original, pruned, report = pair
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(original), str(pruned), "--batch", "1,2", "--runs", "3",
                                       "--warmup", "1", "--provider", "cpu", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "ideal speedup" in result.output and "(1 intra-op threads)" in result.output
    data = json.loads(out.read_text())
    assert data["threads"] == 1
    assert [row["batch"] for row in data["batches"]] == [1, 2]
    assert data["macs_pruned"] == report["after"]["macs"]
    for row in data["batches"]:
        assert row["speedup"] == pytest.approx(row["original"]["median_ms"] / row["pruned"]["median_ms"])
        assert row["of_ideal"] == pytest.approx(row["speedup"] / data["ideal_speedup"])


def _error_line(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_bench_missing_file_is_one_line_exit_2(pair, tmp_path):
    original, _, _ = pair
    line = _error_line(["bench", str(original), str(tmp_path / "absent.onnx")])
    assert "absent.onnx: no such file" in line


def test_cli_bench_refuses_models_with_different_inputs(pair, tmp_path):
    original, _, _ = pair
    other = tmp_path / "small_input.onnx"
    onnx.save(conv_net(size=8), other)
    line = _error_line(["bench", str(original), str(other), "--batch", "1"])
    assert "different inputs" in line and "x:Nx3x16x16" in line and "x:Nx3x8x8" in line


def test_cli_bench_fixed_batch_and_bad_batch_list(tmp_path):
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_net(dynamic_batch=False), fixed)
    assert "fixed batch of 1" in _error_line(["bench", str(fixed), str(fixed), "--batch", "1,4"])
    assert "comma-separated" in _error_line(["bench", str(fixed), str(fixed), "--batch", "1,four"])
    assert "positive" in _error_line(["bench", str(fixed), str(fixed), "--batch", "0"])
    assert "--threads must be at least 1" in _error_line(["bench", str(fixed), str(fixed), "--batch", "1",
                                                          "--threads", "0"])


# ---- MACs budget ------------------------------------------------------------------------------

def _real_macs(model, ratio: float, round_to: int = 1) -> tuple[float, float]:
    """(estimated, real) MACs of the plan at `ratio`: the estimate from masks, the real after surgery."""
    loaded = load(model)
    analysis = analyze_channels(loaded)
    estimator = MacsEstimator(loaded, analysis)
    plan = select(analysis, ratio, "whc", round_to)
    estimated = estimator.macs(plan.removed_roots)
    apply_plan(loaded, analysis, plan)
    real = model_cost(loaded.graph, infer_static_shapes(loaded.graph, loaded.input_shapes)).macs
    return estimated, real


@pytest.mark.parametrize("ratio,round_to", [(0.3, 1), (0.5, 1), (0.45, 8)])
def test_macs_estimate_from_the_plan_equals_the_pruned_model(ratio, round_to):
    for model in (conv_net(), RESNET20):
        estimated, real = _real_macs(model, ratio, round_to)
        assert estimated == pytest.approx(real, rel=1e-9)


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_target_macs_meets_the_budget_with_the_smallest_ratio(target):
    pruned, report = api.prune(RESNET20, target_macs=target, round_to=1, validate=False, recover="none")
    assert report.macs_kept <= target
    assert report.target_macs == target
    assert f"target MACs {target:.1%}: chose ratio {report.ratio:g}" in report.summary()
    # The model returned is the one the chosen ratio gives ...
    _, by_ratio = api.prune(RESNET20, ratio=report.ratio, round_to=1, validate=False, recover="none")
    assert by_ratio.after == report.after
    # ... and one grid step less would miss the budget.
    _, real = _real_macs(RESNET20, round(report.ratio - 1e-4, 4))
    assert real / report.before["macs"] > target


def test_target_macs_on_a_built_net_and_an_unreachable_budget():
    loaded = load(conv_net())
    fit = fit_ratio(loaded, analyze_channels(loaded), 0.6)
    assert fit.macs_kept <= 0.6 and 0 < fit.ratio < 1
    loaded = load(conv_net())
    with pytest.raises(UserInputError, match="out of reach"):
        fit_ratio(loaded, analyze_channels(loaded), 1e-4)


def test_target_macs_one_keeps_everything():
    _, report = api.prune(RESNET20, target_macs=1.0, validate=False, recover="none")
    assert report.ratio == 0 and report.macs_kept == 1.0


def test_cli_ratio_and_target_macs_are_exclusive(tmp_path):
    line = _error_line(["prune", str(RESNET20), "--ratio", "0.3", "--target-macs", "0.5"])
    assert "mutually exclusive" in line
    assert "(0, 1]" in _error_line(["prune", str(RESNET20), "--target-macs", "1.5"])
    assert "must be a number" in _error_line(["prune", str(RESNET20), "--target-macs", "half"])


def test_cli_target_macs_writes_a_model_within_budget(tmp_path):
    out = tmp_path / "r20.onnx"
    result = CliRunner().invoke(main, ["prune", str(RESNET20), "--target-macs", "0.5", "--round-to", "1",
                                       "--no-validate", "--recover", "none", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "target MACs 50.0%" in result.output
    original, pruned = load(RESNET20), load(out)
    kept = model_cost(pruned.graph, pruned.shapes).macs / model_cost(original.graph, original.shapes).macs
    _, report = api.prune(RESNET20, target_macs=0.5, round_to=1, validate=False, recover="none")
    assert kept == pytest.approx(report.macs_kept) and kept <= 0.5


def test_target_macs_with_the_default_rounding_still_meets_the_budget():
    _, report = api.prune(RESNET20, target_macs=0.5, validate=False, recover="none")
    assert report.round_to == api.DEFAULT_ROUND_TO and report.macs_kept <= 0.5


def test_cli_bench_unavailable_provider_is_a_usage_error(pair):
    from onnx_whc.graph.runtime import cuda_works

    if cuda_works():
        pytest.skip("CUDA works here: nothing to refuse")
    original, pruned, _ = pair
    assert "provider cuda is not available" in _error_line(["bench", str(original), str(pruned), "--provider",
                                                            "cuda", "--batch", "1"])


def test_cuda_probe_loads_pip_cuda_libraries_before_giving_up(monkeypatch):
    """With CUDA from pip's nvidia-* packages the provider loads only after onnxruntime.preload_dlls()."""
    from onnx_whc.graph import runtime

    loaded = []
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"])
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda: loaded.append(True) or print("Failed to load x"),
                        raising=False)
    monkeypatch.setattr(runtime, "_cuda_session_loads", lambda: bool(loaded))
    runtime.cuda_works.cache_clear()
    try:
        assert runtime.cuda_works() and loaded == [True]
        runtime.cuda_works.cache_clear()
        monkeypatch.setattr(runtime, "_cuda_session_loads", lambda: False)
        assert not runtime.cuda_works()  # still no CUDA: CPU
    finally:
        runtime.cuda_works.cache_clear()

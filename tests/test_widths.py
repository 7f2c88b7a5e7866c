"""Measured channel widths: candidate ladders, latency steps, snapping, cut-outs and the disk cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onnx_whc import api
from onnx_whc.cli import main
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load
from onnx_whc.plan.widths import (
    CANDIDATES,
    WidthSteps,
    _cut_out,
    _pruned_cut,
    candidate_widths,
    measure_widths,
    steps_of,
)

from .builder import GraphBuilder
from .oracle import prune_and_compare, run


def _residual_model():
    """A stem, two identical residual blocks (one coupled trunk group) and two inner groups."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 16, 16])
    trunk = b.relu(b.conv(x, 16, name="stem"))
    for block in range(2):
        inner = b.relu(b.conv(trunk, 24, name=f"b{block}_c1"))
        trunk = b.relu(b.op("Add", [trunk, b.conv(inner, 16, name=f"b{block}_c2")]))
    return b.build([b.conv(trunk, 4, name="head")])


@pytest.mark.parametrize("channels", [1, 2, 8, 16, 24, 64, 256, 2048])
def test_candidate_widths_cover_narrow_groups_fully_and_wide_ones_evenly(channels):
    widths = candidate_widths(channels)
    assert widths[0] == channels and widths == sorted(set(widths), reverse=True)
    assert len(widths) <= CANDIDATES and min(widths) >= 1
    if channels <= CANDIDATES:
        assert widths == list(range(channels, max(1, int(np.ceil(channels * 0.1))) - 1, -1))
    else:
        strides = set(np.diff(sorted(widths[1:])).tolist())
        assert len(strides) == 1 and widths[-1] <= channels * 0.2


def test_steps_are_the_widths_faster_than_every_wider_one():
    widths = list(range(32, 0, -1))
    staircase = [float(np.ceil(w / 8)) for w in widths]  # blocks of 8 channels
    assert steps_of(widths, staircase).tolist() == [8, 16, 24, 32]
    noisy = [t * (1 + 0.01 * (w % 3)) for w, t in zip(widths, staircase)]  # noise under the step threshold
    assert steps_of(widths, noisy).tolist() == [8, 16, 24, 32]
    flat = [1.0] * len(widths)  # no width is faster: only all of them
    assert steps_of(widths, flat).tolist() == [32]


def test_kept_counts_round_up_to_the_next_step():
    steps = WidthSteps({0: np.array([8, 16, 32])})
    assert [steps.keep(0, wanted, 32) for wanted in (1, 8, 9, 17, 32)] == [8, 8, 16, 32, 32]
    assert steps.keep(5, 11, 32) == 11  # a group never measured keeps what was asked


def test_selection_keeps_step_widths_and_the_pruned_model_is_exact():
    model = _residual_model()
    analysis = analyze_channels(load(model))
    steps = WidthSteps({g.id: np.array([4, 12, g.channels]) for g in analysis.groups if g.prunable})
    _, plan = prune_and_compare(model, 0.5, round_to=steps)
    kept = {d.group.id: d.group.channels - len(d.removed) for d in plan.decisions if d.group.prunable}
    assert kept and all(k == 12 for k in kept.values())  # half of 16 or 24 rounds up to the step 12


def test_a_cut_out_holds_the_group_readers_and_writers_and_runs_pruned():
    model = _residual_model()
    loaded = load(model)
    analysis = analyze_channels(loaded)
    trunk = next(g for g in analysis.groups if any(p.node.name == "stem" for p, _ in g.producers))
    cut = _cut_out(loaded, analysis, trunk)
    ops = sorted(n.name for n in cut.nodes if n.op == "Conv")
    assert ops == ["b0_c1", "b0_c2", "b1_c1", "b1_c2", "head", "stem"]
    pruned, shapes = _pruned_cut(loaded, analysis, trunk, cut, 5, batch=2)
    feeds = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    # the inner activations the second convs read come from outside, unpruned: another group's
    assert shapes.pop("x") == (2, 3, 16, 16) and sorted(shapes.values()) == [(2, 24, 16, 16)] * 2
    outputs = {o.name: a for o, a in zip(pruned.graph.output, run(pruned, feeds))}
    assert outputs["head"].shape == (2, 4, 16, 16)
    assert sorted(a.shape[1] for name, a in outputs.items() if name != "head") == [24, 24]  # b*_c1 convs


def test_widths_are_measured_once_then_read_from_the_cache(tmp_path):
    model = _residual_model()
    loaded = load(model)
    analysis = analyze_channels(loaded)
    cache = tmp_path / "widths.json"
    first = measure_widths(loaded, analysis, ["CPUExecutionProvider"], threads=1, cache=cache)
    prunable = [g.id for g in analysis.groups if g.prunable]
    assert not first.failed and sorted(first.steps) == prunable
    # the two blocks' inner groups are the same layers at the same shapes: timed once
    assert first.measured == len(prunable) - 1 and first.cached == 1
    for gid, steps in first.steps.items():
        channels = next(g.channels for g in analysis.groups if g.id == gid)
        assert steps[-1] == channels and set(steps.tolist()) <= set(candidate_widths(channels))
    again = measure_widths(loaded, analysis, ["CPUExecutionProvider"], threads=1, cache=cache)
    assert again.measured == 0 and again.cached == len(prunable)
    assert {k: v.tolist() for k, v in again.steps.items()} == {k: v.tolist() for k, v in first.steps.items()}
    other = measure_widths(loaded, analysis, ["CPUExecutionProvider"], threads=2, cache=cache)
    assert other.measured == len(prunable) - 1  # another thread count is another runtime
    assert len(json.loads(cache.read_text())["entries"]) == 2 * (len(prunable) - 1)


def test_an_unreadable_cache_is_measured_again(tmp_path):
    cache = tmp_path / "widths.json"
    cache.write_text("not json")
    loaded = load(_residual_model())
    found = measure_widths(loaded, analyze_channels(loaded), ["CPUExecutionProvider"], cache=cache)
    assert found.measured and json.loads(cache.read_text())["version"] == 1


def test_the_cli_prunes_at_measured_widths_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_WHC_CACHE", str(tmp_path / "cache"))
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    source.write_bytes(_residual_model().SerializeToString())
    result = CliRunner().invoke(main, ["prune", str(source), "--round-to", "measured", "--ratio", "0.5",
                                       "--recover", "none", "--no-validate", "-o", str(out), "--report",
                                       str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "widths: measured steps on CPUExecutionProvider for 3 groups (2 timed in" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["round_to"] == "measured" and report["widths"]["groups_measured"] == 2
    for group in report["groups"]:
        if group["removed"]:
            steps = report["widths"]["steps"][str(group["id"])]
            assert group["channels"] - len(group["removed"]) in steps
    assert (tmp_path / "cache" / "widths.json").exists()


def test_a_speed_target_rounds_to_measured_widths_unless_told_otherwise():
    from onnx_whc.plan.speed_target import SpeedTarget

    target = SpeedTarget(speedup=1.5)
    assert api._check_round_to(None, target) == "measured" and api._check_round_to(None, None) == 8
    assert api._check_round_to("4", target) == 4 and api._check_round_to(" measured ", None) == "measured"
    _, fixed = api.prune(_residual_model(), ratio=0.5, round_to=4, recover="none", validate=False, synthetic=False)
    assert fixed.round_to == 4 and fixed.widths is None


def test_with_measured_latency_the_allocator_spends_the_budget_where_time_is_saved():
    from onnx_whc.plan.allocate import Allocator, allocated_plan
    from onnx_whc.plan.channel_stats import channel_stats

    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 8, 8])
    a = b.relu(b.conv(x, 8, name="a"))
    model = b.build([b.conv(b.relu(b.conv(a, 8, name="b")), 4, name="c")])
    loaded = load(model)
    analysis = analyze_channels(loaded)
    group = {d.producers[0][0].node.name: d.id for d in analysis.groups if d.prunable}
    widths = np.arange(1, 9)
    flat, falling = np.ones(8), widths / 8.0  # a's layers take as long at any width, b's shrink with it
    latency = WidthSteps({gid: widths for gid in group.values()},
                         tables={group["a"]: (widths, flat), group["b"]: (widths, falling)})
    calib = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    select_args = dict(criterion="whc", round_to=1, exclude=(), seed=0)
    stats = channel_stats(loaded, analysis, calib)
    by_time = Allocator(loaded, analysis, calib, select_args, stats, latency=latency)
    plan, _ = allocated_plan(loaded, analysis, by_time, None, 0.8, select_args)
    removed = {d.group.producers[0][0].node.name: len(d.removed) for d in plan.decisions if d.group.prunable}
    assert removed["a"] == 0 and removed["b"] > 0  # pruning a saves MACs but no time
    by_macs = Allocator(loaded, analysis, calib, select_args, stats)
    assert {gid for gid, _ in by_macs.path[1:]} == set(group.values())  # MACs alone prune both

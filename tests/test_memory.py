"""Memory that follows a budget: samples read a chunk at a time, passes that hold what fits, the budget's errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from onnx_whc.cli import main
from onnx_whc.data import samples as samples_module
from onnx_whc.data.calibration import Calibration, Preprocess, load_calibration, normalize, pixel_samples, read_image
from onnx_whc.data.samples import evenly_spread
from onnx_whc.errors import UserInputError
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load
from onnx_whc.graph.memory import MemoryBudget, held_bytes, live_sizes, most_samples, parse_size
from onnx_whc.plan.allocate import Allocator
from onnx_whc.plan.channel_stats import channel_stats
from onnx_whc.recovery.recover import REPLAY_OVERHEAD, RecoverySettings, replayed_samples
from onnx_whc.recovery.recover import recover as recover_stage

from .builder import GraphBuilder
from .test_recover import _linear_convs, _pruned_pair


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_pixel_samples_read_the_values_a_whole_decode_gives(photos, monkeypatch, on_disk, layout):
    """uint8 pixels in memory or in the temporary file, normalised per read: the same float32 values as
    decoding every image at once, for slices, index arrays, single rows and subsets."""
    monkeypatch.setattr(samples_module, "IN_MEMORY_BYTES", 0 if on_disk else 1 << 30)
    monkeypatch.setattr("onnx_whc.data.calibration.DECODE_CHUNK", 3)  # several appends
    preprocess = Preprocess(layout=layout)
    whole = normalize(np.stack([read_image(p, preprocess) for p in photos]), preprocess)
    samples = pixel_samples(photos, preprocess)
    assert (samples.source.file is not None) == on_disk
    assert samples.shape == whole.shape and samples.dtype == np.float32
    np.testing.assert_array_equal(samples[2:5], whole[2:5])
    np.testing.assert_array_equal(samples[np.array([6, 0, 3])], whole[[6, 0, 3]])
    np.testing.assert_array_equal(samples[4], whole[4])
    np.testing.assert_array_equal(samples[1, :, 2], whole[1, :, 2])
    part = samples.subset(np.array([5, 1, 2]))
    np.testing.assert_array_equal(np.asarray(part), whole[[5, 1, 2]])
    np.testing.assert_array_equal(part[1:], whole[[1, 2]])


def test_an_npy_stays_memory_mapped_and_is_cast_per_read(tmp_path):
    data = np.random.default_rng(0).standard_normal((6, 3, 4, 4))  # float64 on disk
    np.save(tmp_path / "calib.npy", data)
    samples = load_calibration(tmp_path / "calib.npy", {"x": (None, 3, 4, 4)}, size=5)["x"]
    assert isinstance(samples.source.array, np.memmap) and len(samples) == 5
    assert samples[1:3].dtype == np.float32
    np.testing.assert_array_equal(samples[1:3], data[1:3].astype(np.float32))


def test_calibration_split_is_unchanged_by_reading_lazily():
    """The held-out rows are the ones the arrays gave before: same seed, same rows."""
    data = np.arange(40, dtype=np.float32).reshape(40, 1)
    calibration = Calibration.of({"x": data}, "test", seed=3)
    fit, held = np.asarray(calibration.fit["x"]), np.asarray(calibration.held["x"])
    out = np.zeros(40, bool)
    out[np.random.default_rng([3, 0x4E1D]).choice(40, 8, replace=False)] = True
    np.testing.assert_array_equal(fit, data[~out])
    np.testing.assert_array_equal(held, data[out])


@pytest.mark.parametrize("text, size", [("4G", 4_000_000_000), ("500M", 500_000_000), ("2.5GB", 2_500_000_000),
                                        ("1e9", 1_000_000_000), ("64k", 64_000)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size
    assert MemoryBudget.of(text).total == size


@pytest.mark.parametrize("text", ["lots", "4 gigabytes", "-1G", ""])
def test_a_size_that_is_no_size_is_an_error(text):
    with pytest.raises(UserInputError, match="--memory"):
        MemoryBudget.of(text)


def test_live_sizes_follow_each_tensor_from_producer_to_last_reader():
    b = GraphBuilder(seed=0)
    x = b.input("x", [1, 2, 4, 4])
    a = b.conv(x, 3, name="a")  # 48 per sample, read by b and by the Add
    c = b.conv(a, 3, name="b")
    model = b.build([b.op("Add", [a, c])])
    shapes = {"x": (1, 2, 4, 4), a: (1, 3, 4, 4), c: (1, 3, 4, 4), model.graph.output[0].name: (1, 3, 4, 4)}
    positions = live_sizes(model, shapes)
    assert [sorted(p) for p in positions] == [[48], [48, 48], [48]]  # x dies at a; a lives to the Add
    assert held_bytes(positions, 10, 1 << 40) == 2 * 48 * 10 * 4
    assert held_bytes(positions, 10, 100) == 2 * 48 * 10 * 2  # over the compaction size: float16


def test_most_samples_is_the_largest_count_that_fits():
    assert most_samples(lambda n: 10 * n + 5, 100, 50) == 9
    assert most_samples(lambda n: 10 * n, 1000, 50) == 50
    assert most_samples(lambda n: 10 * n + 5, 4, 50) == 0


def test_evenly_spread_draws_from_the_whole_set():
    picked = evenly_spread(1000, 50, seed=0)
    assert len(set(picked)) == 50 and np.all(np.diff(picked) > 0) and picked[-1] > 500
    np.testing.assert_array_equal(evenly_spread(10, 20, 0), np.arange(10))


def _recovery_case():
    """(original, pruned, keep, shapes, calibration of 48 samples: 39 to fit on)."""
    model = _linear_convs()
    original, pruned, keep, _ = _pruned_pair(model, {0: 0.25})
    calib = np.random.default_rng(0).standard_normal((48, 4, 8, 8)).astype(np.float32)
    return original, pruned, keep, load(model).shapes, Calibration.of({"x": calib}, "test data")


def _room_for(original, shapes, samples: int) -> int:
    return REPLAY_OVERHEAD + 2 * held_bytes(live_sizes(original, shapes), samples, 1 << 62)


def test_recovery_holds_only_the_samples_its_room_allows():
    original, _, _, shapes, calibration = _recovery_case()
    fit = calibration.fit
    everything, count = replayed_samples(original, fit, shapes, None, 0)
    assert count == 39 and everything is fit
    held, count = replayed_samples(original, fit, shapes, _room_for(original, shapes, 10), 0)
    assert count == 10 and len(held["x"]) == 10
    whole = np.asarray(fit["x"])
    assert all(any(np.array_equal(row, other) for other in whole) for row in np.asarray(held["x"]))
    _, count = replayed_samples(original, fit, shapes, _room_for(original, shapes, 10) - 1, 0)
    assert count == 9
    _, count = replayed_samples(original, fit, shapes, 0, 0)
    assert count == 1  # never none: the budget check refused models that cannot run one sample


def test_recovery_report_says_how_many_samples_the_budget_held():
    original, pruned, keep, shapes, calibration = _recovery_case()
    settings = RecoverySettings(method="lsq")
    _, report = recover_stage(original, pruned, keep, calibration, None, 64, settings, shapes,
                              room=_room_for(original, shapes, 12))
    assert report["samples_fitted"] == 12 and report["calibration_samples"] == 39
    assert "12 of the 39 samples (as many as the memory budget holds)" in report["summary"]
    _, full = recover_stage(original, pruned, keep, calibration, None, 64, settings, shapes)
    assert full["samples_fitted"] == 39 and "on 39 samples," in full["summary"]


def test_allocator_probes_on_fewer_samples_when_the_room_is_small():
    model = _linear_convs()
    loaded = load(model)
    analysis = analyze_channels(loaded)
    calib = np.random.default_rng(0).standard_normal((60, 4, 8, 8)).astype(np.float32)
    fit = Calibration.of({"x": calib}, "t").fit
    stats = channel_stats(loaded, analysis, fit)
    args = dict(criterion="l1", round_to=1, exclude=(), seed=0, importance=None)
    assert Allocator(loaded, analysis, fit, args, stats).samples == 48
    assert Allocator(loaded, analysis, fit, args, stats, room=1).samples == 1
    assert 1 < Allocator(loaded, analysis, fit, args, stats, room=20_000).samples < 48


def test_a_budget_too_small_for_the_model_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_linear_convs(), path)
    result = CliRunner().invoke(main, ["prune", str(path), "--memory", "1M", "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the memory budget (--memory 1 MB) is too small")
    assert "give --memory" in lines[0] and not (tmp_path / "out.onnx").exists()


def test_the_summary_and_report_give_the_peak_and_the_budget(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_linear_convs(), path)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((40, 4, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(main, ["prune", str(path), "--memory", "8G", "--calib", str(tmp_path / "calib.npy"),
                                       "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 0, result.output
    assert "budget 8.0 GB (--memory 8.0 GB); calibration data read in" in result.output
    memory = json.loads((tmp_path / "r.json").read_text())["memory"]
    assert memory["budget_bytes"] == 8_000_000_000 and 0 < memory["peak_bytes"] < 8_000_000_000
    assert memory["calibration_chunks"] > 0


def test_reads_through_any_subset_count_on_the_shared_source():
    samples = Calibration.of({"x": np.zeros((20, 2), np.float32)}, "t").fit["x"]
    before = samples.source.reads
    part = samples.subset(slice(0, 4))
    part[0:2], samples[3:5], part[np.array([1, 3])]
    assert samples.source.reads == before + 3

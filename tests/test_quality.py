"""Per-output quality measures, the built-in synthetic calibration and the accuracy-aware search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_whc.api import QualityFloor, prune
from onnx_whc.data.calibration import Calibration, preset_preprocess, synthetic_calibration
from onnx_whc.data.deadleaves import dead_leaves
from onnx_whc.errors import UserInputError
from onnx_whc.measure.quality import OutputKind, QualityProbe, compare, damage, output_kinds

from .builder import GraphBuilder

rng = np.random.default_rng(0)


def test_agreement_counts_changed_argmax_and_top5():
    reference = rng.standard_normal((200, 10))
    candidate = reference.copy()
    candidate[:50] = rng.standard_normal((50, 10))  # a quarter of the samples scrambled
    q = compare(reference, candidate, OutputKind("classifier", 1))
    changed = np.mean(reference.argmax(1) != candidate.argmax(1))
    assert q.metric == "agreement" and q.value == pytest.approx(1 - changed) and 0.75 <= q.value < 1
    assert 0.75 <= q.details["top5"] < 1


def test_r2_weighs_every_channel_alike_where_cosine_does_not():
    """Box channels in pixels dominate the cosine; broken score channels show in R² (the YOLO case)."""
    boxes = rng.uniform(0, 320, (16, 4, 100))
    scores = rng.uniform(0, 1, (16, 18, 100))
    reference = np.concatenate([boxes, scores], 1)
    candidate = np.concatenate([boxes, rng.uniform(0, 1, (16, 18, 100))], 1)  # scores become noise
    q = compare(reference, candidate, OutputKind("dense", 1))
    assert q.cosine > 0.99
    assert q.metric == "r2" and q.value < 0.3 and q.details["r2_worst"] < 0 and q.details["channels"] == 22
    assert not q.ok and damage([reference], [candidate], [OutputKind("dense", 1)]) > 0.7


def test_empty_scalar_and_integer_outputs_get_no_made_up_number():
    empty = compare(np.zeros((0, 16)), np.zeros((0, 16)), OutputKind("dense", 1))
    assert empty.value is None and "empty on these inputs" in empty.describe() and empty.ok
    scalar = compare(np.array([[2.0], [4.0]]), np.array([[2.0], [4.4]]), OutputKind("scalar"))
    assert scalar.metric == "relative_error" and scalar.value == pytest.approx(0.4 / np.sqrt(20))
    ints = compare(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]), OutputKind("integer"))
    assert ints.metric == "match" and ints.value == 0.75


def test_outputs_empty_for_every_sample_are_kinded_and_left_unrated():
    """An NMS-style output with no rows at all (0 x 16) must not break the measure."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 16, 16])
    model = b.build([b.conv(x, 4, name="c1")])
    empty = {"boxes": np.zeros((0, 16), np.float32), "score": np.zeros((0, 1), np.float32)}
    kinds = output_kinds(model, empty)
    assert kinds == {"boxes": OutputKind("classifier", 1), "score": OutputKind("scalar")}
    assert compare(empty["boxes"], empty["boxes"], kinds["boxes"]).describe() == "n/a (empty on these inputs)"


def _head_model():
    """Three outputs: softmax probabilities, raw logits (N x K), and a dense channels-last map."""
    b = GraphBuilder(seed=2)
    x = b.input("x", [1, 3, 16, 16])
    h = b.relu(b.conv(x, 8, name="c1"))
    logits = b.gemm(b.flatten(b.global_average_pool(h)), 5, name="fc")
    probs = b.op("Softmax", [logits], axis=-1)
    nhwc = b.op("Transpose", [b.conv(h, 4, name="c2")], perm=[0, 2, 3, 1])
    return b.build([probs, logits, nhwc])


def test_output_kinds_from_the_producing_op_and_shape():
    model = _head_model()
    feeds = {"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)}
    probe = QualityProbe(model, feeds, "test inputs", 8)
    kinds = list(output_kinds(model, probe.reference).values())
    assert kinds == [OutputKind("classifier", 1), OutputKind("classifier", 1), OutputKind("dense", 3)]
    same = probe.measure(model)
    assert same.ok and all(q.value == pytest.approx(1.0) for q in same.outputs.values())
    assert same.warning() is None and same.on == "test inputs"


def test_dead_leaves_are_deterministic_images_with_edges():
    a, b = dead_leaves(4, 32, 40, seed=3), dead_leaves(4, 32, 40, seed=3)
    assert a.shape == (4, 32, 40, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, dead_leaves(4, 32, 40, seed=4))
    assert a.std() > 30  # contrast, not a flat field
    steps = np.abs(np.diff(a.astype(float), axis=2)).mean()
    assert 0.5 < steps < 40  # smooth regions with edges: neither flat nor noise


@pytest.mark.parametrize("shape, layout, ok", [
    ((1, 3, 32, 32), "NCHW", True), ((1, 64, 64, 1), "NHWC", True), ((1, 3, 8, 8), "NCHW", False),
    ((1, 5, 32, 32), "NCHW", False), ((1, 3, 32), "NCHW", False), ((1, 3, "h", "w"), "NCHW", False),
])
def test_synthetic_calibration_only_for_image_inputs(shape, layout, ok):
    calibration, why = synthetic_calibration({"x": shape}, {"x": np.dtype(np.float32)},
                                             preset_preprocess("inception", layout), count=20)
    assert (calibration is not None) == ok, why
    if ok:
        assert calibration.synthetic and calibration.fit_count == 16 and calibration.held_count == 4
        assert calibration.fit["x"].shape[1:] == shape[1:] and -1.0 <= np.asarray(calibration.fit["x"]).min()
        assert "held-out samples of 20 built-in synthetic dead-leaves images" in calibration.quality_on
    else:
        assert why


def test_calibration_split_holds_out_a_fifth_and_says_when_it_cannot():
    assert Calibration.of({"x": np.zeros((1000, 3))}, "1000 images").held_count == 200  # a fifth
    big = Calibration.of({"x": np.zeros((2000, 3))}, "2000 images from calib/")
    assert big.fit_count == 1744 and big.held_count == 256  # at most 256
    small = Calibration.of({"x": np.zeros((8, 3))}, "8 given samples")
    assert small.held_count == 0 and "too few to hold any out" in small.quality_on


def test_preset_sets_crop_from_the_input_and_explicit_values_win():
    p = preset_preprocess("imagenet")
    assert p.crop_fraction == 0.875 and p.mean == (0.485, 0.456, 0.406)
    assert preset_preprocess("unit", mean=(0.1, 0.2, 0.3)).mean == (0.1, 0.2, 0.3)
    with pytest.raises(UserInputError, match="unknown --calib-preset"):
        preset_preprocess("coco")


def _classifier():
    b = GraphBuilder(seed=7)
    x = b.input("x", [1, 3, 16, 16])
    h = b.relu(b.conv(x, 16, name="c1"))
    h = b.relu(b.conv(h, 16, name="c2"))
    return b.build([b.gemm(b.flatten(b.global_average_pool(h)), 10, name="fc")])


def test_min_agreement_search_keeps_the_floor_and_prunes_the_most_among_probes():
    model = _classifier()
    pruned, report = prune(model, floor=QualityFloor(agreement=0.99), round_to=1, validate=False)
    probes = report.search["probes"]
    assert 2 <= len(probes) <= 7 and not all(p["passed"] for p in probes)  # a real search, not one probe
    chosen = report.search["chosen_macs_kept"]
    passing = [p["macs_kept"] for p in probes if p["passed"]]
    assert chosen == min(passing) and report.quality["fc"]["value"] >= 0.99
    assert report.macs_kept == pytest.approx(chosen, abs=1e-3) and report.macs_kept < 1
    assert all(p["quality"]["fc"] >= 0.99 for p in probes if p["passed"])  # less a standard error, in fact


def test_min_agreement_excludes_a_budget_and_needs_data():
    with pytest.raises(UserInputError, match="mutually exclusive"):
        prune(_classifier(), ratio=0.3, floor=QualityFloor(agreement=0.9), validate=False)
    with pytest.raises(UserInputError, match="needs calibration data"):
        prune(_classifier(), floor=QualityFloor(agreement=0.9), validate=False, synthetic=False)


def test_random_inputs_are_named_as_such_when_nothing_else_exists():
    b = GraphBuilder(seed=1)
    x = b.input("x", [1, 6, 4, 4])  # not an image: six channels
    model = b.build([b.conv(b.relu(b.conv(x, 8, name="c1")), 4, name="c2")])
    _, report = prune(model, ratio=0.25, round_to=1)
    assert report.quality_on.startswith("16 random-normal inputs, nothing like real data")
    assert "is not an image" in report.calibration and report.recovery is None
    assert "recovery skipped: no calibration data" in report.summary()
    assert report.quality["c2"]["metric"] == "r2"


def test_sweep_writes_a_table_json_and_plot_with_top1(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from onnx_whc.cli import main

    model_path = tmp_path / "net.onnx"
    import onnx

    onnx.save(_classifier(), str(model_path))
    folder = tmp_path / "labelled"
    pixels = dead_leaves(12, 16, 16, seed=5)
    for i, image in enumerate(pixels):  # two classes, as class folders
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{i % 2}" / f"{i}.png")
    prefix = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(model_path), "--budgets", "0.8,0.5", "--round-to", "1",
                                       "-o", str(prefix), "--eval", str(folder)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["budget"] for r in data["rows"]] == [0.8, 0.5]
    assert all(r["macs_kept"] <= r["budget"] and 0 <= r["top1"] <= 1 for r in data["rows"])
    assert data["top1_on"] == f"12 labelled images from {folder}" and 0 <= data["top1_original"] <= 1
    assert "| 0.5 |" in (tmp_path / "sweep.md").read_text()
    assert Image.open(tmp_path / "sweep.png").size[0] > 500


def test_labelled_csv_skips_calibration_rows(tmp_path):
    from PIL import Image

    from onnx_whc.data.calibration import load_labelled

    for i, image in enumerate(dead_leaves(4, 16, 16, seed=1)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("file,label,split\n0.png,3,calib\n1.png,1,eval\n2.png,2,eval\n3.png,0,val\n")
    inputs, labels, on = load_labelled(tmp_path / "labels.csv", {"x": (1, 3, 16, 16)})
    assert labels.tolist() == [1, 2, 0] and inputs["x"].shape == (3, 3, 16, 16)
    assert on == f"3 labelled images from {tmp_path / 'labels.csv'}"
    (tmp_path / "bad.csv").write_text("name,class\n0.png,1\n")
    with pytest.raises(UserInputError, match="needs 'file' and 'label' columns"):
        load_labelled(tmp_path / "bad.csv", {"x": (1, 3, 16, 16)})


def test_yolo_preset_letterboxes_instead_of_stretching(tmp_path):
    from PIL import Image

    from onnx_whc.data.calibration import load_images

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    batch = load_images([tmp_path / "wide.png"], preset_preprocess("yolo"), (32, 32))
    assert batch.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(batch[0, :, 0, 0], 114 / 255, rtol=1e-6)  # padding above the picture
    np.testing.assert_allclose(batch[0, :, 16, 16], [1.0, 0.0, 0.0], atol=1e-6)  # the picture, not stretched

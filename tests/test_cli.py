"""The `onnx-whc` command line on the bundled ResNet-20 and on small built graphs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnx_whc.cli import main

from .builder import GraphBuilder
from .test_patterns import out_channels

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "resnet20_cifar10.onnx"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1]))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """One validated raw prune (the paper's: WHC, one ratio, no recovery) of a copy of the bundled model."""
    folder = tmp_path_factory.mktemp("prune")
    source = folder / "resnet20.onnx"
    shutil.copyfile(BUNDLED, source)
    digest = sha256(source)
    result = invoke("prune", source, "--ratio", "0.4", "--round-to", "1", "--recover", "none", "-o",
                    folder / "out.onnx", "--report", folder / "report.json")
    return folder, source, digest, result


def test_prune_writes_a_valid_model(pruned_run):
    folder, _, _, result = pruned_run
    assert result.exit_code == 0, result.output
    assert f"wrote {folder / 'out.onnx'}" in result.output
    onnx.checker.check_model(str(folder / "out.onnx"), full_check=True)


def test_input_file_is_unchanged(pruned_run):
    _, source, digest, result = pruned_run
    assert result.exit_code == 0 and sha256(source) == digest


def test_report_has_costs_and_validation(pruned_run):
    folder, _, _, _ = pruned_run
    report = json.loads((folder / "report.json").read_text())
    assert report["ratio"] == 0.4 and report["criterion"] == "whc"
    for key in ("macs", "params"):
        assert 0 < report["after"][key] < report["before"][key]
    validation = report["validation"]
    assert validation["latency_ms_before"] > 0 and validation["latency_ms_after"] > 0
    assert validation["provider"].endswith("ExecutionProvider")
    assert validation["output_shapes"] == {"logits": [1, 10]}


def test_raw_prune_reports_its_collapse_and_warns(pruned_run):
    """Without recovery ResNet-20 at 0.4 is near chance: the quality says so, and a warning tells the fix."""
    folder, _, _, result = pruned_run
    report = json.loads((folder / "report.json").read_text())
    logits = report["quality"]["logits"]
    assert logits["kind"] == "classifier" and logits["metric"] == "agreement" and logits["value"] < 0.9
    assert "synthetic dead-leaves" in report["quality_on"] and "held-out" in report["quality_on"]
    assert report["warning"].startswith("warning: output 'logits' top-1 agreement")
    assert report["warning"] in result.stderr and "--calib DIR" in result.stderr
    assert report["recovery"] is None and "top-1 agreement" in result.stdout


def test_headline_command_recovers_on_synthetic_images_and_says_so(tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("prune", BUNDLED, "--ratio", "0.4", "-o", tmp_path / "out.onnx", "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["calibration"].startswith("320 built-in synthetic dead-leaves images")
    assert report["recovery"]["method"] == "lsq" and report["allocation"] is not None
    before = report["recovery"]["quality_before"]["logits"]
    assert report["quality"]["logits"]["value"] == report["recovery"]["quality_after"]["logits"] > before
    assert "calibration: 320 built-in synthetic dead-leaves images" in result.stdout
    assert "note: quality was measured on synthetic images, not on your data" in result.stderr
    # the long description of the data is said once; the lines after it name the samples
    assert result.output.count(report["calibration"]) == 1
    fitted = report["recovery"]["calibration_samples"]
    assert f"layers fitted on {fitted} samples" in result.stdout
    assert "quality vs the original, on 64 held-out samples (not used for fitting):" in result.stdout


def test_report_kept_indices_are_the_surviving_filters(pruned_run):
    """kept_by_layer lists original filter indices: the pruned weights have exactly those rows."""
    folder, source, _, _ = pruned_run
    report = json.loads((folder / "report.json").read_text())
    original, pruned = onnx.load(str(source)), onnx.load(str(folder / "out.onnx"))
    layers = {layer: (kept, group["removed_by_layer"][layer])
              for group in report["groups"] for layer, kept in group["kept_by_layer"].items()}
    assert len(layers) == 19  # every conv of ResNet-20 lost filters
    for layer, (kept, removed) in layers.items():
        assert sorted(kept + removed) == list(range(weights(original, layer).shape[0])) and removed
        assert weights(pruned, layer).shape[0] == len(kept)
    # The stem reads the image, whose channels stay: its rows are the kept originals, unchanged.
    kept, _ = layers["/conv1/Conv"]
    np.testing.assert_array_equal(weights(pruned, "/conv1/Conv"), weights(original, "/conv1/Conv")[kept])


def test_analyze_prints_groups():
    result = invoke("analyze", BUNDLED)
    assert result.exit_code == 0
    assert re.match(r"11 channel groups, 10 prunable; [\d.]+ M MACs", result.output)
    assert "/conv1/Conv" in result.output
    as_json = json.loads(invoke("analyze", BUNDLED, "--json").output)
    assert len(as_json["groups"]) == 11 and [g["prunable"] for g in as_json["groups"]].count(False) == 1


def test_analyze_prints_reasons(tmp_path):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.op("LRN", [b.relu(b.conv(x, 16, name="c1"))], size=3)
    path = tmp_path / "lrn.onnx"
    onnx.save(b.build([b.conv(b.relu(b.conv(y, 8, name="c2")), 4, name="c3")]), str(path))
    result = invoke("analyze", path)
    assert result.exit_code == 0
    assert "fixed: LRN mixes neighbouring channels" in result.output
    assert "[prunable]" in result.output  # c2 is still free


def test_exclude_keeps_the_matching_group(tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("prune", BUNDLED, "--exclude", "/conv1/*", "--round-to", "1", "--no-validate", "--recover",
                    "none", "-o", out, "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    trunk = next(g for g in report["groups"] if "/conv1/Conv" in g["producers"])
    assert not trunk["removed"] and "excluded by --exclude '/conv1/*'" in trunk["reasons"][0]
    pruned = onnx.load(str(out))
    assert out_channels(pruned, "/conv1/Conv") == 16
    assert out_channels(pruned, "/layer1/layer1.0/conv1/Conv") < 16


def test_round_to_makes_every_width_a_multiple(tmp_path):
    out = tmp_path / "out.onnx"
    result = invoke("prune", BUNDLED, "--ratio", "0.3", "--round-to", "8", "--no-validate", "--recover", "none",
                    "-o", out)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    widths = [out_channels(model, n.name) for n in model.graph.node if n.op_type == "Conv"]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 64


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "random"])
def test_criterion_option(pruned_run, tmp_path, criterion):
    report_path = tmp_path / "r.json"
    result = invoke("prune", BUNDLED, "--criterion", criterion, "--no-validate", "--recover", "none",
                    "--report", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["criterion"] == criterion and f"({criterion}, ratio 0.4)" in result.output
    whc = json.loads((pruned_run[0] / "report.json").read_text())
    assert [g["removed"] for g in report["groups"]] != [g["removed"] for g in whc["groups"]]


def test_no_validate_skips_validation(tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("prune", BUNDLED, "--no-validate", "--report", report_path)
    assert result.exit_code == 0
    assert json.loads(report_path.read_text())["validation"] is None
    assert "latency" not in result.output


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_whc.cli", *map(str, args)], capture_output=True, text=True)


def test_missing_file_is_one_line_and_exit_2(tmp_path):
    result = _run_cli("prune", tmp_path / "missing.onnx", "-o", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.onnx'}: no such file"]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "error: --ratio must be in [0, 1), got 1.5"),
    (["--ratio", "lots"], "error: --ratio must be a number in [0, 1), got 'lots'"),
])
def test_bad_option_values_are_one_line(args, message):
    result = _run_cli("prune", BUNDLED, *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr


def test_not_an_onnx_file_is_one_line(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("not a model")
    result = invoke("analyze", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")


def test_output_onto_the_input_is_refused(tmp_path):
    source = tmp_path / "m.onnx"
    shutil.copyfile(BUNDLED, source)
    digest = sha256(source)
    result = invoke("prune", source, "-o", source)
    assert result.exit_code == 2 and "-o is the input file" in result.stderr
    assert sha256(source) == digest


def test_prune_help_names_the_numbers():
    """--ratio and --target-macs take numbers: --help shows R and F, not click's TEXT."""
    result = invoke("prune", "--help")
    assert result.exit_code == 0
    shown = dict(re.findall(r"(--ratio|--target-macs) (\S+)", result.output))
    assert shown == {"--ratio": "R", "--target-macs": "F"}, result.output
    for line in result.output.splitlines():
        if "--ratio" in line.split("  ")[0] or "--target-macs" in line.split("  ")[0]:
            assert "TEXT" not in line, line

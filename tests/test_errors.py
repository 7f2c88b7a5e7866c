"""Nothing breaks, nothing is lost: every bad input ends in one clear line and its exit code.

Exit codes: 0 success (also "nothing to prune"), 1 the pruned model failed validation, 2 bad
input or usage, 3 an internal error. Every failure prints exactly one `error: ...` line on
stderr, never a traceback, and never touches the input or an existing output file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_whc.api
from onnx_whc.cli import main
from onnx_whc.errors import ValidationError

from .fuzz.builder import Net

# ---- helpers ---------------------------------------------------------------------------------


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result, code: int) -> str:
    """The single `error:` line of a failed run, after checking exit code and the absence of a traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().endswith(errors[0])  # the last word on stderr
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".onnx-whc-") or p.suffix == ".tmp")


def small_net(opset: int = 17, batch="N", width: int = 8) -> Net:
    net = Net(opset, seed=1, batch=batch)
    x = net.input(3, 16, 16)
    y = net.act(net.conv(net.act(net.conv(x, width), "Relu"), width), "Relu")
    net.output(net.head(y, 4))
    return net


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(small_net().model(), path)
    return path


def graph_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


# ---- files that are not (valid) ONNX models --------------------------------------------------

def test_missing_file(tmp_path):
    line = error_line(cli("prune", tmp_path / "nope.onnx"), 2)
    assert line == f"error: {tmp_path / 'nope.onnx'}: no such file"


@pytest.mark.parametrize("content, expected", [
    (b"this is a text file, not a model\n", "a text file, not an ONNX model"),
    (np.random.default_rng(0).bytes(4096), "not an ONNX model (it does not parse as one: truncated, corrupt"),
    (b"", "not an ONNX model (no graph found)"),
], ids=["text", "random-bytes", "empty"])
def test_not_an_onnx_file(tmp_path, content, expected):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    line = error_line(cli("prune", path), 2)
    assert str(path) in line and expected in line


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_protobuf(tmp_path, model_path, keep):
    data = model_path.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:int(len(data) * keep)])
    line = error_line(cli("prune", path), 2)
    assert "ONNX model" in line


def test_undefined_tensor_is_an_invalid_model(tmp_path):
    """A renamed tensor leaves a node reading nothing: the checker names it."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["ghost"], ["y"], name="r2")]
    path = tmp_path / "dangling.onnx"
    onnx.save(graph_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 3, 4, 4])]), path)
    line = error_line(cli("prune", path), 2)
    assert "not a valid ONNX model" in line and "ghost" in line


def test_name_that_is_not_utf8(tmp_path, model_path):
    model = onnx.load(model_path)
    model.graph.node[0].name = "NAME_TO_BREAK"
    data = model.SerializeToString().replace(b"NAME_TO_BREAK", b"NAME\xff\xfeO_BREAK")
    path = tmp_path / "latin.onnx"
    path.write_bytes(data)
    line = error_line(cli("prune", path), 2)
    assert "not a valid ONNX model" in line and "UTF-8" in line


def test_shapes_that_do_not_add_up(tmp_path):
    """Add of 8 and 4 channels parses and passes the checker, but cannot run."""
    w8 = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w8")
    w4 = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w4")
    nodes = [helper.make_node("Conv", ["x", "w8"], ["a"], name="c8"),
             helper.make_node("Conv", ["x", "w4"], ["b"], name="c4"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    path = tmp_path / "mismatch.onnx"
    onnx.save(graph_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", None)], [w8, w4]), path)
    line = error_line(cli("prune", path), 2)
    assert "shape inference failed" in line and "add" in line


def test_external_data_file_missing(tmp_path):
    model = small_net().model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    (tmp_path / "ext.weights").unlink()
    line = error_line(cli("prune", path), 2)
    assert "external data file 'ext.weights'" in line and "missing" in line


def _linked_outside(folder: Path, data: Path) -> str:
    os.symlink(os.path.join("..", data.name), folder / "link.bin")
    return "link.bin"


# How a model names weights that sit outside its folder, and what the error line then says.
OUTSIDE_LOCATIONS = {
    "parent": (lambda folder, data: "../outside.bin", "lies outside the model's folder"),
    "nested-parent": (lambda folder, data: "sub/../../outside.bin", "lies outside the model's folder"),
    "absolute": (lambda folder, data: str(data), "is an absolute path, not a file inside the model's folder"),
    "symlink": (_linked_outside, "lies outside the model's folder (through a symbolic link)"),
}


def external_outside(tmp_path: Path, how: str) -> tuple[Path, Path, str]:
    """A model in tmp/model/ whose weights are tmp/outside.bin, reached as OUTSIDE_LOCATIONS[how] says."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(small_net().model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    data = tmp_path / "outside.bin"
    (folder / "w.bin").rename(data)
    location = OUTSIDE_LOCATIONS[how][0](folder, data)
    model = onnx.load(path, load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)
    return path, data, location


@pytest.mark.parametrize("how", sorted(OUTSIDE_LOCATIONS))
def test_external_data_outside_the_model_folder(tmp_path, how):
    """onnx refuses such weights: bad input (exit 2, one line), never an internal error, nothing touched."""
    path, data, location = external_outside(tmp_path, how)
    before = digest(path), digest(data)
    out = tmp_path / "out.onnx"
    for args in (["prune", path], ["prune", path, "-o", out], ["prune", path, "-o", data], ["analyze", path]):
        line = error_line(cli(*args), 2)
        assert line == (f"error: {path}: its external data '{location}' (tensor 'w_1') "
                        f"{OUTSIDE_LOCATIONS[how][1]}; onnx refuses to read it")
    assert (digest(path), digest(data)) == before
    assert not out.exists() and leftovers(tmp_path) == [] and leftovers(path.parent) == []


@pytest.mark.parametrize("how", ["parent", "absolute"])
def test_onnx_refusing_external_data_is_bad_input(tmp_path, how, monkeypatch):
    """Should onnx refuse a location our own check lets through, its refusal is still one line, exit 2."""
    path, data, location = external_outside(tmp_path, how)
    monkeypatch.setattr("onnx_whc.graph.storage.external_location_problem", lambda folder, location: None)
    line = error_line(cli("prune", path), 2)
    assert line.startswith(f"error: {path}: onnx refuses to read its external data (")
    assert location in line


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "a\0b", ""])
def test_external_data_files_skips_locations_outside(tmp_path, location):
    """The -o safety check lists only weights loading would read, and never fails on odd locations."""
    path = tmp_path / "m.onnx"
    onnx.save(small_net().model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    assert onnx_whc.graph.storage.external_data_files(str(path)) == [str(tmp_path / "w.bin")]
    model = onnx.load(path, load_external_data=False)
    tensor = next(t for t in model.graph.initializer if onnx.external_data_helper.uses_external_data(t))
    next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save(model, path)
    assert onnx_whc.graph.storage.external_data_files(str(path)) == [str(tmp_path / "w.bin")]  # the other tensors'
    line = error_line(cli("prune", path, "-o", tmp_path / "out.onnx"), 2)
    assert line.startswith(f"error: {path}: ")


def test_folder_as_model(tmp_path):
    result = cli("prune", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr and "Traceback" not in result.output


# ---- models with nothing to prune: exit 0, and a copy only when asked for -------------------

def _no_conv_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((48, 4), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"])]
    return graph_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 4])], [w, b])


def _no_filter_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["y"])]
    return graph_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 48])], [])


def _conv_feeds_output_model() -> onnx.ModelProto:
    net = Net(17, seed=0)
    net.output(net.conv(net.input(3, 8, 8), 6))
    return net.model()


@pytest.mark.parametrize("make, why", [
    (_no_filter_model, "the model has no Conv, Gemm or MatMul filters to remove"),
    (_no_conv_model, "no channel group can be pruned (group 0: feeds graph output 'y')"),
    (_conv_feeds_output_model, "no channel group can be pruned (group 0: feeds graph output 'conv_3')"),
], ids=["no-filter", "no-conv", "no-prunable-group"])
def test_nothing_to_prune(tmp_path, make, why):
    source = tmp_path / "in.onnx"
    onnx.save(make(), source)
    result = cli("prune", source)
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert f"nothing to prune: {why}; nothing written (no -o given)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]

    result = cli("prune", source, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0
    assert f"nothing to prune: {why}; copied the input unchanged (byte-identical) to" in result.stdout
    assert (tmp_path / "out.onnx").read_bytes() == source.read_bytes()


def test_nothing_to_prune_copies_external_data_too(tmp_path):
    source_dir, out_dir = tmp_path / "in", tmp_path / "out"
    source_dir.mkdir()
    out_dir.mkdir()
    source = source_dir / "m.onnx"
    onnx.save(_no_conv_model(), source, save_as_external_data=True, location="m.bin", size_threshold=0)
    assert cli("prune", source, "-o", out_dir / "copy.onnx").exit_code == 0
    assert (out_dir / "copy.onnx").read_bytes() == source.read_bytes()
    assert (out_dir / "m.bin").read_bytes() == (source_dir / "m.bin").read_bytes()
    onnx.checker.check_model(str(out_dir / "copy.onnx"))


def test_ratio_too_small_to_remove_a_channel(model_path, tmp_path):
    result = cli("prune", model_path, "--ratio", "0.05", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0
    assert "nothing to prune: ratio 0.05 removes no whole channel from any prunable group" in result.stdout
    assert digest(tmp_path / "out.onnx") == digest(model_path)


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, expected", [
    ("1", "--ratio must be in [0, 1), got 1"),
    ("1.5", "--ratio must be in [0, 1), got 1.5"),
    ("-0.1", "--ratio must be in [0, 1), got -0.1"),
    ("nan", "--ratio must be in [0, 1), got nan"),
    ("abc", "--ratio must be a number in [0, 1), got 'abc'"),
    ("", "--ratio must be a number in [0, 1), got ''"),
])
def test_bad_ratio(model_path, ratio, expected):
    assert error_line(cli("prune", model_path, "--ratio", ratio), 2) == f"error: {expected}"


@pytest.mark.parametrize("value, expected", [
    ("foo", "is not NAME:DxDxD"),
    ("input:1x3xAx16", "is not NAME:DxDxD"),
    ("input:", "is not NAME:DxDxD"),
    (":1x3x16x16", "is not NAME:DxDxD"),
    ("input:0x3x16x16", "is not NAME:DxDxD"),
    ("image:1x3x16x16", "--input-shape names no model input: image (inputs: input)"),
    ("input:1x3x16", "rank 3 does not match the model's 4"),
    ("input:1x4x16x16", "1x4x16x16 conflicts with the model's Nx3x16x16"),
])
def test_bad_input_shape(model_path, value, expected):
    line = error_line(cli("prune", model_path, "--input-shape", value), 2)
    assert expected in line


def test_dynamic_image_size_is_measured_at_a_stated_size(tmp_path):
    net = Net(17, seed=0)
    x = net.input(3, 16, 16, dims=["N", 3, "H", "W"])
    net.output(net.head(net.act(net.conv(net.act(net.conv(x, 8)), 8)), 4))
    path = tmp_path / "dynamic.onnx"
    onnx.save(net.model(), path)
    said = ("size: input 'input' is Nx3xHxW: measured at 1x3x224x224 (the default; --input-shape to choose); "
            "the pruned model keeps the dynamic size")
    result = cli("analyze", path)
    assert result.exit_code == 0 and said in result.output, result.output
    for shape in ((), ("--input-shape", "input:1x3x16x16")):
        out = tmp_path / "out.onnx"
        result = cli("prune", path, *shape, "--recover", "none", "--no-synthetic", "-o", out)
        assert result.exit_code == 0, result.output
        assert (said in result.output) == (not shape)
        assert [d.dim_param for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim] == \
            ["N", "", "H", "W"]


def test_dynamic_dims_that_are_not_an_image_size_need_input_shape(tmp_path):
    net = Net(17, seed=0)
    x = net.input(3, 16, 16, dims=["N", "C", "H", "W"])
    net.output(net.act(net.conv(x, 8)))
    path = tmp_path / "dynamic.onnx"
    onnx.save(net.model(), path)
    line = error_line(cli("prune", path), 2)
    assert line == "error: input 'input' has dynamic dimensions NxCxHxW; give --input-shape input:1x?x?x?"


@pytest.mark.parametrize("args, expected", [
    (["--bogus"], "No such option"),
    (["--round-to", "x"], "--round-to must be a whole number or 'measured', got 'x'"),
    (["--criterion", "magic"], "'magic' is not one of"),
])
def test_usage_errors_exit_2(model_path, args, expected):
    result = cli("prune", model_path, *args)
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.output


def test_round_to_below_one(model_path):
    assert error_line(cli("prune", model_path, "--round-to", "0"), 2) == "error: --round-to must be at least 1"


def test_unknown_provider_fails_before_pruning(model_path, monkeypatch):
    monkeypatch.setattr(onnx_whc.api, "load", lambda *a, **k: pytest.fail("loaded before checking --provider"))
    line = error_line(cli("prune", model_path, "--provider", "tpu"), 2)
    assert line.startswith("error: --provider tpu is not available")


# ---- where the result goes ---------------------------------------------------------------------

def test_output_is_the_input(tmp_path, model_path):
    before = digest(model_path)
    (tmp_path / "sub").mkdir()
    os.symlink(model_path, tmp_path / "link.onnx")
    os.link(model_path, tmp_path / "hard.onnx")
    for target in (model_path, tmp_path / "sub" / ".." / "model.onnx", tmp_path / "link.onnx",
                   tmp_path / "hard.onnx"):
        line = error_line(cli("prune", model_path, "-o", target), 2)
        assert line == "error: -o is the input file: choose another path (the input is never overwritten)"
    line = error_line(cli("prune", tmp_path / "link.onnx", "-o", model_path), 2)
    assert "-o is the input file" in line
    assert digest(model_path) == before


def test_output_folder_missing(tmp_path, model_path):
    target = tmp_path / "no" / "such" / "out.onnx"
    line = error_line(cli("prune", model_path, "-o", target), 2)
    assert line == f"error: -o {target}: {target.parent} does not exist"


def test_output_under_a_regular_file(tmp_path, model_path):
    """Works as root too: nothing can be created below a file."""
    target = model_path / "out.onnx"
    line = error_line(cli("prune", model_path, "-o", target), 2)
    assert line == f"error: -o {target}: {model_path} is not a folder"
    line = error_line(cli("prune", model_path, "--report", target), 2)
    assert line.startswith(f"error: --report {target}")


def test_output_folder_not_writable(tmp_path, model_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (see test_output_in_proc)")
        line = error_line(cli("prune", model_path, "-o", folder / "out.onnx"), 2)
        assert "cannot write in" in line and str(folder) in line
    finally:
        folder.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_in_proc(model_path, monkeypatch):
    """/proc refuses new files even to root: the unwritable folder every Linux has."""
    monkeypatch.setattr(onnx_whc.api, "load", lambda *a, **k: pytest.fail("pruned before checking -o"))
    line = error_line(cli("prune", model_path, "-o", "/proc/out.onnx"), 2)
    assert line.startswith("error: -o /proc/out.onnx: cannot write in /proc")


# ---- calibration data ------------------------------------------------------------------------

def _calib_error(model_path: Path, calib: Path) -> str:
    return error_line(cli("prune", model_path, "--calib", calib, "-o", model_path.parent / "out.onnx"), 2)


def test_calib_not_images_or_arrays(tmp_path, model_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("hello")
    assert _calib_error(model_path, calib).endswith(f"--calib {calib}: not a folder, .npy or .npz")


def test_calib_shape_mismatch(tmp_path, model_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 3, 8, 8), np.float32))
    line = _calib_error(model_path, calib)
    assert f"--calib {calib}" in line and "(4, 3, 8, 8)" in line and "does not match" in line


def test_calib_folder_without_images(tmp_path, model_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no pictures here")
    assert "no images found" in _calib_error(model_path, tmp_path / "images")


# ---- quantized models --------------------------------------------------------------------------

def _qdq_model():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Conv", ["d", "w"], ["y"])]
    return graph_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 4, 4, 4])], [w, scale, zero])


def _qlinearconv_model():
    inits = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in [
        ("xs", 0.1, np.float32), ("xz", 0, np.uint8), ("w", np.ones((4, 3, 1, 1)), np.int8), ("ws", 0.1, np.float32),
        ("wz", 0, np.int8), ("ys", 0.1, np.float32), ("yz", 0, np.uint8)]]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    return graph_model([node], [tensor("x", [1, 3, 4, 4], TensorProto.UINT8)],
                       [tensor("y", [1, 4, 4, 4], TensorProto.UINT8)], inits)


def _int8_weights_model():
    """Weight-only quantization: int8 weights cast and scaled right before the Conv."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w8")
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    nodes = [helper.make_node("Cast", ["w8"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["wf", "s"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return graph_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 4, 4, 4])], [w, scale])


@pytest.mark.parametrize("make, what", [
    (_qdq_model, "DequantizeLinear, QuantizeLinear"),
    (_qlinearconv_model, "QLinearConv"),
    (_int8_weights_model, "integer Conv weights"),
], ids=["qdq", "qlinearconv", "int8-weights"])
def test_quantized_models_are_refused(tmp_path, make, what):
    path = tmp_path / "q.onnx"
    onnx.save(make(), path)
    line = error_line(cli("prune", path), 2)
    assert line == f"error: the model is quantized ({what}): prune before quantization"


# ---- internal errors stay one line -----------------------------------------------------------

def test_internal_error_is_one_line(model_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("index 7 out of range\nmore detail")

    monkeypatch.setattr(onnx_whc.pipeline, "analyze_channels", broken)
    line = error_line(cli("prune", model_path), 3)
    assert line.startswith("error: internal error (RuntimeError: index 7 out of range); please report it")


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "missing.onnx",
    lambda tmp: (tmp / "junk.onnx").write_bytes(b"\x08\x96\x01 junk") and tmp / "junk.onnx",
    lambda tmp: external_outside(tmp, "parent")[0],
    lambda tmp: external_outside(tmp, "absolute")[0],
], ids=["missing", "junk", "external-data-parent", "external-data-absolute"])
def test_real_entry_point_prints_one_line(tmp_path, make):
    """The installed command, in its own process: exit code 2 and one line, no traceback."""
    path = make(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onnx_whc.cli", "prune", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---- nothing is lost ---------------------------------------------------------------------------

def test_input_file_never_changes(tmp_path, model_path):
    before = digest(model_path)
    assert cli("prune", model_path, "--ratio", "0.5", "-o", tmp_path / "out.onnx").exit_code == 0
    assert cli("prune", model_path, "--ratio", "2").exit_code == 2
    assert digest(model_path) == before


@pytest.mark.parametrize("opset", [7, 17])
def test_model_proto_argument_never_changes(opset):
    """IR 3 models list weights among the inputs; loading works on a copy, not the caller's model."""
    model = small_net(opset).model()
    before = model.SerializeToString()
    onnx_whc.prune(model, ratio=0.5, validate=False)
    assert model.SerializeToString() == before


def _existing_output(tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier result the user wants to keep")
    return out, digest(out)


def test_failed_validation_keeps_existing_output(tmp_path, model_path, monkeypatch):
    out, before = _existing_output(tmp_path)

    def failing(*args, **kwargs):
        raise ValidationError("output 'gemm_9' changed shape: (2, 4) -> (2, 3)")

    monkeypatch.setattr(onnx_whc.api, "validate_models", failing)
    line = error_line(cli("prune", model_path, "--round-to", "1", "-o", out), 1)
    assert line == "error: output 'gemm_9' changed shape: (2, 4) -> (2, 3)"
    assert digest(out) == before and leftovers(tmp_path) == []


def test_failed_validation_writes_nothing(tmp_path, model_path, monkeypatch):
    def failing(*args, **kwargs):
        raise ValidationError("the pruned model does not run: broken")

    monkeypatch.setattr(onnx_whc.api, "validate_models", failing)
    error_line(cli("prune", model_path, "--round-to", "1", "-o", tmp_path / "new.onnx"), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_validation_comes_before_saving(tmp_path, model_path, monkeypatch):
    calls = []
    validate, save = onnx_whc.api.validate_models, onnx_whc.api.save
    monkeypatch.setattr(onnx_whc.api, "validate_models", lambda *a, **k: calls.append("validate") or validate(*a, **k))
    monkeypatch.setattr("onnx_whc.cli.save", lambda *a, **k: calls.append("save") or save(*a, **k))
    assert cli("prune", model_path, "--round-to", "1", "-o", tmp_path / "out.onnx").exit_code == 0
    assert calls == ["validate", "save"]


def test_interrupted_save_keeps_existing_output(tmp_path, model_path, monkeypatch):
    out, before = _existing_output(tmp_path)
    real_save = onnx.save

    def interrupted(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:100])  # half a file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", interrupted)
    result = cli("prune", model_path, "--round-to", "1", "-o", out, "--no-validate")
    monkeypatch.setattr(onnx, "save", real_save)
    assert result.exit_code == 130 and "interrupted: nothing was written" in result.stderr
    assert digest(out) == before and leftovers(tmp_path) == []


def lower_proto_limit(monkeypatch, limit: int = 1000) -> None:
    """Make every stage treat a small model as one over protobuf's 2 GB."""
    for name in ("onnx_whc.graph.storage.PROTO_LIMIT",):
        monkeypatch.setattr(name, limit)


def test_large_models_get_external_data(tmp_path, monkeypatch):
    """Over the 2 GB protobuf limit (lowered here) weights go to <output>.data beside the output."""
    model_path = tmp_path / "wide.onnx"
    onnx.save(small_net(width=16).model(), model_path)  # pruned weights over the 1 kB kept inline
    expected, _ = onnx_whc.prune(model_path, ratio=0.5, round_to=1, validate=False)
    lower_proto_limit(monkeypatch)
    out = tmp_path / "big.onnx"
    result = cli("prune", model_path, "--ratio", "0.5", "--round-to", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "big.onnx.data").stat().st_size > out.stat().st_size
    assert leftovers(tmp_path) == []
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    cpu = ["CPUExecutionProvider"]
    got = ort.InferenceSession(str(out), providers=cpu).run(None, {"input": x})
    want = ort.InferenceSession(expected.SerializeToString(), providers=cpu).run(None, {"input": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_saving_a_large_model_leaves_it_whole(tmp_path, monkeypatch):
    model = small_net().model()
    before = model.SerializeToString()
    lower_proto_limit(monkeypatch)
    onnx_whc.save(model, tmp_path / "m.onnx")
    assert model.SerializeToString() == before
    assert (tmp_path / "m.onnx.data").exists()


def test_large_input_with_external_data(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(small_net().model(), source, save_as_external_data=True, location="in.weights", size_threshold=0)
    before = digest(source), digest(tmp_path / "in.weights")
    result = cli("prune", source, "--ratio", "0.5", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert (digest(source), digest(tmp_path / "in.weights")) == before
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


@pytest.mark.parametrize("location, target", [("in.weights", "in.weights"), ("out.onnx.data", "out.onnx")])
def test_output_would_overwrite_the_inputs_weights(tmp_path, location, target):
    """The input's external data is part of the input: neither -o nor the <-o>.data beside it may hit it."""
    source, data = tmp_path / "in.onnx", tmp_path / location
    onnx.save(small_net().model(), source, save_as_external_data=True, location=location, size_threshold=0)
    before = digest(data)
    line = error_line(cli("prune", source, "-o", tmp_path / target), 2)
    assert line == f"error: -o {tmp_path / target} would overwrite the input's weights in {data}: choose another path"
    assert digest(data) == before

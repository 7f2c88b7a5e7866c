"""Tests for loading calibration inputs from image folders, .npy and .npz files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_whc.data.calibration import Preprocess, load_calibration
from onnx_whc.errors import UserInputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ONE_INPUT = {"input": ("batch", 3, 6, 8)}

# Uniform colours make each image recognisable from any one pixel of the loaded batch.
COLOURS = [(10, 20, 30), (40, 50, 60), (70, 80, 90), (100, 110, 120), (130, 140, 150)]


def _write_image(path: Path, colour, size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def image_dir(tmp_path):
    """Five 8x6 PNGs, some in a subfolder, plus a file that is not an image."""
    for i, colour in enumerate(COLOURS):
        _write_image(tmp_path / ("sub" if i % 2 else "") / f"img{i}.png", colour)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _colour_of(batch: np.ndarray, row: int) -> tuple:
    """Undo the normalisation of one pixel to get back the 0..255 RGB value."""
    pixel = batch[row, :, 0, 0] * np.array(STD) + np.array(MEAN)
    return tuple(int(v) for v in np.round(pixel * 255))


def _message(call) -> str:
    """The UserInputError message raised by `call`, checked to be a single line."""
    with pytest.raises(UserInputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_folder_gives_normalised_nchw_batch(image_dir):
    batch = load_calibration(image_dir, ONE_INPUT)["input"]
    assert batch.shape == (5, 3, 6, 8) and batch.dtype == np.float32
    # Sorted order is img0.png, img2.png, img4.png, sub/img1.png, sub/img3.png.
    expected = [(v / 255 - m) / s for v, m, s in zip(COLOURS[0], MEAN, STD)]
    np.testing.assert_allclose(batch[0, :, 5, 7], expected, rtol=1e-6)
    assert [_colour_of(batch, i) for i in range(5)] == [COLOURS[i] for i in (0, 2, 4, 1, 3)]


def test_folder_nhwc_layout(image_dir):
    batch = load_calibration(image_dir, {"x": (None, 6, 8, 3)}, preprocess=Preprocess(layout="NHWC"))["x"]
    assert batch.shape == (5, 6, 8, 3)
    np.testing.assert_allclose(batch[0, 0, 0], [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                                               (30 / 255 - 0.406) / 0.225], rtol=1e-6)


def test_folder_resized_to_static_model_size(image_dir):
    batch = load_calibration(image_dir, {"input": (None, 3, 4, 5)})["input"]
    assert batch.shape == (5, 3, 4, 5)
    assert _colour_of(batch, 0) == COLOURS[0]


def test_folder_resize_short_side_then_center_crop(tmp_path):
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 10:] = 255  # right half white: the centre crop must straddle the edge
    Image.fromarray(image).save(tmp_path / "wide.png")
    batch = load_calibration(tmp_path, {"input": (None, 3, 8, 8)},
                             preprocess=Preprocess(mean=(0, 0, 0), std=(1, 1, 1), resize=8, crop=8))["input"]
    assert batch.shape == (1, 3, 8, 8)
    assert batch[0, 0, 4, 0] == 0.0 and batch[0, 0, 4, 7] == 1.0


def test_folder_subset_is_seeded(image_dir):
    def colours(seed):
        batch = load_calibration(image_dir, ONE_INPUT, size=3, seed=seed)["input"]
        assert batch.shape == (3, 3, 6, 8)
        return [_colour_of(batch, i) for i in range(3)]

    assert colours(0) == colours(0)
    assert len({tuple(colours(seed)) for seed in range(6)}) > 1


def test_size_above_available_keeps_everything(image_dir):
    assert load_calibration(image_dir, ONE_INPUT, size=50)["input"].shape[0] == 5


def test_npy_used_as_is(tmp_path):
    data = np.random.default_rng(0).standard_normal((4, 3, 6, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    out = load_calibration(tmp_path / "calib.npy", ONE_INPUT)["input"]
    np.testing.assert_array_equal(out, data)
    np.testing.assert_array_equal(load_calibration(tmp_path / "calib.npy", ONE_INPUT, size=2)["input"], data[:2])


def test_npy_float64_becomes_float32_and_dynamic_dims_accept_any_size(tmp_path):
    np.save(tmp_path / "calib.npy", np.ones((2, 3, 5, 7)))
    out = load_calibration(tmp_path / "calib.npy", {"input": ("batch", 3, None, "width")})["input"]
    assert out.shape == (2, 3, 5, 7) and out.dtype == np.float32


def test_fixed_batch_dim_takes_any_number_of_samples(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 6, 8), np.float32))
    assert load_calibration(tmp_path / "calib.npy", {"input": (1, 3, 6, 8)})["input"].shape == (4, 3, 6, 8)


def test_npz_multi_input(tmp_path):
    arrays = {"image": np.zeros((3, 3, 4, 4), np.float32), "extra": np.ones((3, 5), np.float32)}
    np.savez(tmp_path / "calib.npz", **arrays, unused=np.zeros(1))
    out = load_calibration(tmp_path / "calib.npz", {"image": (None, 3, 4, 4), "extra": (None, 5)}, size=2)
    assert set(out) == {"image", "extra"}
    assert out["image"].shape == (2, 3, 4, 4) and out["extra"].shape == (2, 5)


def test_npz_single_input(tmp_path):
    np.savez(tmp_path / "calib.npz", input=np.zeros((2, 3, 6, 8), np.float32))
    assert load_calibration(tmp_path / "calib.npz", ONE_INPUT)["input"].shape == (2, 3, 6, 8)


def test_npy_shape_mismatch_names_both_shapes(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((10, 3, 28, 28), np.float32))
    message = _message(lambda: load_calibration(path, {"input": ("batch", 3, 32, 32)}))
    assert message == (f"--calib {path}: array shape (10, 3, 28, 28) does not match "
                       "model input 'input' of shape (batch, 3, 32, 32)")


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "no such file or folder"),
    (lambda d: _touch(d / "model.txt"), "not a folder, .npy or .npz"),
    (lambda d: _touch(d / "broken.npy", b"garbage"), "cannot read"),
    (lambda d: _touch(d / "broken.npz", b"garbage"), "cannot read"),
])
def test_bad_paths(tmp_path, make, expected):
    assert expected in _message(lambda: load_calibration(make(tmp_path), ONE_INPUT))


def _touch(path: Path, content: bytes = b"") -> Path:
    path.write_bytes(content)
    return path


def test_empty_folder(tmp_path):
    message = _message(lambda: load_calibration(tmp_path, ONE_INPUT))
    assert message == f"--calib {tmp_path}: no images found (looked for .jpg, .jpeg, .png, .bmp, .webp)"


def test_unreadable_image_is_named(image_dir):
    (image_dir / "zz_bad.jpg").write_bytes(b"not really a jpeg")
    message = _message(lambda: load_calibration(image_dir, ONE_INPUT))
    assert "cannot read image" in message and "zz_bad.jpg" in message


def test_folder_for_multi_input_model(image_dir):
    message = _message(lambda: load_calibration(image_dir, {"a": (None, 3, 6, 8), "b": (None, 5)}))
    assert "single-input" in message and "'a', 'b'" in message


def test_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 5), np.float32))
    assert "single-input" in _message(lambda: load_calibration(tmp_path / "x.npy", {"a": (None, 5), "b": (None, 5)}))


def test_npz_missing_input_is_named(tmp_path):
    np.savez(tmp_path / "c.npz", a=np.zeros((2, 5), np.float32))
    message = _message(lambda: load_calibration(tmp_path / "c.npz", {"a": (None, 5), "b": (None, 5)}))
    assert "no array for model input 'b'" in message and "'a'" in message


def test_npz_batch_sizes_differ(tmp_path):
    np.savez(tmp_path / "c.npz", a=np.zeros((2, 5), np.float32), b=np.zeros((3, 5), np.float32))
    assert "different numbers of samples" in _message(
        lambda: load_calibration(tmp_path / "c.npz", {"a": (None, 5), "b": (None, 5)}))


def test_integer_array_rejected(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 6, 8), np.int64))
    assert "dtype int64" in _message(lambda: load_calibration(tmp_path / "x.npy", ONE_INPUT))


def test_scalar_array_rejected(tmp_path):
    np.save(tmp_path / "x.npy", np.float32(1.0))
    assert "array shape ()" in _message(lambda: load_calibration(tmp_path / "x.npy", ONE_INPUT, size=1))


def test_empty_array_rejected(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((0, 3, 6, 8), np.float32))
    assert "no samples" in _message(lambda: load_calibration(tmp_path / "x.npy", ONE_INPUT))


def test_images_of_different_sizes_with_dynamic_model_size(image_dir):
    _write_image(image_dir / "odd.png", (0, 0, 0), size=(9, 9))
    assert "differ in size" in _message(lambda: load_calibration(image_dir, {"input": (None, 3, None, None)}))


def test_crop_larger_than_image(image_dir):
    message = _message(lambda: load_calibration(image_dir, {"input": (None, 3, 16, 16)},
                                                preprocess=Preprocess(crop=16)))
    assert "smaller than the 16x16 crop" in message


def test_preprocess_output_not_matching_model(image_dir):
    message = _message(lambda: load_calibration(image_dir, ONE_INPUT, preprocess=Preprocess(resize=4, crop=4)))
    assert "(5, 3, 4, 4)" in message and "(batch, 3, 6, 8)" in message


def test_model_with_non_rgb_channels(image_dir):
    assert "3-channel RGB" in _message(lambda: load_calibration(image_dir, {"input": (None, 1, 6, 8)}))


def test_bad_options():
    assert "NCHW or NHWC" in _message(lambda: Preprocess(layout="CHW"))
    assert "three values" in _message(lambda: Preprocess(mean=(0.5,)))
    assert "at least 1" in _message(lambda: load_calibration("anything.npy", ONE_INPUT, size=0))


def _shared(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def test_shared_cifar_folder_subset():
    folder = _shared("data", "cifar10-test")
    batch = np.asarray(load_calibration(folder, {"input": ("batch", 3, 32, 32)}, size=8)["input"])
    assert batch.shape == (8, 3, 32, 32) and np.isfinite(batch).all()
    assert -2.2 < batch.min() < batch.max() < 2.7  # the ImageNet-normalised range of 0..255


def test_shared_imagenet_resize_and_crop():
    folder = _shared("data", "imagenet-sample")
    preprocess = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, resize=256, crop=224)
    batch = load_calibration(folder, {"input": ("batch", 3, 224, 224)}, size=4, preprocess=preprocess)["input"]
    batch = np.asarray(batch)
    assert batch.shape == (4, 3, 224, 224) and -1.0 <= batch.min() < batch.max() <= 1.0

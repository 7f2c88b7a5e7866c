"""Calibration data for recovery, allocation and quality: loaded, checked, cast and split once.

A `Calibration` comes from a folder of images, an .npy, an .npz or arrays given to the API, or,
when the user has none and the model takes images, from built-in dead-leaves pictures
(`onnx_whc.data.deadleaves`), refined by model inversion where the model allows it
(`onnx_whc.data.inversion`). It holds the samples the stages fit on, the held-out samples quality is
measured on, and a sentence saying what they are, so every number can name its data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from PIL import Image

from onnx_whc.data.inversion import InversionSettings, NotInvertible, gradient_model, refine
from onnx_whc.data.samples import PixelFile, Samples
from onnx_whc.errors import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Pillow raises a zoo of exception types for broken or hostile files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs.

    Pixels are read as RGB and divided by 255, then normalised with `mean` and `std`
    (defaults: the ImageNet statistics). `resize` scales the short side to that many pixels
    (bilinear), then `crop` takes a centred square. With neither set, images are resized to
    the model input's height and width when those are fixed. `layout` is "NCHW" or "NHWC".
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: int | None = None
    crop: int | None = None
    layout: str = "NCHW"
    # With neither resize nor crop: resize the short side to size / crop_fraction, then crop the
    # model's (square) input size: the ImageNet evaluation recipe (0.875: 256 -> 224).
    crop_fraction: float | None = None
    # Scale to fit the model's input size, aspect kept, and pad the rest with this grey level
    # (YOLO's letterbox, pad 114) instead of stretching.
    letterbox: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise UserInputError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserInputError("mean and std need three values each, one per RGB channel")
        if any(s == 0 for s in self.std):
            raise UserInputError(f"std must not contain zero, got {self.std}")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserInputError(f"{name} must be a positive number of pixels, got {value}")


# name -> (mean, std, resize rule): "crop" resizes the short side to size / 0.875 and crops the model's
# input size (the ImageNet evaluation recipe); "fit" resizes straight to the input size.
PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "crop"),  # torchvision classifiers
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "crop"),  # [-1, 1]: TF/Keras, EfficientNet-Lite
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "fit"),  # CIFAR-10's own statistics
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "fit"),  # x / 255 only: most detectors
    "yolo": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "letterbox"),  # x / 255, letterboxed on grey 114: ultralytics
}
LETTERBOX_PAD = 114
SYNTHETIC_SAMPLES = 320  # dead-leaves images made when the user gives no calibration data
# Model inversion's budget: images x steps x cost per image (64 of EfficientNet-Lite0's 224x224
# images, about 2 minutes on 2 cores: 128 measured no better); fewer than MIN_REFINED images are
# not worth it. An image's cost is its MACs plus the optimiser's work per input value, measured
# here at about 150 MACs' worth.
INVERSION_MACS = 64 * 20 * 410e6
INVERSION_VALUE_MACS = 150
# On 32x32 CIFAR ResNets refined images measured worse than plain dead leaves (ResNet-56 at --ratio 0.4:
# 72.3% against 76.3%; ResNet-20 55.2% against 63.4%): a few pixels push so small an image to a class.
MIN_INVERSION_SIDE = 64
MIN_REFINED = 32
INVERSION_BATCH_MACS = 3e9  # images per gradient run: 8 at 224x224, up to 64 of small ones
MAX_HELD_OUT = 256  # calibration samples kept apart for the quality figures


def preset_preprocess(name: str | None, layout: str = "NCHW", mean=None, std=None, resize=None,
                      crop=None) -> Preprocess:
    """A `Preprocess` from a preset name (None or "none": the defaults), explicit values overriding it."""
    if name not in (None, "none", *PRESETS):
        raise UserInputError(f"unknown --calib-preset '{name}' (choose from none, {', '.join(PRESETS)})")
    base_mean, base_std, rule = PRESETS.get(name, (Preprocess.mean, Preprocess.std, "fit"))
    fraction = 0.875 if rule == "crop" else None
    pad = LETTERBOX_PAD if rule == "letterbox" and resize is None and crop is None else None
    return Preprocess(tuple(mean or base_mean), tuple(std or base_std), resize, crop, layout, fraction, pad)


@dataclass(frozen=True)
class Calibration:
    """Samples keyed by input name, in the model's input types, and what they are.

    `fit` feeds statistics, allocation and recovery; `held` is kept apart for measuring quality
    (empty when there were too few samples to spare any: quality then says it is measured on `fit`).
    Both are `Samples`, read a chunk at a time (arrays given are wrapped as they are).
    """

    fit: dict[str, Samples]
    held: dict[str, Samples]
    source: str  # e.g. "500 images from calib/", "320 built-in synthetic dead-leaves images"
    synthetic: bool = False
    fit_paths: tuple[Path, ...] | None = None  # the files `fit` was read from, when they were image files

    def __post_init__(self) -> None:
        for field in ("fit", "held"):
            object.__setattr__(self, field, {k: Samples.of(v) for k, v in getattr(self, field).items()})

    @property
    def fit_count(self) -> int:
        return len(next(iter(self.fit.values())))

    @property
    def held_count(self) -> int:
        return len(next(iter(self.held.values()))) if self.held else 0

    @property
    def quality_feeds(self) -> dict[str, Samples]:
        return self.held or self.fit

    @property
    def quality_samples(self) -> str:
        """Which samples quality is measured on, without `source`: for lines that follow the one naming it."""
        if self.held:
            return f"{self.held_count} held-out samples (not used for fitting)"
        return f"the {self.fit_count} fitting samples (too few to hold any out)"

    @property
    def quality_on(self) -> str:
        if self.held:
            return f"{self.held_count} held-out samples of {self.source} (not used for fitting)"
        return f"the {self.fit_count} fitting samples of {self.source} (too few to hold any out)"

    @classmethod
    def of(cls, samples: dict[str, np.ndarray | Samples], source: str, synthetic: bool = False, seed: int = 0,
           paths: list[Path] | None = None) -> "Calibration":
        """Split `samples` (read from image `paths`, if given): a fifth (at most MAX_HELD_OUT, none below
        10 samples) held out at random.

        At random, not the last rows: image folders are usually sorted by class, and a tail would
        measure quality on the last classes only.
        """
        count = len(next(iter(samples.values())))
        held = min(MAX_HELD_OUT, count // 5) if count >= 10 else 0
        out = np.zeros(count, bool)
        out[np.random.default_rng([seed, 0x4E1D]).choice(count, held, replace=False)] = True
        samples = {k: Samples.of(v) for k, v in samples.items()}
        fit = {k: v.subset(~out) for k, v in samples.items()}
        fit_paths = tuple(p for p, o in zip(paths, out) if not o) if paths is not None else None
        return cls(fit, {k: v.subset(out) for k, v in samples.items()} if held else {}, source, synthetic, fit_paths)


def make_calibration(calib, input_shapes: dict[str, tuple], input_types: dict[str, np.dtype],
                     size: int | None = None, preprocess: Preprocess | None = None,
                     seed: int = 0) -> Calibration:
    """The user's calibration data (a path, or arrays keyed by input name), checked and cast once."""
    preprocess = preprocess or Preprocess()
    paths = None
    if isinstance(calib, (str, os.PathLike)):
        arrays = load_calibration(calib, input_shapes, size, preprocess, seed)
        path = Path(calib)
        what = "images" if path.is_dir() else "samples"
        source = f"{len(next(iter(arrays.values())))} {what} from {path}"
        if path.is_dir():
            paths = chosen_images(path, size, seed)
    else:
        arrays = {name: array[:size] for name, array in check_arrays(calib, input_shapes).items()}
        source = f"{len(next(iter(arrays.values())))} given samples"
    return Calibration.of(_cast(arrays, input_types), source, seed=seed, paths=paths)


def synthetic_calibration(input_shapes: dict[str, tuple], input_types: dict[str, np.dtype],
                          preprocess: Preprocess | None = None, seed: int = 0, count: int = SYNTHETIC_SAMPLES,
                          model: onnx.ModelProto | None = None, macs: int = 0,
                          progress=list) -> tuple[Calibration | None, str]:
    """Synthetic images for an image-like single input, or (None, why not).

    Given the `model` (and its `macs` per sample; None when nothing will be fitted on the images),
    a classifier's images of MIN_INVERSION_SIDE px or more are first refined by model inversion
    (`onnx_whc.data.inversion`): as many as INVERSION_MACS allows, the rest of the fitting set being
    shifted and flipped copies of them; the held-out images are refined too (half as many at most).
    """
    from .deadleaves import dead_leaves  # PIL drawing: only when needed

    preprocess = preprocess or Preprocess()
    if len(input_shapes) != 1:
        return None, "the model has several inputs"
    name, shape = next(iter(input_shapes.items()))
    if len(shape) != 4 or not np.issubdtype(input_types.get(name, np.float32), np.floating):
        return None, f"input '{name}' of shape {_format_shape(shape)} is not an image"
    channels_last = preprocess.layout == "NHWC"
    channels, h, w = (shape[3], shape[1], shape[2]) if channels_last else shape[1:4]
    if not all(_is_static(d) for d in (channels, h, w)):
        return None, f"input '{name}' has a dynamic size {_format_shape(shape)}; give --input-shape or --calib"
    if channels not in (1, 3) or min(h, w) < 16:
        return None, f"input '{name}' of shape {_format_shape(shape)} is not an image (1 or 3 channels, 16 px or more)"
    channels, h, w = int(channels), int(h), int(w)

    def leaves(n: int) -> np.ndarray:
        return _normalized_leaves(dead_leaves(n, h, w, seed), preprocess, channels)

    held = min(MAX_HELD_OUT, count // 5)
    refined = min(count - held, int(INVERSION_MACS // ((macs + INVERSION_VALUE_MACS * channels * h * w)
                                                       * InversionSettings.steps)))
    batch = max(1, min(refined, int(np.clip(INVERSION_BATCH_MACS // max(macs, 1), 8, 64))))
    grad_model, why = _gradient_model(model, (batch, *shape[1:]), min(h, w), refined)
    if grad_model is not None:
        held = min(held, refined // 2)  # refined too, at half the fitting set's cost at most
        try:
            images = refine(grad_model, leaves(refined + held), *_pixel_bounds(preprocess, channels), channels_last,
                            seed, progress=progress)
            return _refined_calibration(name, images[:refined], images[refined:], count, input_types,
                                        channels_last, seed), ""
        except NotInvertible as err:
            why = str(err)
    source = (f"{count} built-in synthetic dead-leaves images (no --calib given; not refined by model inversion: "
              f"{why})")
    return Calibration.of(_cast({name: leaves(count)}, input_types), source, True, seed), ""


def _gradient_model(model: onnx.ModelProto | None, shape: tuple, side: int,
                    affordable: int) -> tuple[onnx.ModelProto | None, str]:
    """The gradient model to refine the images on, or None and why they are not refined."""
    if model is None:
        return None, "nothing is fitted on them"
    if side < MIN_INVERSION_SIDE:
        return None, f"the images are under {MIN_INVERSION_SIDE} px"
    try:
        grad_model = gradient_model(model, tuple(int(d) for d in shape), InversionSettings.spread)
    except NotInvertible as err:  # checked before the budget: a detector is told it is one, not that it is large
        return None, str(err)
    if affordable < MIN_REFINED:
        return None, "the model is too large to invert in time"
    return grad_model, ""


def _refined_calibration(name: str, images: np.ndarray, held: np.ndarray, count: int, input_types,
                         channels_last: bool, seed: int) -> Calibration:
    """The refined `images` (and copies) to fit on; `held`, refined likewise, held out for the quality figure.

    On plain dead leaves the original's own classes are near ties, so almost any change flips
    them: EfficientNet-Lite0's prune at 0.75 of the MACs read agreement 0.03 there and 0.56 on
    refined images, where ImageNet gave 0.70 and 0.69 (the two versions fit a little differently).
    """
    fit = augmented(images, count - len(held), (1, 2) if channels_last else (2, 3), seed)
    extra = len(fit) - len(images)
    copies = f" and {extra} shifted and flipped copies of them" if extra > 0 else ""
    source = (f"{count} built-in synthetic images: {len(images)} dead leaves refined by model inversion towards "
              f"random classes{copies} to fit on, {len(held)} more refined likewise held out (no --calib given)")
    return Calibration(_cast({name: fit}, input_types), _cast({name: held}, input_types), source, True)


def _normalized_leaves(pixels: np.ndarray, preprocess: Preprocess, channels: int) -> np.ndarray:
    if channels == 3:
        return np.ascontiguousarray(normalize(pixels, preprocess), np.float32)
    # grey: luminance of the RGB leaves, normalised with the first mean and std
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = (luma[..., None] / 255 - preprocess.mean[0]) / preprocess.std[0]
    return np.ascontiguousarray(grey if preprocess.layout == "NHWC" else grey.transpose(0, 3, 1, 2), np.float32)


def _pixel_bounds(preprocess: Preprocess, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The normalised values of pixel levels 0 and 255, shaped to broadcast over one image."""
    mean = np.asarray(preprocess.mean[:channels], np.float32)
    std = np.asarray(preprocess.std[:channels], np.float32)
    shape = (1, 1, channels) if preprocess.layout == "NHWC" else (channels, 1, 1)
    return (-mean / std).reshape(shape), ((1 - mean) / std).reshape(shape)


def augmented(images: np.ndarray, count: int, axes: tuple[int, int], seed: int) -> np.ndarray:
    """`count` samples: the images, their mirror images, then copies shifted by up to a ninth of the side."""
    rng = np.random.default_rng([seed, 0x5F17])
    parts = [images, np.flip(images, axes[1])]
    limit = max(1, min(images.shape[a] for a in axes) // 9)
    while sum(len(p) for p in parts) < count:
        offsets = tuple(int(v) for v in rng.integers(-limit, limit + 1, 2))
        parts.append(np.roll(parts[len(parts) % 2], offsets, axes))
    return np.ascontiguousarray(np.concatenate(parts)[:count])


def check_arrays(calib, input_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Arrays given to the API, keyed by input name (a bare array for single-input models), checked."""
    if not isinstance(calib, dict):
        if len(input_shapes) != 1:
            raise UserInputError(f"calibration data must be keyed by input name ({', '.join(input_shapes)})")
        calib = {next(iter(input_shapes)): calib}
    missing = [name for name in input_shapes if name not in calib]
    if missing:
        raise UserInputError(f"calibration data has no array for model input '{missing[0]}'")
    arrays = {name: np.asarray(calib[name]) for name in input_shapes}
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise UserInputError(f"calibration array '{name}' has dtype {array.dtype}, expected float32")
        if not _fits(array.shape, input_shapes[name]):
            want = "x".join(["N", *(str(d) if _is_static(d) else "?" for d in input_shapes[name][1:])])
            raise UserInputError(f"calibration array '{name}' has shape {'x'.join(map(str, array.shape))}, "
                                 f"the model input needs {want}")
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise UserInputError("calibration arrays must hold the same, non-zero number of samples")
    return arrays


def _cast(arrays: dict, types: dict[str, np.dtype]) -> dict:
    """Arrays (or Samples, cast as they are read) in the element types the model's inputs declare
    (float16 models take float16)."""
    return {name: a.astype(types.get(name, np.float32), copy=False) for name, a in arrays.items()}


def load_calibration(
    path: str | os.PathLike,
    input_shapes: dict[str, tuple],
    size: int | None = None,
    preprocess: Preprocess = Preprocess(),
    seed: int = 0,
) -> dict[str, Samples]:
    """Read calibration inputs for a model whose inputs have `input_shapes`.

    `path` is a folder of images (single-input models), an .npy (single-input models) or an
    .npz keyed by input name. Dim 0 counts samples and takes any size, so a model exported
    with a fixed batch still gets its whole calibration set; other fixed dims must match.
    `size` keeps that many samples: a seeded random subset of the images, or the first rows
    of an array file; fewer available means all are used.
    """
    path = Path(path)
    where = f"--calib {path}"
    if size is not None and size < 1:
        raise UserInputError(f"{where}: the number of calibration samples must be at least 1, got {size}")
    if path.is_dir():
        name, shape = _single_input(input_shapes, where, "a folder of images")
        return {name: _load_folder(path, name, shape, size, preprocess, seed, where)}
    if path.suffix.lower() in (".npy", ".npz") and path.is_file():
        arrays = _read_arrays(path, input_shapes, where)
        _check_batch(arrays, input_shapes, where)
        return {name: Samples.of(arr).astype(np.float32, copy=False).subset(slice(None, size))
                for name, arr in arrays.items()}
    if not path.exists():
        raise UserInputError(f"{where}: no such file or folder")
    raise UserInputError(f"{where}: not a folder, .npy or .npz")


def find_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, in sorted order."""
    return sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def chosen_images(folder: Path, size: int | None, seed: int) -> list[Path]:
    """The images of `folder` a calibration reads: all, or a seeded random `size` of them, in sorted order."""
    paths = find_images(folder)
    if size is not None and size < len(paths):
        keep = np.random.default_rng(seed).choice(len(paths), size, replace=False)
        paths = [paths[i] for i in sorted(keep)]
    return paths


def load_images(
    paths: Sequence[Path], preprocess: Preprocess, size_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode, resize/crop and normalise `paths` into one float32 batch."""
    return pixel_samples(paths, preprocess, size_hw)[:]


DECODE_CHUNK = 32  # images decoded at once into a PixelFile


def pixel_samples(paths: Sequence[Path], preprocess: Preprocess, size_hw: tuple[int, int] | None = None) -> Samples:
    """`paths` decoded, resized and cropped a few at a time into uint8 pixels; normalised when read.

    The same float32 values as `load_images`, without holding them: memory follows `DECODE_CHUNK`.
    """
    if not paths:
        raise UserInputError("no images to load")
    store = None
    for lo in range(0, len(paths), DECODE_CHUNK):
        chunk = paths[lo:lo + DECODE_CHUNK]
        pixels = [read_image(p, preprocess, size_hw) for p in chunk]
        if store is None:
            h, w = pixels[0].shape[:2]
            sample_shape = (h, w, 3) if preprocess.layout == "NHWC" else (3, h, w)
            store = PixelFile(h, w, len(paths), lambda px: normalize(px, preprocess), sample_shape)
        for p, arr in zip(chunk, pixels):
            if arr.shape != store.pixel_shape:
                raise UserInputError(
                    f"images differ in size after preprocessing ({paths[0]} is {store.pixel_shape[1]}x"
                    f"{store.pixel_shape[0]}, {p} is {arr.shape[1]}x{arr.shape[0]}); set a resize and crop")
        store.append(np.stack(pixels))
    return Samples(store, np.float32)


def read_image(path: Path, preprocess: Preprocess, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """One image as uint8 H×W×3 RGB, resized and cropped per `preprocess`.

    `size_hw` is the size to resize to when `preprocess` sets neither resize nor crop.
    """
    try:
        with Image.open(path) as img:
            img = _resize(img, preprocess, size_hw)
    except _DECODE_ERRORS as err:
        # Pillow's own message repeats the path; say what went wrong instead.
        reason = "not an image format Pillow can decode" if isinstance(err, Image.UnidentifiedImageError) else err
        raise UserInputError(f"cannot read image {path} ({reason})") from None
    if preprocess.crop is not None:
        img = _center_crop(img, preprocess.crop, path)
    return np.asarray(img)


def normalize(pixels: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """uint8 N×H×W×3 RGB to float32 ((x / 255) - mean) / std in the preprocess layout."""
    levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
    # A 256-entry table per channel gives the same float32 values as the arithmetic at a
    # fraction of the cost for large batches.
    table = (levels - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    if preprocess.layout == "NHWC":
        return table[pixels, np.arange(3)]
    n, h, w, _ = pixels.shape
    out = np.empty((n, 3, h, w), np.float32)
    for c in range(3):
        np.take(table[:, c], pixels[..., c], out=out[:, c])
    return out


def _resize(img: Image.Image, preprocess: Preprocess, size_hw: tuple[int, int] | None) -> Image.Image:
    """Decode `img` as RGB at the size `preprocess` (or `size_hw`) asks for."""
    if preprocess.letterbox is not None and size_hw is not None:
        return letterboxed(as_rgb(img), size_hw, preprocess.letterbox)
    if preprocess.resize is not None:
        target = _short_side_size(img.size, preprocess.resize)
    elif preprocess.crop is None and size_hw is not None and img.size != size_hw[::-1]:
        target = size_hw[::-1]
    else:
        return as_rgb(img)
    # JPEG can decode at 1/2, 1/4 or 1/8 scale almost for free; keeping at least twice the
    # target size leaves the bilinear filter to do the real work, so results barely change.
    img.draft("RGB", (2 * target[0], 2 * target[1]))
    return as_rgb(img).resize(target, Image.BILINEAR)


def letterboxed(img: Image.Image, size_hw: tuple[int, int], pad: int) -> Image.Image:
    """`img` scaled to fit `size_hw` (bilinear, aspect kept) and centred on a `pad`-grey canvas."""
    h, w = size_hw
    scale = min(w / img.width, h / img.height)
    width, height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (w, h), (pad,) * 3)
    canvas.paste(img.resize((width, height), Image.BILINEAR), ((w - width) // 2, (h - height) // 2))
    return canvas


def as_rgb(img: Image.Image) -> Image.Image:
    """`img` decoded as RGB; skips convert's full copy when it already is."""
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def _short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(width, height) with the short side at `short`, aspect ratio kept.

    The long side is rounded, not truncated: that reproduces the published EfficientNet-Lite0
    baseline on the shared ImageNet sample (truncation flips four of its 500 predictions).
    """
    w, h = size
    if w <= h:
        return short, max(1, round(short * h / w))
    return max(1, round(short * w / h)), short


def _center_crop(img: Image.Image, crop: int, path: Path) -> Image.Image:
    """The centred crop×crop square, offsets rounded as torchvision's CenterCrop does."""
    w, h = img.size
    if w < crop or h < crop:
        raise UserInputError(f"image {path} is {w}x{h}, smaller than the {crop}x{crop} crop; set a larger resize")
    left, top = int(round((w - crop) / 2)), int(round((h - crop) / 2))
    return img.crop((left, top, left + crop, top + crop))


def _single_input(input_shapes: dict[str, tuple], where: str, what: str) -> tuple[str, tuple]:
    """The only (name, shape) of a single-input model, or a UserInputError naming the inputs."""
    if len(input_shapes) != 1:
        names = ", ".join(repr(n) for n in input_shapes)
        raise UserInputError(
            f"{where}: {what} only works for single-input models, but this model has inputs {names}; "
            "pass an .npz with one array per input name"
        )
    return next(iter(input_shapes.items()))


def _load_folder(
    folder: Path, name: str, shape: tuple, size: int | None, preprocess: Preprocess, seed: int, where: str
) -> Samples:
    """Images under `folder` as one batch for the model input `name` of `shape`."""
    if len(shape) != 4:
        raise UserInputError(f"{where}: model input {name!r} of shape {_format_shape(shape)} does not take images")
    channels = shape[3] if preprocess.layout == "NHWC" else shape[1]
    if _is_static(channels) and channels != 3:
        raise UserInputError(
            f"{where}: model input {name!r} of shape {_format_shape(shape)} has {channels} channels "
            f"in {preprocess.layout} layout, but images are read as 3-channel RGB"
        )
    paths = chosen_images(folder, size, seed)
    if not paths:
        raise UserInputError(f"{where}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    h, w = shape[1:3] if preprocess.layout == "NHWC" else shape[2:4]
    size_hw = (h, w) if _is_static(h) and _is_static(w) else None
    preprocess = _sized_for(preprocess, h, w)
    try:
        batch = pixel_samples(paths, preprocess, size_hw)
    except UserInputError as err:
        raise UserInputError(f"{where}: {err}") from None
    if not _fits(batch.shape, shape):
        raise UserInputError(
            f"{where}: images come out as {tuple(batch.shape)} after preprocessing, which does not match "
            f"model input {name!r} of shape {_format_shape(shape)}; adjust resize or crop"
        )
    return batch


def _sized_for(preprocess: Preprocess, h, w) -> Preprocess:
    """A preset's crop rule made concrete for a square, static input size (else `preprocess` as it is)."""
    if preprocess.crop_fraction and preprocess.resize is None and preprocess.crop is None \
            and _is_static(h) and h == w:
        return replace(preprocess, resize=int(round(h / preprocess.crop_fraction)), crop=int(h))
    return preprocess


def _read_arrays(path: Path, input_shapes: dict[str, tuple], where: str) -> dict[str, np.ndarray]:
    """Float32 arrays by input name from an .npy (single input) or .npz (keyed by name)."""
    if path.suffix.lower() == ".npy":
        name, _ = _single_input(input_shapes, where, "an .npy file")
        return {name: _read_npy(path, where)}
    return _read_npz(path, input_shapes, where)


def _read_npy(path: Path, where: str) -> np.ndarray:
    """A float array from an .npy file, memory-mapped (read as float32 a chunk at a time, see `_cast`)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserInputError(f"{where}: cannot read the array ({err})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserInputError(f"{where}: the array has dtype {arr.dtype}, expected float32 model inputs")
    return arr


def _read_npz(path: Path, input_shapes: dict[str, tuple], where: str) -> dict[str, np.ndarray]:
    """One float32 array per model input from an .npz file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in input_shapes if name not in archive.files]
            if missing:
                have = ", ".join(repr(k) for k in archive.files) or "nothing"
                raise UserInputError(f"{where}: no array for model input {missing[0]!r} (the file has {have})")
            return {name: _as_float32(archive[name], where, f"array {name!r}") for name in input_shapes}
    except (OSError, ValueError, EOFError) as err:
        raise UserInputError(f"{where}: cannot read the arrays ({err})") from None


def _as_float32(arr: np.ndarray, where: str, what: str) -> np.ndarray:
    """`arr` as float32; anything but floating point is most likely the wrong file."""
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserInputError(f"{where}: {what} has dtype {arr.dtype}, expected float32 model inputs")
    return arr.astype(np.float32, copy=False)


def _check_batch(arrays: dict[str, np.ndarray], input_shapes: dict[str, tuple], where: str) -> None:
    """Every array matches its input's static dims and all share one non-empty batch size."""
    for name, arr in arrays.items():
        shape = input_shapes[name]
        if not _fits(arr.shape, shape):
            raise UserInputError(
                f"{where}: array shape {tuple(arr.shape)} does not match model input {name!r} "
                f"of shape {_format_shape(shape)}"
            )
    batches = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(batches.values())) > 1:
        sizes = ", ".join(f"{name!r} has {n}" for name, n in batches.items())
        raise UserInputError(f"{where}: inputs hold different numbers of samples ({sizes})")
    if 0 in batches.values():
        raise UserInputError(f"{where}: contains no samples")


def _fits(got: tuple, shape: tuple) -> bool:
    """Whether an array shape `got` matches `shape`: same rank, equal static dims after dim 0."""
    return len(got) == len(shape) and all(not _is_static(w) or g == w for g, w in zip(got[1:], shape[1:]))


def _is_static(dim) -> bool:
    """Whether `dim` is a fixed size (dynamic dims are None or a symbolic name)."""
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim > 0


def _format_shape(shape: tuple) -> str:
    """(batch, 3, 32, 32): static dims as numbers, dynamic ones by name or '?'."""
    dims = [str(d) if d is not None else "?" for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def load_labelled(path: str | os.PathLike, input_shapes: dict[str, tuple], preprocess: Preprocess | None = None,
                  input_types: dict[str, np.dtype] | None = None) -> tuple[dict[str, Samples], np.ndarray, str]:
    """A labelled image set for top-1 (`--eval`): (inputs by name, labels, what it is).

    `path` is a folder with one subfolder per class (ImageNet style: classes numbered in sorted
    order), or a CSV with `file` and `label` columns (files relative to the CSV); when the CSV
    has a `split` column, only its eval/val/test rows are used, never calibration rows.
    """
    import csv

    path, where = Path(path), f"--eval {path}"
    preprocess = preprocess or Preprocess()
    if path.is_dir():
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        items = [(image, label) for label, name in enumerate(classes) for image in find_images(path / name)]
    elif path.suffix.lower() == ".csv" and path.is_file():
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"file", "label"} <= set(rows[0]):
            raise UserInputError(f"{where}: a CSV needs 'file' and 'label' columns")
        rows = [r for r in rows if r.get("split", "eval").lower() in ("eval", "val", "test")]
        try:
            items = [(path.parent / r["file"], int(r["label"])) for r in rows]
        except ValueError:
            raise UserInputError(f"{where}: labels must be class numbers") from None
    else:
        raise UserInputError(f"{where}: not a folder of class folders or a .csv")
    if not items:
        raise UserInputError(f"{where}: no labelled images found")
    name, shape = _single_input(input_shapes, where, "a labelled image set")
    h, w = shape[1:3] if preprocess.layout == "NHWC" else shape[2:4]
    preprocess = _sized_for(preprocess, h, w)
    try:
        batch = pixel_samples([p for p, _ in items], preprocess, (h, w))
    except UserInputError as err:
        raise UserInputError(f"{where}: {err}") from None
    inputs = _cast({name: batch}, input_types or {})
    return inputs, np.array([label for _, label in items]), f"{len(items)} labelled images from {path}"

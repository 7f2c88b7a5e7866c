"""Augmented views of the calibration images, made batch by batch for distillation.

Distillation sees each image many times; what teaches the student is the teacher's answer on
views it has not seen before (Beyer et al., "Knowledge distillation: a good teacher is patient and
consistent", CVPR 2022): random resized crops, mirror images, and mixes of two images. Image
files are decoded when a batch needs them, so memory follows the batch, not the number of
images; arrays (a given .npy, or the built-in synthetic images) are cropped and mixed as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .calibration import Preprocess, as_rgb, letterboxed, normalize

MIXES = ("mixup", "cutmix", "none")


@dataclass(frozen=True)
class Augment:
    """How views are drawn: the crop's share of the image area, mirror images, and how two images mix."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mix: str = "cutmix"  # cutmix: a box of one view pasted into the other; mixup: their weighted sum


class Views:
    """Batches of augmented views for one image input named `name` of static `shape` (batch axis first).

    `paths`: image files, read with `preprocess` (its mean, std, layout and letterbox); `arrays`:
    samples already in the model's input form (N × shape[1:]); or both, drawn from as one pool.
    """

    def __init__(self, name: str, shape: tuple[int, ...], preprocess: Preprocess | None = None,
                 paths: list[Path] | None = None, arrays: np.ndarray | None = None,
                 augment: Augment = Augment(), seed: int = 0):
        if paths is None and arrays is None:
            raise ValueError("give paths, arrays or both")
        self.name, self.shape, self.augment = name, tuple(shape), augment
        self.preprocess = preprocess or Preprocess()
        self.paths, self.arrays = list(paths or []), arrays if arrays is not None else []
        self.count = len(self.paths) + len(self.arrays)
        self.channels_last = self.preprocess.layout == "NHWC"
        self.size_hw = tuple(self.shape[1:3] if self.channels_last else self.shape[2:4])
        self.rng = np.random.default_rng([seed, 0xD157])
        self._order = np.zeros(0, np.int64)

    def batch(self, size: int) -> np.ndarray:
        """`size` views, every image used once before any is used again."""
        while len(self._order) < size:
            self._order = np.concatenate([self._order, self.rng.permutation(self.count)])
        picked, self._order = self._order[:size], self._order[size:]
        files = picked < len(self.paths)
        views = np.empty((size, *self.shape[1:]), np.float32)
        if files.any():
            views[files] = self._from_files(picked[files])
        if not files.all():
            views[~files] = self._from_arrays(picked[~files] - len(self.paths))
        return self._mixed(views)

    def _from_files(self, picked: np.ndarray) -> np.ndarray:
        pixels = np.stack([self._file_view(self.paths[i]) for i in picked])
        return normalize(pixels, self.preprocess)

    def _file_view(self, path: Path) -> np.ndarray:
        """One random crop of the image file, mirrored at random, at the model's input size (uint8 H×W×3)."""
        with Image.open(path) as img:
            img = as_rgb(img)
            left, top, width, height = self._box(img.width, img.height)
            img = img.crop((left, top, left + width, top + height))
        if self.augment.flip and self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        h, w = self.size_hw
        if self.preprocess.letterbox is not None:
            img = letterboxed(img, (h, w), self.preprocess.letterbox)
        else:
            img = img.resize((w, h), Image.BILINEAR)
        return np.asarray(img)

    def _from_arrays(self, picked: np.ndarray) -> np.ndarray:
        """Random crops of the samples resized to the views' size (bilinear), mirrored at random."""
        axes = (1, 2) if self.channels_last else (2, 3)
        out = np.empty((len(picked), *self.shape[1:]), np.float32)
        for k, i in enumerate(picked):
            sample = np.asarray(self.arrays[i], np.float32)
            left, top, width, height = self._box(sample.shape[axes[1] - 1], sample.shape[axes[0] - 1])
            h, w = self.size_hw
            rows = top + (np.arange(h) + 0.5) * height / h - 0.5
            cols = left + (np.arange(w) + 0.5) * width / w - 0.5
            view = _bilinear(sample, rows, cols, axes[0] - 1, axes[1] - 1)
            if self.augment.flip and self.rng.random() < 0.5:
                view = np.flip(view, axes[1] - 1)
            out[k] = view
        return out

    def _box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of a random crop: a share of the area in `scale`, an aspect in `ratio`."""
        lo, hi = self.augment.scale
        for _ in range(10):
            area = width * height * self.rng.uniform(lo, hi)
            aspect = math.exp(self.rng.uniform(*np.log(self.augment.ratio)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(self.rng.integers(0, width - w + 1)), int(self.rng.integers(0, height - h + 1)), w, h
        return 0, 0, width, height

    def _mixed(self, views: np.ndarray) -> np.ndarray:
        """Each view mixed with another of the batch: the teacher answers for the mix itself."""
        mix = self.augment.mix
        if mix == "none" or len(views) < 2:
            return views
        partner = views[self.rng.permutation(len(views))]
        if mix == "mixup":
            weight = self.rng.uniform(0, 1, (len(views),) + (1,) * (views.ndim - 1)).astype(np.float32)
            return weight * views + (1 - weight) * partner
        axes = (1, 2) if self.channels_last else (2, 3)
        h, w = views.shape[axes[0]], views.shape[axes[1]]
        for k in range(len(views)):
            share = self.rng.uniform(0, 1)
            bh, bw = int(h * math.sqrt(share)), int(w * math.sqrt(share))
            top, left = int(self.rng.integers(0, h - bh + 1)), int(self.rng.integers(0, w - bw + 1))
            box = [k, slice(None), slice(None), slice(None)]
            box[axes[0]], box[axes[1]] = slice(top, top + bh), slice(left, left + bw)
            views[tuple(box)] = partner[tuple(box)]
        return views


class Joined:
    """Two sets of samples read as one, neither copied: a memory-mapped calibration stays on disk."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


def _bilinear(sample: np.ndarray, rows: np.ndarray, cols: np.ndarray, row_axis: int, col_axis: int) -> np.ndarray:
    """`sample` read at fractional `rows` × `cols` along its two image axes, edges clamped."""
    def weights(coords: np.ndarray, size: int):
        coords = np.clip(coords, 0, size - 1)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        return low, high, (coords - low).astype(np.float32)

    r0, r1, fr = weights(rows, sample.shape[row_axis])
    c0, c1, fc = weights(cols, sample.shape[col_axis])
    shape_r = [1] * sample.ndim
    shape_r[row_axis] = -1
    shape_c = [1] * sample.ndim
    shape_c[col_axis] = -1
    top = np.take(sample, r0, row_axis) * (1 - fr.reshape(shape_r)) + np.take(sample, r1, row_axis) * fr.reshape(shape_r)
    return np.take(top, c0, col_axis) * (1 - fc.reshape(shape_c)) + np.take(top, c1, col_axis) * fc.reshape(shape_c)

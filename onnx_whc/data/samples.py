"""Calibration samples of one model input, read a chunk at a time so memory follows the chunk.

Decoded images are kept as uint8 pixels (a quarter of float32) in a temporary file once they are
more than a little, and normalised when a chunk is read; a given .npy stays memory-mapped; arrays
already in memory are used as they are. Every stage reads `samples[lo:hi]` (or `samples[indices]`)
as an ordinary array and never holds the whole set unless it asks for it (`np.asarray`).
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import numpy as np

IN_MEMORY_BYTES = 64 << 20  # pixels up to this stay in memory; more go to a temporary file


class Samples:
    """N samples of one input, in `dtype`, as rows `indices` of a source that reads rows on demand."""

    def __init__(self, source, dtype, indices: np.ndarray | None = None):
        self.source, self.dtype = source, np.dtype(dtype)
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)

    @classmethod
    def of(cls, array) -> "Samples":
        """`array` (an ndarray, a memory map, or Samples already) as Samples."""
        return array if isinstance(array, Samples) else cls(_Rows(array), array.dtype)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.source.sample_shape)

    def __getitem__(self, key) -> np.ndarray:
        key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rows = self.indices[key]
        self.source.reads += 1
        values = self.source.read(np.atleast_1d(rows)).astype(self.dtype, copy=False)[(slice(None), *rest)]
        return values[0] if np.ndim(rows) == 0 else values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def subset(self, positions) -> "Samples":
        """The samples at `positions` (indices or a boolean mask), without reading them."""
        return Samples(self.source, self.dtype, self.indices[positions])

    def astype(self, dtype, copy: bool = True) -> "Samples":
        return self if np.dtype(dtype) == self.dtype and not copy else Samples(self.source, dtype, self.indices)


def subset(feeds: dict, positions) -> dict[str, Samples]:
    """Every input's samples at `positions`, unread."""
    return {name: Samples.of(value).subset(positions) for name, value in feeds.items()}


def evenly_spread(count: int, wanted: int, seed: int) -> np.ndarray:
    """`wanted` of `count` positions at random, in order (folders are sorted by class: a prefix is not a sample)."""
    if wanted >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, 0x5A3]).choice(count, wanted, replace=False))


class _Rows:
    """Rows of an array in memory or memory-mapped."""

    def __init__(self, array):
        self.array, self.reads = array, 0  # reads: chunks read through any Samples of it, for the summary
        self.sample_shape = tuple(array.shape[1:])

    def __len__(self) -> int:
        return len(self.array)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and np.all(np.diff(rows) == 1):  # a slice: no fancy-index copy of a memory map's pages
            return np.asarray(self.array[rows[0]:rows[-1] + 1])
        return np.asarray(self.array[rows])


class PixelFile:
    """uint8 H×W×3 images, appended as they are decoded, normalised to model inputs when read.

    Pixels stay in memory up to IN_MEMORY_BYTES, else in an unnamed temporary file read with pread:
    the page cache holds them, not the process.
    """

    def __init__(self, height: int, width: int, count: int, normalize: Callable[[np.ndarray], np.ndarray],
                 sample_shape: tuple[int, ...]):
        self.pixel_shape, self.reads = (height, width, 3), 0
        self.row_bytes = height * width * 3
        self.count, self.filled = count, 0
        self.normalize, self.sample_shape = normalize, tuple(sample_shape)
        if count * self.row_bytes <= IN_MEMORY_BYTES:
            self.memory, self.file = np.empty((count, *self.pixel_shape), np.uint8), None
        else:
            self.memory, self.file = None, tempfile.TemporaryFile(prefix="onnx-whc-pixels-")

    def __len__(self) -> int:
        return self.count

    def append(self, pixels: np.ndarray) -> None:
        pixels = np.ascontiguousarray(pixels, np.uint8)
        if self.memory is not None:
            self.memory[self.filled:self.filled + len(pixels)] = pixels
        else:
            os.pwrite(self.file.fileno(), pixels.tobytes(), self.filled * self.row_bytes)
        self.filled += len(pixels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self.memory is not None:
            return self.normalize(self.memory[rows])
        out = np.empty((len(rows), *self.pixel_shape), np.uint8)
        for k, row in enumerate(rows):
            data = os.pread(self.file.fileno(), self.row_bytes, int(row) * self.row_bytes)
            out[k] = np.frombuffer(data, np.uint8).reshape(self.pixel_shape)
        return self.normalize(out)

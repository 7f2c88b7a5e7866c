"""Labelled evaluation data from ../shared, preprocessed as each shared model expects."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnx_whc.data.calibration import Preprocess, load_images

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Folder under shared/data and the preprocessing from shared/README.md for its models.
DATASETS = {
    "cifar10": ("cifar10-test", Preprocess()),
    "imagenet": ("imagenet-sample", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, resize=256, crop=224)),
}


def load_split(dataset: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs float32 N×3×H×W, labels int64) of `split` ("calib" or "eval").

    `limit` keeps that many evenly spaced rows; the label files are sorted by class, so this
    keeps the classes balanced. The arrays are cached and read-only.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in ("calib", "eval"):
        raise ValueError(f"unknown split {split!r}; choose calib or eval")
    return _load_split(dataset, split, limit)


def forget_loaded() -> None:
    """Drop the cached arrays (a benchmark measuring memory keeps only its own copy)."""
    _load_split.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_split(dataset: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Uncached load_split, so the cache key is exactly (dataset, split, limit)."""
    folder, preprocess = DATASETS[dataset]
    root = SHARED / "data" / folder
    with open(root / "labels.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    inputs = load_images([root / row["file"] for row in rows], preprocess)
    labels = np.array([int(row["label"]) for row in rows], dtype=np.int64)
    inputs.flags.writeable = labels.flags.writeable = False
    return inputs, labels


def predict(model: str | Path | bytes, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """Argmax of the first output of an ONNX model (path or serialized bytes) on CPU."""
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[start: start + batch]})[0].argmax(axis=1)
                           for start in range(0, len(inputs), batch)])


def accuracy(model: str | Path | bytes, inputs: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy (0..1) of an ONNX model (path or serialized bytes) on CPU."""
    return float(np.mean(predict(model, inputs, batch) == labels))

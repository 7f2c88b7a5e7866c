"""Detection agreement of a pruned YOLOv8 with its original, for the shared detector.

The detection model has no labels here, so pruning is judged by how many of the original's
decoded detections survive in the pruned model's output (and how many new ones it invents).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from .common import SHARED

PAD = 114
IMAGES = SHARED / "data" / "imagenet-sample"


def letterbox(path: str | Path, size: int = 320) -> np.ndarray:
    """float32 3×size×size RGB /255: the image scaled to fit (bilinear), centred on pad 114, as YOLOv8 expects."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = min(size / img.width, size / img.height)
        width, height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        resized = img.resize((width, height), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (PAD,) * 3)
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
    return (np.asarray(canvas, np.float32) / np.float32(255)).transpose(2, 0, 1)


def load_letterboxed(paths: Sequence[str | Path], size: int = 320) -> np.ndarray:
    """N×3×size×size batch of letterboxed images."""
    return np.stack([letterbox(p, size) for p in paths])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (n×m) of x1,y1,x2,y2 boxes."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, best score first (drops overlaps with IoU > iou)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[box_iou(boxes[best : best + 1], boxes[rest])[0] <= iou]
    return np.array(keep, dtype=np.int64)


def classwise_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Indices NMS keeps within each class (boxes of different classes never suppress each other), best first."""
    keep = np.zeros(0, np.int64)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        keep = np.concatenate([keep, members[nms(boxes[members], scores[members], iou)]])
    return keep[np.argsort(-scores[keep], kind="stable")]


def decode_one(pred: np.ndarray, score: float, iou: float) -> np.ndarray:
    """(k, 6) x1,y1,x2,y2,score,class from one image's 22×A output, best score first."""
    pred = pred.T
    classes = pred[:, 4:].argmax(axis=1)
    scores = pred[:, 4:].max(axis=1)
    confident = scores > score
    cx, cy, w, h = pred[confident, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    scores, classes = scores[confident], classes[confident]
    keep = classwise_nms(boxes, scores, classes, iou)
    return np.column_stack([boxes[keep], scores[keep], classes[keep]]).astype(np.float32)


def decode(output: np.ndarray, score: float = 0.25, iou: float = 0.45) -> list[np.ndarray]:
    """Per image, the detections of a batch×22×A YOLOv8 output: class score > `score`, class-wise NMS at `iou`."""
    return [decode_one(pred, score, iou) for pred in output]


def match_count(reference: np.ndarray, candidate: np.ndarray, iou: float) -> int:
    """How many reference detections find a same-class candidate at IoU ≥ iou, one-to-one, best reference first."""
    if not len(reference) or not len(candidate):
        return 0
    reference = reference[np.argsort(-reference[:, 4], kind="stable")]
    overlap = box_iou(reference[:, :4], candidate[:, :4])
    overlap[reference[:, 5][:, None] != candidate[:, 5][None, :]] = -1
    free = np.ones(len(candidate), bool)
    matched = 0
    for row in overlap:
        row = np.where(free, row, -1)
        best = int(row.argmax())
        if row[best] >= iou:
            free[best] = False
            matched += 1
    return matched


def agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], iou: float = 0.5) -> dict:
    """How well `candidate` detections (per image) reproduce `reference` ones.

    `kept` is the share of reference detections matched; `extra` counts candidate detections
    left unmatched and `extra_share` gives them per reference detection. Shares are None when
    the reference has no detections at all.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    total = sum(len(r) for r in reference)
    found = sum(len(c) for c in candidate)
    matched = sum(match_count(r, c, iou) for r, c in zip(reference, candidate))
    extra = found - matched
    return {
        "reference": total,
        "candidate": found,
        "matched": matched,
        "kept": matched / total if total else None,
        "extra": extra,
        "extra_share": extra / total if total else None,
    }


def run(model: str | Path | bytes, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """The first output of an ONNX model (path or serialized bytes) on `inputs`, through ONNX Runtime CPU."""
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)])


def detection_agreement(original: str | Path | bytes, pruned: str | Path | bytes, inputs: np.ndarray) -> dict:
    """Agreement of the pruned model's decoded detections with the original's on `inputs`."""
    return agreement(decode(run(original, inputs)), decode(run(pruned, inputs)))


def eval_images(split: str = "eval", limit: int = 150) -> list[Path]:
    """`limit` evenly spaced images of `split` in the shared ImageNet sample (sorted by class, so varied)."""
    with open(IMAGES / "labels.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    if limit < len(rows):
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    return [IMAGES / row["file"] for row in rows]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: agreement of PRUNED with ORIGINAL on the eval images, as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--limit", type=int, default=150)
    args = parser.parse_args(argv)
    inputs = load_letterboxed(eval_images(limit=args.limit), args.size)
    print(json.dumps(detection_agreement(args.original, args.pruned, inputs), indent=2))


if __name__ == "__main__":
    main()

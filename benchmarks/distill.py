"""Distillation after the prune: top-1 against minutes of training on the calibration images.

    python -m benchmarks.distill --cells resnet56-0.549 [--minutes 20] [--provider cpu]

Each cell prunes a shared model to a MACs budget with the default recovery (calibration images
from the calib split, through a folder of links), then distils the recovered model for the
cell's minutes (`onnx_whc.api.distill`, the same calibration data and held-out samples as the
prune). At every held-out check the model is also scored on evaluation images (2,000 CIFAR or
the 500 ImageNet eval images, not counted in the budget), and at the end on the whole eval split.
Cells are stored as they finish, so a long run can be split over several commands.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

import onnx_whc
from onnx_whc.api import distill
from onnx_whc.data.calibration import preset_preprocess
from onnx_whc.graph.runtime import session
from onnx_whc.recovery.distill import DistillSettings

from .common import RESULTS, SHARED, environment, environment_line, markdown_table, write_results
from .datasets import accuracy, load_split

# name: (model, data set, MACs budget or None for --ratio 0.4 without --calib, minutes, images, preset)
CELLS = {
    "resnet56-0.549": ("resnet56_cifar10.onnx", "cifar10", 0.549, 20, "calib", "cifar"),
    "resnet56-0.45": ("resnet56_cifar10.onnx", "cifar10", 0.45, 20, "calib", "cifar"),
    "resnet56-0.45-4000": ("resnet56_cifar10.onnx", "cifar10", 0.45, 20, "eval4000", "cifar"),
    "resnet56-synthetic": ("resnet56_cifar10.onnx", "cifar10", None, 20, None, "cifar"),
    "efficientnet_lite0-0.78": ("efficientnet_lite0_imagenet.onnx", "imagenet", 0.78, 60, "calib", "inception"),
}
FOLDERS = {"cifar10": "cifar10-test", "imagenet": "imagenet-sample"}


def _rows(dataset: str, split: str) -> list[dict]:
    with open(SHARED / "data" / FOLDERS[dataset] / "labels.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def _folder(dataset: str, images: str, tmp: Path) -> Path:
    """Links to the cell's training images: the calib split, or 4,000 of the eval split (every other image
    of its first 8,000: the eval images held out for accuracy are then the rest)."""
    rows = _rows(dataset, "calib") if images == "calib" else _rows(dataset, "eval")[:8000:2]
    folder = tmp / images
    folder.mkdir()
    root = SHARED / "data" / FOLDERS[dataset]
    for i, row in enumerate(rows):
        (folder / f"{i:05d}{Path(row['file']).suffix}").symlink_to(root / row["file"])
    return folder


def _eval_set(dataset: str, images: str | None):
    """(inputs, labels) the final top-1 is measured on, and a subset for the curve."""
    x, y = load_split(dataset, "eval")
    if images == "eval4000":  # the 5,000 eval images not trained on
        keep = np.ones(len(x), bool)
        keep[:8000:2] = False
        x, y = x[keep], y[keep]
    step = max(1, len(x) // 2000)
    return (x, y), (x[::step], y[::step])


def run_cell(name: str, minutes: float | None, provider: str | None) -> dict:
    file, dataset, budget, default_minutes, images, preset = CELLS[name]
    minutes = minutes or default_minutes
    model = SHARED / "models" / file
    preprocess = preset_preprocess(preset)
    (x, y), (xc, yc) = _eval_set(dataset, images)
    with tempfile.TemporaryDirectory() as tmp:
        calib = str(_folder(dataset, images, Path(tmp))) if images else None
        options = {"calib": calib, "preprocess": preprocess}
        start = time.perf_counter()
        if budget is None:
            pruned, report = onnx_whc.prune(model, ratio=0.4, validate=False, progress=True, **options)
        else:
            pruned, report = onnx_whc.prune(model, target_macs=budget, validate=False, progress=True, **options)
        prune_seconds = time.perf_counter() - start
        top1_recovered = accuracy(pruned.SerializeToString(), x, y)
        curve = []

        def checkpoint(point: dict, candidate) -> None:
            curve.append({**point, "top1": round(accuracy(candidate.SerializeToString(), xc, yc), 4)})
            print(f"  {point['seconds'] / 60:.1f} min, step {point['step']}: held-out {point['held_out']}, "
                  f"top-1 {curve[-1]['top1']:.4f}", flush=True)

        distilled, dreport = distill(model, pruned, progress=True, on_checkpoint=checkpoint,
                                     distill=DistillSettings(seconds=60 * minutes, provider=provider), **options)
    top1 = accuracy(distilled.SerializeToString(), x, y)
    forward = _forward_throughput(distilled, dreport.batch, x[:1].shape, dreport.provider)
    return {"cell": name, "model": file, "macs_kept": round(report.macs_kept, 4), "images": images or "synthetic",
            "minutes": minutes, "prune_seconds": round(prune_seconds, 1), "top1_recovered": round(top1_recovered, 4),
            "top1_distilled": round(top1, 4), "top1_original": round(accuracy(model, x, y), 4),
            "eval_images": len(x), "curve": curve, "distill": dreport.to_dict(),
            "forward_views_per_second": round(forward, 1),
            "peak_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _forward_throughput(model, batch: int, shape: tuple, provider: str, seconds: float = 10.0) -> float:
    """Views per second of the pruned model's forward pass alone, at the training batch, on the same provider."""
    sess = session(model, [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)}
    sess.run(None, feed)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, feed)
        runs += 1
    return runs * batch / (time.perf_counter() - start)


def _store(cells: dict, env: dict) -> None:
    rows = [[c["cell"], f"{c['macs_kept']:.3f}", c["images"], c["minutes"], c["distill"]["provider"],
             f"{c['distill']['images_per_second']:.1f} ({c['distill']['images_per_second'] / c['forward_views_per_second']:.2f} of the forward's)",
             f"{c['top1_original']:.2%}", f"{c['top1_recovered']:.2%}",
             f"**{c['top1_distilled']:.2%}**", c["eval_images"]] for c in cells.values()]
    markdown = ("# Distillation\n\n`python -m benchmarks.distill --cells NAME`: prune to the MACs budget with the "
                "default recovery, then `onnx_whc.api.distill` for the cell's minutes on the same calibration "
                "images (held-out samples choose the checkpoint); top-1 on the eval split.\n\n"
                + markdown_table(["cell", "MACs kept", "training images", "minutes", "provider", "training views/s",
                                  "top-1 original", "least squares", "distilled", "eval images"], rows)
                + f"\n\nMachine: {environment_line(env)}.\n")
    write_results("distill", markdown, {"environment": env, "cells": cells})
    _plot(cells)


def _plot(cells: dict) -> None:
    from onnx_whc.reports.plot import line_charts

    series = {name: [(p["seconds"] / 60, p["top1"]) for p in c["curve"]] for name, c in cells.items()}
    line_charts([{"x": "minutes of distillation", "y": "top-1 (eval subset)", "series": series}],
                str(RESULTS / "distill.png"), "top-1 against minutes of distillation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="resnet56-0.549")
    parser.add_argument("--minutes", type=float, help="override every cell's minutes")
    parser.add_argument("--provider", help="cpu or cuda")
    args = parser.parse_args()
    stored = RESULTS / "distill.json"
    cells = json.loads(stored.read_text())["cells"] if stored.exists() else {}
    env = environment()
    for name in args.cells.split(","):
        cell = run_cell(name, args.minutes, args.provider)
        cells[name] = cell
        print(json.dumps({k: v for k, v in cell.items() if k not in ("curve", "distill")}), flush=True)
        _store(cells, env)


if __name__ == "__main__":
    main()

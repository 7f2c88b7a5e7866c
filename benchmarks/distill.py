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
from onnx_whc.data.views import Augment
from onnx_whc.graph.runtime import session
from onnx_whc.recovery.distill import DistillSettings

from .common import RESULTS, SHARED, environment, machine_line, markdown_table, write_results
from .datasets import accuracy, load_split

# name: (model, data set, MACs budget or None for --ratio 0.4 without --calib, minutes, images, preset)
CELLS = {
    "resnet56-0.549": ("resnet56_cifar10.onnx", "cifar10", 0.549, 20, "calib", "cifar"),
    "resnet56-0.45": ("resnet56_cifar10.onnx", "cifar10", 0.45, 20, "calib", "cifar"),
    "resnet56-0.45-4000": ("resnet56_cifar10.onnx", "cifar10", 0.45, 20, "eval4000", "cifar"),
    "resnet56-synthetic": ("resnet56_cifar10.onnx", "cifar10", None, 20, None, "cifar"),
    "efficientnet_lite0-0.78": ("efficientnet_lite0_imagenet.onnx", "imagenet", 0.78, 60, "calib", "inception"),
    "yolov8n-0.7": ("yolov8n_nudenet.onnx", "yolo", 0.7, 60, "calib", "yolo"),
}
# a classifier's defaults since the pooled feature-map term: cutmix, and that term at weight 1
CLASSIFIER_DEFAULTS = {"augment": Augment(mix="cutmix"), "features": 1.0}
VARIANTS = {  # name: (the cell it varies, DistillSettings fields other than the default)
    "resnet56-0.549-affine": ("resnet56-0.549", {"parameters": "affine"}),
    # the built-in synthetic images beside the calib images
    "resnet56-0.549-synthetic-too": ("resnet56-0.549", {"synthetic": True}),
    # on ImageNet the calib split holds 500 classes and the eval split the other 500: the synthetic
    # images are the only views the student gets of anything beyond the user's classes
    "efficientnet_lite0-0.78-synthetic-too": ("efficientnet_lite0-0.78", {"synthetic": True}),
    # a gentler peak step: at 1e-3 the held-out divergence of the last two doubles in the first minutes
    "resnet56-0.549-lr3e-4": ("resnet56-0.549", {"lr": 3e-4}),
    "efficientnet_lite0-0.78-lr3e-4": ("efficientnet_lite0-0.78", {"lr": 3e-4}),
    "yolov8n-0.7-lr3e-4": ("yolov8n-0.7", {"lr": 3e-4}),
    # the held-out checks and the returned model take the weights averaged over the last fifth of the steps
    "resnet56-0.549-average": ("resnet56-0.549", {"average": 0.2}),
    # a box of one image pasted into another instead of their weighted sum
    "resnet56-0.549-cutmix": ("resnet56-0.549", {"augment": Augment(mix="cutmix")}),
    "resnet56-0.549-cutmix-average": ("resnet56-0.549", {"augment": Augment(mix="cutmix"), "average": 0.2}),
    "resnet56-0.549-cutmix-seed1": ("resnet56-0.549", {"augment": Augment(mix="cutmix"), "seed": 1}),
    "efficientnet_lite0-0.78-cutmix": ("efficientnet_lite0-0.78", {"augment": Augment(mix="cutmix")}),
    "yolov8n-0.7-cutmix": ("yolov8n-0.7", {"augment": Augment(mix="cutmix")}),
    "resnet56-0.549-cutmix-lr2e-3": ("resnet56-0.549", {"augment": Augment(mix="cutmix"), "lr": 2e-3}),
    # a term on the feature maps the global pooling reads, beside the logits (MiR)
    "efficientnet_lite0-0.78-features": ("efficientnet_lite0-0.78", CLASSIFIER_DEFAULTS),
    "resnet56-0.549-features": ("resnet56-0.549", CLASSIFIER_DEFAULTS),
    "efficientnet_lite0-0.78-features4": ("efficientnet_lite0-0.78", {"augment": Augment(mix="cutmix"),
                                                                      "features": 4.0}),
    "resnet56-0.549-features4": ("resnet56-0.549", {"augment": Augment(mix="cutmix"), "features": 4.0}),
    # views of 160×160 (--distill-scale 0.75): a step costs about half, the budget holds more of them
    "efficientnet_lite0-0.78-features4-160": ("efficientnet_lite0-0.78", {"augment": Augment(mix="cutmix"),
                                                                          "features": 4.0, "scale": 0.75}),
    # the residual joins the prune left whole, beside the outputs (a detector has no pooled features)
    "yolov8n-0.7-trunks": ("yolov8n-0.7", {"trunks": 1.0}),
    # and the class scores matched on their logits by the binary divergence instead of the squared error
    "yolov8n-0.7-trunks-sigmoid": ("yolov8n-0.7", {"trunks": 1.0, "sigmoid_logits": True}),
    "yolov8n-0.7-sigmoid": ("yolov8n-0.7", {"sigmoid_logits": True}),
    # the classifier's outputs matched unsoftened (Beyer et al. distil at temperature 1), and softer
    "resnet56-0.549-t1": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS, "temperature": 1.0}),
    "resnet56-0.549-t4": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS, "temperature": 4.0}),
    # each weight pulled back toward its start (L2-SP): the held-out divergence stops falling after a
    # third of the budget while the training loss goes on falling
    "resnet56-0.549-anchor5": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS, "anchor": 5.0}),
    # the best detector run again on other views: how far its two detections more are noise
    "yolov8n-0.7-trunks-seed1": ("yolov8n-0.7", {"trunks": 1.0, "seed": 1}),
    # crops of at least half the image instead of a quarter: a 32×32 image's quarter is 16×16 blown up
    # to twice its size, a view unlike any the eval split holds
    "resnet56-0.549-crop50": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS,
                                                 "augment": Augment(mix="cutmix", scale=(0.5, 1.0))}),
    # the 27 residual joins, all left whole by the prune, beside the logits: more of the teacher's answer
    # per view where the images are few
    "resnet56-0.549-trunks": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS, "trunks": 1.0}),
    # the teacher's answer averaged with its answer on the mirror image: a target that treats both sides alike
    "resnet56-0.549-mirrored": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS, "mirrored_teacher": True}),
    # the defaults again after the training graph got faster (the ReLUs' mask multiplied, dW from dY's
    # windows where the filters are fewer): more steps in the same minutes
    "resnet56-0.549-faster-step": ("resnet56-0.549", CLASSIFIER_DEFAULTS),
    # and for 25 minutes: on the Intel Xeon 20 minutes hold about 2,000 steps, where the AMD EPYC ran
    # 2,300-2,550; do the steps explain the Xeon's lower results? (past the 20 minutes the target allows)
    "resnet56-0.549-25min": ("resnet56-0.549", {**CLASSIFIER_DEFAULTS, "minutes": 25}),
}
# the defaults when the cells without these fields of their own were measured: mixup, and no term on
# the pooled feature maps
MEASURED_WITH = {"augment": Augment(mix="mixup"), "features": 0.0}
FOLDERS = {"cifar10": "cifar10-test", "imagenet": "imagenet-sample", "yolo": "imagenet-sample"}
SIDES = {"cifar10": 32, "imagenet": 224, "yolo": 320}


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


class Top1:
    """Top-1 on the eval split (for a cell trained on eval images, on the rest), and on a subset for the curve."""

    def __init__(self, dataset: str, images: str | None, model: Path):
        x, y = load_split(dataset, "eval")
        if images == "eval4000":  # the 5,000 eval images not trained on
            keep = np.ones(len(x), bool)
            keep[:8000:2] = False
            x, y = x[keep], y[keep]
        step = max(1, len(x) // 2000)
        self.x, self.y, self.xc, self.yc = x, y, x[::step], y[::step]
        self.original = round(accuracy(model, x, y), 4)

    def curve(self, model_bytes: bytes) -> float:
        return round(accuracy(model_bytes, self.xc, self.yc), 4)

    def final(self, model_bytes: bytes) -> dict:
        return {"top1": round(accuracy(model_bytes, self.x, self.y), 4), "eval_images": len(self.x)}


class Detections:
    """The YOLOv8n's decoded detections kept on 150 eval images (the honest-quality benchmark's decoder and
    matching), and the mean R² of its class-score channels there."""

    def __init__(self, dataset: str, images: str | None, model: Path):
        from .detection import decode, eval_images, load_letterboxed, run

        self.inputs = load_letterboxed(eval_images("eval", 150), 320)
        self.reference_out = run(str(model), self.inputs)
        self.reference = decode(self.reference_out)
        self.original = 1.0

    def curve(self, model_bytes: bytes) -> float:
        return self.final(model_bytes)["kept"]

    def final(self, model_bytes: bytes) -> dict:
        from onnx_whc.measure.quality import channel_r2

        from .detection import agreement, decode, run

        out = run(model_bytes, self.inputs)
        found = agreement(self.reference, decode(out))
        r2 = channel_r2(self.reference_out[:, 4:], out[:, 4:], 1)
        return {"kept": round(found["kept"], 4), "extra_share": round(found["extra_share"], 4),
                "reference": found["reference"], "extra": found["extra"],
                "class_r2_mean": round(float(np.nanmean(r2)), 4), "eval_images": len(self.inputs)}


def run_cell(name: str, minutes: float | None, provider: str | None) -> dict:
    base, fields = VARIANTS.get(name, (name, {}))
    fields = {**MEASURED_WITH, **fields}
    file, dataset, budget, default_minutes, images, preset = CELLS[base]
    minutes = minutes or fields.pop("minutes", None) or default_minutes
    model = SHARED / "models" / file
    preprocess = preset_preprocess(preset)
    scorer = (Detections if dataset == "yolo" else Top1)(dataset, images, model)
    shapes = {"images": (1, 3, 320, 320)} if dataset == "yolo" else None
    with tempfile.TemporaryDirectory() as tmp:
        calib = str(_folder(dataset, images, Path(tmp))) if images else None
        options = {"calib": calib, "preprocess": preprocess, "input_shapes": shapes}
        start = time.perf_counter()
        if budget is None:
            pruned, report = onnx_whc.prune(model, ratio=0.4, validate=False, progress=True, **options)
        else:
            pruned, report = onnx_whc.prune(model, target_macs=budget, validate=False, progress=True, **options)
        prune_seconds = time.perf_counter() - start
        recovered = scorer.final(pruned.SerializeToString())
        curve = []

        def checkpoint(point: dict, candidate) -> None:
            curve.append({**point, "eval": scorer.curve(candidate.SerializeToString())})
            print(f"  {point['seconds'] / 60:.1f} min, step {point['step']}: held-out {point['held_out']}, "
                  f"eval {curve[-1]['eval']:.4f}", flush=True)

        distilled, dreport = distill(model, pruned, progress=True, on_checkpoint=checkpoint,
                                     distill=DistillSettings(seconds=60 * minutes, provider=provider,
                                                              **fields), **options)
    distilled_scores = scorer.final(distilled.SerializeToString())
    side = SIDES[dataset]
    forward = _forward_throughput(distilled, dreport.batch, (1, 3, side, side), dreport.provider)
    return {"cell": name, "model": file, "macs_kept": round(report.macs_kept, 4), "images": images or "synthetic",
            "minutes": minutes, "prune_seconds": round(prune_seconds, 1), "recovered": recovered,
            "distilled": distilled_scores, "original": scorer.original, "curve": curve, "distill": dreport.to_dict(),
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
             f"{c['distill']['images_per_second']:.1f}{_smaller_views(c)} "
             f"({c['distill']['images_per_second'] / c['forward_views_per_second']:.2f} of the forward's)",
             _scores(c["original"]), _scores(c["recovered"]), f"**{_scores(c['distilled'])}**",
             c["distilled"]["eval_images"]] for c in cells.values()]
    markdown = ("# Distillation\n\n`python -m benchmarks.distill --cells NAME`: prune to the MACs budget with the "
                "default recovery, then `onnx_whc.api.distill` for the cell's minutes on the same calibration "
                "images (held-out samples choose the checkpoint); top-1 on the eval split.\n\n"
                + markdown_table(["cell", "MACs kept", "training images", "minutes", "provider", "training views/s",
                                  "original", "least squares", "distilled", "eval images"], rows)
                + "\n\n" + _machines(cells) + "\n")
    write_results("distill", markdown, {"environment": env, "cells": cells})
    _plot(cells)


def _machines(cells: dict) -> str:
    """Which machine ran which cells: steps within the minutes, and so the results, depend on it."""
    runs: dict[str, list[str]] = {}
    for name, cell in cells.items():
        runs.setdefault(machine_line(cell["environment"]), []).append(name)
    return "\n".join(f"Measured on {machine}: {', '.join(names)}." for machine, names in runs.items())


def _smaller_views(cell: dict) -> str:
    """' at H×W' where the views were smaller than the input (the forward's throughput is at the input's size)."""
    side = SIDES[CELLS[VARIANTS.get(cell["cell"], (cell["cell"],))[0]][1]]
    size = cell["distill"].get("view_size") or [side, side]
    return "" if size == [side, side] else f" at {size[0]}×{size[1]}"


def _scores(value) -> str:
    """Top-1, or the detections kept and extra with the class channels' R²."""
    if isinstance(value, float):
        return f"{value:.2%}"
    if "top1" in value:
        return f"{value['top1']:.2%}"
    return f"{value['kept']:.0%} kept, {value['extra_share']:.0%} extra, R² {value['class_r2_mean']:.3f}"


PANELS = (  # (what the panel compares, its y label, which cells)
    ("ResNet-56 at 0.549: variants", "top-1 (2,000 eval images)", lambda n: n.startswith("resnet56-0.549")),
    ("ResNet-56: 1,000 or 4,000 images, or none", "top-1 (eval subset)", lambda n: n.startswith("resnet56-0.45")
     or n == "resnet56-synthetic"),
    ("EfficientNet-Lite0", "top-1 (500 eval images)", lambda n: n.startswith("efficientnet")),
    ("YOLOv8n", "detections kept (150 eval images)", lambda n: n.startswith("yolo")),
)


def _plot(cells: dict) -> None:
    from onnx_whc.reports.plot import line_charts

    panels = []
    for title, what, chosen in PANELS:
        series = {name: [(p["seconds"] / 60, p["eval"]) for p in c["curve"]] for name, c in cells.items()
                  if chosen(name)}
        if series:
            panels.append({"x": f"minutes of distillation ({title})", "y": what, "series": series})
    line_charts(panels, str(RESULTS / "distill.png"), "against minutes of distillation")


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
        cells[name] = {**cell, "environment": env}
        print(json.dumps({k: v for k, v in cell.items() if k not in ("curve", "distill")}), flush=True)
        _store(cells, env)


if __name__ == "__main__":
    main()

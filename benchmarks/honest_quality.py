"""What the tool reports against what the user gets, on every shared model.

For each case: one `onnx_whc.prune` (the API behind `onnx-whc prune`) in-process, then the
reported quality (per-output metric on held-out samples) beside the truth measured here: top-1 on
the `eval` split for classifiers, detection agreement (decoded boxes) for the YOLOv8n detector.
Calibration images come from the `calib` split only; the built-in synthetic set needs none.
Writes benchmarks/results/honest_quality.md and .json.

    python -m benchmarks.honest_quality                       # every case (about 15 min on 2 cores)
    python -m benchmarks.honest_quality --cases resnet56-no-calib
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
from onnx_whc.api import QualityFloor
from onnx_whc.data.calibration import Preprocess, preset_preprocess

from .common import RESULTS, SHARED, environment, environment_line, markdown_table, write_results
from .datasets import accuracy, load_split, predict
from .variants import active, apply

YOLO = SHARED / "models" / "yolov8n_nudenet.onnx"
LITE0 = dict(mean=(0.5,) * 3, std=(0.5,) * 3, resize=256, crop=224)

# name -> (model file, dataset, prune keyword arguments, calibration split or None)
CASES = {
    "resnet56-raw": ("resnet56_cifar10.onnx", "cifar10", dict(ratio=0.4, recover="none"), None),
    "resnet56-no-calib": ("resnet56_cifar10.onnx", "cifar10", dict(ratio=0.4), None),
    "resnet56-calib": ("resnet56_cifar10.onnx", "cifar10", dict(ratio=0.4), "calib"),
    "resnet56-min-agreement-0.97": ("resnet56_cifar10.onnx", "cifar10",
                                    dict(floor=QualityFloor(agreement=0.97)), "calib"),
    "resnet20-no-calib": ("resnet20_cifar10.onnx", "cifar10", dict(ratio=0.4), None),
    "lite0-raw": ("efficientnet_lite0_imagenet.onnx", "imagenet", dict(target_macs=0.75, recover="none"), None),
    "lite0-no-calib": ("efficientnet_lite0_imagenet.onnx", "imagenet", dict(target_macs=0.75), None),
    "lite0-no-calib-preset": ("efficientnet_lite0_imagenet.onnx", "imagenet", dict(target_macs=0.75, preset=True),
                              None),
    "lite0-calib": ("efficientnet_lite0_imagenet.onnx", "imagenet", dict(target_macs=0.75), "calib"),
    "yolo-raw": ("yolov8n_nudenet.onnx", "yolo", dict(target_macs=0.6, recover="none"), None),
    "yolo-no-calib": ("yolov8n_nudenet.onnx", "yolo", dict(target_macs=0.7), None),
    "yolo-calib": ("yolov8n_nudenet.onnx", "yolo", dict(target_macs=0.7, calib_size=200), "calib"),
    # the time budget at the detector's larger deployment size (15 minutes at 640x640)
    "yolo-calib-640": ("yolov8n_nudenet.onnx", "yolo", dict(target_macs=0.7, calib_size=200, size=640), "calib"),
}


def _calib_folder(dataset: str, tmp: Path) -> Path:
    """A folder of links to the calib-split images only (the shared folders hold both splits)."""
    root = SHARED / "data" / ("imagenet-sample" if dataset in ("imagenet", "yolo") else "cifar10-test")
    with open(root / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "calib"]
    for i, row in enumerate(rows):
        (tmp / f"{i:05d}{Path(row['file']).suffix}").symlink_to(root / row["file"])
    return tmp


def run_case(name: str) -> dict:
    apply()
    file, dataset, kwargs, split = CASES[name]
    kwargs = dict(kwargs)
    preset = kwargs.pop("preset", False)
    size = kwargs.pop("size", 320)
    preprocess = None
    if dataset == "imagenet" and (split or preset):
        preprocess = Preprocess(**LITE0) if split else preset_preprocess("inception")
    if dataset == "yolo":
        preprocess = preset_preprocess("yolo")
        kwargs["input_shapes"] = {"images": (1, 3, size, size)}
    with tempfile.TemporaryDirectory() as tmp:
        calib = str(_calib_folder(dataset, Path(tmp))) if split else None
        start = time.perf_counter()
        pruned, report = onnx_whc.prune(SHARED / "models" / file, calib=calib, preprocess=preprocess, validate=True,
                                        progress=True, **kwargs)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cell = {"case": name, "macs_kept": round(report.macs_kept, 4), "seconds": round(seconds, 1),
            "peak_mib_process": round(peak), "calibration": report.calibration, "quality": report.quality,
            "quality_on": report.quality_on, "warning": report.warning, "search": report.search}
    if dataset == "yolo":
        from .detection import detection_agreement, eval_images, load_letterboxed

        inputs = load_letterboxed(eval_images("eval", 150), size)
        cell["detections"] = detection_agreement(str(YOLO), pruned.SerializeToString(), inputs)
    else:
        x, y = load_split(dataset, "eval")
        cell["top1"] = round(accuracy(pruned.SerializeToString(), x, y), 4)
        cell["top1_original"] = round(accuracy(SHARED / "models" / file, x, y), 4)
        # agreement on the eval split, to compare with the held-out figure the tool reported
        cell["eval_agreement"] = round(_agreement(SHARED / "models" / file, pruned.SerializeToString(), x), 4)
    return cell


def _agreement(original, pruned, x) -> float:
    return float(np.mean(predict(original, x) == predict(pruned, x)))


def _calibration(cell: dict) -> str:
    """The data used, with the temporary folder of calib-split links named for what it holds."""
    text = cell["calibration"].split(" (")[0]
    return text.split(" from /")[0] + " of the calib split" if " from /" in text else text


def _metric(cell: dict) -> str:
    parts = []
    for output, q in (cell["quality"] or {}).items():
        if q["metric"] == "agreement":
            parts.append(f"{output}: agreement {q['value']:.3f}")
        elif q["metric"] == "r2":
            parts.append(f"{output}: R² {q['value']:.3f} (worst {q['r2_worst']:.2f})")
        else:
            parts.append(f"{output}: {q['metric']} {q['value']}")
        parts[-1] += f", cosine {q['cosine']:.4f}" if q.get("cosine") is not None else ""
    return "; ".join(parts)


def _truth(cell: dict) -> str:
    if "detections" in cell:
        d = cell["detections"]
        return f"{d['kept']:.0%} of {d['reference']} detections kept, {d['extra']} extra"
    return f"top-1 {cell['top1']:.2%} (unpruned {cell['top1_original']:.2%}), eval agreement {cell['eval_agreement']:.3f}"


def write(cells: dict, env: dict) -> None:
    ordered = [cells[n] for n in CASES if n in cells]
    rows = [[c["case"], f"{c['macs_kept']:.3f}", _calibration(c), _metric(c), _truth(c),
             "yes" if c["warning"] else "no", c["seconds"]] for c in ordered]
    md = ["# What the tool reports and what the user gets", "",
          "`python -m benchmarks.honest_quality`: the reported quality is measured by `onnx-whc` on held-out "
          "calibration samples (or held-out synthetic images without `--calib`); top-1 and eval agreement "
          "on the whole `eval` split, detections on 150 eval images (320×320, class score > 0.25, NMS 0.45, "
          "matched at IoU 0.5, same class). Prune times were taken with one benchmark at a time on the 2 cores.",
          "", environment_line(env), "",
          markdown_table(["case", "MACs kept", "calibration", "reported (held-out)", "measured on eval",
                          "warning", "prune s"], rows), ""]
    elsewhere: dict[str, list[str]] = {}  # re-measured cells keep their machine: prune times differ by machine
    for c in ordered:
        if c.get("environment", env)["cpu"] != env["cpu"]:
            elsewhere.setdefault(environment_line(c["environment"]), []).append(c["case"])
    md += [f"Measured on another machine: {', '.join(cases)} ({line})." for line, cases in elsewhere.items()]
    md += [""] if elsewhere else []
    for c in ordered:
        if c["search"]:
            md += [f"{c['case']} probes (MACs kept, result, held-out agreement): " + ", ".join(
                f"{p['macs_kept']:.3f} {'pass' if p['passed'] else 'fail'} ({list(p['quality'].values())[0]:.3f})"
                for p in c["search"]["probes"]), ""]
        if c["warning"]:
            md += [f"{c['case']}: `{c['warning']}`", ""]
    write_results("honest_quality", "\n".join(md), {"environment": env, "cells": ordered})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    path = RESULTS / "honest_quality.json"
    stored = json.loads(path.read_text()) if path.exists() else {"cells": []}
    cells = {c["case"]: c for c in stored["cells"]}
    here = environment()
    env = stored.get("environment") or here
    store = not active()  # a variant's cells are printed only, never stored as the tool's
    for name in [n for n in args.cases.split(",") if n]:  # --cases "" rewrites the tables only
        print(f"== {name}", flush=True)
        cells[name] = {**run_case(name), "environment": here}
        print(json.dumps({k: v for k, v in cells[name].items() if k != "search"}, indent=1), flush=True)
        if store:
            write(cells, env)
    if store:
        write(cells, env)


if __name__ == "__main__":
    main()

"""The same command, this version against an earlier commit: identical pruned bytes, and the time of each.

    python -m benchmarks.same_output --against 5a4ccbf [--cases resnet56,lite0-calib]

For each case the CLI prunes a shared model at `--ratio 0.4` in a fresh process, first from a
worktree of `--against`, then from this checkout, one after the other (so both see the same load);
the outputs' SHA-256 must match. Calibration cases read 200 images of the calib split through a
folder of links. A refactoring or an option that is off by default must leave every output unchanged.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import SHARED, environment, environment_line, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 200
CASES = {  # name: (model file, calibration data set or None, extra options)
    "resnet20": ("resnet20_cifar10.onnx", None, ["--calib-preset", "cifar"]),
    "resnet56": ("resnet56_cifar10.onnx", None, ["--calib-preset", "cifar"]),
    "lite0": ("efficientnet_lite0_imagenet.onnx", None, ["--calib-preset", "inception"]),
    "yolov8n": ("yolov8n_nudenet.onnx", None, ["--calib-preset", "yolo"]),
    "fer": ("fer_emotion_minixception_tf2onnx.onnx", None, ["--layout", "NHWC"]),
    "onet": ("facenet_mtcnn_onet_torch.onnx", None, []),
    "resnet56-calib": ("resnet56_cifar10.onnx", "cifar10-test", ["--calib-preset", "cifar"]),
    "lite0-calib": ("efficientnet_lite0_imagenet.onnx", "imagenet-sample", ["--calib-preset", "inception"]),
    "yolov8n-calib": ("yolov8n_nudenet.onnx", "imagenet-sample", ["--calib-preset", "yolo"]),
}


def _calib_folder(dataset: str, folder: Path) -> Path:
    """`IMAGES` calib-split images, evenly spaced over the sorted label file, as links."""
    root = SHARED / "data" / dataset
    with open(root / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "calib"]
    step = max(1, len(rows) // IMAGES)
    folder.mkdir()
    for i, row in enumerate(rows[::step][:IMAGES]):
        (folder / f"{i:05d}{Path(row['file']).suffix}").symlink_to(root / row["file"])
    return folder


def _prune(checkout: Path, args: list[str], output: Path) -> tuple[str, float]:
    """(SHA-256 of the pruned file, seconds) of one CLI run from `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnx_whc.cli", "prune", *args, "-o", str(output)], cwd=checkout,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: prune {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return hashlib.sha256(output.read_bytes()).hexdigest(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the earlier commit")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    env = environment()
    rows, cells = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for name in args.cases.split(","):
                file, dataset, extra = CASES[name]
                options = [str(SHARED / "models" / file), "--ratio", "0.4", "--no-validate", *extra]
                if dataset:
                    options += ["--calib", str(_calib_folder(dataset, tmp / f"calib-{name}"))]
                old, old_s = _prune(before, options, tmp / f"{name}-before.onnx")
                new, new_s = _prune(ROOT, options, tmp / f"{name}-after.onnx")
                cells.append({"case": name, "same_bytes": old == new, "sha256": new, "seconds_before": round(old_s, 1),
                              "seconds_after": round(new_s, 1)})
                rows.append([name, "yes" if old == new else "**no**", f"{old_s:.1f}", f"{new_s:.1f}"])
                print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    markdown = (f"# Same output as {args.against}\n\n`python -m benchmarks.same_output --against {args.against}`: "
                f"`onnx-whc prune MODEL --ratio 0.4 --no-validate` (calibration cases: {IMAGES} calib-split "
                "images), each case run from the earlier commit then from this one, in fresh processes.\n\n"
                + markdown_table(["case", "same bytes", "seconds before", "seconds after"], rows)
                + f"\n\nMachine: {environment_line(env)}. The seconds are single runs: with other jobs on the cores "
                "they say the time did not change by much, not by how little.\n")
    write_results("same_output", markdown, {"against": args.against, "environment": env, "cells": cells})
    print(markdown)


if __name__ == "__main__":
    main()

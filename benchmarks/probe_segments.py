"""The allocator's probing with segments (each group's probes run only what its masks feed) against the
whole masked model, interleaved on one machine: seconds, and whether the chosen path is the same.

The default calibration of each shared model (YOLOv8n at 320 with 200 calib images and the yolo
preset; EfficientNet-Lite0 with its 500 calib images), then the `Allocator` built segments, whole,
segments. Writes benchmarks/results/probe_segments.md and .json.

    python -m benchmarks.probe_segments
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx_whc.plan.allocate as allocate
from onnx_whc.data.calibration import Preprocess, preset_preprocess
from onnx_whc.pipeline import Pipeline
from onnx_whc.plan.channel_stats import channel_stats

from .common import SHARED, environment, environment_line, markdown_table, write_results
from .honest_quality import LITE0, YOLO, _calib_folder

MODELS = {  # name -> (model, input shapes, dataset, calibration size, preprocessing)
    "yolov8n_nudenet 320": (YOLO, {"images": (1, 3, 320, 320)}, "yolo", 200, preset_preprocess("yolo")),
    "efficientnet_lite0": (SHARED / "models" / "efficientnet_lite0_imagenet.onnx", None, "imagenet", None,
                           Preprocess(**LITE0)),
}
ORDER = ("segments", "whole", "segments")


def _allocator(run: Pipeline, stats, segmented: bool) -> tuple[float, list]:
    original = allocate.MaskedModel.__init__

    def init(self, *args, probes=(), **kwargs):
        original(self, *args, probes=probes if segmented else (), **kwargs)

    allocate.MaskedModel.__init__ = init
    try:
        start = time.perf_counter()
        allocator = allocate.Allocator(run.loaded, run.analysis, run.calibration.fit, run.select_args, stats)
        return time.perf_counter() - start, allocator.path
    finally:
        allocate.MaskedModel.__init__ = original


def measure(name: str) -> dict:
    model, shapes, dataset, size, preprocess = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        run = Pipeline(model, shapes, str(_calib_folder(dataset, Path(tmp))), size, preprocess, 0, True, "auto",
                       "auto", False, (), 8, None, False, measure=False)
    stats = channel_stats(run.loaded, run.analysis, run.calibration.fit)
    times, paths = {"segments": [], "whole": []}, []
    for mode in ORDER:
        seconds, path = _allocator(run, stats, mode == "segments")
        times[mode].append(round(seconds, 1))
        paths.append(path)
        print(f"{name} {mode}: {seconds:.1f} s", flush=True)
    return {"model": name, "seconds": times, "same_path": all(p == paths[0] for p in paths),
            "speedup": round(min(times["whole"]) / min(times["segments"]), 2)}


def main() -> None:
    env = environment()
    cells = [measure(name) for name in MODELS]
    rows = [[c["model"], ", ".join(map(str, c["seconds"]["segments"])), ", ".join(map(str, c["seconds"]["whole"])),
             f"{c['speedup']}×", "yes" if c["same_path"] else "no"] for c in cells]
    md = ["# The allocator's probes on segments", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
          environment_line(env), "",
          markdown_table(["model", "probing s, segments", "probing s, whole model", "speed-up (best of each)",
                          "same allocation path"], rows), ""]
    write_results("probe_segments", "\n".join(md), {"environment": env, "cells": cells})


if __name__ == "__main__":
    main()

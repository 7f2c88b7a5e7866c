"""Accuracy at an equal measured latency: a speed target against the MACs budget, with calibration.

For each shared classifier: `onnx_whc.prune(--target-macs F, --calib)` (the MACs budget,
`--round-to 8`), timed here against the original; then `onnx_whc.prune(--target-speedup S)` with
the same calibration, S the speedup the MACs plan measured, so both land at about the same latency:
the speed search spends the budget per measured millisecond at measured widths. Top-1 on the
`eval` split; both pruned models are timed again together, interleaved with the original (ONNX
Runtime CPU, batch 1, one thread). Writes benchmarks/results/latency_accuracy.md and .json.

    python -m benchmarks.latency_accuracy
    python -m benchmarks.latency_accuracy --models resnet56
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx

import onnx_whc
from onnx_whc.graph.runtime import session
from onnx_whc.measure.validate import time_pair
from onnx_whc.plan.speed_target import SpeedTarget

from .common import (
    RESULTS,
    cold_widths_cache,
    environment,
    environment_line,
    markdown_table,
    shared_model,
    write_results,
)
from .datasets import accuracy, load_split

# name -> (dataset, MACs budget)
MODELS = {"resnet56": ("cifar10", 0.6), "efficientnet_lite0": ("imagenet", 0.75)}
THREADS, RUNS, WARMUP = 1, 50, 5
TARGET_TIMINGS = 3  # the MACs plan's speedup, the target, is the median of this many interleaved runs


def _speedups(original, models: list[onnx.ModelProto], input_shape) -> list[float]:
    """Each model's speedup over the original, all timed in one interleaved run."""
    providers = ["CPUExecutionProvider"]
    base = session(original, providers, THREADS)
    feeds = {base.get_inputs()[0].name: np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)}
    result = []
    for model in models:
        before, after = time_pair(base, session(model, providers, THREADS), feeds, RUNS, WARMUP)
        result.append(float(np.median(before) / np.median(after)))
    return result


def run(name: str) -> dict:
    dataset, budget = MODELS[name]
    path = shared_model(name)
    x, _ = load_split(dataset, "calib")
    xe, ye = load_split(dataset, "eval")
    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    calib = {input_name: np.array(x)}
    shape = (1, *x.shape[1:])
    start = time.perf_counter()
    by_macs, macs_report = onnx_whc.prune(path, target_macs=budget, calib=calib, validate=False)
    macs_seconds = time.perf_counter() - start
    goal = float(np.median(_speedups(path, [by_macs] * TARGET_TIMINGS, shape)))
    with cold_widths_cache():
        start = time.perf_counter()
        by_speed, speed_report = onnx_whc.prune(path, speed=SpeedTarget(goal, threads=THREADS), calib=calib,
                                                validate=False, provider="cpu")
        speed_seconds = time.perf_counter() - start
    measured = _speedups(path, [by_macs, by_speed], shape)
    row = {"model": name, "top1_original": round(accuracy(str(path), xe, ye), 4), "target_speedup": round(goal, 3)}
    for key, model, report, seconds, speedup in (("macs", by_macs, macs_report, macs_seconds, measured[0]),
                                                 ("speed", by_speed, speed_report, speed_seconds, measured[1])):
        row[key] = {"macs_kept": round(report.macs_kept, 4), "speedup": round(speedup, 3),
                    "top1": round(accuracy(model.SerializeToString(), xe, ye), 4), "seconds": round(seconds, 1),
                    "speed": report.speed, "widths": (report.widths or {}).get("seconds")}
    print(f"{name}: MACs plan {row['macs']}, speed plan {row['speed']}", flush=True)
    return row


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# Accuracy at an equal measured latency", "",
             "Each model is pruned to a MACs budget with `--calib` (the `calib` split; `--round-to 8`), that "
             "model's speedup is measured (the median of three interleaved timings), and the same speedup is asked of `--target-speedup` with the same "
             "calibration (measured widths, the budget spent per measured millisecond). Top-1 on the `eval` "
             f"split; the speedups in the table come from one later run timing both models interleaved with the "
             f"original (ONNX Runtime CPU, batch 1, {THREADS} thread, {RUNS} runs), so the MACs plan's may differ from "
             "the target its first timing set.",
             "", f"Machine: {environment_line(env)}.", "", "Command: `python -m benchmarks.latency_accuracy`", ""]
    table = []
    for r in rows:
        for key, label in (("macs", "MACs budget"), ("speed", f"--target-speedup {r['target_speedup']:.2f}")):
            c = r[key]
            table.append([r["model"], label, f"{c['macs_kept']:.3f}", f"{c['speedup']:.2f}x", f"{c['top1']:.2%}",
                          f"{r['top1_original']:.2%}", f"{c['seconds']:.0f}"])
    lines += [markdown_table(["model", "budget", "MACs kept", "measured speedup", "top-1", "unpruned", "prune s"],
                             table), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    env = environment()
    path = RESULTS / "latency_accuracy.json"
    stored = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    for name in args.models.split(","):
        stored[name] = run(name)
        rows = [stored[m] for m in MODELS if m in stored]
        write_results("latency_accuracy", markdown(rows, env), {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()

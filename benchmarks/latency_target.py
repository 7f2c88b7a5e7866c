"""Pruning to a measured speed: `--target-speedup` against a MACs budget, timed on this machine's CPU.

For each model, `onnx_whc.prune(model, speed=SpeedTarget(X))` (no calibration data, no recovery:
timing needs neither) at measured channel widths (the default with a speed target; a cold cache,
then the same measurement again from the warm one), the same search at `--round-to 8`, and the
plain `--ratio 0.4` with the default `--round-to 8`.
Every pruned model is then timed again, apart from the search, by `onnx_whc.reports.bench.compare`
(batch 1, interleaved with the original, 50 runs after 5 warm-up runs), so the speedup in the table
is not the one the search selected on. Writes benchmarks/results/latency_target.md and .json.

    python -m benchmarks.latency_target
    python -m benchmarks.latency_target --models fer_emotion
"""

from __future__ import annotations

import argparse
import time

import onnx

import onnx_whc
from onnx_whc.errors import UserInputError
from onnx_whc.graph.dependency import analyze_channels
from onnx_whc.graph.load import load
from onnx_whc.plan.speed_target import SpeedTarget
from onnx_whc.plan.widths import measure_widths
from onnx_whc.reports.bench import compare

from . import synthetic
from .common import SHARED, cold_widths_cache, environment, environment_line, markdown_table, write_results

# name -> (how to get the model, target speedup, least measured speedup the issue accepts)
MODELS = {
    "resnet50": (lambda: synthetic.resnet50(), 2.0, 1.9),
    "mobilenet_v2": (lambda: synthetic.mobilenet_v2(), 1.5, 1.45),
    "fer_emotion": (lambda: onnx.load(SHARED / "models" / "fer_emotion_minixception_tf2onnx.onnx"), 1.3, 1.25),
}
RUNS, WARMUP = 50, 5


def measure(original, pruned, threads) -> float:
    result = compare(original, pruned, batches=(1,), provider="cpu", runs=RUNS, warmup=WARMUP, threads=threads)
    return result.batches[0].speedup


HOW = {"speed": "speed target, measured widths", "speed-8": "speed target, --round-to 8", "ratio": "ratio 0.4"}


def run(name: str, threads: int | None) -> list[dict]:
    make, speedup, accept = MODELS[name]
    model = make()
    rows = []
    with cold_widths_cache():  # cold for the first search, warm for the rest
        for how in HOW:
            start = time.perf_counter()
            if how.startswith("speed"):
                try:
                    pruned, report = onnx_whc.prune(model, speed=SpeedTarget(speedup, threads=threads),
                                                    round_to=8 if how == "speed-8" else None, recover="none",
                                                    synthetic=False, validate=False, provider="cpu")
                except UserInputError as err:  # no plan was measured fast enough: the table says how close
                    rows.append({"model": name, "how": how, "target": speedup, "accept": accept, "error": str(err),
                                 "seconds": round(time.perf_counter() - start, 1)})
                    print(f"{name} {how}: {err}", flush=True)
                    continue
            else:
                pruned, report = onnx_whc.prune(model, ratio=0.4, recover="none", synthetic=False, validate=False)
            seconds = time.perf_counter() - start
            measured = measure(model, pruned, threads)
            row = {"model": name, "how": how, "target": speedup if how.startswith("speed") else None,
                   "accept": accept, "macs_kept": round(report.macs_kept, 4), "ideal": round(1 / report.macs_kept, 3),
                   "measured": round(measured, 3), "seconds": round(seconds, 1),
                   "probes": report.speed["probes"] if report.speed else None}
            if report.widths:
                row["widths_cold_s"] = report.widths["seconds"]
                row["widths_warm_s"] = round(_warm_widths(model, threads), 2)
            rows.append(row)
            print(f"{name} {how}: {measured:.2f}x measured at {report.macs_kept:.3f} of the MACs, {seconds:.0f} s",
                  flush=True)
    return rows


def _warm_widths(model, threads) -> float:
    """Seconds to read every group's widths back from the cache the search just filled."""
    loaded = load(model)
    found = measure_widths(loaded, analyze_channels(loaded), ["CPUExecutionProvider"], threads)
    assert found.measured == 0, "the cache was not reused"
    return found.seconds


def markdown(rows: list[dict], env: dict, threads) -> str:
    lines = ["# Pruning to a measured speed", "",
             "`onnx_whc.prune(model, speed=SpeedTarget(X))` searches the MACs budget by timing each probe's "
             "plan against the original (batch 1, ONNX Runtime CPU), at measured channel widths (each group's "
             "layers timed at candidate widths, cold cache; the prune time includes it) or at `--round-to 8`; "
             "the *ratio 0.4* rows are the MACs budget alone (`--round-to 8`). *Measured* is a separate interleaved timing of the final model "
             f"({RUNS} runs after {WARMUP} warm-up runs), not the search's own. Synthetic weights for ResNet-50 and "
             "MobileNetV2 (`benchmarks/synthetic.py`, 224×224); the shared Keras emotion classifier at its 64×64×1 "
             "NHWC input. No calibration, no recovery: accuracy is not measured here.", "",
             f"Machine: {environment_line(env)}; intra-op threads: {threads or 'default'}.", "",
             "Command: `python -m benchmarks.latency_target`", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["model"], HOW[r["how"]], f"{r['target']:g}x (≥ {r['accept']:g}x)", "", "", "",
                          "**missed**", f"{r['seconds']:.0f}", "", r["error"]])
            continue
        met = "" if r["target"] is None else ("met" if r["measured"] >= r["accept"] else "**missed**")
        probes = "" if not r["probes"] else ", ".join(f"{p['macs_kept']:.2f}: {p['speedup']:.2f}x" for p in r["probes"])
        cache = f"{r['widths_cold_s']:.0f} / {r['widths_warm_s']:.1f}" if "widths_cold_s" in r else ""
        table.append([r["model"], HOW[r["how"]], f"{r['target']:g}x (≥ {r['accept']:g}x)" if r["target"] else "",
                      f"{r['macs_kept']:.3f}", f"{r['ideal']:.2f}x", f"{r['measured']:.2f}x", met,
                      f"{r['seconds']:.0f}", cache, probes])
    lines += [markdown_table(["model", "budget", "target", "MACs kept", "ideal", "measured", "", "prune s",
                              "widths s, cold / warm cache", "probes (MACs kept: speedup the search measured)"],
                             table), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    env = environment()
    rows = [row for name in args.models.split(",") for row in run(name, args.threads)]
    write_results("latency_target", markdown(rows, env, args.threads), {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()

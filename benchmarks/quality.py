"""Accuracy after pruning (no recovery) vs MACs kept: WHC against its peers on the shared models.

For each model, criterion and ratio: prune, then top-1 on the `eval` split of ../shared.
Writes benchmarks/results/quality.md (tables), quality.json (every cell) and quality.png
(accuracy vs MACs kept, one line per criterion, one panel per model).

    python -m benchmarks.quality                                  # the full grid (minutes)
    python -m benchmarks.quality --models resnet20 --criteria whc,l2 --ratios 0.2,0.4 --limit 500

Every cell is one call of `evaluate_cell` with the keyword arguments of `onnx_whc.prune`, so a new
axis is one more entry in `grid_axes`; `--recover none,lsq` is one (calibration images come from
the `calib` split, never from `eval`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

import onnx_whc

from .common import (
    SHARED_MODELS,
    environment,
    environment_line,
    markdown_table,
    parse_list,
    shared_model,
    write_results,
)
from .datasets import accuracy, load_split, predict

CRITERIA = ["whc", "l2", "l1", "fpgm", "random"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
# Top-1 of the unpruned models on the whole eval split, from ../shared/README.md.
PUBLISHED_BASELINES = {"resnet20": 0.8110, "resnet56": 0.8328, "efficientnet_lite0": 0.8820}


def evaluate_cell(model: Path, inputs, labels, reference, **prune_kwargs) -> dict:
    """Prune with `prune_kwargs`, then measure: the one place a cell of the grid is computed.

    `reference` is the unpruned model's argmax on `inputs`: agreement on eval sits beside the
    agreement the tool itself reported on its held-out samples.
    """
    start = time.perf_counter()
    pruned, report = onnx_whc.prune(model, **prune_kwargs)
    pruned_at = time.perf_counter()
    predictions = predict(pruned.SerializeToString(), inputs)
    top1 = float(np.mean(predictions == labels))
    recorded = {k: v for k, v in prune_kwargs.items() if k != "calib"}
    reported = next(iter((report.quality or {}).values()), {})
    return {**recorded, "ratio": report.ratio, "top1": top1, "eval_agreement": float(np.mean(predictions == reference)),
            "reported_agreement": reported.get("value"), "reported_on": report.quality_on,
            "macs_kept": report.macs_kept,
            "params_kept": report.params_kept, "prune_seconds": round(pruned_at - start, 3),
            "eval_seconds": round(time.perf_counter() - pruned_at, 3)}


def grid_axes(args) -> dict[str, list]:
    """The prune keyword arguments to vary; every combination is one cell."""
    return {"recover": args.recover, "criterion": args.criteria, "ratio": args.ratios}


def cells(args, calib: dict | None):
    axes = grid_axes(args)
    for values in itertools.product(*axes.values()):
        kwargs = {**dict(zip(axes, values)), "round_to": args.round_to, "seed": args.seed, "allocate": False,
                  "validate": True}  # validation measures the reported quality
        if kwargs["recover"] != "none":
            kwargs["calib"] = calib
        yield kwargs


def calibration(path: Path, dataset: str, args) -> dict | None:
    if all(method == "none" for method in args.recover):
        return None
    import numpy as np
    import onnx

    name = onnx.load(path, load_external_data=False).graph.input[0].name
    return {name: np.ascontiguousarray(load_split(dataset, "calib", args.calib)[0])}


def run_model(name: str, args) -> dict:
    path = shared_model(name)
    dataset = SHARED_MODELS[name][1]
    inputs, labels = load_split(dataset, "eval", args.limit)
    baseline = accuracy(path, inputs, labels)
    published = PUBLISHED_BASELINES[name]
    full = args.limit is None  # the published baselines are for the whole eval split
    print(f"{name}: unpruned top-1 {baseline:.2%} on {len(labels)} eval images"
          + (f" (published {published:.2%})" if full else ""), flush=True)
    if full and abs(baseline - published) > 5e-5:
        print(f"warning: {name} baseline {baseline:.2%} differs from the published {published:.2%}", file=sys.stderr)
    results = []
    reference = predict(path, inputs)
    for kwargs in cells(args, calibration(path, dataset, args)):
        results.append({"model": name, **evaluate_cell(path, inputs, labels, reference, **kwargs)})
        r = results[-1]
        print(f"  {r['recover']:5s} {r['criterion']:6s} ratio {r['ratio']:.1f}: top-1 {r['top1']:.2%}, "
              f"agreement {r['eval_agreement']:.3f} (reported {r['reported_agreement']}), "
              f"MACs kept {r['macs_kept']:.3f}, params kept {r['params_kept']:.3f}", flush=True)
    return {"model": name, "dataset": dataset, "images": len(labels), "baseline": baseline,
            "published_baseline": published if full else None, "cells": results}


def markdown(data: dict) -> str:
    methods = list(dict.fromkeys(c["recover"] for m in data["models"] for c in m["cells"]))
    parts = ["# Quality: top-1 after pruning", "",
             f"Machine: {environment_line(data['environment'])}.", "",
             f"Command: `{data['command']}`", "",
             "Top-1 on the `eval` split of ../shared after pruning every prunable group at the ratio "
             f"(round_to {data['round_to']}, no fine-tuning; recovery: {', '.join(methods)}), as "
             "*top-1 % / top-1 agreement with the unpruned model on eval / the agreement `onnx-whc` reported on "
             "its held-out samples (synthetic dead-leaves images when no calibration data is given)*; in brackets "
             "the share of MACs kept. Chance is 10% on CIFAR-10 and 0.1% on ImageNet. Without recovery, accuracy "
             "of one-shot pruning collapses fast: the WHC paper's Table 3 reports the same regime (ResNet-56 pruned "
             "40%, raw accuracy before fine-tuning: WHC 19.73%, l2 16.99%).", "",
             "![accuracy vs MACs kept](quality.png)", ""]
    for model in data["models"]:
        published = (f", published {100 * model['published_baseline']:.2f}%" if model["published_baseline"] else "")
        for method in methods:
            chosen = [c for c in model["cells"] if c["recover"] == method]
            ratios = sorted({c["ratio"] for c in chosen})
            criteria = list(dict.fromkeys(c["criterion"] for c in chosen))
            by_key = {(c["criterion"], c["ratio"]): c for c in chosen}
            parts += [f"## {model['model']} ({model['dataset']}, {model['images']} images), recovery {method}: "
                      f"unpruned {100 * model['baseline']:.2f}%{published}", ""]
            rows = []
            for ratio in ratios:
                row = [f"{ratio:.1f}"]
                for criterion in criteria:
                    cell = by_key.get((criterion, ratio))
                    row.append(f"{100 * cell['top1']:.2f} / {cell['eval_agreement']:.2f} / "
                               f"{_reported(cell)} ({cell['macs_kept']:.2f})" if cell else "")
                rows.append(row)
            parts += [markdown_table(["ratio", *criteria], rows), "", _wins(chosen, criteria, ratios), ""]
    return "\n".join(parts)


def _reported(cell: dict) -> str:
    value = cell.get("reported_agreement")
    return "n/a" if value is None else f"{value:.2f}"


def _wins(chosen: list[dict], criteria: list[str], ratios: list[float]) -> str:
    """How often each criterion is the most accurate at a ratio (ties count for all)."""
    cells = {(c["criterion"], c["ratio"]): c["top1"] for c in chosen}
    wins = dict.fromkeys(criteria, 0)
    for ratio in ratios:
        scores = {c: cells[(c, ratio)] for c in criteria if (c, ratio) in cells}
        if scores:
            top = max(scores.values())
            for c, value in scores.items():
                wins[c] += value == top
    return "Most accurate at a ratio: " + ", ".join(f"{c} {n}/{len(ratios)}" for c, n in wins.items())


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, model in zip(axes[0], models):
        criteria = list(dict.fromkeys(c["criterion"] for c in model["cells"]))
        methods = list(dict.fromkeys(c["recover"] for c in model["cells"]))
        for criterion, color in zip(criteria, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for method, style in zip(methods, styles):
                points = sorted((c["macs_kept"], 100 * c["top1"]) for c in model["cells"]
                                if c["criterion"] == criterion and c["recover"] == method)
                label = criterion if len(methods) == 1 else f"{criterion}, {method}"
                ax.plot(*zip(*points), style, marker="o", color=color, label=label,
                        linewidth=2 if criterion == "whc" else 1)
        ax.axhline(100 * model["baseline"], color="grey", linestyle="--", linewidth=1, label="unpruned")
        ax.set_title(f"{model['model']} ({model['images']} eval images)")
        ax.set_xlabel("share of MACs kept")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    methods = sorted({c["recover"] for m in models for c in m["cells"]})
    fig.suptitle("Top-1 after pruning (recovery: " + ", ".join(methods) + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda s: parse_list(s, str), default=list(SHARED_MODELS))
    parser.add_argument("--criteria", type=lambda s: parse_list(s, str), default=CRITERIA)
    parser.add_argument("--ratios", type=lambda s: parse_list(s, float), default=RATIOS)
    parser.add_argument("--limit", type=int, help="eval images per model (default: the whole split)")
    parser.add_argument("--round-to", type=int, default=1, help="1: every ratio removes what it says")
    parser.add_argument("--recover", type=lambda s: parse_list(s, str), default=["none"],
                        help="recovery methods to compare, e.g. none,lsq (see onnx_whc.recovery.recover)")
    parser.add_argument("--calib", type=int, default=256, help="calibration images for recovery")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(SHARED_MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHARED_MODELS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    data = {"environment": environment(), "command": " ".join(["python -m benchmarks.quality", *sys.argv[1:]]),
            "round_to": args.round_to, "models": [run_model(name, args) for name in args.models]}
    kwargs = {"folder": args.out} if args.out else {}
    write_results("quality", markdown(data), data, **kwargs)
    plot(data, (args.out or Path(__file__).resolve().parent / "results") / "quality.png")
    print(markdown(data))


if __name__ == "__main__":
    main()

"""Accuracy recovered without training: top-1 by model x MACs budget x criterion x allocation x recovery.

Every cell is one `onnx_whc.prune(model, target_macs=..., criterion=..., allocate=..., recover=...,
calib=<the calib split>)` in a fresh subprocess, so its time and peak memory (RSS high-water mark,
taken before the eval images are loaded) are that prune's own; top-1 is on the whole `eval` split.
Calibration images come from the `calib` split only. Writes benchmarks/results/recovery.md and
recovery.json; cells already in the json are kept unless --fresh, so an interrupted run resumes.

    python -m benchmarks.recovery                                     # the whole grid (about 2 h on 2 cores)
    python -m benchmarks.recovery --models resnet20 --cells default,uniform-lsq
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from onnx_whc.api import DEFAULT_ROUND_TO
from onnx_whc.recovery.recover import RecoverySettings

from .common import RESULTS, environment, environment_line, markdown_table, shared_model, write_results
from .datasets import accuracy, forget_loaded, load_split
from .variants import active, apply

BUDGETS = {"resnet56": [0.61, 0.80], "resnet20": [0.61, 0.80], "efficientnet_lite0": [0.75, 0.60]}
DATASET = {"resnet56": "cifar10", "resnet20": "cifar10", "efficientnet_lite0": "imagenet"}
BASELINES = {"resnet20": 0.8110, "resnet56": 0.8328, "efficientnet_lite0": 0.8820}  # ../shared/README.md
# The tool's targets for its default behaviour (top-1 at MACs kept <= budget): those of the mobile-nets
# issue (ResNets at about 40% fewer MACs, EfficientNet-Lite0 at 25% and 40% fewer), and the earlier one at 20%.
TARGETS = {("resnet56", 0.61): 0.82, ("resnet56", 0.80): 0.83, ("resnet20", 0.61): 0.76,
           ("efficientnet_lite0", 0.75): 0.85, ("efficientnet_lite0", 0.60): 0.78}
# name -> (criterion, allocate, recover); "default" is what `--calib` alone gives.
CELLS = {
    "default": ("auto", True, "lsq"),
    "whc": ("whc", True, "lsq"),
    "whc+": ("whc+", True, "lsq"),
    "uniform-none": ("whc", False, "none"),
    "uniform-bias": ("whc", False, "bias"),
    "uniform-stats": ("whc", False, "stats"),
    "uniform-lsq": ("whc", False, "lsq"),
    "uniform-whc+-none": ("whc+", False, "none"),
    "uniform-whc+-lsq": ("whc+", False, "lsq"),
    "l2": ("l2", True, "lsq"),
    "fpgm": ("fpgm", True, "lsq"),
    "random": ("random", True, "lsq"),
    "uniform-l2-none": ("l2", False, "none"),
    "uniform-l2-lsq": ("l2", False, "lsq"),
    "uniform-fpgm-none": ("fpgm", False, "none"),
    "uniform-fpgm-lsq": ("fpgm", False, "lsq"),
    "uniform-random-none": ("random", False, "none"),
    "uniform-random-lsq": ("random", False, "lsq"),
    # CIFAR ResNets with the residual trunk kept whole (only the blocks' inner convs pruned), as in
    # the Torch-Pruning comparison of the project's issue: --exclude the trunk's producers.
    "inner-none": ("whc", False, "none", ("/conv1/*", "*conv2*")),
    "inner-lsq": ("whc", False, "lsq", ("/conv1/*", "*conv2*")),
    "inner-l2-none": ("l2", False, "none", ("/conv1/*", "*conv2*")),
    "inner-fpgm-none": ("fpgm", False, "none", ("/conv1/*", "*conv2*")),
    # the default with more sampled output positions per fitted layer (`--recover-samples N`; default 20,000)
    "rows-80k": ("auto", True, "lsq", (), 80_000),
    "rows-160k": ("auto", True, "lsq", (), 160_000),
}
INNER = [name for name in CELLS if name.startswith("inner")]
ROWS = [name for name, cell in CELLS.items() if len(cell) > 4]  # cells with their own sampled rows
ON_REQUEST = INNER + ROWS  # not in the default grid
# Variants tried for mobile nets and not kept: measured on the commit that had their code, with
# `git checkout <commit>` and `[WHC_COMPENSATE=1] python -m benchmarks.recovery --one '[model, budget, cell, 8, null]'`;
# their records carry "code" (the commit) and "variant" (the name here).
VARIANTS = "3597b4f"
OTHER_CODE = {
    "plain-lsq": ("2e6e5b8", "default", "", "least squares on the layer's own outputs only, before the rectified refits "
                  "(a layer read by a Relu/Clip now fits what the rectifier passes on)"),
    "refit": ("442ba71", "refit", "", "criterion `refit`: greedy least-squares selection (ThiNet's, closed form on "
              "each reader's input covariance), allocation probes fill removed channels with their mean"),
    "compensated": ("442ba71", "default", "WHC_COMPENSATE=1 ", "criterion `energy`; allocation probes fill removed "
                    "channels with their least-squares prediction from the kept ones (damage after a reader refit)"),
    "refit-compensated": ("442ba71", "refit", "WHC_COMPENSATE=1 ", "both of the above"),
    "progressive": ("0453af9", "default", "WHC_ROUNDS=3 ", "allocation in three rounds: after each third of the "
                    "budget, every group's damage re-measured with the plan so far applied (interactions between "
                    "groups, e.g. many blocks of one stage pruned together)"),
    # benchmarks/variants.py (in this repository since 3597b4f): env variables patch one stage
    "probes-0.5": (VARIANTS, "default", "WHC_PROBES=0.15,0.3,0.5 ", "the allocator probes at 0.15/0.3/0.5, so no group "
                   "loses more than half its channels"),
    "probes-fine": (VARIANTS, "default", "WHC_PROBES=0.1,0.2,0.3,0.4,0.5 ", "five probes up to 0.5"),
    "kl-damage": (VARIANTS, "default", "WHC_DAMAGE=kl ", "the allocator's damage is the mean KL divergence of the "
                  "softmax instead of 1 - the cosine of the logits"),
    "kl-probes-0.5": (VARIANTS, "default", "WHC_DAMAGE=kl WHC_PROBES=0.15,0.3,0.5 ", "both of the above"),
    "ridge-0.1": (VARIANTS, "default", "WHC_RIDGE=0.1 ", "least-squares ridge 0.1 (default 1e-3), with the "
                  "rectified refits"),
    "ridge-0.01": (VARIANTS, "default", "WHC_RIDGE=0.01 ", "least-squares ridge 0.01"),
    "mirror": (VARIANTS, "default", "WHC_MIRROR=1 ", "recovery fits on the 400 calibration images and their mirror "
               "images (is it short of data?)"),
    "flat-80k": ("3597b4f", "rows-80k", "", "80,000 sampled rows for every fitted layer, before a layer's rows grew "
                 "with its inputs (100 per input, 20,000 to 80,000)"),
    # diagnostics at budget 0.99: parts of the default allocation at 0.75 alone, and groups it leaves whole
    "only-early": (VARIANTS, "default", "WHC_FORCE=0:0.25,4:0.25,7:0.25 ", "diagnostic: only the default plan's "
                   "stem and early expansions (groups 0, 4, 7)"),
    "only-middle": (VARIANTS, "default", "WHC_FORCE=10:0.75,11:0.75,14:0.5,15:0.75 ", "diagnostic: only its "
                    "expansions of blocks 6, 7, 9, 10 (groups 10, 11, 14, 15)"),
    "only-late": (VARIANTS, "default", "WHC_FORCE=18:0.25,19:0.25,20:0.25 ", "diagnostic: only its expansions of "
                  "blocks 12-14 (groups 18-20)"),
    "early-0.5": (VARIANTS, "default", "WHC_FORCE=0:0.5,2:0.5 ", "diagnostic: stem and block-1 expansion at 0.5"),
    "trunk-80": (VARIANTS, "default", "WHC_FORCE=9:0.25 ", "diagnostic: a quarter of the 80-channel residual trunk"),
    "trunk-112": (VARIANTS, "default", "WHC_FORCE=13:0.25 ", "diagnostic: a quarter of the 112-channel trunk"),
    "trunk-192": (VARIANTS, "default", "WHC_FORCE=17:0.25 ", "diagnostic: a quarter of the 192-channel trunk"),
    "expansions-0.3": (VARIANTS, "default", "WHC_FORCE=2:0.3,4:0.3,5:0.3,7:0.3,8:0.3,10:0.3,11:0.3,12:0.3,14:0.3,"
                       "15:0.3,16:0.3,18:0.3,19:0.3,20:0.3,21:0.3 ", "diagnostic: every expansion at 0.3, the budget "
                       "spread evenly instead of allocated (about the default plan's MACs)"),
}
# The big model gets the cells that answer the questions; its peers' uniform rows add little.
MODEL_CELLS = {"efficientnet_lite0": ["default", "whc", "whc+", "uniform-none", "uniform-bias", "uniform-lsq", "l2", "fpgm",
                                      "random", "rows-80k"]}
JSON = RESULTS / "recovery.json"


def run_cell(model: str, budget: float, name: str, round_to: int, limit: int | None) -> dict:
    """One prune and its evaluation (runs inside the subprocess)."""
    import onnx_whc

    apply()
    criterion, allocate, recover, *rest = CELLS[name]
    exclude = rest[0] if rest else ()
    samples = rest[1] if len(rest) > 1 else None  # sampled rows per fitted layer; None: the default
    calib = np.array(load_split(DATASET[model], "calib")[0])  # the tool's copy: the cached one is dropped
    forget_loaded()  # so the peak memory is the prune's, not the benchmark's
    start = time.perf_counter()
    pruned, report = onnx_whc.prune(shared_model(model), target_macs=budget, criterion=criterion, allocate=allocate,
                                    recover=recover, round_to=round_to, exclude=exclude, calib=None if recover in ("none", "bias") and not allocate
                                    else calib, validate=False,
                                    recovery_settings=RecoverySettings(samples=samples) if samples else None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB; before the eval images
    inputs, labels = load_split(DATASET[model], "eval", limit)
    recovery = report.recovery or {}
    return {
        "model": model, "budget": budget, "cell": name, "round_to": round_to, "criterion": report.criterion,
        "allocate": allocate, "trunk_kept": bool(exclude),
        "recover": recover, "recover_samples": samples, "top1": accuracy(pruned.SerializeToString(), inputs, labels),
        "eval_images": len(labels), "macs_kept": round(report.macs_kept, 4), "params_kept": round(report.params_kept, 4),
        "uniform_ratio": report.ratio, "allocation": report.allocation and report.allocation["ratios"],
        # analysis and allocation probing happen as the prune sets up; recovery times itself
        "select_seconds": round(report.seconds.get("analyzed", 0) + report.seconds.get("selected", 0), 2),
        "recover_seconds": recovery.get("seconds"),
        "total_seconds": round(seconds, 2), "peak_rss_mib": round(peak),
        "quality_before": recovery.get("quality_before"), "quality_after": recovery.get("quality_after"),
        "calibration_samples": recovery.get("calibration_samples"),
    }


def _subprocess(model: str, budget: float, name: str, round_to: int, limit: int | None) -> dict:
    command = [sys.executable, "-m", "benchmarks.recovery", "--one", json.dumps([model, budget, name, round_to, limit])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model} {budget} {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def _fidelity(cell: dict) -> str:
    """Held-out quality before and after recovery (older cells recorded the cosine as `fidelity_*`)."""
    before = cell.get("quality_before") or cell.get("fidelity_before")
    after = cell.get("quality_after") or cell.get("fidelity_after")
    if not after:
        return ""
    return f"{min(before.values()):.3f} → {min(after.values()):.3f}"


def markdown(results: list[dict], env: dict, models: list[str]) -> str:
    lines = ["# Recovering accuracy without training", "",
             "Top-1 on the whole `eval` split of ../shared after `onnx_whc.prune(model, target_macs=B, ...)`; "
             "calibration images (unlabelled use only) from the `calib` split: 1,000 CIFAR-10 images, 500 ImageNet "
             "images, of which a random fifth is held out for the quality figure (800 and 400 fitted; cells "
             "measured before 2026-12 held out the last 64 instead: 936 and 436 fitted). "
             "*default* is what `--calib` alone gives: criterion `auto` (= `energy` with calibration data), `--allocate` (per-group ratios from "
             f"calibration sensitivity under the budget), `--recover lsq`, `--round-to {DEFAULT_ROUND_TO}` (rows for "
             "other values come from `--round-to N` runs). *uniform* rows prune every group at the one "
             "ratio that meets the budget (`--no-allocate`). Fidelity: the held-out quality before → after "
             "recovery (top-1 agreement with the original; cells measured before 2026-12: the cosine of the outputs; "
             "data-free `bias` rows: on 16 random normal inputs). *select s* includes the analysis and the "
             "allocation's sensitivity probes. Time and peak memory (RSS high-water mark of the "
             "whole prune, calibration loading included) per cell, each in its own process.", "",
             f"Machine: {environment_line(env)}. Other jobs shared the machine, so times are upper bounds.", ""]
    lines += ["## Targets for the default behaviour", ""]
    rows = []
    for (model, budget), want in TARGETS.items():
        defaults = [r for r in results if r["model"] == model and r["budget"] == budget and r["cell"] == "default"
                    and "code" not in r]
        for cell in sorted(defaults, key=lambda r: -r["round_to"]) if model in models else []:
            met = "met" if cell["top1"] >= want and cell["macs_kept"] <= budget else "**missed**"
            rows.append([model, f"≥{100 * (1 - budget):.0f}% fewer", cell["round_to"], _pct(1 - cell["macs_kept"]),
                         _pct(want), _pct(cell["top1"]), met, f"{cell['recover_seconds'] or 0:.1f} s",
                         f"{cell['peak_rss_mib']} MiB"])
    lines += [markdown_table(["model", "budget", "round-to", "MACs removed", "target top-1", "top-1", "",
                              "recovery time", "peak memory"], rows), ""]
    for model in models:
        cells = [r for r in results if r["model"] == model and "code" not in r]
        if not cells:
            continue
        lines += [f"## {model} (unpruned {_pct(BASELINES[model])})", ""]
        rows = []
        for r in sorted(cells, key=lambda r: (-r["round_to"], r["budget"], list(CELLS).index(r["cell"]))):
            how = "allocated" if r["allocate"] else f"uniform {r['uniform_ratio']:g}"
            how += ", trunk whole" if r.get("trunk_kept") else ""
            recovered = r["recover"] + (f", {r['recover_samples']:,} rows" if r.get("recover_samples") else "")
            rows.append([f"{r['budget']:.2f}", r["round_to"], f"{r['macs_kept']:.3f}", r["criterion"], how, recovered,
                         _pct(r["top1"]), _fidelity(r), f"{r['select_seconds'] or 0:.1f}",
                         f"{r['recover_seconds'] or 0:.1f}", f"{r['total_seconds']:.1f}", r["peak_rss_mib"]])
        lines += [markdown_table(["budget (MACs kept ≤)", "round-to", "MACs kept", "criterion", "ratios", "recovery", "top-1",
                                  "fidelity", "select s", "recovery s", "total s", "peak MiB"], rows), ""]
    return "\n".join(lines + _other_code(results))


def _other_code(results: list[dict]) -> list[str]:
    """Variants whose code is not in this version, beside this version's default cell."""
    others = [r for r in results if "code" in r]
    if not others:
        return []
    lines = ["## Variants tried and not kept", "",
             "Each measured on the commit that holds its code; the default row is this version's. Command: "
             "`git checkout COMMIT && ENV python -m benchmarks.recovery --one '[\"MODEL\", BUDGET, \"CELL\", 8, "
             "null]'`. The variants set by environment variables are in `benchmarks/variants.py` (no checkout "
             "needed since " + VARIANTS + "); the commits of the earlier ones (branches `experiment/refit-selection`, "
             "`experiment/progressive`) are not kept in this repository. Diagnostics run at budget 0.99: exactly "
             "the ratios named, nothing else pruned.", ""]
    rows = []
    for r in sorted(others, key=lambda r: (r["model"], list(OTHER_CODE).index(r["variant"]))):
        commit, cell, env, what = OTHER_CODE[r["variant"]]
        default = next((d for d in results if d["model"] == r["model"] and d["budget"] == r["budget"]
                        and d["cell"] == "default" and d["round_to"] == r["round_to"] and "code" not in d), None)
        rows.append([r["model"], f"{r['budget']:.2f}", r["variant"], what, f"`{commit}` {env}{cell}",
                     f"{r['macs_kept']:.3f}", _pct(r["top1"]), _pct(default and default["top1"]),
                     f"{r['total_seconds']:.0f}", r["peak_rss_mib"]])
    return lines + [markdown_table(["model", "budget", "variant", "what", "commit, env, cell", "MACs kept", "top-1",
                                    "default top-1", "total s", "peak MiB"], rows), ""] + _block_training()


def _block_training() -> list[str]:
    """The block-wise training variant, which has its own benchmark (block_reconstruction.py)."""
    path = RESULTS / "block_reconstruction.json"
    if not path.exists():
        return []
    found = json.loads(path.read_text())
    gains = [b["error_before"] - b["error_after"] for b in found["blocks"]]
    largest = max(b["error_before"] for b in found["blocks"])
    return [f"Block-wise training (`python -m benchmarks.block_reconstruction --budget {found['budget']} --steps "
            f"{found['steps']} --lr {found['lr']}`, block_reconstruction.md): after the default prune, each inverted "
            "residual's kept expand, depthwise and projection filters trained together by Adam against the block's "
            f"original output. EfficientNet-Lite0 at {found['macs_kept']:.3f} of the MACs: top-1 "
            f"{_pct(found['top1_blocks'])} against {_pct(found['top1_default'])}; each block's held-out relative "
            f"error fell by {min(gains):.4f} to {max(gains):.4f} (of up to {largest:.2f}), "
            f"for {found['blocks_seconds']:.0f} s more.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUDGETS))
    parser.add_argument("--cells", default=",".join(c for c in CELLS if c not in ON_REQUEST),
                        help=f"any of {', '.join(CELLS)}")
    parser.add_argument("--limit", type=int, help="Evaluate on this many eval images (default: all).")
    parser.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, help="As onnx-whc prune (default: its default).")
    parser.add_argument("--fresh", action="store_true", help="Measure every cell again.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_cell(*json.loads(args.one))))
        return
    variables = active()
    if variables:
        raise SystemExit(f"{', '.join(variables)} set: variants are measured one cell at a time with --one")
    models, names = args.models.split(","), args.cells.split(",")
    env = environment()
    results = [] if args.fresh or not JSON.exists() else json.loads(JSON.read_text())["cells"]
    done = {(r["model"], r["budget"], r["cell"], r["round_to"]) for r in results if "code" not in r}
    for model in models:
        for budget in BUDGETS[model]:
            for name in names:
                if (model, budget, name, args.round_to) in done or name not in MODEL_CELLS.get(model, names):
                    continue
                cell = _subprocess(model, budget, name, args.round_to, args.limit)
                results.append(cell)
                print(f"{model} {budget} {name}: top-1 {_pct(cell['top1'])} at {cell['macs_kept']:.3f} MACs, "
                      f"{cell['total_seconds']:.0f} s, {cell['peak_rss_mib']} MiB", flush=True)
                write_results("recovery", markdown(results, env, list(BUDGETS)), {"environment": env, "cells": results})
    write_results("recovery", markdown(results, env, list(BUDGETS)), {"environment": env, "cells": results})


if __name__ == "__main__":
    main()

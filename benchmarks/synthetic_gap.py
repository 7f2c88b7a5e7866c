"""Why synthetic calibration fails on EfficientNet-Lite0: allocation or recovery, and the ridge.

The default without `--calib` spends the budget by sensitivities measured on dead-leaves images and
refits the layers on them. Here the two halves are crossed: the allocation measured on synthetic
images or on the `calib` split (or none: one uniform ratio), and recovery fitted on either, at
several ridge strengths; top-1 on the `eval` split, all at 0.75 of the MACs (`--round-to 8`). Also
how strongly dead leaves drive each conv's channels: the median over channels of their variance on
64 synthetic images over their variance on 64 calib-split photos, by depth.
Writes benchmarks/results/synthetic_gap.md and .json.

    python -m benchmarks.synthetic_gap          # about 16 minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
import onnxruntime as ort

from onnx_whc.calibration import normalize, preset_preprocess
from onnx_whc.deadleaves import dead_leaves
from onnx_whc.pipeline import Pipeline

from .common import environment, environment_line, markdown_table, shared_model, write_results
from .datasets import accuracy, load_split

BUDGET = 0.75
# (allocation measured on, recovery fitted on, ridge)
CELLS = [("synthetic", "synthetic", 1e-3), ("synthetic", "calib", 1e-3), ("calib", "synthetic", 1e-3),
         ("calib", "synthetic", 0.1), ("calib", "synthetic", 1.0), ("calib", "calib", 1e-3), ("calib", "calib", 0.1),
         ("calib", "calib", 1.0), ("uniform", "synthetic", 1e-3), ("uniform", "synthetic", 1.0)]


def _pipeline(path, calib) -> Pipeline:
    """As `onnx-whc prune --target-macs 0.75 [--calib]` sets it up (the inception preset without)."""
    return Pipeline(str(path), None, calib, None, preset_preprocess("inception"), 0, True, "auto", "auto", None, (),
                    8, None, False, True)


def variance_ratios(path, photos: np.ndarray) -> list[float]:
    """Per conv output, in graph order: median over channels of Var(synthetic) / Var(photos)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    known = {v.name: v for v in model.graph.value_info}
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.output[0] in known]
    del model.graph.output[:]
    model.graph.output.extend(known[name] for name in convs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def variances(x):
        runs = [session.run(None, {name: x[i:i + 16]}) for i in range(0, len(x), 16)]
        outs = [np.concatenate([r[j] for r in runs]) for j in range(len(convs))]
        return [a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1).var(1) for a in outs]

    synthetic = normalize(dead_leaves(len(photos), 224, 224, 0), preset_preprocess("inception")).astype(np.float32)
    return [float(np.median(s / np.maximum(p, 1e-12))) for s, p in zip(variances(synthetic), variances(photos))]


def main() -> None:
    env = environment()
    path = shared_model("efficientnet_lite0")
    x, _ = load_split("imagenet", "calib")
    xe, ye = load_split("imagenet", "eval")
    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    start = time.perf_counter()
    runs = {"synthetic": _pipeline(path, None), "calib": _pipeline(path, {input_name: np.array(x)})}
    plans = {source: run.plan(None, BUDGET)[0] for source, run in runs.items()}
    allocator, runs["synthetic"].allocator = runs["synthetic"].allocator, None
    plans["uniform"] = runs["synthetic"].plan(None, BUDGET)[0]
    runs["synthetic"].allocator = allocator
    print(f"analysed and allocated in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for allocation, fitted, ridge in CELLS:
        run = runs[fitted]
        run.settings = dataclasses.replace(run.settings, ridge=ridge)
        begin = time.perf_counter()
        model, _, cost = run.recovered(plans[allocation])
        rows.append({"allocation": allocation, "recovery": fitted, "ridge": ridge,
                     "macs_kept": round(cost.macs / run.before.macs, 4),
                     "top1": round(accuracy(model.SerializeToString(), xe, ye), 4),
                     "seconds": round(time.perf_counter() - begin, 1)})
        print(rows[-1], flush=True)
    ratios = variance_ratios(path, np.array(load_split("imagenet", "calib", 64)[0]))
    quarters = [round(float(np.median(part)), 3) for part in np.array_split(np.array(ratios), 4)]
    lines = ["# Synthetic calibration on EfficientNet-Lite0: allocation against recovery", "",
             f"`python -m benchmarks.synthetic_gap`: EfficientNet-Lite0 at {BUDGET} of the MACs (`--round-to 8`). "
             "*Allocation*: the per-group ratios and the channels chosen (criterion `energy`) measured on 320 "
             "dead-leaves images (what `onnx-whc prune` does without `--calib`), on the 500 calib-split images, or "
             "one uniform ratio with channels chosen on the synthetic images. *Recovery*: `lsq` fitted on "
             "either set at that ridge (1e-3 is the default). Top-1 on the 500 eval-split images "
             "(unpruned 88.20%; ±2 points of sampling noise).", "", f"Machine: {environment_line(env)}.", "",
             markdown_table(["allocation on", "recovery fitted on", "ridge", "MACs kept", "top-1", "recovery s"],
                            [[r["allocation"], r["recovery"], f"{r['ridge']:g}", f"{r['macs_kept']:.3f}",
                              f"{r['top1']:.2%}", f"{r['seconds']:.0f}"] for r in rows]), "",
             "How strongly dead leaves drive the network: per conv, the median over its channels of the variance on "
             "64 synthetic images over the variance on 64 calib-split photos, then the median over each quarter "
             f"of the convs in graph order (first to last): {', '.join(f'{q:.2f}' for q in quarters)}.", ""]
    write_results("synthetic_gap", "\n".join(lines), {"environment": env, "rows": rows, "variance_ratios": ratios,
                                                      "variance_ratio_quarters": quarters})


if __name__ == "__main__":
    main()

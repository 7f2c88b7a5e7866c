"""What pruning costs: wall time and peak memory of `onnx-whc prune --no-validate` vs model size.

Each prune runs in its own process, measured by `/usr/bin/time -v` (or by polling with psutil
where that is missing): synthetic ResNet-50s from 1 MB to 500 MB of weights, the shared
EfficientNet-Lite0, a full-size ResNet-50 (224x224), and one model over 2 GB stored with external
data, pruned end to end and run in ONNX Runtime afterwards. Writes benchmarks/results/cost.md,
cost.json and cost.png.

    python -m benchmarks.cost                         # everything (about 10 minutes, 10 GB of disk)
    python -m benchmarks.cost --sizes 1,10 --big 0    # a quick look, no large model
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import synthetic
from .common import environment, environment_line, markdown_table, parse_list, shared_model, write_results

SIZES_MB = [1, 10, 50, 100, 250, 500]
TIME = "/usr/bin/time"


def model_bytes(path: Path) -> int:
    """The model file plus its external data file (`<stem>.data` or `<name>.data`)."""
    files = {path, path.with_suffix(".data"), path.with_name(path.name + ".data")}
    return sum(f.stat().st_size for f in files if f.exists())


def measure(command: list[str]) -> dict:
    """Wall seconds and peak RSS (bytes) of a command in a fresh process."""
    if os.path.exists(TIME):
        start = time.perf_counter()
        done = subprocess.run([TIME, "-v", *command], capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    else:
        done, wall, peak = _polled(command)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr[-2000:]}")
    return {"wall_seconds": round(wall, 3), "peak_rss_bytes": peak, "stdout": done.stdout}


def _polled(command: list[str]):
    import psutil

    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), time.perf_counter() - start, peak


def prune_cost(name: str, model: Path, folder: Path, ratio: float = 0.4) -> dict:
    output, report = folder / f"{model.stem}_pruned.onnx", folder / f"{model.stem}_report.json"
    result = measure([sys.executable, "-m", "onnx_whc.cli", "prune", str(model), "--ratio", str(ratio),
                      "--no-validate", "-o", str(output), "--report", str(report)])
    size = model_bytes(model)
    row = {"model": name, "ratio": ratio, "model_bytes": size, "output_bytes": model_bytes(output),
           "wall_seconds": result["wall_seconds"], "peak_rss_bytes": result["peak_rss_bytes"],
           "peak_over_model": round(result["peak_rss_bytes"] / size, 2),
           "round_to": json.loads(report.read_text())["round_to"], "stages": json.loads(report.read_text())["seconds"]}
    print(f"{name}: {size / 1e6:.1f} MB, ratio {ratio}: {row['wall_seconds']:.2f} s, peak "
          f"{row['peak_rss_bytes'] / 1e6:.0f} MB ({row['peak_over_model']}x the model)", flush=True)
    return row


def interpreter_floor() -> dict:
    """The fixed cost of any run: Python with numpy, onnx, onnxruntime and onnx-graphsurgeon imported."""
    result = measure([sys.executable, "-m", "onnx_whc.cli", "--version"])
    return {"wall_seconds": result["wall_seconds"], "peak_rss_bytes": result["peak_rss_bytes"]}


def runs_in_ort(model: Path, image_size: int) -> dict:
    """Load the pruned model in ONNX Runtime in a fresh process and run it once."""
    code = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1], "
            "providers=['CPUExecutionProvider']); x = np.zeros((1, 3, int(sys.argv[2]), int(sys.argv[2])), "
            "np.float32); print(s.run(None, {s.get_inputs()[0].name: x})[0].shape)")
    result = measure([sys.executable, "-c", code, str(model), str(image_size)])
    return {"ort_output_shape": result["stdout"].strip(), "ort_peak_rss_bytes": result["peak_rss_bytes"]}


def sized_models(sizes: list[float], folder: Path) -> list[dict]:
    rows = []
    for mb in sizes:
        path = synthetic.save(synthetic.model_of_size(mb), folder / f"size{mb:g}.onnx")
        rows.append(prune_cost(f"synthetic {mb:g} MB", path, folder))
        for stale in folder.iterdir():
            stale.unlink()
    return rows


def reference_models(folder: Path) -> list[dict]:
    """The issue's time targets: EfficientNet-Lite0 <= 2 s, a ResNet-50-sized graph <= 5 s."""
    resnet50 = synthetic.save(synthetic.resnet50(width=1.0), folder / "resnet50.onnx")
    return [prune_cost("efficientnet_lite0", shared_model("efficientnet_lite0"), folder),
            prune_cost("resnet50 (224x224)", resnet50, folder)]


def big_model(mb: float, ratios: list[float], folder: Path) -> list[dict]:
    path = synthetic.save(synthetic.model_of_size(mb), folder / f"size{mb:g}.onnx", external_data=True)
    rows = []
    for ratio in ratios:
        row = prune_cost(f"synthetic {mb:g} MB (external data)", path, folder, ratio)
        output = folder / f"{path.stem}_pruned.onnx"
        row["output_external_data"] = (folder / f"{output.name}.data").exists()
        row.update(runs_in_ort(output, 64))
        print(f"  output {row['output_bytes'] / 1e6:.0f} MB, external data: {row['output_external_data']}, "
              f"runs in ONNX Runtime: {row['ort_output_shape']}", flush=True)
        rows.append(row)
        for stale in folder.glob(f"{path.stem}_pruned*"):
            stale.unlink()
    return rows


def targets(data: dict) -> list[str]:
    """The issue's targets, met or missed, from the rows."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = []
    for row in data["reference"]:
        limit = 2.0 if row["model"].startswith("efficientnet") else 5.0
        lines.append(f"- {row['model']}: {row['wall_seconds']:.2f} s wall (target <= {limit:g} s): "
                     f"{verdict(row['wall_seconds'] <= limit)}")
    large = [r for r in data["sizes"] + data["big"] if r["model_bytes"] >= 100e6]
    if large:
        worst = max(large, key=lambda r: r["peak_over_model"])
        lines.append(f"- peak memory of models >= 100 MB: at most {worst['peak_over_model']}x the model "
                     f"({worst['model']}, ratio {worst['ratio']}; target <= 3x): "
                     f"{verdict(worst['peak_over_model'] <= 3)}")
    for row in data["big"]:
        lines.append(f"- {row['model']} at ratio {row['ratio']}: pruned end to end, output "
                     f"{row['output_bytes'] / 1e6:.0f} MB{' in external data' if row['output_external_data'] else ''}, "
                     f"runs in ONNX Runtime (output {row['ort_output_shape']})")
    return lines


def markdown(data: dict) -> str:
    floor = data["interpreter"]

    def rows_of(rows):
        return markdown_table(
            ["model", "ratio", "model MB", "output MB", "wall s", "load+analyze s", "select s", "surgery+export s",
             "peak RSS MB", "peak / model"],
            [[r["model"], r["ratio"], f"{r['model_bytes'] / 1e6:.1f}", f"{r['output_bytes'] / 1e6:.1f}",
              f"{r['wall_seconds']:.2f}", f"{r['stages'].get('analyzed', 0):.2f}",
              f"{r['stages'].get('selected', 0):.2f}",
              f"{r['stages'].get('pruned', 0):.2f}", f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['peak_over_model']}x"]
             for r in rows])

    parts = [
        "# Cost: prune time and peak memory vs model size",
        "",
        *targets(data),
        "",
        f"Machine: {environment_line(data['environment'])}.",
        "",
        f"Command: `{data['command']}`",
        "",
        "Each row is one `python -m onnx_whc.cli prune MODEL --ratio R --no-validate -o OUT --report R.json` in a "
        f"fresh process (default --round-to {data['reference'][0].get('round_to')}); wall time and peak RSS from "
        "`/usr/bin/time -v`, the stage times from the report. Wall time "
        "includes starting Python and writing the output. Synthetic models are ResNet-50s widened or narrowed to the "
        "size (`benchmarks.synthetic.model_of_size`, 64x64 input).",
        "",
        f"Fixed floor of every run (Python with numpy, onnx, onnxruntime, onnx-graphsurgeon imported; "
        f"`onnx-whc --version`): {floor['wall_seconds']:.2f} s, {floor['peak_rss_bytes'] / 1e6:.0f} MB. "
        "That floor dominates the peak/model ratio of small models; the ratio is meaningful from ~100 MB up.",
        "",
        "## Reference models (targets: EfficientNet-Lite0 <= 2 s, ResNet-50 <= 5 s)",
        "",
        rows_of(data["reference"]),
        "",
        "## Synthetic models by size (target: peak <= 3x the model for large models)",
        "",
        rows_of(data["sizes"]),
        "![time and memory vs model size](cost.png)",
    ]
    if data["big"]:
        parts += ["", "## Over 2 GB, external data, end to end", "", rows_of(data["big"]), "",
                  markdown_table(["ratio", "output MB", "output in external data", "ONNX Runtime output",
                                  "ORT peak RSS MB"],
                                 [[r["ratio"], f"{r['output_bytes'] / 1e6:.0f}", r["output_external_data"],
                                   r["ort_output_shape"], f"{r['ort_peak_rss_bytes'] / 1e6:.0f}"]
                                  for r in data["big"]])]
    return "\n".join(parts)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["sizes"] + [r for r in data["big"] if r["ratio"] == 0.4]
    others = [r for r in data["big"] if r["ratio"] != 0.4]
    sizes = [r["model_bytes"] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(sizes, [r["wall_seconds"] for r in rows], "o-", label="ratio 0.4")
    right.loglog(sizes, [r["peak_rss_bytes"] / 1e6 for r in rows], "o-", label="peak RSS, ratio 0.4")
    for r in others:  # e.g. a ratio that keeps the output over 2 GB
        left.loglog(r["model_bytes"] / 1e6, r["wall_seconds"], "s", label=f"ratio {r['ratio']}")
        right.loglog(r["model_bytes"] / 1e6, r["peak_rss_bytes"] / 1e6, "s", label=f"peak RSS, ratio {r['ratio']}")
    left.set_xlabel("model size (MB)")
    left.set_ylabel("prune wall time (s)")
    left.legend()
    right.loglog(sizes, [3 * s for s in sizes], "--", color="grey", label="3x the model")
    right.axhline(data["interpreter"]["peak_rss_bytes"] / 1e6, linestyle=":", color="grey", label="interpreter floor")
    right.set_xlabel("model size (MB)")
    right.set_ylabel("peak RSS (MB)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("onnx-whc prune --no-validate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: parse_list(s, float), default=SIZES_MB, help="MB of weights")
    parser.add_argument("--big", type=float, default=2200, help="MB of the external-data model (0: skip)")
    parser.add_argument("--big-ratios", type=lambda s: parse_list(s, float), default=[0.4, 0.02],
                        help="0.02 keeps the output over 2 GB, so saving goes through external data too")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    data = {"environment": environment(), "command": " ".join(["python -m benchmarks.cost", *sys.argv[1:]]),
            "interpreter": interpreter_floor()}
    work = Path(tempfile.mkdtemp(prefix="onnx-whc-cost-", dir=args.work))
    try:
        data["reference"] = reference_models(work)
        for stale in work.iterdir():
            stale.unlink()
        data["sizes"] = sized_models(args.sizes, work)
        data["big"] = big_model(args.big, args.big_ratios, work) if args.big else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data["environment"]["load_average_1min_end"] = environment()["load_average_1min"]
    folder = args.out or Path(__file__).resolve().parent / "results"
    write_results("cost", markdown(data), data, folder)
    plot(data, folder / "cost.png")
    print(markdown(data))


if __name__ == "__main__":
    main()

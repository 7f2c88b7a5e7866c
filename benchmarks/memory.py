"""Peak memory and time of `prune --calib` against the number of images and the input size.

Each cell runs the command line in a fresh process and reads that process's peak resident memory
(the kernel's high-water mark, measured, not estimated) and its wall time. The model is the shared
YOLOv8n widened to YOLOv8s's structure (`benchmarks.widened`) at 640x640; the images are calibration
images only (500 from the ImageNet sample's calib split, 500 from CIFAR-10's, letterboxed to 640):
no accuracy is measured here, only what holding them costs.

    python -m benchmarks.memory                       # every cell
    python -m benchmarks.memory --cells yolov8s-640-250
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import RESULTS, SHARED, environment, environment_line, markdown_table

_RUNNER = """
import resource, sys, time
from onnx_whc.cli import main
start = time.perf_counter()
try:
    main(sys.argv[1:])
finally:
    print("BENCH", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          file=sys.stderr)
"""

# name -> (model, input side, images, extra options)
CELLS = {
    "yolov8s-640-250": ("yolov8s_like", 640, 250, ()),
    "yolov8s-640-500": ("yolov8s_like", 640, 500, ()),
    "yolov8s-640-1000": ("yolov8s_like", 640, 1000, ()),
    "yolov8n-640-200": ("yolov8n", 640, 200, ()),
}


def _images(folder: Path) -> Path:
    """1,000 calibration-split images as links in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for root in (SHARED / "data" / "imagenet-sample", SHARED / "data" / "cifar10-test"):
        with open(root / "labels.csv") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == "calib"][:500]
        for row in rows:
            source = root / row["file"]
            link = folder / f"{count:04d}{source.suffix.lower()}"
            if not link.exists():
                link.symlink_to(source)
            count += 1
    return folder


def _model(name: str, work: Path) -> Path:
    shared = SHARED / "models" / "yolov8n_nudenet.onnx"
    if name == "yolov8n":
        return shared
    path = work / f"{name}.onnx"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "benchmarks.widened", str(shared), "--factor", "2", "-o", str(path)],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def run_cell(name: str, work: Path, images: Path, memory: str | None) -> dict:
    model, side, count, extra = CELLS[name]
    report = work / f"{name}.json"
    command = ["prune", str(_model(model, work)), "--calib", str(images), "--calib-size", str(count),
               "--calib-preset", "yolo", "--input-shape", f"images:1x3x{side}x{side}", "--target-macs", "0.7",
               "-o", str(work / f"{name}.onnx"), "--report", str(report), *extra]
    if memory:
        command += ["--memory", memory]
    done = subprocess.run([sys.executable, "-c", _RUNNER, *command], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    line = next((x for x in done.stderr.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    seconds, peak = (float(v) for v in line.split()[1:])
    data = json.loads(report.read_text())
    recovery = data.get("recovery") or {}
    return {"cell": name, "model": model, "side": side, "images": count, "peak_gb": round(peak / 1e9, 2),
            "minutes": round(seconds / 60, 1), "budget": data["memory"]["budget"],
            "budget_gb": round(data["memory"]["budget_bytes"] / 1e9, 2),
            "recovery_samples": recovery.get("samples_fitted"), "fit_samples": recovery.get("calibration_samples"),
            "macs_kept": round(data["macs_kept"], 4), "summary": done.stdout.strip().splitlines()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--memory", help="--memory for every cell (default: the tool's default)")
    parser.add_argument("--work", type=Path, help="folder for the model, links and outputs (default: temporary)")
    args = parser.parse_args(argv)
    env = environment()
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-whc-memory-"))
    images = _images(work / "images")
    path = RESULTS / "memory.json"
    rows = {r["cell"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    for name in args.cells:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows[name] = {**run_cell(name, work, images, args.memory), "environment": environment_line(env)}
        print(f"{name}: peak {rows[name]['peak_gb']} GB, {rows[name]['minutes']} min", file=sys.stderr, flush=True)
        path.write_text(json.dumps({"rows": list(rows.values())}, indent=2))
    _write_markdown(list(rows.values()))


def _write_markdown(rows: list[dict]) -> None:
    table = markdown_table(
        ["cell", "model", "input", "images", "peak RSS (GB)", "minutes", "budget", "recovery held", "MACs kept"],
        [[r["cell"], r["model"], f"{r['side']}x{r['side']}", r["images"], r["peak_gb"], r["minutes"],
          f"{r['budget_gb']} GB ({r['budget']})", f"{r['recovery_samples']} of {r['fit_samples']}",
          f"{r['macs_kept']:.1%}"] for r in rows])
    machines = sorted({r["environment"] for r in rows})
    text = ("# Memory of `prune --calib`\n\n`python -m benchmarks.memory`: `prune MODEL --calib IMAGES --calib-size N "
            "--calib-preset yolo --input-shape images:1x3xSxS --target-macs 0.7`, each in a fresh process; peak RSS "
            "is the process's high-water mark (getrusage), not an estimate.\n\n" + table + "\n\n"
            + "\n".join(f"Machine: {m}" for m in machines) + "\n")
    (RESULTS / "memory.md").write_text(text)
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    from onnx_whc.reports.plot import line_charts

    series = sorted((r for r in rows if r["model"] == "yolov8s_like"), key=lambda r: r["images"])
    if series:
        line_charts([{"x": "calibration images", "y": "peak RSS (GB)",
                      "series": {"peak RSS": [(r["images"], r["peak_gb"]) for r in series],
                                 "target 6 GB": [(series[0]["images"], 6.0), (series[-1]["images"], 6.0)]}},
                     {"x": "calibration images", "y": "minutes",
                      "series": {"whole prune": [(r["images"], r["minutes"]) for r in series],
                                 "target 20 min": [(series[0]["images"], 20.0), (series[-1]["images"], 20.0)]}}],
                    str(RESULTS / "memory.png"), "YOLOv8s-sized at 640: prune --calib")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    main()

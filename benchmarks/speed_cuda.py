"""Does pruning make models faster on a GPU? Measured vs MACs-ideal speedup with ONNX Runtime's CUDA provider.

Prunes the shared ResNet-56 (CIFAR-10) and EfficientNet-Lite0 with the default `--round-to`, and the
synthetic ResNet-50 (224x224) and MobileNetV2 (`benchmarks.synthetic`) with several, at one ratio;
validates each pruned model on the CUDA provider (`onnx_whc.prune(..., provider="cuda")`), then times
original against pruned, interleaved run by run, twice: with `onnx_whc.reports.bench.compare`, as
`onnx-whc bench --provider cuda` does (NumPy in, NumPy out: every timing includes the copy of the
input to the GPU and of the outputs back), and with IO binding (input already on the GPU, outputs
left there: the GPU work alone). Writes benchmarks/results/speed_cuda.md and speed_cuda.json.

    python -m benchmarks.speed_cuda                            # needs onnxruntime-gpu and a GPU (a few minutes)
    python -m benchmarks.speed_cuda --models DIR               # the shared models from DIR, not ../shared/models
    python -m benchmarks.speed_cuda --provider cpu --runs 5 --out /tmp/r   # a dry run without a GPU
    python -m benchmarks.speed_cuda --render benchmarks/results/speed_cuda.json  # rewrite the .md only
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnx_whc
from onnx_whc.api import DEFAULT_ROUND_TO
from onnx_whc.graph.runtime import best_providers, random_inputs, session
from onnx_whc.measure.validate import cosine
from onnx_whc.reports.bench import compare

from . import synthetic
from .common import SHARED, SHARED_MODELS, environment, environment_line, markdown_table, parse_list, write_results

SYNTHETIC = {"resnet50": lambda: synthetic.resnet50(width=1.0), "mobilenet_v2": lambda: synthetic.mobilenet_v2()}
SHARED_NAMES = ["resnet56", "efficientnet_lite0"]


def device_info(provider: str) -> dict:
    """The GPU, its driver, and what ONNX Runtime was built against and loads."""
    info = {"provider": provider, "onnxruntime_package": _version("onnxruntime-gpu") or _version("onnxruntime")}
    try:
        from onnxruntime.capi import build_and_package_info as build
        info["onnxruntime_cuda_build"] = getattr(build, "cuda_version", None)
    except ImportError:
        pass
    for package in ("nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"):
        info[package] = _version(package)
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        name, driver, memory = (s.strip() for s in _output(query).splitlines()[0].split(","))
        info.update(gpu=name, driver=driver, gpu_memory=memory)
        found = re.search(r"CUDA Version:\s*([\d.]+)", _output(["nvidia-smi"]))
        info["driver_cuda"] = found.group(1) if found else None
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        info["gpu"] = None
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _output(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def device_line(info: dict) -> str:
    if not info.get("gpu"):
        return f"no GPU found; provider {info['provider']}"
    pip = ", ".join(f"{name} {info[name]}" for name in ("nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime")
                    if info.get(name))
    return (f"{info['gpu']} ({info['gpu_memory']}), driver {info['driver']} (CUDA {info['driver_cuda']}); "
            f"onnxruntime-gpu {info['onnxruntime_package']} built for CUDA {info.get('onnxruntime_cuda_build')}"
            + (f" (CUDA pip packages installed: {pip})" if pip else ""))


def time_bound(sessions: list, feeds: dict, device: str, runs: int, warmup: int) -> list[list[float]]:
    """Interleaved timings (ms) with the inputs bound on the device and the outputs left there."""
    bindings = []
    for sess in sessions:
        binding = sess.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
        for output in sess.get_outputs():
            binding.bind_output(output.name, device)
        bindings.append(binding)
    for _ in range(warmup):
        for sess, binding in zip(sessions, bindings):
            sess.run_with_iobinding(binding)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for sess, binding, spent in zip(sessions, bindings, times):
            start = time.perf_counter()
            sess.run_with_iobinding(binding)  # returns once the device's work is done
            binding.synchronize_outputs()
            spent.append((time.perf_counter() - start) * 1000)
    return times


def measure(model: str, original: Path, round_to: int, batches: list[int], folder: Path, args) -> dict:
    pruned, report = onnx_whc.prune(original, ratio=args.ratio, round_to=round_to, provider=args.provider)
    path = folder / f"{original.stem}_r{round_to}.onnx"
    onnx_whc.save(pruned, str(path))
    validation = report.validation or {}
    result = compare(original, path, batches=tuple(batches), provider=args.provider, runs=args.runs,
                     warmup=args.warmup).to_dict()
    providers = best_providers(args.provider)
    sessions = [session(p, providers) for p in (original, path)]
    shapes = {i.name: tuple(i.shape) for i in sessions[0].get_inputs()}
    device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    for row in result["batches"]:
        row["speedup_of_min"] = row["original"]["min_ms"] / row["pruned"]["min_ms"]
        feeds = random_inputs(sessions[0], shapes, row["batch"])
        bound = time_bound(sessions, feeds, device, args.runs, args.warmup)
        row["bound_original_ms"], row["bound_pruned_ms"] = (float(np.median(t)) for t in bound)
        row["bound_speedup"] = row["bound_original_ms"] / row["bound_pruned_ms"]
        row["input_mb"] = sum(a.nbytes for a in feeds.values()) / 1e6
    feeds = random_inputs(sessions[1], shapes, 1)
    on_cpu = session(path, ["CPUExecutionProvider"]).run(None, feeds)
    same = min(cosine(a, b) for a, b in zip(sessions[1].run(None, feeds), on_cpu))
    options = sessions[1].get_provider_options().get(providers[0], {})
    out = {"model": model, "round_to": round_to, "ratio": args.ratio, "macs_kept": report.macs_kept,
           "ideal_speedup": result["ideal_speedup"], "validated_on": validation.get("provider"),
           "bench_provider": result["provider"], "cosine_vs_cpu": same,
           "provider_options": {k: options[k] for k in ("use_tf32", "cudnn_conv_algo_search", "prefer_nhwc")
                                if k in options},
           "runs": args.runs, "warmup": args.warmup, "batches": result["batches"]}
    print(_line(out), flush=True)
    return out


def _line(row: dict) -> str:
    parts = [f"b{b['batch']} {b['original']['median_ms']:.2f}->{b['pruned']['median_ms']:.2f} ms {b['speedup']:.2f}x "
             f"(bound {b['bound_original_ms']:.2f}->{b['bound_pruned_ms']:.2f} ms {b['bound_speedup']:.2f}x)"
             for b in row["batches"]]
    return (f"{row['model']} round_to {row['round_to']}: validated on {row['validated_on']}, timed on "
            f"{row['bench_provider']}, outputs vs CPU cosine {row['cosine_vs_cpu']:.6f}, ideal "
            f"{row['ideal_speedup']:.2f}x; " + "; ".join(parts))


def markdown(data: dict) -> str:
    rows = data["rows"]
    runs, warmup = (rows[0]["runs"], rows[0]["warmup"]) if rows else (0, 0)
    parts = [
        "# Speed on a GPU: measured vs ideal speedup (ONNX Runtime, CUDA)",
        "",
        f"Device: {device_line(data['device'])}. Host: {environment_line(data['environment'])}.",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Pruned with WHC at ratio {data['ratio']} (no recovery: no calibration data), each pruned model validated "
        "by `onnx_whc.prune(..., provider=...)`, the path of `onnx-whc prune --provider cuda`. Timings: median of "
        f"{runs} interleaved runs after {warmup} warm-up runs per model and batch, ONNX Runtime's default "
        f"session and CUDA provider options ({_options(rows)}). Ideal speedup = original MACs / pruned MACs.",
        "",
        "Two timings per batch. *With copies* is what `onnx-whc bench --provider cuda` measures: `session.run` on "
        "NumPy arrays, no IO binding, so every run includes copying the input from host to GPU and the outputs "
        "back (pageable memory). *GPU only* binds the input on the GPU and leaves the outputs there "
        "(`run_with_iobinding`): the GPU's work plus the launch overhead. At batch 1 (and up to batch 8 for the CIFAR "
        "model) kernel launches bound the time, not arithmetic: every model takes about 1 to 4 ms, and these times "
        "vary between runs of the benchmark more than pruning changes them.",
        "",
        "## The CUDA path",
        "",
        markdown_table(["model", "round_to", "MACs kept", "ideal speedup", "`prune` validated on", "timed on",
                        "pruned outputs, GPU vs CPU (cosine)"],
                       [[r["model"], r["round_to"], f"{r['macs_kept']:.3f}", f"{r['ideal_speedup']:.2f}x",
                         r["validated_on"], r["bench_provider"], f"{r['cosine_vs_cpu']:.6f}"] for r in rows]),
        "",
        "## Latency",
        "",
        markdown_table(["model", "round_to", "batch", "input MB", "original ms", "pruned ms", "speedup (of ideal)",
                        "GPU only: original / pruned ms", "GPU-only speedup (of ideal)"],
                       [[r["model"], r["round_to"], b["batch"], f"{b['input_mb']:.1f}",
                         f"{b['original']['median_ms']:.2f}", f"{b['pruned']['median_ms']:.2f}",
                         f"{b['speedup']:.2f}x of {r['ideal_speedup']:.2f}x ({b['speedup'] / r['ideal_speedup']:.0%})",
                         f"{b['bound_original_ms']:.2f} / {b['bound_pruned_ms']:.2f}",
                         f"{b['bound_speedup']:.2f}x ({b['bound_speedup'] / r['ideal_speedup']:.0%})"]
                        for r in rows for b in r["batches"]]),
    ]
    parts += ["", "## Summary", ""]
    for r in rows:
        first, last = r["batches"][0], r["batches"][-1]
        copies = 1 - last["bound_original_ms"] / last["original"]["median_ms"]
        parts.append(f"- {r['model']}, round_to {r['round_to']} (ideal {r['ideal_speedup']:.2f}x): "
                     f"{first['speedup']:.2f}x at batch {first['batch']}, {last['speedup']:.2f}x at batch "
                     f"{last['batch']} with copies; {last['bound_speedup']:.2f}x GPU only at batch {last['batch']}, "
                     f"where the copies take {copies:.0%} of the original's time")
    return "\n".join(parts)


def _options(rows: list[dict]) -> str:
    options = rows[0]["provider_options"] if rows else {}
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "CPU provider"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--round-to", type=lambda s: parse_list(s, int), default=[1, 8, 16],
                        help="round_to values for the synthetic models (the shared ones use the default)")
    parser.add_argument("--batches", type=lambda s: parse_list(s, int), default=[1, 8, 32])
    parser.add_argument("--cifar-batches", type=lambda s: parse_list(s, int), default=[128],
                        help="extra batch sizes for the 32x32 CIFAR model")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--provider", default="cuda", help="cuda (the point), or cpu for a dry run")
    parser.add_argument("--models", type=Path, default=SHARED / "models", help="folder of the shared models")
    parser.add_argument("--only", type=lambda s: parse_list(s, str), help="model names to run (default: all)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--render", type=Path, help="only rewrite the Markdown from this speed_cuda.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        (args.out or args.render.parent).joinpath("speed_cuda.md").write_text(
            markdown(json.loads(args.render.read_text())).rstrip() + "\n")
        return
    best_providers(args.provider)  # fails now when the provider does not load
    data = {"environment": environment(), "device": device_info(args.provider),
            "command": " ".join(["python -m benchmarks.speed_cuda", *sys.argv[1:]]), "ratio": args.ratio, "rows": []}
    with tempfile.TemporaryDirectory(prefix="onnx-whc-speed-cuda-") as tmp:
        folder = Path(tmp)
        jobs = [(name, args.models / SHARED_MODELS[name][0], [DEFAULT_ROUND_TO],
                 args.batches + [b for b in args.cifar_batches if SHARED_MODELS[name][1] == "cifar10"
                                 and b not in args.batches])
                for name in SHARED_NAMES]
        jobs += [(name, None, args.round_to, args.batches) for name in SYNTHETIC]
        for name, path, round_tos, batches in jobs:
            if args.only and name not in args.only:
                continue
            if path is None:
                path = synthetic.save(SYNTHETIC[name](), folder / f"{name}.onnx")
            elif not path.exists():
                raise SystemExit(f"{path} not found: give --models")
            for round_to in round_tos:
                data["rows"].append(measure(name, path, round_to, batches, folder, args))
    text = markdown(data)
    write_results("speed_cuda", text, data, **({"folder": args.out} if args.out else {}))
    print(text)


if __name__ == "__main__":
    main()

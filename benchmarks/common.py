"""Helpers shared by the benchmarks: where results go, the machine they ran on, Markdown tables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_whc.plan.widths import processor

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODELS = {
    "resnet20": ("resnet20_cifar10.onnx", "cifar10"),
    "resnet56": ("resnet56_cifar10.onnx", "cifar10"),
    "efficientnet_lite0": ("efficientnet_lite0_imagenet.onnx", "imagenet"),
}


def shared_model(name: str) -> Path:
    path = SHARED / "models" / SHARED_MODELS[name][0]
    if not path.exists():
        raise SystemExit(f"{path} not found: the benchmarks need ../shared beside the repository")
    return path


def environment() -> dict:
    """What the numbers depend on: CPU, core count, library versions, load when measuring."""
    return {
        "cpu": processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(env: dict) -> str:
    return (f"{env['cpu']}, {env['cores']} cores; onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, "
            f"Python {env['python']}")


def environment_line(env: dict) -> str:
    return f"{machine_line(env)}; 1-min load average {env['load_average_1min']} at the start ({env['date']})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def cold_widths_cache():
    """An empty measured-widths cache of its own while the block runs (the user's is left alone)."""
    before = os.environ.get("ONNX_WHC_CACHE")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ONNX_WHC_CACHE"] = folder
        try:
            yield
        finally:
            if before is None:
                del os.environ["ONNX_WHC_CACHE"]
            else:
                os.environ["ONNX_WHC_CACHE"] = before


def write_results(name: str, markdown: str, data: dict, folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (folder / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def parse_list(text: str, kind=float) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]

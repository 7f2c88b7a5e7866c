"""Shared fixtures: the real models and data in ../shared beside the repository."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODELS = ["resnet20_cifar10.onnx", "resnet56_cifar10.onnx", "efficientnet_lite0_imagenet.onnx"]


def shared_model(name: str) -> Path:
    path = SHARED / "models" / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path

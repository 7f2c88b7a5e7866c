"""Shared fixtures: the real models and data in ../shared beside the repository."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODELS = ["resnet20_cifar10.onnx", "resnet56_cifar10.onnx", "efficientnet_lite0_imagenet.onnx",
                 "yolov8n_nudenet.onnx", "fer_emotion_minixception_tf2onnx.onnx", "facenet_mtcnn_onet_torch.onnx"]


def shared_model(name: str) -> Path:
    path = SHARED / "models" / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path

# Hypothesis profiles: 'ci' (the default, fast enough for every test run) and 'long' for a deep
# fuzzing run: python -m pytest tests/fuzz --hypothesis-profile long
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def _private_widths_cache(tmp_path_factory):
    """Measured widths go to a folder of the test run, never to the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ONNX_WHC_CACHE", str(tmp_path_factory.mktemp("widths-cache")))
    yield
    patch.undo()

"""onnx-whc: prune whole convolution filters directly in ONNX graphs.

    >>> import onnx_whc
    >>> pruned, report = onnx_whc.prune("model.onnx", ratio=0.4)
    >>> pruned, report = onnx_whc.prune("model.onnx", target_macs=0.6, calib="calib_images/")  # + recovery
    >>> print(report.quality_on, report.quality)  # top-1 agreement / per-channel R² on held-out samples
    >>> onnx_whc.save(pruned, "small.onnx")
"""

__version__ = "0.1.0"

from .api import QualityFloor, Settings, analyze, prune, save, sweep  # noqa: E402
from .errors import OnnxWhcError, UserInputError, ValidationError  # noqa: E402
from .plan.speed_target import SpeedTarget  # noqa: E402

__all__ = ["analyze", "prune", "sweep", "save", "Settings", "QualityFloor", "SpeedTarget", "OnnxWhcError", "UserInputError", "ValidationError", "__version__"]

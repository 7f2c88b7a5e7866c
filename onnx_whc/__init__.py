"""onnx-whc: prune whole convolution filters directly in ONNX graphs.

    >>> import onnx_whc
    >>> pruned, report = onnx_whc.prune("model.onnx", ratio=0.4)
    >>> pruned, report = onnx_whc.prune("model.onnx", target_macs=0.6, calib="calib_images/")  # + recovery
    >>> onnx_whc.save(pruned, "small.onnx")
"""

__version__ = "0.1.0"

from .api import analyze, prune, save  # noqa: E402
from .errors import OnnxWhcError, UserInputError, ValidationError  # noqa: E402

__all__ = ["analyze", "prune", "save", "OnnxWhcError", "UserInputError", "ValidationError", "__version__"]

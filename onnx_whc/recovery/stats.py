"""Statistics correction: match each layer's per-channel output mean and std to the original's.

Shifting a channel's mean to the original's folds the expected value of everything the pruned
model no longer computes (its removed input channels, and drift from upstream) into the bias;
rescaling by the ratio of standard deviations restores the channel's spread. Both fold into
the layer's own weights and bias, so they work when BatchNormalization was folded into Conv.
"""

from __future__ import annotations

import numpy as np

from .layers import Affine
from .moments import Moments

_MIN_STD = 1e-8


def renormalise(moments: Moments, current: Affine, std: bool = True) -> Affine:
    """Affine maps whose outputs have the target channels' mean and (with `std`) spread."""
    w = current.weights
    mean_now = np.einsum("gd,gdm->gm", moments.x_mean, w)
    if current.bias is not None:
        mean_now = mean_now + current.bias
    scale = np.ones_like(mean_now)
    if std:
        var_now = np.einsum("gdm,gde,gem->gm", w, moments.xx, w) / moments.count
        std_now, std_want = np.sqrt(np.maximum(var_now, 0)), np.sqrt(moments.yy / moments.count)
        scale = np.where(std_now > _MIN_STD, std_want / np.maximum(std_now, _MIN_STD), 1.0)
    weights = w * scale[:, None, :]
    if current.bias is None:
        return Affine(weights, None)  # MatMul: no bias to shift
    return Affine(weights, (current.bias - mean_now) * scale + moments.y_mean)

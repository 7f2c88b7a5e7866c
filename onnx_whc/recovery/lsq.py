"""Least-squares reconstruction (ThiNet, Luo et al. 2017; He et al. 2017 channel pruning).

Each layer's weights on its kept inputs (and its bias) are solved so that, on calibration
patches, it reproduces the original model's outputs of that layer. The ridge term pulls the
weights towards the pruned layer's own (lambda = `ridge * trace(C) / d` on the centred Gram
matrix C): the solve stays stable when kept inputs are nearly collinear. The bias is the
unregularised intercept.
"""

from __future__ import annotations

import numpy as np

from .layers import Affine
from .moments import Moments


def ridge_fit(moments: Moments, current: Affine, ridge: float) -> Affine:
    """Per group: weights (d, m) and bias minimising ||x W + b - y||^2 + lambda ||W - W_now||^2.

    Layers without a bias (MatMul) are solved without an intercept. With no more samples than
    inputs (a classifier fed one row per image) the data cannot pin the weights down: the fit
    would interpolate the calibration rows, so only the bias is re-estimated.
    """
    intercept = current.bias is not None
    if moments.count <= moments.xx.shape[1]:
        if not intercept:
            return current
        return Affine(current.weights, moments.y_mean - np.einsum("gd,gdm->gm", moments.x_mean, current.weights))
    gram, cross = moments.xx.copy(), moments.xy.copy()
    if not intercept:
        gram += moments.count * moments.x_mean[:, :, None] * moments.x_mean[:, None, :]
        cross += moments.count * moments.x_mean[:, :, None] * moments.y_mean[:, None, :]
    dim = gram.shape[1]
    scale = np.trace(gram, axis1=1, axis2=2) / dim
    damping = ridge * scale + 1e-12 * (scale + 1.0)  # the tiny term only guards all-zero inputs
    gram[:, np.arange(dim), np.arange(dim)] += damping[:, None]
    weights = np.linalg.solve(gram, cross + damping[:, None, None] * current.weights)
    if not intercept:
        return Affine(weights, None)
    return Affine(weights, moments.y_mean - np.einsum("gd,gdm->gm", moments.x_mean, weights))

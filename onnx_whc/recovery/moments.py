"""Second moments of a layer's inputs and target outputs: all that the fits need.

Every method's update and every error figure is a function of these few matrices, so the
sampled patches are reduced once (in float32 BLAS, after centring) and then discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import Affine


@dataclass
class Moments:
    count: int  # sampled rows
    x_mean: np.ndarray  # (G, d)
    y_mean: np.ndarray  # (G, m)
    xx: np.ndarray  # (G, d, d) centred Gram matrix of the inputs
    xy: np.ndarray  # (G, d, m) centred cross products
    yy: np.ndarray  # (G, m) centred sum of squares of each target channel

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> "Moments":
        """x (G, S, d) inputs, y (G, S, m) targets; both are centred in place."""
        x_mean = x.mean(axis=1, dtype=np.float64)
        x -= x_mean[:, None, :].astype(x.dtype)
        xx = np.stack([g.T @ g for g in x]) if len(x) < 8 else np.matmul(x.transpose(0, 2, 1), x)
        return cls._with_target(x.shape[1], x_mean, xx.astype(np.float64), x, y)

    def retargeted(self, x_centred: np.ndarray, y: np.ndarray) -> "Moments":
        """The same inputs (as `of` left them, centred) against other targets y, centred in place:
        the Gram matrix of the inputs is reused."""
        return self._with_target(self.count, self.x_mean, self.xx, x_centred, y)

    @classmethod
    def _with_target(cls, count: int, x_mean: np.ndarray, xx: np.ndarray, x: np.ndarray, y: np.ndarray) -> "Moments":
        y_mean = y.mean(axis=1, dtype=np.float64)
        y -= y_mean[:, None, :].astype(y.dtype)
        xy = np.matmul(x.transpose(0, 2, 1), y)
        return cls(count, x_mean, y_mean, xx, xy.astype(np.float64), np.einsum("gsm,gsm->gm", y, y, dtype=np.float64))

    def squared_error(self, affine: Affine) -> float:
        """Sum over rows and channels of (x W + b - y)^2, from the moments alone."""
        w = affine.weights
        offset = np.einsum("gd,gdm->gm", self.x_mean, w) - self.y_mean
        if affine.bias is not None:
            offset = offset + affine.bias
        quadratic = np.einsum("gdm,gde,gem->", w, self.xx, w)
        return float(quadratic - 2 * np.einsum("gdm,gdm->", w, self.xy) + self.yy.sum()
                     + self.count * (offset ** 2).sum())

    @property
    def spread(self) -> float:
        return float(self.yy.sum())

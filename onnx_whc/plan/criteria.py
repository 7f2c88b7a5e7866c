"""Filter-importance criteria: `score(filters, rng) -> scores`, lowest pruned first.

`filters` is an (N, D) matrix, one flattened filter per row. Everything is a Gram-matrix
computation in numpy: no Python loop over filter pairs.
"""

from __future__ import annotations

import numpy as np


def _norms_and_gram(filters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(filters, dtype=np.float32)
    gram = (f @ f.T).astype(np.float64)  # float32 BLAS: the Gram matrix dominates pruning time
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    return norms, gram


def whc(filters: np.ndarray, rng=None) -> np.ndarray:
    """Weighted Hybrid Criterion (Chen, Sun, Huang, ICASSP 2023).

    score_i = ||F_i|| * sum_{j != i} ||F_j|| * (1 - |cos(F_i, F_j)|): a filter matters when it
    is large *and* points where other large filters do not.
    """
    norms, gram = _norms_and_gram(filters)
    # In place on the Gram matrix: for wide layers the N x N arrays are a prune's largest allocation.
    safe = np.where(norms > 0, norms, 1.0)  # a zero filter has a zero Gram row: cosine 0
    dissimilarity = gram
    dissimilarity /= safe[:, None]
    dissimilarity /= safe[None, :]
    np.abs(dissimilarity, out=dissimilarity)
    np.minimum(dissimilarity, 1.0, out=dissimilarity)
    np.subtract(1.0, dissimilarity, out=dissimilarity)
    np.fill_diagonal(dissimilarity, 0.0)
    return norms * (dissimilarity @ norms)


def l1(filters: np.ndarray, rng=None) -> np.ndarray:
    """Sum of absolute weights (Li et al., 2017)."""
    return np.abs(np.asarray(filters, dtype=np.float64)).sum(axis=1)


def l2(filters: np.ndarray, rng=None) -> np.ndarray:
    """Euclidean norm of each filter."""
    return np.linalg.norm(np.asarray(filters, dtype=np.float64), axis=1)


def fpgm(filters: np.ndarray, rng=None) -> np.ndarray:
    """Filter Pruning via Geometric Median (He et al., 2019): total distance to the other filters.

    Filters near the geometric median are the most replaceable and score lowest.
    """
    norms, gram = _norms_and_gram(filters)
    distance = gram  # in place, as in whc
    distance *= -2.0
    distance += (norms**2)[:, None]
    distance += (norms**2)[None, :]
    np.maximum(distance, 0.0, out=distance)
    return np.sqrt(distance, out=distance).sum(axis=1)


def random(filters: np.ndarray, rng=None) -> np.ndarray:
    """Uniform random scores: the baseline every criterion must beat."""
    rng = rng if rng is not None else np.random.default_rng(0)
    return rng.random(len(filters))


CRITERIA = {"whc": whc, "l1": l1, "l2": l2, "fpgm": fpgm, "random": random}

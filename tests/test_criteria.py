"""Filter criteria: WHC against hand arithmetic and the paper's examples, the peers against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_whc.plan.criteria import CRITERIA, fpgm, l1, l2, random, whc

SQRT2 = math.sqrt(2)


def polar(norm: float, degrees: float) -> list[float]:
    angle = math.radians(degrees)
    return [norm * math.cos(angle), norm * math.sin(angle)]


def embed(vectors: list[list[float]], width: int = 27) -> np.ndarray:
    """2-D example filters as rows of a (N, 3*3*3) matrix, the shape a 3x3 conv over 3 channels has."""
    filters = np.zeros((len(vectors), width), dtype=np.float32)
    filters[:, :2] = vectors
    return filters


def whc_reference(filters: np.ndarray) -> np.ndarray:
    """Eq. (1) of the paper written as loops: ||F_i|| * sum_{j != i} ||F_j|| (1 - |cos theta_ij|)."""
    f = np.asarray(filters, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1)
    scores = np.zeros(len(f))
    for i in range(len(f)):
        for j in range(len(f)):
            if i != j and norms[i] > 0 and norms[j] > 0:
                cos = f[i] @ f[j] / (norms[i] * norms[j])
                scores[i] += norms[j] * (1 - abs(cos))
        scores[i] *= norms[i]
    return scores


# ---- WHC by hand -------------------------------------------------------------------------------

def test_whc_matches_the_paper_figure_2_scores():
    """Fig. 1(a)/Fig. 2: norms 1.1, 1.2, 1.3; F1 orthogonal to F2 and F3, which point opposite ways.

    score1 = 1.1 * (1.2 * (1 - 0) + 1.3 * (1 - 0)) = 1.1 * 2.5 = 2.75
    score2 = 1.2 * (1.1 * (1 - 0) + 1.3 * (1 - |-1|)) = 1.2 * 1.1 = 1.32
    score3 = 1.3 * (1.1 * (1 - 0) + 1.2 * (1 - |-1|)) = 1.3 * 1.1 = 1.43
    """
    filters = embed([polar(1.1, 90), polar(1.2, 180), polar(1.3, 0)])
    np.testing.assert_allclose(whc(filters), [2.75, 1.32, 1.43], rtol=1e-5)


def test_whc_four_filters_by_hand():
    """F1 = (1,0,0), F2 = (0,2,0), F3 = (1,1,0), F4 = (0,0,0.5).

    Norms: 1, 2, sqrt2, 0.5. Only F3 leans on others: cos13 = cos23 = 1/sqrt2, every other pair is
    orthogonal. With d = 1 - 1/sqrt2 and sqrt2 * d = sqrt2 - 1:
    score1 = 1 * (2*1 + sqrt2*d + 0.5*1)         = 1.5 + sqrt2        = 2.914214
    score2 = 2 * (1*1 + sqrt2*d + 0.5*1)         = 1 + 2*sqrt2        = 3.828427
    score3 = sqrt2 * (1*d + 2*d + 0.5*1)         = 3.5*sqrt2 - 3      = 1.949747
    score4 = 0.5 * (1*1 + 2*1 + sqrt2*1)         = 1.5 + sqrt2/2      = 2.207107
    F3, a mix of F1 and F2, is the most redundant even though F4 is four times smaller.
    """
    filters = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 0.5]], dtype=np.float32)
    expected = [1.5 + SQRT2, 1 + 2 * SQRT2, 3.5 * SQRT2 - 3, 1.5 + SQRT2 / 2]
    np.testing.assert_allclose(whc(filters), expected, rtol=1e-5)
    assert np.argmin(whc(filters)) == 2
    assert np.argmin(l2(filters)) == 3  # the norm alone would prune the independent F4


def test_whc_equals_the_loop_reference_on_random_filters():
    filters = np.random.default_rng(0).standard_normal((24, 3 * 3 * 16)).astype(np.float32)
    np.testing.assert_allclose(whc(filters), whc_reference(filters), rtol=1e-4)


# ---- zero filters and invariances --------------------------------------------------------------

def test_zero_filters_score_zero_without_nan():
    filters = np.array([[0, 0, 0], [1, 2, 0], [0, 0, 0], [0, 1, 1]], dtype=np.float32)
    for name, criterion in CRITERIA.items():
        scores = criterion(filters, np.random.default_rng(0))
        assert np.isfinite(scores).all(), name
    scores = whc(filters)
    assert scores[0] == scores[2] == 0
    # The zero filters add nothing to the others' sums: each sees only the other non-zero filter.
    np.testing.assert_allclose(scores[[1, 3]], whc(filters[[1, 3]]), rtol=1e-6)
    assert (whc(np.zeros((3, 5), np.float32)) == 0).all()


@pytest.fixture
def filters() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((10, 18)).astype(np.float32)


def test_whc_scales_quadratically(filters):
    np.testing.assert_allclose(whc(3 * filters), 9 * whc(filters), rtol=1e-4)


def test_whc_ignores_the_sign_of_a_filter(filters):
    """|cos| counts an inverted filter as just as redundant: flipping one changes no score."""
    flipped = filters.copy()
    flipped[4] *= -1
    np.testing.assert_allclose(whc(flipped), whc(filters), rtol=1e-5)


@pytest.mark.parametrize("name", ["whc", "l2", "fpgm"])
def test_rotation_invariance(filters, name):
    rotation, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((18, 18)))
    rotated = (filters @ rotation).astype(np.float32)
    np.testing.assert_allclose(CRITERIA[name](rotated), CRITERIA[name](filters), rtol=1e-4)


@pytest.mark.parametrize("name", ["whc", "l1", "l2", "fpgm"])
def test_permutation_equivariance(filters, name):
    order = np.random.default_rng(3).permutation(len(filters))
    np.testing.assert_allclose(CRITERIA[name](filters[order]), CRITERIA[name](filters)[order], rtol=1e-5)


def test_whc_duplicate_filter_gains_nothing_from_its_twin(filters):
    """A copy of F0 adds ||F0||^2 * (1 - 1) = 0 to F0's sum, while every other filter gains
    ||F_j|| ||F0|| (1 - |cos|) >= 0: the pair sinks in the ranking."""
    before = whc(filters)
    after = whc(np.vstack([filters, filters[:1]]))
    assert after[0] == pytest.approx(before[0], rel=1e-5) and after[-1] == pytest.approx(before[0], rel=1e-5)
    assert (after[1:-1] > before[1:]).all()


# ---- the paper's failure cases of the other criteria ------------------------------------------

def test_similar_norms_different_angles_figure_1a():
    """Fig. 1(a): F2 and F3 point opposite ways (strongly correlated maps), F1 is orthogonal to both.

    Norms 1.1 < 1.2 < 1.3 hardly differ, and l1/l2 prune F1, the one unique direction. FPGM
    prunes F1 too: its distances 1.63 + 1.70 = 3.33 are the shortest (F2: 1.63 + 2.5, F3: 1.70 + 2.5).
    WHC prunes F2, the smaller of the redundant pair.
    """
    filters = embed([polar(1.1, 90), polar(1.2, 180), polar(1.3, 0)])
    assert np.argmin(l2(filters)) == np.argmin(l1(filters)) == 0
    np.testing.assert_allclose(fpgm(filters), [3.3308, 4.1279, 4.2029], rtol=1e-4)
    assert np.argmin(fpgm(filters)) == 0
    assert np.argmin(whc(filters)) == 1


def test_equal_norms_cannot_be_separated_by_norm_criteria():
    """The same geometry with equal norms: l1 and l2 see three identical filters; WHC still ranks
    the two parallel (inverted) filters below the orthogonal one."""
    filters = embed([polar(1.0, 90), polar(1.0, 180), polar(1.0, 0)])
    for norm_criterion in (l1, l2):
        scores = norm_criterion(filters)
        assert scores.max() - scores.min() < 1e-6
    scores = whc(filters)
    np.testing.assert_allclose(scores, [2.0, 1.0, 1.0], rtol=1e-6)  # F1: 1*(1+1); F2, F3: 1*(1+0)


def test_similar_angles_different_norms_figure_1b():
    """Fig. 1(b): F1 (norm 1.5) at 135 degrees from both F2 (norm 1) and F3 (norm 2); F2 and F3 orthogonal.

    FPGM: d12 = 2.318, d13 = 3.239, d23 = 2.236, so F2 (4.554) is pruned and the kept F1, F3 stay
    correlated (|cos| = 0.707). WHC: with d = 1 - 1/sqrt2,
    score1 = 1.5 * (1*d + 2*d) = 4.5*d = 1.318, score2 = 1 * (1.5*d + 2) = 2.439,
    score3 = 2 * (1.5*d + 1) = 2.879: F1 goes and the kept pair is orthogonal.
    """
    filters = embed([polar(1.5, 225), polar(1.0, 0), polar(2.0, 90)])
    d = 1 - 1 / SQRT2
    np.testing.assert_allclose(whc(filters), [4.5 * d, 1.5 * d + 2, 2 * (1.5 * d + 1)], rtol=1e-5)
    np.testing.assert_allclose(fpgm(filters), [5.5569, 4.5537, 5.4754], rtol=1e-4)

    def kept_pair_correlation(scores):
        kept = np.sort(np.argsort(scores)[1:])
        a, b = filters[kept]
        return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))

    assert np.argmin(fpgm(filters)) == 1 and kept_pair_correlation(fpgm(filters)) == pytest.approx(1 / SQRT2)
    assert np.argmin(whc(filters)) == 0 and kept_pair_correlation(whc(filters)) == pytest.approx(0, abs=1e-6)


# ---- the peers against numpy references -------------------------------------------------------

def test_l1_l2_fpgm_match_numpy(filters):
    f = filters.astype(np.float64)
    np.testing.assert_allclose(l1(filters), np.abs(f).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(l2(filters), np.sqrt((f ** 2).sum(axis=1)), rtol=1e-6)
    distances = np.linalg.norm(f[:, None, :] - f[None, :, :], axis=2)
    np.testing.assert_allclose(fpgm(filters), distances.sum(axis=1), rtol=1e-4)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_every_criterion_shares_one_signature(filters, name):
    scores = CRITERIA[name](filters, np.random.default_rng(0))
    assert scores.shape == (len(filters),) and np.isfinite(scores).all()


def test_random_is_deterministic_for_a_seed(filters):
    first = random(filters, np.random.default_rng(7))
    again = random(filters, np.random.default_rng(7))
    other = random(filters, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert ((first >= 0) & (first < 1)).all()

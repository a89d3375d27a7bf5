"""Private sufficient statistics for the linear start: one vector per device, summed, solved once.

A pair ``(x, y)`` of L2-normalised embeddings enters through the augmented
runtime vector ``t = [y, 1] / sqrt(2)`` (unit norm, so the intercept, the
means and the count ride inside the Gram matrix instead of needing blocks of
their own). A device sends

    ``v = [a * packed(sum t t^T), b * vec(sum t x^T)]``,   ``a^2 + b^2 = 1``,

where ``packed`` keeps the upper triangle with off-diagonal entries scaled by
``sqrt(2)`` (its Euclidean norm is the Frobenius norm of the symmetric
matrix, in half the values). Adding or removing one pair changes ``v`` by
``sqrt(a^2 |t|^4 + b^2 |t|^2 |x|^2) = 1``: the L2 sensitivity is exactly 1.

Why the weights: the ridge solution ``W = (T'T + floor)^-1 T'X`` is far more
sensitive to noise in ``T'X`` than in the well-conditioned directions of
``T'T`` (the eigenvalue floor absorbs the latter), so the cross block gets
most of the signal budget. ``GRAM_WEIGHT / CROSS_WEIGHT = 0.25`` and the
floor fraction 0.125 were chosen on a validation population (synthetic seed
1, never the reporting seed 0); see ``docs/privacy.md``.

Because the weights are public, the server divides them out: the noise on
``T'T`` is ``1/a`` times, on ``T'X`` ``1/b`` times the released noise std.
"""

from __future__ import annotations

import math

import numpy as np

from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats

#: L2 sensitivity of one device's vector to adding or removing one unit-norm pair.
SENSITIVITY = 1.0
#: Ratio of the Gram block's weight to the cross block's (a / b).
GRAM_TO_CROSS = 0.25
CROSS_WEIGHT = 1.0 / math.sqrt(1.0 + GRAM_TO_CROSS ** 2)
GRAM_WEIGHT = GRAM_TO_CROSS * CROSS_WEIGHT
#: Eigenvalue floor of the noisy Gram matrix, as a fraction of its noise's spectral norm.
FLOOR_FRACTION = 0.125
#: Ridge regularisation (relative to the mean eigenvalue) when the noise floor is lower.
DEFAULT_ALPHA = 1e-3


def vector_size(d_x: int, d_y: int) -> int:
    """Values one device sends for runtime dimension ``d_y`` and enrollment dimension ``d_x``."""
    k = d_y + 1
    return k * (k + 1) // 2 + k * d_x


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def augment(runtime: np.ndarray) -> np.ndarray:
    """``[y / |y|, 1] / sqrt(2)``: unit-norm rows that carry the intercept."""
    y = _unit_rows(runtime)
    return np.concatenate([y, np.ones((len(y), 1))], axis=1) / math.sqrt(2.0)


def _triu_scale(k: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    rows, cols = np.triu_indices(k)
    return (rows, cols), np.where(rows == cols, 1.0, math.sqrt(2.0))


def device_vector(enroll: np.ndarray, runtime: np.ndarray, row_weights: np.ndarray | None = None) -> np.ndarray:
    """One device's un-noised contribution (float64; rows are normalised here, whatever came in).

    ``row_weights`` (>= 0, one per pair) weigh each pair's term: every entry is a product of
    two row values, so scaling both rows by ``sqrt(w)`` scales the pair's whole term by ``w``
    (device level: a device's statistics weighted by ``min(1, K / n)``).
    """
    if len(enroll) != len(runtime):
        raise ValueError(f"{len(enroll)} enrollment rows but {len(runtime)} runtime rows")
    t, x = augment(runtime), _unit_rows(enroll)
    if row_weights is not None:
        root = np.sqrt(np.asarray(row_weights, np.float64))[:, None]
        t, x = t * root, x * root
    idx, scale = _triu_scale(t.shape[1])
    gram = (t.T @ t)[idx] * scale
    cross = (t.T @ x).ravel()
    return np.concatenate([GRAM_WEIGHT * gram, CROSS_WEIGHT * cross])


def pair_rows(enroll: np.ndarray, runtime: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """Each pair's own term of :func:`device_vector` (one row per pair, L2 norm exactly ``weight``; they sum
    to it). One pair moves the statistics by its row, of norm <= ``weight``: the example level's
    sensitivity, on which the integer mechanism's coupled bound for the rounded sum rests."""
    t, x = augment(runtime), _unit_rows(enroll)
    (rows, cols), scale = _triu_scale(t.shape[1])
    gram = t[:, rows] * t[:, cols] * scale
    cross = (t[:, :, None] * x[:, None, :]).reshape(len(t), -1)
    return weight * np.concatenate([GRAM_WEIGHT * gram, CROSS_WEIGHT * cross], axis=1)


def unpack(vec: np.ndarray, d_x: int, d_y: int) -> tuple[np.ndarray, np.ndarray]:
    """The summed ``(T'T, T'X)`` with the public weights divided out."""
    vec = np.asarray(vec, np.float64)
    if vec.shape != (vector_size(d_x, d_y),):
        raise ValueError(f"sufficient-statistics vector has {vec.size} values, expected {vector_size(d_x, d_y)}")
    k = d_y + 1
    n_tri = k * (k + 1) // 2
    idx, scale = _triu_scale(k)
    gram = np.zeros((k, k))
    gram[idx] = vec[:n_tri] / (GRAM_WEIGHT * scale)
    gram = gram + np.triu(gram, 1).T
    cross = vec[n_tri:].reshape(k, d_x) / CROSS_WEIGHT
    return gram, cross


def pair_count(gram: np.ndarray) -> float:
    """Pairs in the (possibly noisy) sum: the intercept entry is n / 2."""
    return 2.0 * float(gram[-1, -1])


def ridge_stats(gram: np.ndarray, cross: np.ndarray) -> RidgeStats:
    """The plain sums ``(sum y y^T, sum y x^T, sum y, sum x, n)`` inside the augmented ones."""
    return RidgeStats(yy=2.0 * gram[:-1, :-1], yx=math.sqrt(2.0) * cross[:-1], y=2.0 * gram[:-1, -1],
                      x=math.sqrt(2.0) * cross[-1], n=pair_count(gram))


def enrollment_mean(gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """The (noisy) mean unit enrollment embedding of the summed statistics: post-processing of a release.

    Raises ValueError where the noisy pair count is not positive (too few pairs for the noise)."""
    stats = ridge_stats(gram, cross)
    if not stats.n > 0:
        raise ValueError(f"the released statistics count {stats.n:.3g} pairs: no mean enrollment embedding")
    return np.asarray(stats.x, np.float64) / stats.n


def solve(gram: np.ndarray, cross: np.ndarray, alpha: float, noise_std: float = 0.0,
          floor_fraction: float = FLOOR_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Ridge ``x ~ W y + b`` from the augmented sums; returns ``W`` (d_x, d_y) and ``b`` (d_x,).

    Without noise this is exactly centralised ridge (:func:`ridge_from_stats`).
    ``noise_std`` is the per-value std of the noise in the *released* vector:
    ``sum y y^T`` then carries off-diagonal noise of std ``2 noise_std / (a sqrt 2)``,
    and the covariance's eigenvalues are lifted by ``floor_fraction`` of that
    noise's spectral norm, so directions the noise dominates are regularised
    away instead of inverted.
    """
    yy_offdiag_std = 2.0 * noise_std / (GRAM_WEIGHT * math.sqrt(2.0))
    return ridge_from_stats(ridge_stats(gram, cross), alpha, noise_std=floor_fraction * yy_offdiag_std)


def noisy_solve(total: np.ndarray, noise_std: float, rng: np.random.Generator, d_x: int, d_y: int,
                alpha: float = DEFAULT_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Release ``total`` with Gaussian noise of ``noise_std`` once, then solve as the server does.

    The centralised DP reference and the round-maths replays use this; a federation's server
    gets the noise from the devices' shares instead and calls :func:`solve` itself.
    """
    noisy = total + (rng.normal(0.0, noise_std, total.shape) if noise_std > 0 else 0.0)
    return solve(*unpack(noisy, d_x, d_y), alpha, noise_std=noise_std)

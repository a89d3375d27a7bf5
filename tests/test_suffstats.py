"""The private linear start's statistics: sensitivity, exact recovery, noise handling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_nessa.federated import suffstats
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats


def _pairs(n: int, dx: int = 6, dy: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, dy))
    x = np.tanh(y @ rng.standard_normal((dy, dx))) + 0.1 * rng.standard_normal((n, dx))
    return x, y


def test_weights_make_the_sensitivity_exactly_one() -> None:
    assert suffstats.GRAM_WEIGHT ** 2 + suffstats.CROSS_WEIGHT ** 2 == pytest.approx(1.0)
    x, y = _pairs(40)
    full = suffstats.device_vector(x, y)
    worst = max(np.linalg.norm(full - suffstats.device_vector(np.delete(x, i, 0), np.delete(y, i, 0)))
                for i in range(len(x)))
    assert worst <= suffstats.SENSITIVITY + 1e-12
    assert worst == pytest.approx(1.0, abs=1e-12)  # every unit-norm pair reaches the bound


def test_unpack_recovers_the_plain_sums_and_count() -> None:
    x, y = _pairs(50)
    gram, cross = suffstats.unpack(suffstats.device_vector(x, y), 6, 5)
    plain = RidgeStats.from_pairs(l2_normalize(x).astype(np.float64), l2_normalize(y).astype(np.float64))
    got = suffstats.ridge_stats(gram, cross)
    assert suffstats.pair_count(gram) == pytest.approx(50)
    for a, b in ((got.yy, plain.yy), (got.yx, plain.yx), (got.y, plain.y), (got.x, plain.x)):
        np.testing.assert_allclose(a, b, atol=1e-5)  # l2_normalize works in float32


def test_vector_is_half_the_symmetric_block() -> None:
    assert suffstats.vector_size(256, 192) == 193 * 194 // 2 + 193 * 256
    x, y = _pairs(3)
    assert suffstats.device_vector(x, y).shape == (suffstats.vector_size(6, 5),)


def test_sums_of_devices_are_the_statistics_of_the_union() -> None:
    x, y = _pairs(60)
    parts = suffstats.device_vector(x[:25], y[:25]) + suffstats.device_vector(x[25:], y[25:])
    np.testing.assert_allclose(parts, suffstats.device_vector(x, y), atol=1e-10)


def test_noiseless_solve_is_centralised_ridge() -> None:
    x, y = _pairs(200)
    gram, cross = suffstats.unpack(suffstats.device_vector(x, y), 6, 5)
    W, b = suffstats.solve(gram, cross, alpha=1e-3)
    W2, b2 = ridge_from_stats(RidgeStats.from_pairs(l2_normalize(x).astype(np.float64),
                                                    l2_normalize(y).astype(np.float64)), 1e-3)
    np.testing.assert_allclose(W, W2, atol=1e-5)
    np.testing.assert_allclose(b, b2, atol=1e-5)


def test_wrong_vector_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected"):
        suffstats.unpack(np.zeros(7), 6, 5)
    with pytest.raises(ValueError, match="rows"):
        suffstats.device_vector(np.zeros((3, 6)), np.zeros((2, 5)))


def test_noise_floor_beats_inverting_the_noise() -> None:
    rng = np.random.default_rng(1)
    d, n = 48, 4000
    y = rng.standard_normal((n, d))
    x = y @ rng.standard_normal((d, d)) + 0.1 * rng.standard_normal((n, d))
    vec = suffstats.device_vector(x, y)
    std = 20.0
    gram, cross = suffstats.unpack(vec + rng.normal(0.0, std, vec.shape), d, d)
    xn, yn = l2_normalize(x), l2_normalize(y)

    def fit(W: np.ndarray, b: np.ndarray) -> float:
        return float((l2_normalize(yn @ W.T + b) * xn).sum(1).mean())

    floored = fit(*suffstats.solve(gram, cross, 1e-3, noise_std=std))
    naive = fit(*suffstats.solve(gram, cross, 1e-3, noise_std=0.0))
    assert floored > naive + 0.05
    assert math.isfinite(floored)

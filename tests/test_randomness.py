"""Noise sources: the OS CSPRNG by default, a seeded stream only on explicit request."""

from __future__ import annotations

import numpy as np
import pytest

from fed_nessa.randomness import ReproducibleNoise, SecureNoise, noise_source


def test_secure_noise_is_fresh_and_has_the_asked_distribution() -> None:
    src = SecureNoise()
    assert src.secure
    a, b = src.normal((20_000,), 2.0), src.normal((20_000,), 2.0)
    assert not np.array_equal(a, b)
    assert abs(a.std() - 2.0) < 0.05 and abs(a.mean()) < 0.05
    u = src.uniform(20_000)
    assert 0.0 < u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    assert src.normal((3, 5), 1.0).shape == (3, 5) and src.normal((7,), 1.0).shape == (7,)  # odd sizes too
    assert not src.normal((4,), 0.0).any() and src.uniform(0).shape == (0,)


def test_reproducible_noise_replays_per_stream() -> None:
    a, b = ReproducibleNoise(0, "device", "d", 1), ReproducibleNoise(0, "device", "d", 1)
    assert not a.secure
    np.testing.assert_array_equal(a.normal((10,), 1.0), b.normal((10,), 1.0))
    np.testing.assert_array_equal(a.uniform(5), b.uniform(5))
    other = ReproducibleNoise(0, "device", "d", 2).normal((10,), 1.0)
    assert not np.allclose(ReproducibleNoise(0, "device", "d", 1).normal((10,), 1.0), other)


@pytest.mark.parametrize("reproducible", [False, True])
def test_noise_source_is_secure_unless_asked(reproducible: bool) -> None:
    src = noise_source(reproducible, 0, "x")
    assert src.secure is (not reproducible)
    assert isinstance(src, ReproducibleNoise if reproducible else SecureNoise)

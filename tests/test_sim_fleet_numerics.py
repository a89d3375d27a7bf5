"""The fleet engine's simulated SecAgg+ arithmetic and fast-numerics streams (fed_nessa.sim.fleet_numerics)."""

from __future__ import annotations

import numpy as np

from fed_nessa.config import from_run_config
from fed_nessa.federated.codec import make_codec
from fed_nessa.sim.fleet_numerics import encode_all, fast_rounding, modular_sum, summed_noise, uniforms

REPLAY = from_run_config({"reproducible-noise": True, "seed": 3})
SECURE = from_run_config({"reproducible-noise": False})


def test_a_saturated_vector_fails_on_its_device_and_the_rest_sum_exactly() -> None:
    codec = make_codec(2.0, 8.0, 2**20, 4)
    rng = np.random.default_rng(0)
    vectors = [rng.uniform(-1, 1, 6).astype(np.float32) for _ in range(3)] + [np.full(6, 1e6, np.float32)]
    payloads, sent, failed = encode_all(vectors, [10, 11, 12, 13], codec)
    assert (sent, failed) == ([10, 11, 12], [13])
    total = modular_sum(payloads, codec)
    assert np.abs(total - np.sum(vectors[:3], axis=0)).max() <= 2 * codec.sum_error_bound(3)


def test_the_fast_streams_replay_only_under_reproducible_noise() -> None:
    codec = make_codec(2.0, 8.0, 2**20, 4)
    zero = np.zeros(8)
    assert np.array_equal(fast_rounding(zero, 4, codec, REPLAY, 5), fast_rounding(zero, 4, codec, REPLAY, 5))
    assert not np.array_equal(fast_rounding(zero, 4, codec, REPLAY, 5), fast_rounding(zero, 4, codec, REPLAY, 6))
    assert not np.array_equal(fast_rounding(zero, 4, codec, SECURE, 5), fast_rounding(zero, 4, codec, SECURE, 5))
    assert np.array_equal(uniforms(REPLAY, 9, 2), uniforms(REPLAY, 9, 2))
    assert not np.array_equal(uniforms(SECURE, 9, 2), uniforms(SECURE, 9, 2))
    assert np.array_equal(summed_noise(REPLAY, 2).normal((4,), 1.0), summed_noise(REPLAY, 2).normal((4,), 1.0))
    assert summed_noise(SECURE, 2).secure

"""The server's model: the private linear start equals central ridge without noise; the solve's noise floor."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from test_federated_device import FLEET, Cfg, _shards

from fed_nessa.config import DPMode, FederationConfig, LinearStart, Phase
from fed_nessa.federated import suffstats
from fed_nessa.federated.device import suffstats_vector
from fed_nessa.federated.mechanism import PAYLOAD_SIGMAS
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.model.aligners import AlignerInfo, RidgeAligner
from fed_nessa.model.aligners.base import l2_normalize


def _stats(shards: list) -> np.ndarray:
    return sum(suffstats_vector(s).astype(np.float32).astype(np.float64) for s in shards)


def _ridge(shards: list, cfg: FederationConfig) -> RidgeAligner:
    x = np.concatenate([s.enroll for s in shards])
    y = np.concatenate([s.runtime for s in shards])
    return RidgeAligner(AlignerInfo(5, 4), alpha=cfg.ridge_alpha).fit(x, y)


def test_suffstats_without_noise_reproduce_central_ridge() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE)
    shards = _shards()
    model = ServerModel(cfg, 5, 4, "X", "Y")
    assert model.phases() == [Phase.SUFFSTATS, Phase.DPSGD, Phase.DPSGD]
    model.apply(Phase.SUFFSTATS, _stats(shards), len(shards))
    y = np.concatenate([s.runtime for s in shards])
    np.testing.assert_allclose(model.comparator().map_runtime(y), _ridge(shards, cfg).map_runtime(y), atol=1e-4)


def test_state_round_trip() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE, linear_start=LinearStart.NONE)
    a = ServerModel(cfg, 5, 4, "X", "Y")
    a.apply(Phase.DPSGD, np.full(sum(p.numel() for p in a.net.parameters() if p.requires_grad), 0.01, np.float32), 1)
    b = ServerModel(replace(cfg, seed=1), 5, 4, "X", "Y")
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.vector(), b.vector())
    assert b.completed == [Phase.DPSGD]


def test_suffstats_over_several_rounds_accumulate() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE, num_server_rounds=4, suffstats_rounds=2)
    shards = _shards(k=4)
    model = ServerModel(cfg, 5, 4, "X", "Y")
    assert model.phases() == [Phase.SUFFSTATS, Phase.SUFFSTATS, Phase.DPSGD, Phase.DPSGD]
    for block in (shards[:2], shards[2:]):
        model.apply(Phase.SUFFSTATS, _stats(block), len(block))
    y = np.concatenate([s.runtime for s in shards])
    np.testing.assert_allclose(model.comparator().map_runtime(y), _ridge(shards, cfg).map_runtime(y), atol=1e-4)
    restored = ServerModel(cfg, 5, 4, "X", "Y")
    restored.load_state_dict(model.state_dict())
    assert restored.stats_devices == 4 and np.allclose(restored.stats_sum, model.stats_sum)


def test_noise_floor_regularises_noisy_statistics() -> None:
    from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats

    rng = np.random.default_rng(0)
    d, n = 48, 4000  # unit rows: covariance eigenvalues ~1/d, like real embeddings
    y = l2_normalize(rng.standard_normal((n, d))).astype(np.float64)
    x = l2_normalize(y @ rng.standard_normal((d, d)) + 0.1 * rng.standard_normal((n, d))).astype(np.float64)
    clean = RidgeStats.from_pairs(x, y)
    std = 10.0
    noisy = RidgeStats(clean.yy + rng.normal(0, std, clean.yy.shape), clean.yx + rng.normal(0, std, clean.yx.shape),
                       clean.y, clean.x, clean.n)
    np.testing.assert_array_equal(ridge_from_stats(clean, 1e-3)[0], ridge_from_stats(clean, 1e-3, noise_std=0.0)[0])

    def fit(W: np.ndarray, b: np.ndarray) -> float:
        pred = l2_normalize(y @ W.T + b)
        return float((pred * x).sum(1).mean())

    assert fit(*ridge_from_stats(noisy, 1e-3, noise_std=std)) > fit(*ridge_from_stats(noisy, 1e-3)) + 0.05


def test_rounding_noise_is_floored_like_dp_noise() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE)
    shards = _shards()
    total = _stats(shards)
    exact, rounded = ServerModel(cfg, 5, 4, "X", "Y"), ServerModel(cfg, 5, 4, "X", "Y")
    exact.apply(Phase.SUFFSTATS, total, len(shards))
    rounded.apply(Phase.SUFFSTATS, total, len(shards), quantization_std=0.5)
    assert exact.stats_noise_var == 0.0 and rounded.stats_noise_var == pytest.approx(len(shards) * 0.25)
    assert not np.allclose(exact.vector(), rounded.vector())  # the floor rose with the rounding noise


def test_released_noise_variance_follows_each_devices_own_g() -> None:
    """The solve is told the g each arrived device sized its share for (from its reply)."""
    sigma = 2.0
    model = ServerModel(Cfg(suffstats_noise_multiplier=sigma), 5, 4, "X", "Y")
    unit = (sigma * suffstats.SENSITIVITY) ** 2
    assert model.released_noise_var(3, [4, 4, 100]) == pytest.approx(unit * (1 / 4 + 1 / 4 + 1 / 100))
    assert model.released_noise_var(2, []) == pytest.approx(2 * unit / model.cfg.min_arrivals)
    local = ServerModel(Cfg(dp_mode=DPMode.LOCAL, suffstats_noise_multiplier=sigma), 5, 4, "X", "Y")
    assert local.released_noise_var(3, [4, 4, 4]) == pytest.approx(3 * unit)
    assert ServerModel(Cfg(dp_mode=DPMode.NONE), 5, 4, "X", "Y").released_noise_var(3, [4, 4, 4]) == 0.0
    model.apply(Phase.SUFFSTATS, _stats(_shards()), 4, noise_arrivals=[4, 4, 4, 4])
    assert model.stats_noise_var == pytest.approx(unit)


def test_payload_bound_covers_the_largest_honest_share() -> None:
    """The range assumes g = 1 (the full sigma), so no honest device saturates whatever its own g."""
    cfg = Cfg(noise_multiplier=2.0, clip_norm=0.5, suffstats_noise_multiplier=1.5, max_pairs_per_device=30)
    model = ServerModel(cfg, 5, 4, "X", "Y")
    plan = noise_plan(cfg, FLEET)
    assert model.payload_bound(Phase.SUFFSTATS, plan) == pytest.approx(
        30 + PAYLOAD_SIGMAS * 1.5 * suffstats.SENSITIVITY)
    assert model.payload_bound(Phase.DPSGD, plan) == pytest.approx(
        0.5 * 4 * cfg.batch_size + PAYLOAD_SIGMAS * 2.0 * 0.5)
    # a device-local sample-rate bounds the sample by the largest device's expected sample
    sampled = cfg.replace(sample_rate=0.1)
    mean = 0.1 * 30
    assert ServerModel(sampled, 5, 4, "X", "Y").payload_bound(Phase.DPSGD, noise_plan(sampled, FLEET)) == (
        pytest.approx(0.5 * max(4 * mean, mean + 8 * math.sqrt(mean) + 8) + PAYLOAD_SIGMAS * 2.0 * 0.5))
    none, local = Cfg(dp_mode=DPMode.NONE), Cfg(dp_mode=DPMode.LOCAL)
    assert ServerModel(none, 5, 4, "X", "Y").payload_bound(Phase.SUFFSTATS, noise_plan(none, FLEET)) == 1000.0
    assert ServerModel(local, 5, 4, "X", "Y").payload_bound(Phase.DPSGD, noise_plan(local, FLEET)) == cfg.update_clip


def test_apply_needs_a_contributor() -> None:
    with pytest.raises(ValueError, match="no device"):
        ServerModel(Cfg(), 5, 4, "X", "Y").apply(Phase.SUFFSTATS, np.zeros(3), 0)


@pytest.mark.parametrize(("dp_mode", "unit", "gradients", "descends"), [
    (DPMode.NONE, "example", True, True),  # the fleet engine's non-DP control sends gradient sums
    (DPMode.NONE, "device", None, True),  # device level sends gradients, DP or not
    (DPMode.DISTRIBUTED, "example", None, True),
    (DPMode.NONE, "example", None, False),  # example-level non-DP Flower devices send model deltas
])
def test_a_gradient_sum_is_stepped_against_and_a_delta_added(dp_mode: DPMode, unit: str, gradients: bool | None,
                                                              descends: bool) -> None:
    """Found by the federated canary audit: the fleet engine's dp-mode none rounds did gradient ascent."""
    cfg = Cfg(dp_mode=dp_mode, privacy_unit=unit, server_optimizer="sgd", server_lr=0.1)
    model = ServerModel(cfg, 5, 4, "X", "Y")
    before = model.vector().copy()
    push = np.ones(sum(p.numel() for p in model.net.parameters() if p.requires_grad), np.float32)
    model.apply(Phase.DPSGD, push, 3, gradients=gradients)
    moved = model.vector() - before
    assert (moved[moved != 0] < 0).all() if descends else (moved[moved != 0] > 0).all()
    assert (moved != 0).any()

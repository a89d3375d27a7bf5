"""Round maths: the private linear start equals central ridge without noise; events, declines, updates."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.model.aligners import AlignerInfo, RidgeAligner
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.config import FederationConfig
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.federated.rounds import (DPSGD, SUFFSTATS, SUFFSTATS_SENSITIVITY, ServerModel, client_round, plan_round,
                              planned_event, suffstats_vector)
from fed_nessa.data.shards import Shard, make_shard


# The real, validated config, with small test-sized defaults (min-arrival-fraction only matters
# when a cohort size is passed, as in deployment).
_TEST_DEFAULTS = dict(num_server_rounds=3, batch_size=8, lr=0.01, server_lr=1.0, noise_multiplier=1.0,
                      min_arrivals=4, hidden=8, depth=1, dp_mode="distributed", linear_start="suffstats")


def Cfg(**changes: object) -> FederationConfig:  # noqa: N802 - reads like the dataclass it builds
    return FederationConfig().replace(**{**_TEST_DEFAULTS, **changes})


def _shards(k: int = 4, n: int = 30, dx: int = 5, dy: int = 4) -> list[Shard]:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((dy, dx))
    out = []
    for i in range(k):
        y = l2_normalize(rng.standard_normal((n, dy)))
        x = l2_normalize(np.tanh(y @ A) + 0.05 * rng.standard_normal((n, dx)))
        out.append(make_shard(x, y, np.arange(n) % 3, "X", "Y"))
    return out


def test_suffstats_without_noise_reproduce_central_ridge(tmp_path: Path) -> None:
    cfg = Cfg(dp_mode="none")
    shards = _shards()
    model = ServerModel.create(cfg, 5, 4, "X", "Y")
    assert model.phases() == [SUFFSTATS, DPSGD, DPSGD]
    total = sum(client_round(SUFFSTATS, s, model.vector(), cfg, 1, None).vector.astype(np.float64)
                for s in shards)
    model.apply(SUFFSTATS, total, len(shards))
    x = np.concatenate([s.enroll for s in shards])
    y = np.concatenate([s.runtime for s in shards])
    ridge = RidgeAligner(AlignerInfo(5, 4), alpha=cfg.ridge_alpha).fit(x, y)
    np.testing.assert_allclose(model.comparator().map_runtime(y), ridge.map_runtime(y), atol=1e-4)


def test_suffstats_sensitivity_bound() -> None:
    s = _shards(1)[0]
    full = suffstats_vector(s)
    minus_one = suffstats_vector(make_shard(s.enroll[1:], s.runtime[1:], s.speaker[1:], "X", "Y"))
    assert np.linalg.norm(full - minus_one) <= SUFFSTATS_SENSITIVITY + 1e-9


def test_planned_events() -> None:
    cfg = Cfg()
    e = planned_event(SUFFSTATS, 30, cfg, 1)
    assert (e.mechanism, e.steps, e.sample_rate, e.clip_norm) == ("gaussian-sum", 1, 1.0, SUFFSTATS_SENSITIVITY)
    d = planned_event(DPSGD, 40, cfg, 2)
    assert (d.mechanism, d.steps, d.sample_rate, d.mode) == ("dp-sgd", 1, 0.2, "distributed")
    loc = planned_event(DPSGD, 40, replace(cfg, dp_mode="local", local_epochs=2), 2)
    assert (loc.steps, loc.mode) == (10, "local")
    assert planned_event(DPSGD, 40, replace(cfg, dp_mode="none"), 2) is None


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_dpsgd_round_records_and_moves_model(tmp_path: Path, mode: str) -> None:
    cfg = Cfg(dp_mode=mode, linear_start="none")
    shards = _shards()
    model = ServerModel.create(cfg, 5, 4, "X", "Y")
    start = model.vector().copy()
    vecs = []
    for i, s in enumerate(shards):
        ledger = DeviceLedger.open(tmp_path / f"d{i}", f"d{i}")
        out = client_round(DPSGD, s, start, cfg, 1, ledger)
        assert out.status == "ok" and out.vector.dtype == np.float32
        assert out.metrics["epsilon_spent"] > 0 and len(ledger.events()) == 1 and not ledger.pending()
        if mode == "local":
            assert np.linalg.norm(out.vector) <= cfg.update_clip + 1e-5
        assert np.abs(out.vector).max() <= model.payload_bound(DPSGD)
        vecs.append(out.vector)
    model.apply(DPSGD, np.sum(vecs, axis=0), len(vecs))
    assert not np.allclose(model.vector(), start)


def test_device_declines_over_budget(tmp_path: Path) -> None:
    cfg = Cfg(dp_mode="local", linear_start="none", epsilon_budget=1.0, noise_multiplier=0.5, local_epochs=3)
    s = _shards(1)[0]
    ledger = DeviceLedger.open(tmp_path / "d", "d")
    out = client_round(DPSGD, s, ServerModel.create(cfg, 5, 4, "X", "Y").vector(), cfg, 1, ledger)
    assert out.status == "declined" and out.vector is None and "budget" in str(out.metrics["reason"]).lower()
    assert ledger.events() == []
    assert plan_round(DPSGD, s, cfg, 1, ledger).status == "declined"


def test_failure_is_still_recorded(tmp_path: Path) -> None:
    cfg = Cfg(dp_mode="local", linear_start="none")
    s = _shards(1)[0]
    ledger = DeviceLedger.open(tmp_path / "d", "d")
    with pytest.raises(ValueError, match="global model vector"):
        client_round(DPSGD, s, np.zeros(3, np.float32), cfg, 1, ledger)
    assert len(ledger.events()) == 1 and not ledger.pending()  # spent conservatively, closed as failed


def test_distributed_noise_share_is_calibrated(tmp_path: Path) -> None:
    cfg = Cfg(linear_start="none", min_arrivals=4, noise_multiplier=2.0, clip_norm=0.5)
    s = _shards(1)[0]
    model = ServerModel.create(cfg, 5, 4, "X", "Y")
    noisy = client_round(DPSGD, s, model.vector(), cfg, 1, DeviceLedger.open(tmp_path / "a", "a")).vector
    clean = client_round(DPSGD, s, model.vector(), replace(cfg, dp_mode="none"), 1, None).vector
    share = float(np.std(noisy - clean))
    assert abs(share - 2.0 * 0.5 / math.sqrt(4)) < 0.15  # sigma*C/sqrt(min_arrivals) = 0.5


def test_state_round_trip() -> None:
    cfg = Cfg(dp_mode="none", linear_start="none")
    a = ServerModel.create(cfg, 5, 4, "X", "Y")
    a.apply(DPSGD, np.full(sum(p.numel() for p in a.net.parameters() if p.requires_grad), 0.01, np.float32), 1)
    b = ServerModel.create(replace(cfg, seed=1), 5, 4, "X", "Y")
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.vector(), b.vector())


def test_suffstats_over_several_rounds_accumulate(tmp_path: Path) -> None:
    cfg = Cfg(dp_mode="none", num_server_rounds=4, suffstats_rounds=2)
    shards = _shards(k=4)
    model = ServerModel.create(cfg, 5, 4, "X", "Y")
    assert model.phases() == [SUFFSTATS, SUFFSTATS, DPSGD, DPSGD]
    for block in (shards[:2], shards[2:]):
        vec = sum(client_round(SUFFSTATS, s, model.vector(), cfg, 1, None).vector.astype(np.float64) for s in block)
        model.apply(SUFFSTATS, vec, len(block))
    x = np.concatenate([s.enroll for s in shards])
    y = np.concatenate([s.runtime for s in shards])
    ridge = RidgeAligner(AlignerInfo(5, 4), alpha=cfg.ridge_alpha).fit(x, y)
    np.testing.assert_allclose(model.comparator().map_runtime(y), ridge.map_runtime(y), atol=1e-4)
    restored = ServerModel.create(cfg, 5, 4, "X", "Y")
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


def test_noise_share_is_calibrated_to_the_rounds_guaranteed_arrivals(tmp_path: Path) -> None:
    from fed_nessa.federated.rounds import guaranteed_arrivals

    cfg = Cfg(min_arrival_fraction=0.5, linear_start="none", noise_multiplier=2.0, clip_norm=0.5)
    assert guaranteed_arrivals(cfg, None) == 4 and guaranteed_arrivals(cfg, 40) == 20
    assert guaranteed_arrivals(cfg, 5) == 4  # never below min-arrivals
    from fed_nessa.federated.rounds import _client_distributed_grad, build_net

    s = _shards(1)[0]
    quiet = replace(cfg, noise_multiplier=1e-9)
    noisy = _client_distributed_grad(build_net(cfg, 5, 4), s, cfg, 7, 40)
    clean = _client_distributed_grad(build_net(cfg, 5, 4), s, quiet, 7, 40)  # same Poisson sample (same seed)
    assert abs(float(np.std(noisy - clean)) - 2.0 * 0.5 / math.sqrt(20)) < 0.03


def test_rounding_noise_is_floored_like_dp_noise() -> None:
    cfg = Cfg(dp_mode="none")
    shards = _shards()
    total = sum(client_round(SUFFSTATS, s, np.zeros(1), cfg, 1, None).vector.astype(np.float64) for s in shards)
    exact, rounded = ServerModel.create(cfg, 5, 4, "X", "Y"), ServerModel.create(cfg, 5, 4, "X", "Y")
    exact.apply(SUFFSTATS, total, len(shards))
    rounded.apply(SUFFSTATS, total, len(shards), quantization_std=0.5)
    assert exact.stats_noise_var == 0.0 and rounded.stats_noise_var == pytest.approx(len(shards) * 0.25)
    assert not np.allclose(exact.vector(), rounded.vector())  # the floor rose with the rounding noise

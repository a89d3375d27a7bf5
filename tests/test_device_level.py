"""Device-level DP (privacy-unit = device): the sensitivity bound, the accounting, the device's limits, the audit."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fed_nessa.config import ConfigError, DevicePolicy, FederationConfig, Phase, from_run_config
from fed_nessa.federated import suffstats
from fed_nessa.federated.device import (
    RoundRequest,
    planned_event,
    policy_refusal,
    separation_refusal,
)
from fed_nessa.federated.layout import build_net
from fed_nessa.federated.mechanism import device_subset, mechanism_for
from fed_nessa.model.training import device_update
from fed_nessa.privacy.accounting import (
    PLD,
    PRV,
    RDP,
    UnitNotCoveredError,
    compute_epsilon,
    gaussian_epsilon,
)
from fed_nessa.privacy.events import DEVICE, DISTRIBUTED, DP_SGD, EXAMPLE, GAUSSIAN_SUM, DPEvent, EventError
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.sim.ghost import device_clipped_sum, device_clipped_vectors

DEVICE_POLICY = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, min_noise_multiplier=0.2,
                             min_suffstats_noise_multiplier=0.2)


def _devices(sizes: list[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, 192)).astype(np.float32), rng.standard_normal((n, 256)).astype(np.float32))
            for n in sizes]


def _perturbed_net(cfg: FederationConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_net(cfg, 192, 256)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


# -- the sensitivity bound ---------------------------------------------------------------------
@pytest.mark.parametrize("clip", [0.01, 0.1, 10.0])
def test_removing_a_whole_device_moves_the_gradient_sum_by_at_most_the_clip(clip: float) -> None:
    cfg = FederationConfig(privacy_unit="device")
    net = _perturbed_net(cfg)
    devices = _devices([1, 3, 17, 40, 5])
    vectors = [device_update(net, x, y, clip_norm=clip, noise_std=0.0) for x, y in devices]
    total = np.sum(vectors, axis=0, dtype=np.float64)
    for k in range(len(devices)):
        without = total - vectors[k]
        assert np.linalg.norm(total - without) <= clip * (1 + 1e-5)
    # the fleet engine's two paths release the same sum the devices send
    x = torch.from_numpy(np.concatenate([d[0] for d in devices]))
    y = torch.from_numpy(np.concatenate([d[1] for d in devices]))
    seg = torch.from_numpy(np.repeat(np.arange(len(devices)), [len(d[0]) for d in devices]))
    per_device = device_clipped_vectors(net, x, y, seg, len(devices), clip).numpy()
    np.testing.assert_allclose(per_device, np.stack(vectors), atol=1e-6)
    summed = device_clipped_sum(net, x, y, seg, len(devices), clip).numpy()
    np.testing.assert_allclose(summed, total, atol=1e-6)


def test_a_devices_statistics_weigh_at_most_k_pairs() -> None:
    cfg = FederationConfig(privacy_unit="device", device_stats_pairs=10)
    for n in (1, 10, 11, 200):
        (x, y), = _devices([n], seed=n)
        vec = suffstats.device_vector(x, y) * mechanism_for(cfg).stats_weight(n)
        assert np.linalg.norm(vec) <= cfg.device_stats_pairs * suffstats.SENSITIVITY + 1e-9
        rows = suffstats.device_vector(x, y, np.full(n, mechanism_for(cfg).stats_weight(n)))
        np.testing.assert_allclose(rows, vec, atol=1e-9)  # the fleet's per-row weights give the same vector


def test_device_subset_is_the_smallest_uniforms_and_all_when_unbounded() -> None:
    u = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    assert device_subset(u, 2).tolist() == [1, 3]
    assert device_subset(u, 0).tolist() == device_subset(u, 9).tolist() == [0, 1, 2, 3, 4]


# -- accounting -----------------------------------------------------------------------------
def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang (2018), Theorem 8, inverted by bisection: written here independently of the library."""
    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def _span(rounds: int, sigma: float, unit: str = DEVICE) -> DPEvent:
    return DPEvent(round=1, mechanism=GAUSSIAN_SUM, steps=rounds, sample_rate=1.0, noise_multiplier=sigma,
                   clip_norm=0.1, delta=1e-5, mode=DISTRIBUTED, last_round=rounds, unit=unit)


def test_device_level_accounting_matches_a_hand_computed_gaussian() -> None:
    """100 rounds at sigma 20 plus a statistics round at sigma 5: mu = sqrt(100/400 + 1/25) = sqrt(0.29)."""
    stats = DPEvent(round=0, mechanism=GAUSSIAN_SUM, steps=1, sample_rate=1.0, noise_multiplier=5.0,
                    clip_norm=100.0, delta=1e-5, mode=DISTRIBUTED, unit=DEVICE)
    events = [stats, _span(100, 20.0)]
    mu, delta = math.sqrt(100 / 20.0 ** 2 + 1 / 5.0 ** 2), 1e-5
    exact = _exact_gaussian_epsilon(mu, delta)
    # by hand: Phi(-2.1655/mu + mu/2) - e^2.1655 Phi(-2.1655/mu - mu/2) = 8.77e-5 - 8.72 x 8.9e-6 = 1.0e-5
    assert exact == pytest.approx(2.1655, abs=2e-3)
    assert gaussian_epsilon(events, delta) == pytest.approx(exact, abs=1e-6)
    assert compute_epsilon(events, delta, PLD, DEVICE) == pytest.approx(exact, abs=0.01)
    assert compute_epsilon(events, delta, PRV, DEVICE) == pytest.approx(exact, abs=0.02)
    rdp = compute_epsilon(events, delta, RDP, DEVICE)
    rho = mu ** 2 / 2  # zCDP of the composed Gaussian, and its classic conversion (Bun & Steinke 2016)
    assert exact <= rdp <= rho + 2 * math.sqrt(rho * math.log(1 / delta))
    # example-level is implied at twice the sensitivity: the same Gaussian with mu doubled
    assert compute_epsilon(events, delta, PLD, EXAMPLE) == pytest.approx(_exact_gaussian_epsilon(2 * mu, delta),
                                                                          abs=0.02)


def test_example_level_events_give_no_device_level_guarantee() -> None:
    example = DPEvent(round=1, mechanism=DP_SGD, steps=10, sample_rate=0.02, noise_multiplier=1.0, clip_norm=1.0,
                      delta=1e-5, mode=DISTRIBUTED)
    with pytest.raises(UnitNotCoveredError):
        compute_epsilon([example, _span(5, 10.0)], 1e-5, RDP, DEVICE)
    assert compute_epsilon([example], 1e-5, RDP, EXAMPLE) > 0


def test_a_device_level_event_never_claims_amplification() -> None:
    with pytest.raises(EventError, match="no amplification"):
        DPEvent(round=1, mechanism=DP_SGD, steps=1, sample_rate=0.1, noise_multiplier=1.0, clip_norm=1.0,
                delta=1e-5, mode=DISTRIBUTED, unit=DEVICE)
    ev = _span(3, 2.0)
    assert DPEvent.from_dict(ev.to_dict()) == ev and ev.to_dict()["unit"] == DEVICE
    assert "unit" not in _span(3, 2.0, EXAMPLE).to_dict()  # example-level ledgers keep their old layout


# -- the device's own limits -------------------------------------------------------------------
def test_participation_limits_are_enforced_by_the_device(tmp_path: Path) -> None:
    policy = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, max_participations=3, min_separation=2,
                          epsilon_budget=50.0, min_noise_multiplier=0.2, min_suffstats_noise_multiplier=0.2)
    cfg = from_run_config({"privacy-unit": "device", "num-devices": 20, "min-arrivals": 8, "noise-multiplier": 3.0,
                           "distributed-mechanism": "gaussian",  # planned without a shard's dimensions
                           "epsilon-budget": 50.0, "num-server-rounds": 10, "linear-start": "none"})
    ledger = DeviceLedger.open(tmp_path / "dev", "dev", policy=policy, key_folder=tmp_path / "keys")
    joined, reasons = [], []
    for r in range(1, 11):
        req = RoundRequest(Phase.DPSGD, r, 8, 20)
        why = policy_refusal(req, 30, cfg, policy, ledger)
        if why:
            reasons.append(why)
            continue
        event = planned_event(req, 30, cfg, policy)
        assert event is not None and event.unit == DEVICE and event.sample_rate == 1.0
        ledger.reserve(event)
        joined.append(r)
    assert joined == [1, 3, 5]
    assert any("min-separation is 2" in why for why in reasons)
    assert any("its policy's limit is 3" in why for why in reasons)
    assert separation_refusal(7, {5}, policy) is None and separation_refusal(6, {5}, policy) is not None


def test_a_device_level_policy_declines_example_level_rounds(tmp_path: Path) -> None:
    ledger = DeviceLedger.open(tmp_path / "dev", "dev", policy=DEVICE_POLICY, key_folder=tmp_path / "keys")
    example_cfg = from_run_config({"num-devices": 20, "min-arrivals": 8})
    why = policy_refusal(RoundRequest(Phase.DPSGD, 1, 8, 20), 30, example_cfg, DEVICE_POLICY, ledger)
    assert why is not None and "budgets per device" in why
    assert ledger.unit == DEVICE


def test_device_level_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="privacy-unit"):
        from_run_config({"privacy-unit": "speaker"})
    with pytest.raises(ConfigError, match="dp-mode 'distributed'"):
        from_run_config({"privacy-unit": "device", "dp-mode": "local"})
    with pytest.raises(ConfigError, match="delta below 1 / num-devices"):
        from_run_config({"privacy-unit": "device", "num-devices": 200_000, "delta": 1e-5})
    with pytest.raises(ConfigError, match="device-clip-norm"):
        from_run_config({"privacy-unit": "device", "device-clip-norm": float("nan")})


# -- both engines and the audit ----------------------------------------------------------------
def _fleet_cfg(tmp: Path, name: str, **over: Any) -> FederationConfig:
    base = {"num-devices": 12, "num-server-rounds": 4, "min-arrivals": 8, "secagg-num-shares": 5,
            "secagg-reconstruction-threshold": 3, "privacy-unit": "device", "suffstats-noise-multiplier": 2.0,
            "noise-multiplier": 3.0, "aligner": "nessa", "eval-speakers": 20, "validation-speakers": 20,
            "hidden": 8, "device-batch": 4, "device-stats-pairs": 20, "references": False,
            "run-dir": str(tmp / name), "distributed-mechanism": "gaussian"}  # the closed-form Gaussian's audit
    base.update(over)
    return from_run_config(base)


def test_fleet_device_level_run_is_audited_at_both_units(tmp_path: Path) -> None:
    from fed_nessa.privacy.audit import audit
    from fed_nessa.sim.fleet import run_fleet

    policy = DevicePolicy(**{**DEVICE_POLICY.to_dict(), "min_separation": 2})
    summary = run_fleet(_fleet_cfg(tmp_path, "run"), policy)
    privacy = summary["privacy"]
    assert privacy["privacy_unit"] == DEVICE and "device" in privacy["neighbouring_relation"]
    assert privacy["epsilon_example_max"] > privacy["epsilon_max"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "epsilon per device over devices" in report and "implied example-level epsilon" in report
    ledger = DeviceLedger.open(tmp_path / "run" / "devices" / "device-00000", "device-00000")
    rounds = sorted(ledger.rounds())
    assert rounds[0] == 1 and all(b - a >= 2 for a, b in zip(rounds, rounds[1:]))  # min-separation held
    assert all(ev.unit == DEVICE and ev.sample_rate == 1.0 for ev in ledger.events())
    result = audit(tmp_path / "run")
    assert result.passed, [f.message for f in result.findings]
    dev = result.devices[0]
    assert set(dev.epsilon_by_unit) == {EXAMPLE, DEVICE}
    assert dev.epsilon_by_unit[DEVICE][PLD] == pytest.approx(dev.epsilon_by_unit[DEVICE]["gaussian"], abs=0.01)
    assert dev.epsilon_by_unit[DEVICE][RDP] == pytest.approx(ledger.epsilon(policy.delta), rel=1e-9)
    # a summary that understates the device-level epsilon fails the audit
    path = tmp_path / "run" / "summary.json"
    data = json.loads(path.read_text())
    data["privacy"]["epsilon_max"] = privacy["epsilon_max"] / 2
    path.write_text(json.dumps(data))
    failed = audit(tmp_path / "run", write=False)
    assert not failed.passed and any(f.check == "summary.epsilon_max" for f in failed.findings)


@pytest.mark.slow
def test_device_level_flower_engine_equals_the_fleet_engine(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Flower rounds with SecAgg+ and the fleet's exact numerics release the same device-level sums."""
    from fed_nessa.federated.codec import make_codec
    from fed_nessa.federated.noise_plan import noise_plan
    from fed_nessa.federated.server_model import ServerModel
    from fed_nessa.sim.fleet import run_fleet
    from fed_nessa.sim.runner import simulate

    seen: list[tuple[str, np.ndarray]] = []
    original = ServerModel.apply

    def spy(self: ServerModel, phase: Phase, aggregate_sum: np.ndarray, n_arrived: int, **kw: Any) -> None:
        seen.append((str(phase), np.array(aggregate_sum, np.float64)))
        original(self, phase, aggregate_sum, n_arrived, **kw)

    monkeypatch.setattr(ServerModel, "apply", spy)
    over = {"num-server-rounds": 3, "reproducible-noise": True, "fleet-numerics": "exact"}
    replay = replace(DEVICE_POLICY, allow_reproducible_noise=True)  # the devices allow the public-seed noise
    simulate(_fleet_cfg(tmp_path, "flower", **over), policy=replay, quiet=True)
    flower = list(seen)
    seen.clear()
    run_fleet(_fleet_cfg(tmp_path, "fleet", **over), replay)
    assert [s[0] for s in flower] == [s[0] for s in seen] == ["suffstats", "dpsgd", "dpsgd"]
    cfg = _fleet_cfg(tmp_path, "bounds", **over)
    model, plan = ServerModel(cfg, 256, 192, "x", "y"), noise_plan(cfg, 12)
    for (phase, a), (_, b) in zip(flower, seen, strict=True):
        codec = make_codec(model.payload_bound(Phase(phase), plan), cfg.secagg_clipping_range,
                           cfg.secagg_quantization_range, 12)
        assert np.abs(a - b).max() <= 2 * codec.sum_error_bound(12) + 1e-5 * np.abs(a).max(), phase
    for i in range(12):
        dev = f"device-{i:05d}"
        eps = [DeviceLedger.open(tmp_path / run / "devices" / dev, dev).epsilon(DEVICE_POLICY.delta)
               for run in ("flower", "fleet")]
        assert eps[0] == pytest.approx(eps[1], rel=1e-9)

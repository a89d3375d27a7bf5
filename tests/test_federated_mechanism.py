"""The mechanism registry: one object per privacy unit computes every noise number of a round."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.config import Phase, from_run_config
from fed_nessa.federated import suffstats
from fed_nessa.federated.mechanism import (
    MECHANISMS,
    PAYLOAD_SIGMAS,
    DeviceLevel,
    ExampleLevel,
    max_sampled,
    mechanism_for,
)
from fed_nessa.federated.noise_plan import NoisePlan

PLAN = NoisePlan(suffstats_sigma=0.8, dpsgd_sigma=1.5, dpsgd_rounds_per_device=10, sample_rate=0.1)


def _cfg(**kw: object):
    return from_run_config({"num-devices": 1000, **{k.replace("_", "-"): v for k, v in kw.items()}})


def test_registry_covers_every_unit() -> None:
    assert set(MECHANISMS) == {"example", "device"}
    assert isinstance(mechanism_for(_cfg()), ExampleLevel)
    assert isinstance(mechanism_for(_cfg(privacy_unit="device", delta=1e-6)), DeviceLevel)


def test_example_level_sensitivities() -> None:
    m = mechanism_for(_cfg(clip_norm=0.7))
    assert m.sensitivity(Phase.SUFFSTATS) == suffstats.SENSITIVITY
    assert m.sensitivity(Phase.DPSGD) == 0.7
    assert m.stats_weight(5000) == 1.0


def test_device_level_sensitivities_and_weights() -> None:
    m = mechanism_for(_cfg(privacy_unit="device", delta=1e-6, device_stats_pairs=40, device_clip_norm=0.2))
    assert m.sensitivity(Phase.SUFFSTATS) == 40 * suffstats.SENSITIVITY
    assert m.sensitivity(Phase.DPSGD) == 0.2
    assert m.stats_weight(20) == 1.0 and m.stats_weight(80) == 0.5
    # a device's weighted statistics move the sum by at most the sensitivity
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 8)), rng.normal(size=(80, 6))
    vec = suffstats.device_vector(x / np.linalg.norm(x, axis=1, keepdims=True),
                                  y / np.linalg.norm(y, axis=1, keepdims=True)) * m.stats_weight(80)
    assert np.linalg.norm(vec) <= m.sensitivity(Phase.SUFFSTATS) + 1e-9


@pytest.mark.parametrize("mode", ["distributed", "local", "none"])
def test_share_and_released_variance(mode: str) -> None:
    m = mechanism_for(_cfg(dp_mode=mode, clip_norm=2.0))
    full = PLAN.dpsgd_sigma * 2.0
    share = m.share_std(Phase.DPSGD, PLAN, g=25)
    expected = {"distributed": full / 5.0, "local": full, "none": 0.0}[mode]
    assert share == pytest.approx(expected)
    var = m.released_variance(Phase.DPSGD, PLAN, [25] * 25)
    assert var == pytest.approx({"distributed": full ** 2, "local": 25 * full ** 2, "none": 0.0}[mode])


def test_distributed_shares_sum_to_the_full_noise_whatever_each_g() -> None:
    m = mechanism_for(_cfg())
    gs = [50, 80, 200]
    var = m.released_variance(Phase.SUFFSTATS, PLAN, gs)
    assert var == pytest.approx(sum((0.8 * suffstats.SENSITIVITY) ** 2 / g for g in gs))


def test_payload_bounds() -> None:
    cfg = _cfg(max_pairs_per_device=30, clip_norm=1.0)
    m = mechanism_for(cfg)
    assert m.payload_bound(Phase.SUFFSTATS, PLAN) == pytest.approx(30 + PAYLOAD_SIGMAS * 0.8)
    assert m.payload_bound(Phase.DPSGD, PLAN) == pytest.approx(max_sampled(cfg, 0.1) + PAYLOAD_SIGMAS * 1.5)
    dev = mechanism_for(_cfg(privacy_unit="device", delta=1e-6, device_clip_norm=0.1))
    assert dev.payload_bound(Phase.DPSGD, PLAN) == pytest.approx(0.1 * (1 + PAYLOAD_SIGMAS * 1.5))
    assert mechanism_for(_cfg(dp_mode="local")).payload_bound(Phase.DPSGD, PLAN) == 1.0


def test_max_sampled_bounds_a_poisson_sample() -> None:
    cfg = _cfg(max_pairs_per_device=1000)
    mean = 0.05 * 1000
    assert max_sampled(cfg, 0.05) >= mean + 8 * math.sqrt(mean)
    assert max_sampled(cfg, 0.0) == 4.0 * cfg.batch_size


def test_what_each_unit_carries_sends_and_clips() -> None:
    """Issue 18: the questions the device, the server model and the fleet engine used to answer with a unit
    branch are the mechanism's: statistics weights (one device or all at once), pairs a payload carries,
    whether a DP-SGD sum holds gradients, whether a device's whole contribution is clipped as one vector."""
    n = np.array([0, 1, 50, 400, 10_000])
    example = mechanism_for(_cfg(dp_mode="local"))
    assert example.stats_weights(n) is None and example.carried_pairs(10_000) == 10_000
    assert not example.sends_gradients() and mechanism_for(_cfg()).sends_gradients()
    assert not example.clips_whole_device
    device = mechanism_for(_cfg(privacy_unit="device", delta=1e-6, device_stats_pairs=200, dp_mode="none"))
    weights = device.stats_weights(n)
    assert weights is not None and weights.tolist() == [device.stats_weight(int(k)) for k in n]
    assert weights.tolist() == [1.0, 1.0, 1.0, 0.5, 0.02]
    assert device.carried_pairs(10_000) == 200 and device.carried_pairs(50) == 50
    assert device.sends_gradients() and device.clips_whole_device  # DP or not


def test_the_noise_plans_unit_rules_are_the_mechanisms() -> None:
    """q, the auto rule's signal and its decision per unit (fed_nessa.federated.noise_plan composes them)."""
    from fed_nessa.config import AlignerChoice
    from fed_nessa.federated.mechanism import AUTO_SIGNAL_THRESHOLD
    from fed_nessa.federated.noise_plan import noise_plan

    example = mechanism_for(_cfg(sample_rate=0.02))
    assert example.plan_sample_rate(1000, 1000) == 0.02 and mechanism_for(_cfg()).plan_sample_rate(1000, 1000) == 0
    assert example.auto_choice(10, AUTO_SIGNAL_THRESHOLD)[0] == AlignerChoice.NESSA
    assert example.auto_choice(10, AUTO_SIGNAL_THRESHOLD - 1)[0] == AlignerChoice.LINEAR
    assert example.auto_choice(0, math.inf)[0] == AlignerChoice.LINEAR  # no DP-SGD round to run
    device = mechanism_for(_cfg(privacy_unit="device", delta=1e-6, device_clip_norm=0.5))
    assert device.plan_sample_rate(1000, 100) == 1.0 and device.plan_signal(100, 1.0, 2.0) == 100.0
    assert device.auto_choice(10, 0.0)[0] == AlignerChoice.NESSA  # no calibrated threshold: the gate decides
    plan = noise_plan(_cfg(privacy_unit="device", delta=1e-6, aligner="auto"), 1000)
    assert plan.sample_rate == 1.0 and plan.reason.startswith("aligner auto, device level") and plan.fleet == 1000


def test_each_unit_records_its_own_event() -> None:
    """Example level: a Gaussian statistics sum, then DP-SGD at the device's Poisson rate; device level:
    one Gaussian sum at the whole-device sensitivity, q = 1, in the device unit."""
    ex = mechanism_for(_cfg(sample_rate=0.05, clip_norm=0.7))
    stats = ex.event(Phase.SUFFSTATS, 1, 40, 1000, 0.8, 1e-5, 800)
    assert (stats.mechanism, stats.sample_rate, stats.clip_norm, stats.unit) == ("gaussian-sum", 1.0, 1.0, "example")
    sgd = ex.event(Phase.DPSGD, 2, 40, 1000, 1.5, 1e-5, 800)
    assert (sgd.mechanism, sgd.steps, sgd.clip_norm) == ("dp-sgd", 1, 0.7)
    assert sgd.sample_rate == ex.device_sample_rate(40, 1000) and "g = 800" in sgd.note
    dev = mechanism_for(_cfg(privacy_unit="device", delta=1e-6, device_stats_pairs=16, device_clip_norm=0.4))
    for phase, sens in ((Phase.SUFFSTATS, 16.0), (Phase.DPSGD, 0.4)):
        e = dev.event(phase, 3, 40, 1000, 0.9, 1e-6, 800)
        assert (e.mechanism, e.steps, e.sample_rate, e.clip_norm, e.unit) == ("gaussian-sum", 1, 1.0, sens, "device")


def test_policy_units_implied_units_and_rounded_rows() -> None:
    ex, dev = mechanism_for(_cfg()), mechanism_for(_cfg(privacy_unit="device", delta=1e-6))
    assert ex.policy_refusal("example") is None and dev.policy_refusal("example") is None  # device level covers it
    assert dev.policy_refusal("device") is None
    why = ex.policy_refusal("device")
    assert why == ("declined: this device's policy budgets per device and the round is example-level "
                   "(it would bound one pair, not everything the device holds)")
    assert (ex.implied_units(), dev.implied_units()) == ((), ("example",))
    assert ex.sums_examples() and not dev.sums_examples()


def _unit_named(node: ast.AST) -> bool:
    """Whether an expression names the privacy unit: ``privacy_unit``/``unit``, ``PrivacyUnit.X``,
    the ``EXAMPLE``/``DEVICE`` constants, a ``"privacy_unit"`` key, or the strings ``"example"``/``"device"``."""
    names = {"privacy_unit", "unit"}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_unit_named(e) for e in node.elts)
    if isinstance(node, ast.Attribute):
        return node.attr in names or (isinstance(node.value, ast.Name) and node.value.id == "PrivacyUnit")
    if isinstance(node, ast.Name):
        return node.id in names | {"EXAMPLE", "DEVICE"}
    if isinstance(node, ast.Call):
        return any(isinstance(a, ast.Constant) and a.value in names for a in node.args)
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value in names
    return isinstance(node, ast.Constant) and node.value in ("example", "device")


def unit_comparisons(source: str) -> list[int]:
    """Lines of ``source`` that compare the privacy unit (``==``, ``!=``, ``in``, ...)."""
    return [n.lineno for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Compare) and any(_unit_named(x) for x in (n.left, *n.comparators))]


def test_the_unit_check_sees_every_spelling() -> None:
    """The detector below would catch each way the unit was compared before the mechanism owned it."""
    for line in ("cfg.privacy_unit == PrivacyUnit.DEVICE", "self.cfg.privacy_unit != EXAMPLE",
                 "unit == 'device'", "priv.get('privacy_unit') == x", "x in (PrivacyUnit.EXAMPLE,)"):
        assert unit_comparisons(line) == [1], line
    assert unit_comparisons("phase == Phase.SUFFSTATS") == []


def test_only_the_mechanism_compares_the_unit() -> None:
    """No module of ``federated/`` but ``mechanism.py``, nor the fleet engine, branches on the privacy unit:
    a new unit is one mechanism class (docs/architecture.md "Where to add")."""
    root = Path(__file__).resolve().parents[1] / "fed_nessa"
    modules = [p for p in sorted((root / "federated").rglob("*.py")) if p.name != "mechanism.py"]
    modules.append(root / "sim" / "fleet.py")
    found = {str(p.relative_to(root)): lines for p in modules if (lines := unit_comparisons(p.read_text()))}
    assert found == {}

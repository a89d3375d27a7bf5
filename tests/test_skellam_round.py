"""``distributed-mechanism = skellam`` wired end to end: what is released is what is accounted (issue 19).

Real Flower SecAgg+ rounds over the tiny folder federation of tests/test_simulation.py (8 devices).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_simulation import make_folder, overrides, simulate

from fed_nessa.config import ConfigError, DevicePolicy, FederationConfig, Phase, from_run_config
from fed_nessa.federated import skellam_mechanism, suffstats
from fed_nessa.federated.device import RoundRequest, integer_params
from fed_nessa.federated.integer_mechanism import WrapAroundError, centred, encode_rounded, modular_sum
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.rounds import FIELD_BITS_COLUMN
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.privacy.accounting import MechanismNotCoveredError, compute_epsilon
from fed_nessa.privacy.events import SKELLAM, DPEvent, EventError
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.privacy.skellam import skellam_log_pmf
from fed_nessa.randomness import SecureNoise
from fed_nessa.sim.runner import build_config

torch.set_num_threads(1)
DEVICE_POLICY = DevicePolicy(epsilon_budget=30.0, guaranteed_arrivals=3, delta=1e-3, privacy_unit="device")


def _example_stats(tmp: Path, name: str, **extra: object) -> FederationConfig:
    """One example-level statistics round (the main job's shape) with the integer mechanism."""
    settings: dict[str, object] = {"distributed_mechanism": '"skellam"', "aligner": '"linear"',
                                   "num_server_rounds": 1, "run_dir": f'"{tmp / name}"', **extra}
    return build_config(None, overrides(tmp, **settings))


def _device_rounds(tmp: Path, name: str, **extra: object) -> FederationConfig:
    return build_config(None, overrides(tmp, distributed_mechanism='"skellam"', privacy_unit='"device"',
                                        delta=1e-3, num_server_rounds=2, run_dir=f'"{tmp / name}"', **extra))


def _server_params(cfg: FederationConfig, promised: int = 7):
    """The statistics round's parameters as the server builds them (8 devices, g = 7 promised)."""
    dim = skellam_mechanism.payload_dim(cfg, Phase.SUFFSTATS, 16, 12)
    return skellam_mechanism.round_params(cfg, Phase.SUFFSTATS, noise_plan(cfg, 8), dim, 1, promised)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


# -- the mechanism's numbers ------------------------------------------------------------------

def _params(cfg: FederationConfig, phase: Phase, g: int = 5, fleet: int = 8):
    req = RoundRequest(phase, 1, g, fleet)
    return integer_params(req, cfg, DevicePolicy(guaranteed_arrivals=g), (16, 12))


@pytest.mark.parametrize("phase", [Phase.SUFFSTATS, Phase.DPSGD])
def test_rounded_sensitivity_never_exceeds_the_recorded_bound(phase: Phase) -> None:
    """Adversarial inputs AT the clip (one spike, all equal, alternating, half-integers after scaling):
    every rounded vector's exact integer norm is within the bound the event records."""
    cfg = from_run_config({"distributed-mechanism": "skellam", "privacy-unit": "device", "delta": 1e-4})
    params = _params(cfg, phase)
    clip, dim = params.l2_clip, params.dim
    spike = np.zeros(dim)
    spike[0] = clip
    equal = np.full(dim, clip / math.sqrt(dim))
    alternating = equal * np.where(np.arange(dim) % 2, -1.0, 1.0)
    rng = np.random.default_rng(0)
    beyond = [v / np.linalg.norm(v) * clip * 1.5 for v in rng.normal(size=(6, dim))]  # clipped back to the clip
    inputs = [spike, equal, alternating, -equal, *beyond]
    recorded = skellam_mechanism.event_parameters(params, 1.0)["l2_bound"]
    assert recorded == params.norm_bound
    noise = SecureNoise()
    for x in inputs:
        for _ in range(20):
            y = encode_rounded(x, params, noise)
            assert int(np.dot(y, y)) <= recorded ** 2
    # and the bound the accountant charges is above the clip only by the rounding's inflation
    assert params.norm_bound / params.scale == pytest.approx(params.l2_clip, rel=0.01)
    assert skellam_mechanism.sensitivity_after_rounding(params) >= params.l2_clip


def test_the_released_integer_sum_has_the_accounted_distribution() -> None:
    """Fixed (zero) inputs, g devices each sized for g: the released integer sum is Sk(mu) with mu exactly the
    variance the event records (chi-square over 40 x padded-dim draws)."""
    from scipy.stats import chisquare

    cfg = from_run_config({"distributed-mechanism": "skellam", "privacy-unit": "device", "delta": 1e-4,
                           "suffstats-noise-multiplier": 0.005, "device-stats-pairs": 1})
    g = 4
    params = _params(cfg, Phase.SUFFSTATS, g=g)
    mu = skellam_mechanism.event_parameters(params, noise_plan(cfg, 8).suffstats_sigma)["mu"]
    assert 20 < mu < 400  # small enough for a fine histogram
    noise, rows = SecureNoise(), np.zeros(params.dim)
    draws = np.concatenate([centred(modular_sum(np.stack([skellam_mechanism.encode_device(rows, params, noise)
                                                          for _ in range(g)]), params), params)
                            for _ in range(40)])
    edges = np.arange(-int(4 * math.sqrt(mu)), int(4 * math.sqrt(mu)) + 1)
    pmf = np.exp(skellam_log_pmf(edges, mu))
    observed = np.array([np.count_nonzero(draws == k) for k in edges] + [np.count_nonzero(np.abs(draws) > edges[-1])])
    expected = np.append(pmf, 1 - pmf.sum()) * len(draws)
    assert chisquare(observed, expected).pvalue > 1e-3
    assert draws.var() == pytest.approx(mu, rel=0.1)


def test_a_skellam_event_with_edited_parameters_is_refused_when_read() -> None:
    cfg = from_run_config({"distributed-mechanism": "skellam", "privacy-unit": "device", "delta": 1e-4})
    params = _params(cfg, Phase.DPSGD)
    ev = DPEvent(1, SKELLAM, 1, 1.0, 1.5, params.l2_clip, 1e-3, "distributed", unit="device",
                 skellam=skellam_mechanism.event_parameters(params, 1.5))
    assert DPEvent.from_dict(ev.to_dict()) == ev
    for key, factor in (("scale", 1.01), ("l2_bound", 0.9), ("l1_bound", 0.5), ("mu", 2.0)):
        edited = ev.to_dict()
        edited["skellam"] = {**edited["skellam"], key: edited["skellam"][key] * factor}
        with pytest.raises(EventError, match="skellam event of round 1"):
            DPEvent.from_dict(edited)
    with pytest.raises(EventError, match="noise_multiplier"):  # more noise claimed than the recorded mu
        DPEvent.from_dict({**ev.to_dict(), "noise_multiplier": 3.0})
    # only rdp and skellam analyse the integer mechanism; PLD says so in one line
    assert compute_epsilon([ev], 1e-3, "skellam", "device") <= compute_epsilon([ev], 1e-3, "rdp", "device")
    with pytest.raises(MechanismNotCoveredError, match="pld accountant has no skellam mechanism"):
        compute_epsilon([ev], 1e-3, "pld", "device")


def test_skellam_costs_epsilon_only_for_the_rounding_and_the_discretisation() -> None:
    """At the same noise multiplier the integer mechanism's epsilon is just above the Gaussian's."""
    cfg = from_run_config({"distributed-mechanism": "skellam", "privacy-unit": "device", "delta": 1e-4})
    params = _params(cfg, Phase.DPSGD)
    ev = DPEvent(1, SKELLAM, 1, 1.0, 1.5, params.l2_clip, 1e-3, "distributed", unit="device",
                 skellam=skellam_mechanism.event_parameters(params, 1.5))
    gauss = DPEvent(1, "gaussian-sum", 1, 1.0, 1.5, params.l2_clip, 1e-3, "distributed", unit="device")
    eps_s, eps_g = (compute_epsilon([e], 1e-3, "rdp", "device") for e in (ev, gauss))
    assert eps_g < eps_s < eps_g * 1.02


# -- config and engines -----------------------------------------------------------------------

def test_an_unknown_mechanism_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="allowed values gaussian, skellam"):
        from_run_config({"distributed-mechanism": "discrete-gaussian"})


@pytest.mark.parametrize(("mode", "noise"), [("distributed", "skellam"), ("local", "gaussian"), ("none", "none")])
def test_the_default_mechanism_is_the_distributed_modes_only(mode: str, noise: str) -> None:
    """`skellam` is the default noise of dp-mode distributed only: local mode's device releases its own float
    vector (the continuous Gaussian is exact there) and every output names what ran."""
    cfg = from_run_config({"dp-mode": mode, **({"noise-multiplier": 0.0} if mode == "none" else {})})
    assert cfg.noise_mechanism == noise and cfg.integer_noise == (mode == "distributed")


def test_example_level_dpsgd_rounds_round_the_gradient_sum_once_and_are_audited(tmp_path: Path, data: Path) -> None:
    """Example level, statistics then one DP-SGD round under skellam on Flower: each device rounds its clipped
    sum once; the events record the coupled bound (beta 0, c + sqrt(d)) and, for DP-SGD, the Poisson rate; the
    audit re-derives every epsilon."""
    from fed_nessa.privacy.audit import audit

    cfg = _example_stats(tmp_path, "run", aligner='"nessa"', num_server_rounds=2, sample_rate=0.5)
    summary = simulate(cfg, quiet=True)
    assert [e["status"] for e in summary["rounds"]] == ["applied", "applied"]
    events = DeviceLedger.open(tmp_path / "run" / "devices" / "dev-000", "dev-000").events()
    assert [ev.mechanism for ev in events] == [SKELLAM, SKELLAM]
    for ev in events:
        assert ev.skellam is not None and ev.skellam["beta"] == 0.0
        c = ev.skellam["scale"] * ev.clip_norm
        assert ev.skellam["l2_bound"] == c + math.sqrt(ev.skellam["dim"])
    assert events[0].sample_rate == 1.0 and events[1].sample_rate == cfg.round_sample_rate(1, 8, cfg.cohort_size(8)) < 1
    # each round's summary entry states the field SecAgg+ summed in, as the devices' events record it
    assert [e[FIELD_BITS_COLUMN] for e in summary["rounds"]] == [int(ev.skellam["bits"]) for ev in events]
    result = audit(tmp_path / "run", write=False)
    assert result.passed, [f.message for f in result.findings]
    # an example-level event claiming the one-vector bound (beta > 0) is refused
    ev = events[1].to_dict()
    with pytest.raises(EventError, match="coupled bound: beta must be 0"):
        DPEvent.from_dict({**ev, "skellam": {**ev["skellam"], "beta": 0.5}})


# -- real Flower SecAgg+ rounds ---------------------------------------------------------------

def _forbid_global_generators(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    def forbidden(name: str):
        def draw(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} drew from a global generator during a skellam round")
        return draw

    for name in ("rand", "randn", "random", "random_sample", "randint", "normal", "uniform", "choice",
                 "permutation", "shuffle", "binomial", "poisson"):
        monkeypatch.setattr(np.random, name, forbidden(f"numpy.random.{name}"))
    for name in ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "poisson", "rand_like", "randn_like"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))


@pytest.mark.parametrize("mechanism", ["skellam", "skellam-dpsgd", "gaussian"])
def test_no_global_generator_draw_during_a_real_secagg_round(tmp_path: Path, data: Path,
                                                             monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    """Every draw of a skellam round (rounding, noise, SecAgg+'s quantizer) avoids numpy's and torch's global
    generators; the Gaussian mode's Flower quantizer does not (np.random.rand), which is why this test can fail."""
    import server.secagg_round as secagg_round

    calls: list[str] = []
    original = secagg_round.secure_sum

    def guarded(*args: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as m:
            _forbid_global_generators(m, calls)
            return original(*args, **kwargs)

    monkeypatch.setattr(secagg_round, "secure_sum", guarded)
    monkeypatch.setattr("server.federation.secure_sum", guarded)
    name, _, dpsgd = mechanism.partition("-")
    extra: dict[str, object] = {"aligner": '"nessa"', "num_server_rounds": 2, "sample_rate": 0.5} if dpsgd else {}
    cfg = _example_stats(tmp_path, "run", distributed_mechanism=f'"{name}"', **extra)
    summary = simulate(cfg, quiet=True)
    assert summary["privacy"]["mechanism"] == name
    if mechanism == "gaussian":
        assert "numpy.random.rand" in calls  # Flower's stochastic rounding
        return
    assert calls == []
    assert [r["status"] for r in summary["rounds"]] == ["applied"] * len(summary["rounds"])
    assert summary["rounds"][0]["participants"] == 8  # the statistics round's; a DP-SGD cohort is 6
    assert len(summary["rounds"]) == (2 if dpsgd else 1)


def test_the_released_sum_is_exactly_the_decoded_field_sum(tmp_path: Path, data: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Flower's real SecAgg+ (masks, modulus, its dequantizer) the server's sum is exactly the decode of
    the devices' own field elements: nothing of Flower's quantizer changes a bit of it."""
    sent: list[np.ndarray] = []
    seen: list[np.ndarray] = []
    encode, apply = skellam_mechanism.encode_device, ServerModel.apply

    def spy_encode(*args: Any, **kwargs: Any) -> np.ndarray:
        out = encode(*args, **kwargs)
        sent.append(out.copy())
        return out

    def spy_apply(self: ServerModel, phase: Phase, aggregate_sum: np.ndarray, n_arrived: int, **kw: Any) -> None:
        seen.append(np.array(aggregate_sum))
        apply(self, phase, aggregate_sum, n_arrived, **kw)

    monkeypatch.setattr(skellam_mechanism, "encode_device", spy_encode)
    monkeypatch.setattr(ServerModel, "apply", spy_apply)
    cfg = _example_stats(tmp_path, "run")
    simulate(cfg, quiet=True)
    assert len(sent) == 8 and len(seen) == 1
    codec = skellam_mechanism.IntegerCodec(_server_params(cfg))
    np.testing.assert_array_equal(seen[0], codec.decode_field(np.stack(sent), 8))


def test_a_wrapped_sum_is_refused_and_never_applied(tmp_path: Path, data: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose field elements are shifted by half the modulus makes the sum leave the stated bound:
    the server refuses it (no model update), as docs/privacy.md states."""
    encode = skellam_mechanism.encode_device
    shifted: list[int] = []

    def half_turn(rows: np.ndarray, params: Any, noise: Any) -> np.ndarray:
        out = encode(rows, params, noise)
        if not shifted:
            shifted.append(1)
            return (out + params.modulus // 2) % params.modulus
        return out

    monkeypatch.setattr(skellam_mechanism, "encode_device", half_turn)
    applied: list[int] = []
    monkeypatch.setattr(ServerModel, "apply", lambda *a, **k: applied.append(1))
    summary = simulate(_example_stats(tmp_path, "run"), quiet=True)
    entry = summary["rounds"][0]
    assert entry["status"] == "refused" and "may have wrapped; refused" in entry["note"] and applied == []
    params = _server_params(_example_stats(tmp_path, "x"))
    with pytest.raises(WrapAroundError, match="may have wrapped"):
        field = np.zeros(params.padded_dim, np.int64)
        field[3] = params.modulus // 2
        skellam_mechanism.IntegerCodec(params).decode_field(field[None, :], 7)


@pytest.mark.parametrize("update", ["fedsgd", pytest.param("fedavg", marks=pytest.mark.slow)])
def test_device_level_rounds_are_audited_and_every_output_names_the_mechanism(tmp_path: Path, data: Path,
                                                                              update: str) -> None:
    from fed_nessa.privacy.audit import audit

    summary = simulate(_device_rounds(tmp_path, "run", device_update=f'"{update}"'), policy=DEVICE_POLICY, quiet=True)
    assert [e["status"] for e in summary["rounds"]] == ["applied", "applied"]
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "skellam" and "integer mechanism" in privacy["noise_source"]
    secagg = summary["secure_aggregation"]  # the Gaussian's ranges would be a false claim here
    assert "Z_2^b" in secagg["field"] and "quantization_range" not in secagg
    run = tmp_path / "run"
    assert "noise mechanism: skellam" in (run / "report.md").read_text()
    card = json.loads((run / "aligner" / "card.json").read_text())
    assert card["training"]["privacy"]["mechanism"] == "skellam"
    ledger = DeviceLedger.open(run / "devices" / "dev-000", "dev-000")
    events = ledger.events()
    assert [ev.mechanism for ev in events] == [SKELLAM, SKELLAM]
    assert all(ev.skellam and ev.skellam["bits"] <= 31 and ev.skellam["dim"] >= 1 for ev in events)
    result = audit(run, write=False)
    assert result.passed, [f.message for f in result.findings]
    assert result.accountants == ("rdp", "skellam")
    # an edited mechanism parameter fails the audit (the event is refused when read)
    path = run / "devices" / "dev-000" / "privacy-ledger.jsonl"
    lines = path.read_text().splitlines()
    edited = [line.replace('"mu":', '"mu":1', 1) if '"skellam"' in line else line for line in lines]
    path.write_text("\n".join(edited) + "\n")
    failed = audit(run, write=False)
    assert not failed.passed
    assert any("skellam event of round" in f.message and f.device == "dev-000" for f in failed.findings)
    # a summary naming the wrong mechanism fails it too
    path.write_text("\n".join(lines) + "\n")
    data_ = json.loads((run / "summary.json").read_text())
    data_["privacy"]["mechanism"] = "gaussian"
    (run / "summary.json").write_text(json.dumps(data_))
    assert any(f.check == "summary.mechanism" for f in audit(run, write=False).findings)


def test_the_audit_fails_a_closed_form_below_the_numerical_divergence(tmp_path: Path, data: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit's second computation is independent: a closed form that understated the Skellam RDP fails."""
    import fed_nessa.privacy.skellam as skellam
    from fed_nessa.privacy.audit import audit
    from fed_nessa.privacy.audit import integer as audit_integer

    simulate(_example_stats(tmp_path, "run"), quiet=True)
    assert audit(tmp_path / "run", write=False).passed
    original = skellam.skellam_rdp
    monkeypatch.setattr(skellam, "skellam_rdp", lambda a, l2, l1, mu: original(a, l2, l1, mu) / 2)
    audit_integer._numerical_check.cache_clear()
    skellam._integer_curve.cache_clear()
    failed = audit(tmp_path / "run", write=False)
    audit_integer._numerical_check.cache_clear()
    skellam._integer_curve.cache_clear()
    assert any(f.check == "skellam.numerical" for f in failed.findings) and not failed.passed


def test_pair_rows_are_each_pairs_unit_norm_term_and_sum_to_the_device_vector() -> None:
    rng = np.random.default_rng(3)
    enroll, runtime = rng.normal(size=(7, 16)), rng.normal(size=(7, 12))
    rows = suffstats.pair_rows(enroll, runtime, 0.5)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 0.5)
    np.testing.assert_allclose(rows.sum(axis=0), 0.5 * suffstats.device_vector(enroll, runtime), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 64, 128, 256, 2048])
def test_the_blocked_hadamard_transform_is_the_sylvester_matrix(n: int) -> None:
    from scipy.linalg import hadamard

    from fed_nessa.federated.integer_mechanism import fwht

    x = np.random.default_rng(n).normal(size=(3, n))
    np.testing.assert_allclose(fwht(x), x @ hadamard(n) / math.sqrt(n), atol=1e-9)
    np.testing.assert_allclose(fwht(fwht(x)), x, atol=1e-9)


def test_the_decoded_noise_has_the_gaussians_released_variance() -> None:
    """Unrotated and descaled, the integer noise of g shares sized for g has exactly the continuous Gaussian's
    per-coordinate variance (sigma C)^2, so the statistics solve's floor is unchanged."""
    from fed_nessa.federated.mechanism import mechanism_for

    cfg = from_run_config({"distributed-mechanism": "skellam", "privacy-unit": "device", "delta": 1e-4})
    g, plan = 4, noise_plan(cfg, 8)
    params = skellam_mechanism.round_params(cfg, Phase.SUFFSTATS, plan, 300, 1, g)
    share = skellam_mechanism.device_params(params, g)
    noise, rows = SecureNoise(), np.zeros(300)
    decoded = np.concatenate([skellam_mechanism.IntegerCodec(params).decode_field(
        np.stack([skellam_mechanism.encode_device(rows, share, noise) for _ in range(g)]), g) for _ in range(30)])
    expected = skellam_mechanism.released_variance(params, plan.suffstats_sigma, [g] * g)
    assert expected == pytest.approx(mechanism_for(cfg).released_variance(Phase.SUFFSTATS, plan, [g] * g))
    assert decoded.var() == pytest.approx(expected, rel=0.1)


# -- the fleet engine's statistics round ------------------------------------------------------

def _fleet_stats_cfg(tmp: Path, name: str, **over: Any) -> FederationConfig:
    base = {"num-devices": 12, "num-server-rounds": 1, "min-arrivals": 8, "secagg-num-shares": 5,
            "secagg-reconstruction-threshold": 3, "privacy-unit": "device", "suffstats-noise-multiplier": 2.0,
            "aligner": "linear", "eval-speakers": 20, "validation-speakers": 20, "hidden": 8,
            "device-stats-pairs": 20, "references": False, "distributed-mechanism": "skellam",
            "reproducible-noise": True, "fleet-numerics": "exact", "delta": 1e-3, "run-dir": str(tmp / name)}
    base.update(over)
    return from_run_config(base)


def test_flower_and_fleet_engines_release_the_same_integer_statistics_sum(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Device level, reproducible noise: every device's rounding and share come from the same stream in both
    engines, so the decoded sums are equal (up to float summation order) and so are the ledgers' epsilons."""
    from fed_nessa.sim.fleet import run_fleet

    seen: list[np.ndarray] = []
    apply = ServerModel.apply

    def spy(self: ServerModel, phase: Phase, aggregate_sum: np.ndarray, n_arrived: int, **kw: Any) -> None:
        seen.append(np.array(aggregate_sum, np.float64))
        apply(self, phase, aggregate_sum, n_arrived, **kw)

    monkeypatch.setattr(ServerModel, "apply", spy)
    policy = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, min_suffstats_noise_multiplier=0.2,
                          delta=1e-3, allow_reproducible_noise=True)
    from fed_nessa.sim.runner import simulate as flower_simulate

    flower_simulate(_fleet_stats_cfg(tmp_path, "flower"), policy=policy, quiet=True)
    run_fleet(_fleet_stats_cfg(tmp_path, "fleet"), policy)
    assert len(seen) == 2
    np.testing.assert_allclose(seen[0], seen[1], rtol=0, atol=1e-6 * np.abs(seen[0]).max())
    for i in range(12):
        dev = f"device-{i:05d}"
        events = [DeviceLedger.open(tmp_path / run / "devices" / dev, dev).events() for run in ("flower", "fleet")]
        assert events[0] == events[1] and events[0][0].mechanism == SKELLAM


@pytest.mark.parametrize("unit", ["example", "device-fedsgd", pytest.param("device-fedavg", marks=pytest.mark.slow)])
def test_flower_and_fleet_engines_release_the_same_skellam_dpsgd_sums(tmp_path: Path, unit: str,
                                                                     applied_sums: list[Any]) -> None:
    """Reproducible noise, exact numerics, statistics then two DP-SGD rounds under skellam: every device's
    Poisson sample (or rows), rounding and share come from the same stream in both engines, so the released sums
    agree up to the float difference of the two engines' clipped gradients (a rounding it flips moves the sum by
    at most one integer unit, C / k per device after the inverse rotation) and the ledgers hold the same events."""
    from fed_nessa.sim.fleet import run_fleet
    from fed_nessa.sim.runner import simulate as flower_simulate

    level, _, update = unit.partition("-")
    over: dict[str, Any] = {"num-server-rounds": 3, "aligner": "nessa", "noise-multiplier": 1.5,
                            "privacy-unit": level}
    if level == "example":
        over.update({"sample-rate": 0.2, "suffstats-noise-multiplier": 1.0})
    else:
        over.update({"device-update": update, "local-epochs": 2, "local-batch": 3, "local-lr": 0.5})
    policy = DevicePolicy(privacy_unit=level, guaranteed_arrivals=8, min_suffstats_noise_multiplier=0.2,
                          min_noise_multiplier=0.2, delta=1e-3, allow_reproducible_noise=True)
    flower_simulate(_fleet_stats_cfg(tmp_path, "flower", **over), policy=policy, quiet=True)
    flower = list(applied_sums)
    applied_sums.clear()
    run_fleet(_fleet_stats_cfg(tmp_path, "fleet", **over), policy)
    assert [s[0] for s in flower] == [s[0] for s in applied_sums] == ["suffstats", "dpsgd", "dpsgd"]
    for (phase, a, n_a), (_, b, n_b) in zip(flower, applied_sums, strict=True):
        assert n_a == n_b == 12
        cfg = _fleet_stats_cfg(tmp_path, "x", **over)
        clip = mechanism_for(cfg).sensitivity(Phase(phase))
        params = skellam_mechanism.round_params(cfg, Phase(phase), noise_plan(cfg, 12),
                                                a.size, 1, 8)
        k = params.scale * clip / math.sqrt(params.padded_dim)
        assert np.abs(a - b).max() <= 12 * clip / k + 1e-5 * np.abs(a).max(), phase
        assert np.abs(a).max() > 100 * clip / k  # the sums are more than the rounding
    for i in range(12):
        dev = f"device-{i:05d}"
        ledgers = [DeviceLedger.open(tmp_path / run / "devices" / dev, dev) for run in ("flower", "fleet")]
        events = [ledger.events() for ledger in ledgers]
        # the fleet reserves its DP-SGD rounds as one span: the same mechanism, the same epsilon
        assert {ev.mechanism for ev in events[0] + events[1]} == {SKELLAM}
        assert [(ev.skellam, ev.sample_rate) for ev in events[0][:2]] == [(ev.skellam, ev.sample_rate)
                                                                         for ev in events[1]]
        assert ledgers[0].epsilon(1e-3) == pytest.approx(ledgers[1].epsilon(1e-3), rel=1e-9)
        if level == "example":
            assert events[0][-1].sample_rate < 1


@pytest.mark.parametrize("level", ["example", "device"])
def test_a_fast_fleet_skellam_run_with_dpsgd_rounds_passes_its_audit(tmp_path: Path, level: str) -> None:
    """Fast numerics (one summed Skellam draw per round), statistics then two DP-SGD rounds, OS CSPRNG noise:
    the run applies every round, names the mechanism and passes the audit (every epsilon re-derived)."""
    from fed_nessa.privacy.audit import audit
    from fed_nessa.sim.fleet import run_fleet

    over = {"num-server-rounds": 3, "aligner": "nessa", "privacy-unit": level, "sample-rate": 0.2,
            "reproducible-noise": False, "fleet-numerics": "fast"}
    policy = DevicePolicy(privacy_unit=level, guaranteed_arrivals=8, min_suffstats_noise_multiplier=0.2,
                          min_noise_multiplier=0.2, delta=1e-3)
    summary = run_fleet(_fleet_stats_cfg(tmp_path, "run", **over), policy)
    assert [e["status"] for e in summary["rounds"]] == ["applied"] * 3
    assert summary["privacy"]["mechanism"] == "skellam"
    result = audit(tmp_path / "run", write=False)
    assert result.passed, [f.message for f in result.findings]


@pytest.mark.parametrize("level", ["example", "device"])
def test_budget_split_calibrates_the_integer_mechanism_onto_the_budget(level: str) -> None:
    """budget-split under skellam: each sigma is searched against the integer mechanism's own epsilon (the skellam
    events a device records, at the scale each sigma's round would build), so the split lands within 1 % below
    the budget; the Gaussian's calibrated sigmas would overspend it; without the payload's size, one error."""
    cfg = from_run_config({"distributed-mechanism": "skellam", "budget-split": 0.4, "aligner": "nessa",
                           "num-server-rounds": 21, "num-devices": 100, "privacy-unit": level, "delta": 1e-3,
                           "sample-rate": 0.05 if level == "example" else 0.0, "epsilon-budget": 8.0})
    dims = (16, 12)
    plan = noise_plan(cfg, 100, dims)
    stats = (Phase.SUFFSTATS, plan.suffstats_sigma, 1.0, 1)
    dpsgd = (Phase.DPSGD, plan.dpsgd_sigma, plan.sample_rate, plan.dpsgd_rounds_per_device)
    assert plan.dpsgd_rounds_per_device == 20
    stats_eps = skellam_mechanism.calibration_epsilon(cfg, 100, dims, [stats])
    total = skellam_mechanism.calibration_epsilon(cfg, 100, dims, [stats, dpsgd])
    assert 0.99 * 0.4 * 8.0 <= stats_eps <= 0.4 * 8.0
    assert 0.99 * 8.0 <= total <= 8.0
    gaussian = noise_plan(dataclasses.replace(cfg, distributed_mechanism="gaussian"), 100)
    overspent = skellam_mechanism.calibration_epsilon(
        cfg, 100, dims, [(Phase.SUFFSTATS, gaussian.suffstats_sigma, 1.0, 1),
                         (Phase.DPSGD, gaussian.dpsgd_sigma, plan.sample_rate, plan.dpsgd_rounds_per_device)])
    assert overspent > 8.0
    with pytest.raises(ValueError, match="needs the shards' dimensions"):
        noise_plan(cfg, 100)


def test_the_calibration_searches_past_sigmas_whose_field_does_not_fit() -> None:
    """The main job's shape (1,000 devices, 1,000 pairs each, one statistics round): the search's largest sigmas
    need more than 31 bits; they are above every usable sigma, so the search moves down and lands on the budget."""
    from fed_nessa.federated.integer_mechanism import FieldTooSmallError

    cfg = from_run_config({"distributed-mechanism": "skellam", "budget-split": 1.0, "aligner": "linear",
                           "num-devices": 1000, "epsilon-budget": 8.0, "delta": 1e-5, "sample-rate": 0.01})
    dims = (256, 192)
    with pytest.raises(FieldTooSmallError, match="bits"):
        skellam_mechanism.calibration_epsilon(cfg, 1000, dims, [(Phase.SUFFSTATS, 1e6, 1.0, 1)])
    sigma = noise_plan(cfg, 1000, dims).suffstats_sigma
    eps = skellam_mechanism.calibration_epsilon(cfg, 1000, dims, [(Phase.SUFFSTATS, sigma, 1.0, 1)])
    assert 0.99 * 8.0 <= eps <= 8.0


def test_a_budget_split_skellam_fleet_run_spends_its_budget(tmp_path: Path) -> None:
    """The calibrated run itself (fleet engine, fast numerics, example level): every device's ledger epsilon
    (the RDP accountant over its skellam events) is <= the budget and within 1 % of it; the audit passes."""
    from fed_nessa.privacy.audit import audit
    from fed_nessa.sim.fleet import run_fleet

    over = {"num-server-rounds": 3, "aligner": "nessa", "privacy-unit": "example", "sample-rate": 0.2,
            "budget-split": 0.5, "epsilon-budget": 8.0, "reproducible-noise": False, "fleet-numerics": "fast"}
    policy = DevicePolicy(guaranteed_arrivals=8, min_suffstats_noise_multiplier=0.05, min_noise_multiplier=0.05,
                          delta=1e-3, epsilon_budget=8.0)
    run_fleet(_fleet_stats_cfg(tmp_path, "run", **over), policy)
    for i in range(12):
        dev = f"device-{i:05d}"
        eps = DeviceLedger.open(tmp_path / "run" / "devices" / dev, dev).epsilon(1e-3)
        assert 0.99 * 8.0 <= eps <= 8.0, dev
    result = audit(tmp_path / "run", write=False)
    assert result.passed, [f.message for f in result.findings]


def test_fleet_fast_numerics_match_the_exact_ones_in_mean_and_variance() -> None:
    """The fast numerics' one summed Skellam draw plus the rounding's Gaussian: the exact numerics' law (40 draws)."""
    from fed_nessa.sim import fleet_integer

    cfg = from_run_config({"distributed-mechanism": "skellam", "aligner": "linear", "suffstats-noise-multiplier": 0.2})
    rng = np.random.default_rng(5)
    shards = [(rng.normal(size=(n, 16)), rng.normal(size=(n, 12))) for n in (3, 5, 4)]
    plan = noise_plan(cfg, 3)
    dim = skellam_mechanism.payload_dim(cfg, Phase.SUFFSTATS, 16, 12)
    codec = skellam_mechanism.IntegerCodec(skellam_mechanism.round_params(cfg, Phase.SUFFSTATS, plan, dim, 1, 3))
    truth = np.sum([suffstats.device_vector(x, y) for x, y in shards], axis=0)
    draws = {numerics: np.stack([fleet_integer.stats_sum(cfg, numerics, shards, ["a", "b", "c"], [3, 3, 3], 1, codec)
                                 for _ in range(40)]) - truth for numerics in ("exact", "fast")}
    expected = skellam_mechanism.released_variance(codec.params, plan.suffstats_sigma, [3, 3, 3])
    for numerics, err in draws.items():
        assert abs(err.mean()) < 4 * math.sqrt(expected / err.size), numerics
        assert err.var() == pytest.approx(expected, rel=0.05), numerics


def test_the_main_job_under_skellam_stays_within_the_devices_budget() -> None:
    """The main job (the default, `skellam`): its one statistics round under the integer mechanism, at a multiplier
    whose Skellam epsilon is the Gaussian comparison's (`--config main-gaussian`, 7.965), below the devices' 8;
    the Gaussian's own 0.64 would overspend under skellam (which is why the default states its own)."""
    from fed_nessa.sim.runner import build_config as from_file

    cfg = from_file("main", [], run_dir="unused")
    gaussian = from_file("main-gaussian", [], run_dir="unused")
    assert cfg.integer_noise and not gaussian.integer_noise and cfg.num_server_rounds == 1
    for dims in ((256, 192), (192, 256)):
        spent = skellam_mechanism.calibration_epsilon(
            cfg, cfg.num_devices, dims, [(Phase.SUFFSTATS, cfg.suffstats_noise_multiplier, 1.0, 1)])
        assert 7.9 < spent <= 7.97
        at_gaussians = skellam_mechanism.calibration_epsilon(
            cfg, cfg.num_devices, dims, [(Phase.SUFFSTATS, gaussian.suffstats_noise_multiplier, 1.0, 1)])
        assert at_gaussians > 8.0

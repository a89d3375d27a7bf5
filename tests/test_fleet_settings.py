"""Fleet runs that configure themselves (fed_nessa.sim.fleet_settings, the runner and the progress epsilon)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fed_nessa.cli import main
from fed_nessa.config import SECAGG_MODULUS_RANGE, DevicePolicy, from_run_config
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.privacy.calibration import gaussian_epsilon, sigma_for_epsilon
from fed_nessa.privacy.events import DPEvent
from fed_nessa.sim.fleet_epsilon import events_up_to
from fed_nessa.sim.fleet_settings import (
    BUDGET_SPLIT,
    DEVICE_MIN_NOISE,
    DPSGD_ROUNDS,
    INTEGER_RATE_FRACTIONS,
    LOW_SIGNAL,
    LOW_SIGNAL_SERVER_LR,
    MAX_STATS_SHARE,
    PAIRS_PER_ROUND,
    SERVER_LR,
    STATS_SIGMA,
    FleetSettingsError,
    budget_split,
    derive,
    device_level_delta,
    quantization_range,
    server_lr,
    source_dims,
)
from fed_nessa.sim.runner import build_config, build_policy, fleet_overrides


def test_the_rule_at_10k_devices_and_epsilon_3_is_the_tuned_schedule() -> None:
    """q 0.04 (under either mechanism since the symmetric subsampling bound), the statistics round at sigma 2.5,
    1,000 DP-SGD rounds, Adam 4e-3 (the plan's signal, 17.9k, is below LOW_SIGNAL; docs/results.md)."""
    s = derive({"num-devices": 10_000, "epsilon-budget": 3.0, "distributed-mechanism": "gaussian"}, {})
    assert s.run == {"secagg-quantization-range": 2**18, "sample-rate": pytest.approx(0.04),
                     "budget-split": pytest.approx(gaussian_epsilon(STATS_SIGMA, 1e-5) / 3.0),
                     "num-server-rounds": 1 + DPSGD_ROUNDS, "server-lr": LOW_SIGNAL_SERVER_LR}
    # the rule's sigma is the Gaussian accountant's; under skellam the plan calibrates against its own epsilon
    cfg = from_run_config({"num-devices": 10_000, "epsilon-budget": 3.0, "aligner": "nessa", **s.run,
                           "distributed-mechanism": "gaussian"})
    assert noise_plan(cfg, 10_000).dpsgd_sigma == pytest.approx(2.50, abs=0.01)
    assert noise_plan(cfg, 10_000).suffstats_sigma == pytest.approx(STATS_SIGMA, rel=1e-3)
    assert s.device == {"guaranteed-arrivals": 8000, "min-noise-multiplier": DEVICE_MIN_NOISE,
                        "min-suffstats-noise-multiplier": DEVICE_MIN_NOISE, "epsilon-budget": 3.0, "delta": 1e-5,
                        "privacy-unit": "example"}


@pytest.mark.parametrize(("mechanism", "devices", "epsilon", "tries_nessa"), [
    ("gaussian", 10_000, 8.0, True), ("gaussian", 10_000, 3.0, True), ("gaussian", 10_000, 1.0, False),
    ("gaussian", 1000, 8.0, False), ("skellam", 10_000, 8.0, True), ("skellam", 10_000, 3.0, True),
    ("skellam", 10_000, 1.0, False), ("skellam", 3000, 8.0, True), ("skellam", 3000, 3.0, False),
    ("skellam", 30_000, 1.0, True)])
def test_under_the_rule_aligner_auto_tries_dp_nessa_only_where_the_tuning_population_says(
        mechanism: str, devices: int, epsilon: float, tries_nessa: bool) -> None:
    """The threshold lies just below the smallest measured win (13.9k at 10k devices, epsilon 3 under skellam,
    with the low-signal lr) and above the losses (<= 8.6k). Under the symmetric subsampling bound skellam's plans
    hold nearly the Gaussian's signal, so the two decide alike (3k devices, epsilon 8: 15.2k)."""
    given = {"num-devices": devices, "epsilon-budget": epsilon, "distributed-mechanism": mechanism}
    cfg = from_run_config({**given, **derive(given, {}).run})
    plan = noise_plan(cfg, devices, source_dims(cfg))
    assert (plan.aligner == "nessa") is tries_nessa and (plan.dpsgd_rounds_per_device > 0) is tries_nessa


@pytest.mark.parametrize(("mechanism", "devices", "epsilon", "lr"), [
    ("skellam", 10_000, 3.0, LOW_SIGNAL_SERVER_LR), ("skellam", 10_000, 8.0, SERVER_LR),
    ("skellam", 3000, 8.0, LOW_SIGNAL_SERVER_LR), ("skellam", 30_000, 1.0, LOW_SIGNAL_SERVER_LR),
    ("skellam", 30_000, 3.0, SERVER_LR), ("gaussian", 10_000, 3.0, LOW_SIGNAL_SERVER_LR),
    ("gaussian", 3000, 8.0, LOW_SIGNAL_SERVER_LR)])
def test_adam_takes_the_larger_step_where_the_plan_holds_less_signal(
        mechanism: str, devices: int, epsilon: float, lr: float) -> None:
    given = {"num-devices": devices, "epsilon-budget": epsilon, "distributed-mechanism": mechanism}
    run = derive(given, {}).run
    cfg = from_run_config({**given, **run})
    signal = noise_plan(cfg, devices, source_dims(cfg)).signal
    assert run["server-lr"] == lr == server_lr(signal)
    assert (signal < LOW_SIGNAL) is (lr == LOW_SIGNAL_SERVER_LR)


def test_the_low_signal_step_starts_below_the_boundary_and_an_explicit_lr_wins() -> None:
    assert server_lr(LOW_SIGNAL) == SERVER_LR and server_lr(LOW_SIGNAL - 1) == LOW_SIGNAL_SERVER_LR > SERVER_LR
    given = {"num-devices": 10_000, "epsilon-budget": 3.0, "server-lr": 1e-3}
    assert "server-lr" not in derive(given, {}).run
    assert "server-lr" not in derive({**given, "server-optimizer": "sgd"}, {}).run


@pytest.mark.parametrize(("epsilon", "share"), [(8.0, 0.21), (3.0, 0.56), (1.0, MAX_STATS_SHARE)])
def test_the_statistics_round_gets_the_share_that_buys_its_sigma_up_to_the_cap(epsilon: float, share: float) -> None:
    split = budget_split("example", epsilon, 1e-5)
    assert split == pytest.approx(share, abs=0.01) and split <= MAX_STATS_SHARE
    if split < MAX_STATS_SHARE:
        assert sigma_for_epsilon(split * epsilon, 1e-5) == pytest.approx(STATS_SIGMA, rel=1e-3)


@pytest.mark.parametrize(("devices", "q"), [(1000, 0.4), (3000, 44_800 / 336_000), (30_000, 44_800 / 3_360_000)])
def test_the_local_rate_keeps_the_expected_pairs_per_round(devices: int, q: float) -> None:
    rate = derive({"num-devices": devices, "distributed-mechanism": "gaussian"}, {}).run["sample-rate"]
    assert rate == pytest.approx(q) == PAIRS_PER_ROUND / (devices * 112)


@pytest.mark.parametrize(("epsilon", "fraction", "sigma"), [(8.0, 1.0, 1.13), (3.0, 1.0, 2.55), (1.0, 1.0, 6.74)])
def test_under_the_integer_mechanism_the_rate_is_the_one_whose_plan_holds_the_most_signal(
        epsilon: float, fraction: float, sigma: float) -> None:
    """Under the symmetric subsampling bound skellam's sigma is within 2 % of the Gaussian's (1.10, 2.50, 6.64), so
    at 10k devices the rule keeps q 0.04 at every epsilon (Zhu & Wang's factor 3 made it halve q at 3 and quarter it
    at 1); each kept q beats every other fraction's signal, and an explicit sample-rate still wins."""
    given = {"num-devices": 10_000, "epsilon-budget": epsilon}
    run = derive(given, {}).run
    assert run["sample-rate"] == pytest.approx(0.04 * fraction)
    dims = source_dims(from_run_config({**given, **run}))
    plan = noise_plan(from_run_config({**given, **run}), 10_000, dims)
    assert plan.dpsgd_sigma == pytest.approx(sigma, abs=0.01)
    for other in INTEGER_RATE_FRACTIONS:
        alt = noise_plan(from_run_config({**given, **run, "sample-rate": 0.04 * other}), 10_000, dims)
        assert alt.signal <= plan.signal
    assert "sample-rate" not in derive({**given, "sample-rate": 0.04}, {}).run


def test_a_linear_only_run_gets_its_statistics_rounds_and_an_explicit_schedule_wins() -> None:
    assert derive({"num-devices": 10_000, "aligner": "linear"}, {}).run["num-server-rounds"] == 1
    assert derive({"num-devices": 10_000, "linear-start": "none"}, {}).run["num-server-rounds"] == DPSGD_ROUNDS
    given = derive({"num-devices": 10_000, "num-server-rounds": 501, "server-lr": 1e-3}, {}).run
    assert "num-server-rounds" not in given and "server-lr" not in given
    assert "server-lr" not in derive({"num-devices": 10_000, "server-optimizer": "sgd"}, {}).run


def test_device_level_derives_delta_below_one_over_devices_and_no_sample_rate() -> None:
    s = derive({"num-devices": 100_000, "privacy-unit": "device"}, {})
    assert s.run["delta"] == 1e-6 < 1 / 100_000 and "sample-rate" not in s.run
    assert "num-server-rounds" not in s.run and "server-lr" not in s.run  # no device-level evidence
    assert s.run["budget-split"] == BUDGET_SPLIT["device"]
    assert s.device["privacy-unit"] == "device" and s.device["delta"] == 1e-6
    assert device_level_delta(30_000, 1e-5) == 1e-5 and device_level_delta(10_000, 1e-5) == 1e-5


@pytest.mark.parametrize("n", [300, 10_000, 100_000, 1_000_000])
def test_the_quantization_range_never_wraps_the_modulus(n: int) -> None:
    qr = quantization_range(n)
    assert n * qr < SECAGG_MODULUS_RANGE and 2 * n * qr >= SECAGG_MODULUS_RANGE or qr == 2**22
    from_run_config({"num-devices": n, "secagg-quantization-range": qr, "min-arrivals": 2})  # the config accepts it


def test_an_explicit_setting_always_wins() -> None:
    s = derive({"num-devices": 10_000, "sample-rate": 0.5, "secagg-quantization-range": 1024, "noise-multiplier": 2.0},
               {"guaranteed-arrivals": 100, "min-noise-multiplier": 0.9})
    assert "sample-rate" not in s.run and "secagg-quantization-range" not in s.run
    assert "budget-split" not in s.run  # noise given: not calibrated from epsilon
    assert "guaranteed-arrivals" not in s.device and "min-noise-multiplier" not in s.device


@pytest.mark.parametrize(("run", "device", "names"), [
    ({"num-devices": 10_000, "secagg-quantization-range": 2**22}, {}, "secagg-quantization-range = 4194304"),
    ({"num-devices": 10_000}, {"guaranteed-arrivals": 9000}, "guaranteed-arrivals = 9000"),
    ({"num-devices": 1000}, {"privacy-unit": "device"}, "privacy-unit = device"),
])
def test_a_contradictory_setting_is_one_clear_error(run: dict, device: dict, names: str) -> None:
    with pytest.raises(FleetSettingsError, match="contradicts") as err:
        derive(run, device)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_a_contradiction_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["simulate", "--engine", "fleet", "--quiet", "--set", "num-devices=10000", "--device-set",
               "guaranteed-arrivals=9000", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "fleet.toml" in err[0] and "guaranteed-arrivals = 9000" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_runner_fills_in_only_what_was_left_out(capsys: pytest.CaptureFixture) -> None:
    """num-devices=10000 alone: the settings that used to stop the run are derived and printed."""
    run, device = fleet_overrides("fleet", ["num-devices=10000"], ["epsilon-budget=4"])
    printed = capsys.readouterr().out
    assert "fleet settings derived for 10000 devices" in printed and "secagg-quantization-range=262144" in printed
    cfg = build_config("fleet", run)
    policy = build_policy("fleet", device)
    assert cfg.secagg_quantization_range == 2**18 and cfg.num_devices == 10_000
    assert policy.guaranteed_arrivals == 8000 and policy.epsilon_budget == 4.0  # the explicit one
    assert isinstance(policy, DevicePolicy)


def _event(round_: int, steps: int = 1, last: int | None = None) -> DPEvent:
    return DPEvent(round=round_, mechanism="dp-sgd", steps=steps, sample_rate=0.1, noise_multiplier=1.0,
                   clip_norm=1.0, delta=1e-5, mode="distributed", last_round=last)


def test_a_span_counts_only_the_rounds_run_so_far() -> None:
    events = [_event(1), _event(2, steps=3, last=6)]
    scheduled = [2, 4, 6]
    assert events_up_to(events, scheduled, 1) == [events[0]]
    assert [e.steps for e in events_up_to(events, scheduled, 4)] == [1, 2]
    assert events_up_to(events, scheduled, 6) == events


@pytest.mark.slow
def test_a_fleet_run_reports_the_real_epsilon_every_round(tmp_path: Path) -> None:
    """The progress epsilon grows with the rounds and ends at the ledgers' epsilon (it was 0.00 each round)."""
    run = tmp_path / "run"
    assert main(["simulate", "--engine", "fleet", "--quiet", "--config", "smoke", "--set", "num-server-rounds=4",
                 "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    eps = [r["epsilon_max"] for r in summary["rounds"]]
    assert eps[0] > 0 and all(b >= a for a, b in zip(eps, eps[1:])) and eps[1] > eps[0]
    assert math.isclose(eps[-1], summary["privacy"]["epsilon_max"], rel_tol=1e-9)


@pytest.mark.parametrize(("name", "devices", "unit"), [("fleet-10k", 10_000, "example"),
                                                       ("fleet-100k", 100_000, "example"),
                                                       ("device-level-100k", 100_000, "device")])
def test_the_named_fleet_configs_configure_themselves(name: str, devices: int, unit: str) -> None:
    run, device = fleet_overrides(name, [], [])
    cfg, policy = build_config(name, run), build_policy(name, device)
    assert cfg.num_devices == devices and cfg.privacy_unit == policy.privacy_unit == unit
    assert devices * cfg.secagg_quantization_range < SECAGG_MODULUS_RANGE
    assert policy.guaranteed_arrivals == math.ceil(0.8 * devices) and policy.delta == cfg.delta
    assert unit == "example" or cfg.delta < 1 / devices  # device level: delta below 1 / devices


@pytest.mark.slow
def test_a_fleet_run_writes_a_progress_summary_for_the_viewer(tmp_path: Path) -> None:
    """Before, the fleet engine wrote summary.json only at the end: `fed-nessa view` saw nothing live."""
    from fed_nessa.sim.fleet import PROGRESS_EVERY, run_fleet

    run = tmp_path / "run"
    overrides, device = fleet_overrides("smoke", ["num-server-rounds=7", f'run-dir="{run}"'], [])
    seen: list[tuple[int, int, object]] = []

    def progress(event: dict) -> None:
        if event["event"] == "round" and (run / "summary.json").exists():
            live = json.loads((run / "summary.json").read_text())
            seen.append((event["round"], len(live["rounds"]), live["final"]))

    run_fleet(build_config("smoke", overrides), build_policy("smoke", device), progress=progress)
    assert (1, 1, None) in seen and (PROGRESS_EVERY, PROGRESS_EVERY, None) in seen
    assert json.loads((run / "summary.json").read_text())["final"]  # the full summary at the end


@pytest.mark.slow
def test_a_run_given_only_its_fleet_size_prints_and_records_the_derived_schedule(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The derived q, rounds, budget split and server lr reach the run and its summary.json; at 300 devices
    the auto rule ships the linear start alone, so only the statistics round runs."""
    run = tmp_path / "run"
    assert main(["simulate", "--engine", "fleet", "--quiet", "--set", "num-devices=300", "--set", "references=false",
                 "--set", "ledger-layout=sqlite", "--run-dir", str(run)]) == 0
    printed = capsys.readouterr().out
    derived = derive({"num-devices": 300}, {}).run
    config = json.loads((run / "summary.json").read_text())["config"]
    for key, value in derived.items():
        assert config[key] == pytest.approx(value) and f"{key}=" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["noise_plan"]["aligner"] == "linear" and len(summary["rounds"]) == 1


def test_at_30k_devices_the_statistics_round_fits_31_bits_at_a_smaller_scale() -> None:
    """30,000 devices x 1,000 pairs overflow a 31-bit field at every scale down to k = 8; the plan takes k = 4
    (rounding inflates the bound by 1/4 instead of 1/8) rather than falling to the floor the devices refuse."""
    from fed_nessa.config import Phase
    from fed_nessa.federated import skellam_mechanism as sm
    from fed_nessa.federated.integer_mechanism import MAX_BITS, FieldTooSmallError, build_params

    given = {"num-devices": 30_000, "epsilon-budget": 1.0}
    cfg = from_run_config({**given, **derive(given, {}).run})
    dims = source_dims(cfg)
    assert dims is not None
    plan = noise_plan(cfg, 30_000, dims)
    assert plan.suffstats_sigma > DEVICE_MIN_NOISE
    dim = sm.payload_dim(cfg, Phase.SUFFSTATS, *dims)
    params = sm.phase_params(cfg, Phase.SUFFSTATS, plan.suffstats_sigma, plan.sample_rate, 30_000, dim, 1, 1)
    assert params.scale * params.l2_clip / math.sqrt(params.padded_dim) == 4.0 and params.bits <= MAX_BITS
    with pytest.raises(FieldTooSmallError, match="32 bits"):
        build_params(dim, params.l2_clip, plan.suffstats_sigma, 1, 1, 30_000, params.vectors_per_device, beta=0.0,
                     clip_per_sqrt_dim=8.0)

"""Fleet runs that configure themselves (fed_nessa.sim.fleet_settings, the runner and the progress epsilon)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fed_nessa.cli import main
from fed_nessa.config import SECAGG_MODULUS_RANGE, DevicePolicy, from_run_config
from fed_nessa.privacy.events import DPEvent
from fed_nessa.sim.fleet_epsilon import events_up_to
from fed_nessa.sim.fleet_settings import (
    BUDGET_SPLIT,
    DEVICE_MIN_NOISE,
    FleetSettingsError,
    derive,
    device_level_delta,
    quantization_range,
)
from fed_nessa.sim.runner import build_config, build_policy, fleet_overrides


def test_the_derivation_reproduces_the_studies_hand_settings() -> None:
    """simulations/fleet_study.sh derived these by hand at 10k devices (example level, epsilon 3)."""
    s = derive({"num-devices": 10_000, "epsilon-budget": 3.0}, {})
    assert s.run == {"secagg-quantization-range": 2**18, "sample-rate": pytest.approx(22_800 / (10_000 * 112)),
                     "budget-split": BUDGET_SPLIT["example"]}
    assert s.device == {"guaranteed-arrivals": 8000, "min-noise-multiplier": DEVICE_MIN_NOISE,
                        "min-suffstats-noise-multiplier": DEVICE_MIN_NOISE, "epsilon-budget": 3.0, "delta": 1e-5,
                        "privacy-unit": "example"}


def test_device_level_derives_delta_below_one_over_devices_and_no_sample_rate() -> None:
    s = derive({"num-devices": 100_000, "privacy-unit": "device"}, {})
    assert s.run["delta"] == 1e-6 < 1 / 100_000 and "sample-rate" not in s.run
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

"""The federated canary audit: planting into a federation's devices, scoring a run's released aligner, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.canary.empirical import make_canaries
from fed_nessa.canary.federated import (
    CanaryError,
    CanarySpec,
    canary_scores,
    claimed_epsilon,
    device_id,
    load_released,
    make_spec,
    plant,
    plant_devices,
    planter,
    spec_path,
)
from fed_nessa.canary.stats import one_run_audit
from fed_nessa.cli import main
from fed_nessa.config import from_run_config
from fed_nessa.data.registry import load_federation_data
from fed_nessa.data.shards import load_shard, make_shard
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig
from fed_nessa.sim.canary_audit import initial_cosines, score_run

TINY = ["num-devices=10", "secagg-num-shares=5", "secagg-reconstruction-threshold=3", "min-arrivals=8",
        "eval-speakers=20", "validation-speakers=0"]
TINY_DEVICE = ["guaranteed-arrivals=8"]


def _shard(n: int, d_x: int = 6, d_y: int = 5, seed: int = 0):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    return make_shard(rng.standard_normal((n, d_x)), rng.standard_normal((n, d_y)), np.arange(n) % 3, "x", "y")


# ----------------------------------------------------------------------------- planting
def test_spec_uses_the_centralised_canaries_and_a_coin_free_assignment() -> None:
    spec = make_spec(400, 6, 5, fleet=7, seed=3)
    x, y, included = make_canaries(400, 6, 5, 3)
    assert np.array_equal(spec.x, x) and np.array_equal(spec.y, y) and np.array_equal(spec.included, included)
    assert np.array_equal(spec.device, np.arange(400) % 7)  # j mod fleet, whatever the coins say
    other = make_spec(400, 6, 5, fleet=7, seed=4)
    assert np.array_equal(other.device, spec.device) and not np.array_equal(other.included, spec.included)
    assert 0.4 < spec.included.mean() < 0.6
    # the coins are independent of the assignment: about half included on every device
    per_device = [spec.included[spec.device == i].mean() for i in range(7)]
    assert min(per_device) > 0.3 and max(per_device) < 0.7


def test_included_canaries_land_in_their_devices_and_excluded_ones_nowhere() -> None:
    devices = tuple(_shard(20 + i, seed=i) for i in range(4))
    spec = make_spec(30, 6, 5, fleet=4, seed=1)
    planted = plant_devices(devices, spec)
    for i, (before, after) in enumerate(zip(devices, planted)):
        mine = (spec.device == i) & spec.included
        assert after.n == before.n + int(mine.sum())
        np.testing.assert_array_equal(after.enroll[: before.n], before.enroll)  # the device's own pairs unchanged
        np.testing.assert_allclose(after.enroll[before.n:], spec.x[mine])
        np.testing.assert_allclose(after.runtime[before.n:], spec.y[mine])
        assert len(set(after.speaker[before.n:])) == int(mine.sum())  # one new speaker per canary
        assert not set(after.speaker[before.n:]) & set(before.speaker)
    everything = np.vstack([s.enroll for s in planted])
    for j in np.flatnonzero(~spec.included):
        assert not np.any(np.all(np.isclose(everything, spec.x[j]), axis=1))


def test_plant_refuses_a_mismatched_federation(tmp_path: Path) -> None:
    spec = make_spec(20, 6, 5, fleet=3, seed=0)
    with pytest.raises(CanaryError, match="3 devices"):
        plant_devices(tuple(_shard(10) for _ in range(4)), spec)
    with pytest.raises(CanaryError, match="at least 10"):
        make_spec(9, 6, 5, fleet=3, seed=0)


def test_shard_files_are_rewritten_for_the_flower_engine(tmp_path: Path) -> None:
    cfg = from_run_config({"num-devices": 4, "secagg-num-shares": 3, "secagg-reconstruction-threshold": 2,
                           "min-arrivals": 3, "eval-speakers": 10, "validation-speakers": 0,
                           "run-dir": str(tmp_path / "run")})
    data = load_federation_data(cfg, tmp_path / "run" / "shards")
    before = [load_shard(p).n for p in data.shards]
    spec = make_spec(40, data.d_x, data.d_y, fleet=len(data.shards), seed=2)
    assert plant(data, spec) is data
    for i, p in enumerate(data.shards):
        shard = load_shard(p)
        mine = (spec.device == i) & spec.included
        assert shard.n == before[i] + int(mine.sum())
        np.testing.assert_allclose(shard.enroll[before[i]:], spec.x[mine], atol=1e-6)


def test_spec_round_trips_beside_the_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert spec_path(run) == tmp_path / "run.canaries.npz"
    spec = make_spec(12, 6, 5, fleet=5, seed=9)
    spec.save(spec_path(run))
    back = CanarySpec.load(spec_path(run))
    assert back.seed == 9 and back.fleet == 5 and back.m == 12
    np.testing.assert_array_equal(back.included, spec.included)
    np.testing.assert_array_equal(back.device, spec.device)
    assert back.device_ids() == [device_id(i) for i in range(5)]
    with pytest.raises(CanaryError, match="earlier run"):
        planter(12, 0, run)  # never overwrite another run's secret


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A real (tiny) fleet run, `fed-nessa simulate --canaries 40`: planted by the runner's hook."""
    run = tmp_path_factory.mktemp("fed") / "run"
    sets = [a for kv in TINY for a in ("--set", kv)] + [a for kv in TINY_DEVICE for a in ("--device-set", kv)]
    rc = main(["simulate", "--engine", "fleet", "--quiet", "--config", "canary-audit", "--canaries", "40",
               "--canary-seed", "1", "--run-dir", str(run), *sets])
    assert rc == 0
    return run, json.loads((run / "summary.json").read_text())


def test_the_engine_trains_on_the_planted_canaries(tiny_run: tuple[Path, dict]) -> None:
    run, summary = tiny_run
    spec = CanarySpec.load(spec_path(run))
    cfg = from_run_config({**summary["config"], "run-dir": str(run)})
    base = sum(s.n for s in load_federation_data(cfg, None).devices)
    assert summary["engine"]["pairs"] == base + int(spec.included.sum())
    # the secret is beside the run folder, and nothing in the run folder is about canaries
    assert spec_path(run).is_file() and spec_path(run).parent == run.parent
    assert not [p for p in run.rglob("*") if "canar" in p.name]
    assert not any(b"canar" in p.read_bytes() for p in run.rglob("*.jsonl"))


def test_claim_comes_from_the_canary_devices_ledgers(tiny_run: tuple[Path, dict]) -> None:
    run, summary = tiny_run
    claim = claimed_epsilon(run, CanarySpec.load(spec_path(run)))
    assert claim.devices == 10 and claim.delta == 1e-5
    assert claim.epsilon["rdp"] == pytest.approx(summary["privacy"]["epsilon_max"], rel=1e-6)
    # the audit config runs the default, integer mechanism: PLD has none, the Skellam accountant states it
    assert summary["privacy"]["mechanism"] == "skellam" and set(claim.epsilon) == {"rdp", "skellam"}
    assert 0 < claim.epsilon["skellam"] <= claim.epsilon["rdp"] * 1.001 and claim.epsilon["rdp"] < 8.0
    ledger = run / "devices" / device_id(0) / "privacy-ledger.jsonl"
    text = ledger.read_text()
    ledger.write_text(text.replace('"steps":1', '"steps":0', 1))
    try:
        with pytest.raises(CanaryError, match="does not verify"):
            claimed_epsilon(run, CanarySpec.load(spec_path(run)))
    finally:
        ledger.write_text(text)


def test_a_run_folder_is_scored_from_its_released_aligner(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run, _ = tiny_run
    result = score_run(run, "dp")
    assert result["canaries"] == 40 and result["fleet"] == 10 and result["seed"] == 1
    assert len(result["scores_in"]) + len(result["scores_out"]) == 40
    assert result["baseline"].startswith("none")
    assert result["attack"]["epsilon_lower_bound"] <= min(result["epsilon_claimed"].values())
    assert main(["audit-empirical", "--run", str(run), "--out", str(tmp_path / "scored")]) == 0
    report = (tmp_path / "scored" / "report.md").read_text()
    assert "Run folders scored as found" in report and "No positive control was given" in report


def test_simulate_refuses_to_plant_over_an_earlier_secret(tiny_run: tuple[Path, dict],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = tiny_run
    assert main(["simulate", "--engine", "fleet", "--config", "canary-audit", "--canaries", "40",
                 "--run-dir", str(run)]) == 2
    assert "earlier run's secret" in capsys.readouterr().err


# ----------------------------------------------------------------------------- scoring
def test_scores_separate_canaries_an_aligner_memorised() -> None:
    spec = make_spec(60, 256, 192, fleet=10, seed=0)
    aligner = NessaAligner(AlignerInfo(d_x=256, d_y=192), NessaConfig(hidden=4, depth=1))
    inc = spec.included
    aligner.set_linear(spec.x[inc].T @ spec.y[inc], np.zeros(256))  # maps an included y_c close to its x_c
    scores = canary_scores(aligner, spec)
    assert scores[inc].min() > 0.7 > 0.4 > scores[~inc].max()
    attack = one_run_audit(scores, inc, 1e-5)
    assert attack.auroc == 1.0 and attack.epsilon_lower_bound > 1
    np.testing.assert_allclose(canary_scores(aligner, spec, np.ones(60)), scores - 1)


def test_the_initial_network_is_a_baseline_only_where_it_survives() -> None:
    spec = make_spec(20, 8, 6, fleet=2, seed=0)
    stats = from_run_config({"linear-start": "suffstats"})
    none = from_run_config({"linear-start": "none"})
    assert initial_cosines(stats, spec) is None
    first, again = initial_cosines(none, spec), initial_cosines(none, spec)
    assert first is not None and first.shape == (20,)
    np.testing.assert_array_equal(first, again)  # from the seed alone


def test_no_aligner_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no released aligner"):
        load_released(tmp_path)


# ----------------------------------------------------------------------------- the CLI's bad input
@pytest.mark.parametrize("argv, message", [
    (["--federated", "--config", "no-such-config"], "config file not found"),
    (["--federated", "--canaries", "5"], "at least 10"),
    (["--run", "{tmp}/empty"], "no released aligner"),
    (["--run", "{tmp}/missing"], "no such run folder"),
    (["--control", "{tmp}/empty"], "needs --run"),
    (["--federated", "--set", 'dp-mode="none"'], "nothing to audit"),
    (["--run", "{tmp}/empty", "--canaries", "50"], "--run scores those"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    (tmp_path / "empty").mkdir()
    make_spec(10, 4, 4, 1, 0).save(spec_path(tmp_path / "empty"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["audit-empirical", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_federated_audit_dp_bound_below_claim_and_control_clearly_above(tmp_path: Path) -> None:
    """The shipped audit config on the fleet engine (reproducible noise: deterministic, no guarantee)."""
    out = tmp_path / "audit"
    rc = main(["audit-empirical", "--federated", "--out", str(out), "--set", "reproducible-noise=true",
               "--device-set", "allow-reproducible-noise=true"])
    res = json.loads((out / "empirical.json").read_text())
    dp, control = res["runs"]
    assert dp["dp_mode"] == "distributed" and control["dp_mode"] == "none"
    claimed = dp["epsilon_claimed"]
    assert dp["attack"]["epsilon_lower_bound"] <= claimed["skellam"] <= claimed["rdp"] * 1.001
    assert control["attack"]["epsilon_lower_bound"] > dp["attack"]["epsilon_lower_bound"] + 0.5
    assert control["attack"]["auroc"] > 0.95 and dp["attack"]["auroc"] < control["attack"]["auroc"]
    assert control["epsilon_claimed"]["rdp"] == float("inf")
    assert rc == 0
    for name in ("dp", "control"):
        assert (out / f"{name}.canaries.npz").is_file() and (out / name / "aligner" / "card.json").is_file()
    report = (out / "report.md").read_text()
    for text in ("Canary design", "inclusion probability 0.5", "AUROC", "dp-mode=\"none\"", "allow-non-dp=true",
                 "engine **fleet**", "50 devices", "Bonferroni"):
        assert text in report
    assert (out / "canary-scores.png").stat().st_size > 1000
    # a second audit into the same folder is refused: its ledgers already spent
    assert main(["audit-empirical", "--federated", "--out", str(out)]) == 2

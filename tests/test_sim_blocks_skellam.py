"""The block engine under ``distributed-mechanism = skellam``: == the fleet engine, blocks cut any way, the audit.

Exact numerics with reproducible noise: every device's rows, rotation, rounding and integer share come from
its own keyed stream in both engines and the blocks' partial field sums add up to the fleet's modular sum,
so the decoded sums are compared for equality, as are the device ledgers (their skellam events: scale, bits,
norm bounds, mu) and the federation ledger's records. Fast numerics draw the whole sum's Skellam noise once,
keyed by (seed, round) under reproducible noise: the same draw in both engines, so their sums agree to the
float summation order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sim_blocks_engine import (
    DEVICES,
    POLICY,
    _blocks,
    _cfg,
    _ledgers,
    _population,
    _records,
    _same_runs,
    ray_equals_in_process,
)

from fed_nessa.config import Phase
from fed_nessa.federated import suffstats
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.skellam_mechanism import payload_dim, round_params
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.events import SKELLAM
from fed_nessa.sim.blocks.backends import IN_PROCESS
from fed_nessa.sim.blocks.engine import ENGINE, BlockEngine, lazy_federation, refusal
from fed_nessa.sim.blocks.worker import BlockError
from fed_nessa.sim.fleet import FleetEngine

SKELLAM_SET = {"distributed-mechanism": "skellam"}


@pytest.fixture(autouse=True)
def _key_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FED_NESSA_KEY_STORE", str(tmp_path / "keys"))


def _skellam_cfg(tmp: Path, name: str, **over: Any) -> Any:
    return _cfg(tmp, name, **{**SKELLAM_SET, **over})


def _events(run_dir: str) -> list[dict[str, Any]]:
    """Every reserve entry's DP event in the run's store (the devices' signed mechanism parameters)."""
    return [json.loads(payload)["event"] for entries in _ledgers(run_dir).values()
            for _, kind, payload in entries if kind == "reserve"]


@pytest.mark.parametrize("update", ["fedsgd", pytest.param("fedavg", marks=pytest.mark.slow)])
def test_blocks_equal_the_fleet_engine_under_skellam(tmp_path: Path, update: str,
                                                    applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """Statistics then two device-level DP-SGD rounds, exact numerics: the same decoded sums applied, bit for
    bit, the same epsilons, device ledgers (skellam events with the same scale, bits, bounds and mu) and
    federation-ledger records (but the engine's name)."""
    cfg = _skellam_cfg(tmp_path, "blocks", **{"device-update": update})
    blocks = _blocks(cfg, IN_PROCESS, per_block=10)
    by_blocks, applied_sums[:] = list(applied_sums), []
    fcfg = _skellam_cfg(tmp_path, "fleet", **{"device-update": update})
    fleet = FleetEngine(fcfg, POLICY, lazy_federation(fcfg, _population(fcfg), devices=True)).run()
    assert [(p, n) for p, _, n in by_blocks] == [(p, n) for p, _, n in applied_sums] == \
        [("suffstats", DEVICES), ("dpsgd", DEVICES), ("dpsgd", DEVICES)]
    for (_, a, _), (_, b, _) in zip(by_blocks, applied_sums, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a).max() > 0
    _same_runs(blocks, fleet)
    assert blocks["privacy"]["epsilon_max"] > 0
    assert _ledgers(cfg.run_dir) == _ledgers(fcfg.run_dir)
    assert _records(cfg.run_dir) == _records(fcfg.run_dir)
    events = _events(cfg.run_dir)
    assert len(events) == 2 * DEVICES and {e["mechanism"] for e in events} == {SKELLAM}
    assert all({"scale", "bits", "l2_bound", "mu"} <= set(e["skellam"]) for e in events)


def test_cutting_the_fleet_into_other_blocks_changes_nothing_under_skellam(
        tmp_path: Path, applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """One block or three: the blocks' partial field sums add up to the same decoded sums, ledgers alike."""
    one = _blocks(_skellam_cfg(tmp_path, "one"), IN_PROCESS, per_block=DEVICES)
    by_one, applied_sums[:] = list(applied_sums), []
    three = _blocks(_skellam_cfg(tmp_path, "three"), IN_PROCESS, per_block=10)
    assert len(by_one) == len(applied_sums) == 3
    for (_, a, _), (_, b, _) in zip(by_one, applied_sums, strict=True):
        np.testing.assert_array_equal(a, b)
    _same_runs(one, three)
    assert _ledgers(str(tmp_path / "one")) == _ledgers(str(tmp_path / "three"))


def test_fast_numerics_draw_the_fleet_engines_one_skellam_sum(tmp_path: Path,
                                                             applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """Fast numerics, statistics round only (aligner linear): the blocks' projected float sums plus the ONE draw
    of the whole sum's Skellam noise and rounding error, keyed as the fleet engine keys it: the fleet engine's
    released sum to float summation order; and not the noise-free sum (the noise is there, at its scale)."""
    over = {"fleet-numerics": "fast", "aligner": "linear", "num-server-rounds": 1}
    cfg = _skellam_cfg(tmp_path, "blocks", **over)
    _blocks(cfg, IN_PROCESS, per_block=10)
    by_blocks, applied_sums[:] = list(applied_sums), []
    fcfg = _skellam_cfg(tmp_path, "fleet", **over)
    FleetEngine(fcfg, POLICY, lazy_federation(fcfg, _population(fcfg), devices=True)).run()
    assert [(p, n) for p, _, n in by_blocks] == [(p, n) for p, _, n in applied_sums] == [("suffstats", DEVICES)]
    a, b = by_blocks[0][1], applied_sums[0][1]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())
    data = lazy_federation(cfg, _population(cfg), devices=True)
    mech = mechanism_for(cfg)
    clean = np.sum([suffstats.device_vector(d.enroll, d.runtime) * mech.stats_weight(d.n) for d in data.devices],
                   axis=0)
    plan = noise_plan(cfg, DEVICES, (data.d_x, data.d_y))
    # the released variance: DEVICES shares sized for g, (sigma C)^2 / g each (the rounding's is far smaller)
    std = plan.suffstats_sigma * mech.sensitivity(Phase.SUFFSTATS) * np.sqrt(DEVICES / POLICY.guaranteed_arrivals)
    assert 0.8 * std < float(np.std(a - clean)) < 1.2 * std
    assert _ledgers(cfg.run_dir) == _ledgers(fcfg.run_dir)


@pytest.mark.slow
def test_two_ray_actors_equal_in_process_under_skellam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """In-process and 2 Ray actors: the same decoded sums, epsilons and ledgers (the codec and the partial
    field sums cross the process boundary). Slow: local Ray's start-up."""
    ray_equals_in_process(tmp_path, monkeypatch, applied_sums, _skellam_cfg)


def test_simulate_engine_blocks_under_skellam_passes_the_audit(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``fed-nessa simulate --engine blocks`` with skellam (secure noise, fast numerics, statistics then two
    device-level DP-SGD rounds): every device ledger holds skellam events at the rounds' bit widths, the
    summary names the integer mechanism, and ``fed-nessa audit`` PASSES."""
    from fed_nessa.sim.runner import main

    run_dir = tmp_path / "cli"
    args = ["--engine", "blocks", "--devices-per-block", "10", "--backend", "in-process", "--quiet",
            "--run-dir", str(run_dir), "--device-set", "guaranteed-arrivals=8",
            "--device-set", "min-noise-multiplier=0.2", "--device-set", "min-suffstats-noise-multiplier=0.2"]
    for key, value in {"num-devices": DEVICES, "num-server-rounds": 3, "min-arrivals": 8, "privacy-unit": "device",
                       "device-batch": 8, "fleet-numerics": "fast", "hidden": 8, "references": "false",
                       "eval-speakers": 20, "validation-speakers": 10, "suffstats-noise-multiplier": 1.0,
                       "noise-multiplier": 1.5, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3,
                       "distributed-mechanism": "skellam"}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"]["name"] == ENGINE and summary["engine"]["blocks"] == 3
    assert [e["participants"] for e in summary["rounds"]] == [DEVICES] * 3
    assert summary["privacy"]["noise_source"].startswith(
        "block engine, distribution-equivalent numerics, integer mechanism")
    assert 0 < summary["final"]["eer"] < 0.5
    cfg = _skellam_cfg(tmp_path, "x", **{"hidden": 8})
    data = lazy_federation(cfg, _population(cfg))
    plan = noise_plan(cfg, DEVICES, (data.d_x, data.d_y))
    bits = {str(p): round_params(cfg, p, plan, payload_dim(cfg, p, data.d_x, data.d_y), 1, 8).bits
            for p in (Phase.SUFFSTATS, Phase.DPSGD)}
    events = _events(str(run_dir))
    assert len(events) == 2 * DEVICES and {e["mechanism"] for e in events} == {SKELLAM}
    assert sorted({e["skellam"]["bits"] for e in events}) == sorted(set(bits.values()))
    result = audit(run_dir, write=False)
    assert result.passed, [f.message for f in result.findings if f.severity == "fail"][:3]


def test_skellam_is_no_longer_refused_but_what_the_engine_does_not_run_still_is(tmp_path: Path) -> None:
    cfg = _skellam_cfg(tmp_path, "run")
    assert refusal(cfg, POLICY) is None
    example = _skellam_cfg(tmp_path, "example", **{"privacy-unit": "example"})
    with pytest.raises(BlockError, match="device-level DP-SGD rounds only"):
        BlockEngine(example, POLICY, _population(example))
    assert not Path(example.run_dir).exists()

"""The block engine behind the round loop: in-process == 2 Ray actors == the fleet engine, the audit, the command.

Exact numerics with reproducible noise make every engine's draws the same numbers (each device's
share and row subset from its own keyed stream, each payload's stochastic rounding keyed by
(seed, round, device)), so what the server applies, the epsilons and the device ledgers are
compared for equality, not within a tolerance.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fed_nessa.config import DevicePolicy, FederationConfig, from_run_config
from fed_nessa.data.synthetic import PopulationConfig, population_config
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.chain import read_chain
from fed_nessa.privacy.ledger import FEDERATION_LEDGER_NAME, LEDGER_HEADS
from fed_nessa.privacy.store import STORE_NAME
from fed_nessa.sim.blocks.backends import IN_PROCESS, RAY
from fed_nessa.sim.blocks.engine import ENGINE, BlockEngine, BlockOptions, lazy_federation
from fed_nessa.sim.blocks.worker import BLOCK_STORES, BlockError
from fed_nessa.sim.fleet import FleetEngine

DEVICES = 24
POLICY = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, allow_reproducible_noise=True,
                      min_noise_multiplier=0.2, min_suffstats_noise_multiplier=0.2)
#: Fields of a federation-ledger record that name the engine (everything else must agree).
ENGINE_FIELDS = {"engine"}


def _cfg(tmp: Path, name: str, **over: Any) -> FederationConfig:
    base = {"num-devices": DEVICES, "num-server-rounds": 3, "clients-per-round": 0, "min-arrivals": 8,
            "privacy-unit": "device", "device-batch": 8, "reproducible-noise": True, "fleet-numerics": "exact",
            "hidden": 8, "suffstats-noise-multiplier": 1.0, "noise-multiplier": 1.5, "ledger-layout": "sqlite",
            "references": False, "eval-speakers": 20, "validation-speakers": 10, "run-dir": str(tmp / name)}
    base.update(over)
    return from_run_config(base)


def _population(cfg: FederationConfig) -> PopulationConfig:
    return population_config(DEVICES, cfg.seed, speakers_per_device=(1, 2), utts_per_speaker=(5, 10),
                             eval_speakers=cfg.eval_speakers)


@pytest.fixture(autouse=True)
def _key_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FED_NESSA_KEY_STORE", str(tmp_path / "keys"))


def _ledgers(run_dir: str) -> dict[str, list[tuple[int, str, str]]]:
    """Every device's entries in the run's store as ``(seq, kind, payload)`` (time and signature aside)."""
    conn = sqlite3.connect(Path(run_dir) / STORE_NAME)
    ids = dict(conn.execute("SELECT num, device_id FROM devices").fetchall())
    out: dict[str, list[tuple[int, str, str]]] = {}
    for num, entry in conn.execute("SELECT num, entry FROM entries ORDER BY num, seq"):
        e = json.loads(entry)
        out.setdefault(ids[num], []).append((e["seq"], e["kind"], json.dumps(e["payload"], sort_keys=True)))
    conn.close()
    return out


def _records(run_dir: str) -> list[str]:
    """The federation ledger's entries (kind and payload) in order, the engine's name aside and each device
    head as its seq (a head's hash covers its entry's time and signature, which differ between runs)."""
    out = []
    for entry in read_chain(Path(run_dir) / FEDERATION_LEDGER_NAME).entries:
        payload = dict(entry.get("payload") or {})
        extra = {k: v for k, v in (payload.pop("extra", None) or {}).items() if k not in ENGINE_FIELDS}
        if LEDGER_HEADS in extra:
            extra[LEDGER_HEADS] = {dev: head[0] for dev, head in extra[LEDGER_HEADS].items()}
        for moment in ("time", "heads_digest"):
            payload.pop(moment, None)
        out.append(json.dumps({"kind": entry.get("kind"), **payload, "extra": extra}, sort_keys=True))
    return out


def _blocks(cfg: FederationConfig, backend: str, per_block: int = 12) -> dict[str, Any]:
    return BlockEngine(cfg, POLICY, _population(cfg), BlockOptions(devices_per_block=per_block,
                                                                   backend=backend)).run()


def _same_runs(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two runs' round entries and final privacy figures agree (seconds and memory aside)."""
    keep = ("round", "phase", "status", "participants", "declined", "failed", "epsilon_max", "epsilon_median")
    assert [{k: e.get(k) for k in keep} for e in a["rounds"]] == [{k: e.get(k) for k in keep} for e in b["rounds"]]
    for key in ("epsilon_max", "epsilon_median", "num_devices_with_spend"):
        assert a["privacy"][key] == b["privacy"][key], key
    assert a["final"]["eer"] == b["final"]["eer"]


@pytest.mark.parametrize("update", ["fedsgd", "fedavg"])
def test_blocks_in_process_equal_the_fleet_engine(tmp_path: Path, update: str,
                                                 applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """The same devices (the lazy population, handed to the fleet engine in memory): the same sums applied,
    bit for bit, the same epsilons after every round, the same device ledgers line for line and the same
    federation-ledger records (but the engine's name)."""
    cfg = _cfg(tmp_path, "blocks", **{"device-update": update})
    blocks = _blocks(cfg, IN_PROCESS, per_block=10)
    by_blocks, applied_sums[:] = list(applied_sums), []
    fcfg = _cfg(tmp_path, "fleet", **{"device-update": update})
    fleet = FleetEngine(fcfg, POLICY, lazy_federation(fcfg, _population(fcfg), devices=True)).run()
    assert [(p, n) for p, _, n in by_blocks] == [(p, n) for p, _, n in applied_sums] == \
        [("suffstats", DEVICES), ("dpsgd", DEVICES), ("dpsgd", DEVICES)]
    for (_, a, _), (_, b, _) in zip(by_blocks, applied_sums, strict=True):
        np.testing.assert_array_equal(a, b)
    _same_runs(blocks, fleet)
    assert blocks["privacy"]["epsilon_max"] > 0
    assert _ledgers(cfg.run_dir) == _ledgers(fcfg.run_dir)
    assert _records(cfg.run_dir) == _records(fcfg.run_dir)
    assert blocks["engine"]["name"] == ENGINE and fleet["engine"]["name"] == "fleet"


def ray_equals_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          applied_sums: list[tuple[str, np.ndarray, int]], make_cfg: Any) -> None:
    """Run ``make_cfg(tmp, name)`` in-process and on 2 local Ray actors: the same sums, runs and ledgers."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    local = _blocks(make_cfg(tmp_path, "local"), IN_PROCESS)
    by_local, applied_sums[:] = list(applied_sums), []
    try:
        remote = _blocks(make_cfg(tmp_path, "ray"), RAY)
    finally:
        ray.shutdown()
    assert len(by_local) == len(applied_sums) == 3
    for (pa, a, na), (pb, b, nb) in zip(by_local, applied_sums, strict=True):
        assert (pa, na) == (pb, nb)
        np.testing.assert_array_equal(a, b)
    _same_runs(local, remote)
    assert _ledgers(str(tmp_path / "local")) == _ledgers(str(tmp_path / "ray"))
    assert _records(str(tmp_path / "local")) == _records(str(tmp_path / "ray"))


@pytest.mark.slow
def test_two_ray_actors_equal_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """The issue's test: in-process and 2 Ray actors give identical aggregates, epsilons and ledgers (exact
    numerics, reproducible noise). Slow: local Ray's start-up."""
    ray_equals_in_process(tmp_path, monkeypatch, applied_sums, _cfg)


def test_cutting_the_fleet_into_other_blocks_changes_nothing(tmp_path: Path,
                                                             applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """One block or three: the same sums, epsilons and ledgers."""
    one = _blocks(_cfg(tmp_path, "one"), IN_PROCESS, per_block=DEVICES)
    by_one, applied_sums[:] = list(applied_sums), []
    three = _blocks(_cfg(tmp_path, "three"), IN_PROCESS, per_block=10)
    for (_, a, _), (_, b, _) in zip(by_one, applied_sums, strict=True):
        np.testing.assert_array_equal(a, b)
    _same_runs(one, three)
    assert _ledgers(str(tmp_path / "one")) == _ledgers(str(tmp_path / "three"))


def test_simulate_engine_blocks_writes_a_run_folder_that_passes_the_audit(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``fed-nessa simulate --engine blocks`` (secure noise, fast numerics; the ledger store without asking):
    the loop's run folder (evaluated rounds, the gate, summary), one merged ledger store, and
    ``fed-nessa audit`` PASSES."""
    from fed_nessa.sim.runner import main

    run_dir = tmp_path / "cli"
    args = ["--engine", "blocks", "--devices-per-block", "10", "--backend", "in-process", "--quiet",
            "--run-dir", str(run_dir), "--device-set", "guaranteed-arrivals=8",
            "--device-set", "min-noise-multiplier=0.2", "--device-set", "min-suffstats-noise-multiplier=0.2"]
    for key, value in {"num-devices": DEVICES, "num-server-rounds": 3, "min-arrivals": 8, "privacy-unit": "device",
                       "device-batch": 8, "fleet-numerics": "fast", "hidden": 8, "references": "false",
                       "eval-speakers": 20, "validation-speakers": 10, "suffstats-noise-multiplier": 1.0,
                       "noise-multiplier": 1.5, "secagg-num-shares": 5,
                       "secagg-reconstruction-threshold": 3}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0, capsys.readouterr().err
    assert "final EER" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"]["name"] == ENGINE and summary["engine"]["blocks"] == 3
    assert len(summary["engine"]["workers_peak_rss_mib"]) == 3 and all(e["peak_rss_mib"] > 0 for e in summary["rounds"])
    assert [e["participants"] for e in summary["rounds"]] == [DEVICES] * 3
    assert summary["privacy"]["num_device_ledgers"] == DEVICES and summary["privacy"]["epsilon_max"] > 0
    assert summary["privacy"]["ledger_layout"] == "sqlite"
    assert summary["privacy"]["noise_source"].startswith("block engine, distribution-equivalent numerics")
    assert 0 < summary["final"]["eer"] < 0.5 and "gate" in summary["final"]
    assert all(e["eer"] is not None for e in summary["rounds"])  # the loop's evaluation cadence: every round here
    assert len(_ledgers(str(run_dir))) == DEVICES
    assert not (run_dir / BLOCK_STORES).exists() or not any((run_dir / BLOCK_STORES).iterdir())
    result = audit(run_dir, write=False)
    assert result.passed, [f.message for f in result.findings if f.severity == "fail"][:3]


@pytest.mark.parametrize(("over", "message"), [
    ({"clients-per-round": 12, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3}, "full-participation"),
    ({"dropout-rate": 0.1}, "drop-outs"),
    ({"privacy-unit": "example"}, "device-level DP-SGD rounds only"),
    ({"ledger-layout": "files"}, "ledger store"),
    ({"dp-mode": "local", "privacy-unit": "example"}, "distributed DP"),
])
def test_the_engine_refuses_what_it_does_not_simulate(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    cfg = _cfg(tmp_path, "run", **over)
    with pytest.raises(BlockError, match=message):
        BlockEngine(cfg, POLICY, _population(cfg))
    assert not Path(cfg.run_dir).exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--canaries", "10"], "--canaries"),
    (["--resume"], "--resume"),
    (["--set", "data-source=real-dev"], "data-source"),
])
def test_simulate_refuses_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                        message: str) -> None:
    from fed_nessa.sim.runner import main

    run_dir = tmp_path / "run"
    assert main(["--engine", "blocks", "--quiet", "--run-dir", str(run_dir), "--set", "num-devices=200",
                 "--set", "privacy-unit=device", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("simulate: error:") and message in err
    assert not (run_dir / "summary.json").exists()


def test_block_flags_belong_to_the_block_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fed_nessa.sim.runner import main

    assert main(["--engine", "fleet", "--devices-per-block", "10", "--quiet", "--run-dir", str(tmp_path / "r"),
                 "--set", "num-devices=200"]) == 2
    assert "block engine's options" in capsys.readouterr().err

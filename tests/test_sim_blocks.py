"""The block engine: block workers' partial sums, their backends (in-process, Ray) and the driver's run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fed_nessa.config import SECAGG_MODULUS_RANGE, DevicePolicy, FederationConfig, Phase, from_run_config
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.synthetic import PopulationConfig, population_config
from fed_nessa.federated.codec import make_codec
from fed_nessa.federated.layout import build_net
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.store import STORE_NAME
from fed_nessa.randomness import noise_source
from fed_nessa.sim.blocks.backends import IN_PROCESS, RAY, RAY_MIN_DEVICES, choose_backend
from fed_nessa.sim.blocks.driver import BlockEngine, block_specs
from fed_nessa.sim.blocks.worker import BLOCK_STORES, BlockError, BlockWorker, ReserveRequest, SumRequest
from fed_nessa.sim.fleet import device_id
from fed_nessa.sim.fleet_numerics import (
    ROUNDING_STREAM,
    dequantized_total,
    modular_sum,
    partial_modular_sum,
)

DEVICES = 24
POLICY = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, allow_reproducible_noise=True,
                      min_noise_multiplier=0.2, min_suffstats_noise_multiplier=0.2)


def _cfg(tmp: Path, name: str, **over: Any) -> FederationConfig:
    base = {"num-devices": DEVICES, "num-server-rounds": 3, "clients-per-round": 0, "min-arrivals": 8,
            "privacy-unit": "device", "device-batch": 8, "reproducible-noise": True, "fleet-numerics": "exact",
            "hidden": 8, "suffstats-noise-multiplier": 1.0, "noise-multiplier": 1.5, "ledger-layout": "sqlite",
            "run-dir": str(tmp / name)}
    base.update(over)
    return from_run_config(base)


def _population() -> PopulationConfig:
    return population_config(DEVICES, 0, speakers_per_device=(1, 2), utts_per_speaker=(5, 10))


def _net(cfg: FederationConfig) -> Any:
    lazy = LazyPopulation(_population())
    models = lazy.world.models
    return build_net(cfg, models[lazy.enroll_model].dim, models[lazy.runtime_model].dim)


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


# -- partial sums --------------------------------------------------------------------------
def test_partial_modular_sums_of_disjoint_groups_add_to_the_whole_sum() -> None:
    """Blocks' partial modular sums, added modulo the field, dequantize to the sum of all payloads; keyed
    rounding replays in any order and leaves NumPy's global generator as it found it."""
    rng = np.random.default_rng(0)
    codec = make_codec(3.0, 8.0, 1 << 22, 10)
    payloads = [codec.encode(rng.uniform(-2, 2, 50))[0] for _ in range(10)]
    keys = [[0, ROUNDING_STREAM, 1, j] for j in range(10)]
    state = np.random.get_state()
    whole = partial_modular_sum(payloads, codec, keys)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state, strict=True))
    parts = (partial_modular_sum(payloads[:4], codec, keys[:4]) + partial_modular_sum(payloads[4:], codec, keys[4:]))
    np.testing.assert_array_equal(parts % SECAGG_MODULUS_RANGE, whole)
    np.testing.assert_array_equal(dequantized_total(whole, 10, codec),
                                  dequantized_total(parts % SECAGG_MODULUS_RANGE, 10, codec))
    unkeyed = modular_sum(payloads, codec)  # Flower's own (unkeyed) rounding: the same sum to its error
    np.testing.assert_allclose(unkeyed, dequantized_total(whole, 10, codec), atol=10 * codec.step * 10)


@pytest.mark.parametrize("update", ["fedsgd", "fedavg"])
def test_a_blocks_exact_vectors_are_what_each_device_sends(tmp_path: Path, update: str) -> None:
    """Exact numerics, device-level round (FedSGD and DP-FedAvg): the block's partial sum equals the modular
    sum of the vectors each device computes itself (``DeviceLevel.dpsgd_vector`` on its own shard and stream)."""
    cfg = _cfg(tmp_path, "run", **{"device-update": update})
    spec = block_specs(_population(), 10, Path(cfg.run_dir))[1]  # devices 10..19
    worker = BlockWorker(spec, cfg, POLICY)
    lazy = LazyPopulation(_population())
    plan = noise_plan(cfg, DEVICES)
    from fed_nessa.federated.device import RoundRequest

    worker.reserve(ReserveRequest(RoundRequest(Phase.DPSGD, 2, 8, DEVICES), (2,), {}))
    net = _net(cfg)
    codec = make_codec(mechanism_for(cfg).payload_bound(Phase.DPSGD, plan), cfg.secagg_clipping_range,
                       cfg.secagg_quantization_range, DEVICES)
    got = worker.contribute(SumRequest(Phase.DPSGD, 2, codec, plan, net))
    mech = mechanism_for(cfg)
    std = mech.share_std(Phase.DPSGD, plan, POLICY.guaranteed_arrivals)
    own = [mech.dpsgd_vector(net, lazy.device(j), std, noise_source(True, cfg.seed, "device", device_id(j), 2), 1.0)
           for j in range(spec.first, spec.stop)]
    want = partial_modular_sum([codec.encode(v)[0] for v in own], codec,
                               [[cfg.seed, ROUNDING_STREAM, 2, j] for j in range(spec.first, spec.stop)])
    assert got.sent == spec.stop - spec.first
    np.testing.assert_allclose(dequantized_total(got.total, got.sent, codec), dequantized_total(want, got.sent, codec),
                               atol=2 * codec.step)
    worker.close()


# -- backends ------------------------------------------------------------------------------
def test_one_block_and_three_blocks_release_the_same_sums_and_ledgers(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
        applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """Exact numerics, reproducible noise: how the fleet is cut into blocks changes nothing released or signed."""
    seen = applied_sums
    BlockEngine(_cfg(tmp_path, "one"), POLICY, _population(), devices_per_block=DEVICES, backend=IN_PROCESS).run()
    one, seen[:] = list(seen), []
    BlockEngine(_cfg(tmp_path, "three"), POLICY, _population(), devices_per_block=10, backend=IN_PROCESS).run()
    assert [(p, n) for p, _, n in one] == [(p, n) for p, _, n in seen] == [("suffstats", 24), ("dpsgd", 24)] * 1 + [
        ("dpsgd", 24)]
    for (_, a, _), (_, b, _) in zip(one, seen, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _ledgers(str(tmp_path / "one")) == _ledgers(str(tmp_path / "three"))


@pytest.mark.slow
def test_two_ray_actors_equal_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        applied_sums: list[tuple[str, np.ndarray, int]]) -> None:
    """The issue's test: in-process and 2 Ray actors give identical aggregates and ledgers (exact numerics,
    reproducible noise). Slow: local Ray's start-up."""
    ray = pytest.importorskip("ray")
    seen = applied_sums
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    BlockEngine(_cfg(tmp_path, "local"), POLICY, _population(), devices_per_block=12, backend=IN_PROCESS).run()
    local, seen[:] = list(seen), []
    try:
        BlockEngine(_cfg(tmp_path, "ray"), POLICY, _population(), devices_per_block=12, backend=RAY).run()
    finally:
        ray.shutdown()
    assert len(local) == len(seen) == 3
    for (pa, a, na), (pb, b, nb) in zip(local, seen, strict=True):
        assert (pa, na) == (pb, nb)
        np.testing.assert_array_equal(a, b)
    assert _ledgers(str(tmp_path / "local")) == _ledgers(str(tmp_path / "ray"))


def test_auto_backend_picks_ray_for_large_fleets_or_a_cluster() -> None:
    assert choose_backend("auto", 100, None) == IN_PROCESS
    assert choose_backend("auto", 100, "ray://head:10001") == RAY
    assert choose_backend("in-process", 10 * RAY_MIN_DEVICES, None) == IN_PROCESS
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("dask", 100, None)


# -- the driver ----------------------------------------------------------------------------
@pytest.mark.parametrize("update", ["fedsgd", "fedavg"])
def test_a_block_run_passes_the_audit(tmp_path: Path, update: str) -> None:
    """Fast numerics, secure noise (FedSGD and DP-FedAvg): the merged store holds every device's chain, the
    blocks' stores are gone, the summary states every round, and ``fed-nessa audit`` PASSES."""
    cfg = _cfg(tmp_path, "run", **{"reproducible-noise": False, "fleet-numerics": "fast", "device-update": update})
    policy = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, min_noise_multiplier=0.2,
                          min_suffstats_noise_multiplier=0.2)
    summary = BlockEngine(cfg, policy, _population(), devices_per_block=10, backend=IN_PROCESS).run()
    assert [e["participants"] for e in summary["rounds"]] == [DEVICES] * 3
    assert summary["privacy"]["num_device_ledgers"] == DEVICES and summary["privacy"]["epsilon_max"] > 0
    assert summary["privacy"]["noise_source"].startswith("block engine, distribution-equivalent numerics")
    assert len(_ledgers(cfg.run_dir)) == DEVICES
    assert not (Path(cfg.run_dir) / BLOCK_STORES).exists() or not any((Path(cfg.run_dir) / BLOCK_STORES).iterdir())
    result = audit(cfg.run_dir, write=False)
    assert result.passed, [f.message for f in result.findings if f.severity == "fail"][:3]


@pytest.mark.parametrize(("over", "message"), [
    ({"clients-per-round": 12, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3}, "full-participation"),
    ({"dropout-rate": 0.1}, "drop-outs"),
])
def test_the_driver_refuses_what_it_does_not_simulate(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    with pytest.raises(BlockError, match=message):
        BlockEngine(_cfg(tmp_path, "run", **over), POLICY, _population(), devices_per_block=10, backend=IN_PROCESS)


def test_a_worker_refuses_the_adaptive_clip(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "run", **{"device-update": "fedavg", "clip-target-quantile": 0.5})
    worker = BlockWorker(block_specs(_population(), 10, Path(cfg.run_dir))[0], cfg, POLICY)
    plan = noise_plan(cfg, DEVICES)
    with pytest.raises(BlockError, match="clip-target-quantile"):
        worker.contribute(SumRequest(Phase.DPSGD, 2, make_codec(1.0, 8.0, 1 << 22, 10), plan, _net(cfg)))
    worker.close()


def test_the_command_runs_a_small_fleet_and_names_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fed_nessa.sim.blocks.__main__ import main

    run_dir = tmp_path / "cli"
    assert main(["--devices", "12", "--devices-per-block", "5", "--backend", "in-process", "--guaranteed-arrivals",
                 "8", "--set", f"run-dir={run_dir}", "--set", "min-arrivals=8", "--set", "num-server-rounds=2",
                 "--set", "hidden=8", "--set", "secagg-num-shares=5", "--set", "secagg-reconstruction-threshold=3",
                 "--set", "fleet-numerics=fast"]) == 0
    assert "epsilon max" in capsys.readouterr().out
    assert json.loads((run_dir / "summary.json").read_text())["privacy"]["num_device_ledgers"] == 12
    assert main(["--devices", "12", "--set", "no-equals-sign"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no-equals-sign" in err and "\n" not in err

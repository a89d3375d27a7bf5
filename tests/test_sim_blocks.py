"""The block engine's parts: block workers' partial sums and their backends (in-process, Ray).

The engine behind the round loop (runs, Ray against in-process against the fleet engine, the audit,
the command and its refusals): tests/test_sim_blocks_engine.py."""

from __future__ import annotations

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
from fed_nessa.randomness import noise_source
from fed_nessa.sim.blocks.backends import IN_PROCESS, RAY, RAY_MIN_DEVICES, choose_backend
from fed_nessa.sim.blocks.engine import block_specs
from fed_nessa.sim.blocks.worker import BlockWorker, ReserveRequest, SumRequest
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


@pytest.mark.parametrize(("update", "weight", "centred"), [("fedsgd", "equal", False), ("fedavg", "equal", False),
                                                          ("fedavg", "pairs", False), ("fedsgd", "equal", True),
                                                          ("fedavg", "equal", True)])
def test_a_blocks_exact_vectors_are_what_each_device_sends(tmp_path: Path, update: str, weight: str,
                                                           centred: bool) -> None:
    """Exact numerics, device-level round (FedSGD and DP-FedAvg, equal or pair-weighted, the plain loss or the
    loss about a centre): the block's partial sum equals the modular sum of the vectors each device computes
    itself (``DeviceLevel.dpsgd_vector`` on the net and shard its round takes the loss on, and its own stream)."""
    cfg = _cfg(tmp_path, "run", **{"device-update": update, "device-weight": weight})
    spec = block_specs(_population(), 10, Path(cfg.run_dir))[1]  # devices 10..19
    worker = BlockWorker(spec, cfg, POLICY)
    lazy = LazyPopulation(_population())
    plan = noise_plan(cfg, DEVICES)
    from fed_nessa.federated.device import RoundRequest, round_net

    worker.reserve(ReserveRequest(RoundRequest(Phase.DPSGD, 2, 8, DEVICES), (2,), {}))
    net = _net(cfg)
    codec = make_codec(mechanism_for(cfg).payload_bound(Phase.DPSGD, plan), cfg.secagg_clipping_range,
                       cfg.secagg_quantization_range, DEVICES)
    centre = np.random.default_rng(3).normal(0.0, 0.05, net.linear.out_features) if centred else None
    got = worker.contribute(SumRequest(Phase.DPSGD, 2, codec, plan, net, centre=centre))
    mech = mechanism_for(cfg)
    std = mech.share_std(Phase.DPSGD, plan, POLICY.guaranteed_arrivals)
    req = RoundRequest(Phase.DPSGD, 2, 8, DEVICES, centre=None if centre is None else tuple(centre.tolist()))
    vector = np.concatenate([p.detach().numpy().reshape(-1) for p in net.parameters()])
    own = [mech.dpsgd_vector(*round_net(req, cfg, lazy.device(j), vector), std,
                             noise_source(True, cfg.seed, "device", device_id(j), 2), 1.0)
           for j in range(spec.first, spec.stop)]
    want = partial_modular_sum([codec.encode(v)[0] for v in own], codec,
                               [[cfg.seed, ROUNDING_STREAM, 2, j] for j in range(spec.first, spec.stop)])
    assert got.sent == spec.stop - spec.first
    np.testing.assert_allclose(dequantized_total(got.total, got.sent, codec), dequantized_total(want, got.sent, codec),
                               atol=2 * codec.step)
    if centred:  # the centre moved the sum: the loss about it is not the plain loss
        plain = worker.contribute(SumRequest(Phase.DPSGD, 2, codec, plan, net))
        diff = dequantized_total(got.total, got.sent, codec) - dequantized_total(plain.total, plain.sent, codec)
        assert np.abs(diff).max() > 100 * codec.step
    worker.close()


# -- backends ------------------------------------------------------------------------------
def test_auto_backend_picks_ray_for_large_fleets_or_a_cluster() -> None:
    assert choose_backend("auto", 100, None) == IN_PROCESS
    assert choose_backend("auto", 100, "ray://head:10001") == RAY
    assert choose_backend("in-process", 10 * RAY_MIN_DEVICES, None) == IN_PROCESS
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("dask", 100, None)


# -- what a worker refuses ------------------------------------------------------------------
def test_a_worker_refuses_an_adaptive_round_that_states_no_clip(tmp_path: Path) -> None:
    """The adaptive clip runs (tests/test_sim_blocks_adaptive.py), but only at the C_t the round states:
    a DP-SGD request of an adaptive run without its clip is refused, naming the setting."""
    cfg = _cfg(tmp_path, "run", **{"device-update": "fedavg", "clip-target-quantile": 0.5})
    worker = BlockWorker(block_specs(_population(), 10, Path(cfg.run_dir))[0], cfg, POLICY)
    plan = noise_plan(cfg, DEVICES)
    with pytest.raises(ValueError, match="clip-target-quantile > 0: the DP-SGD round's config states no clip"):
        worker.contribute(SumRequest(Phase.DPSGD, 2, make_codec(1.0, 8.0, 1 << 22, 10), plan, _net(cfg)))
    worker.close()

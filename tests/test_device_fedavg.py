"""DP-FedAvg at device level: the device update, its vectorised twin, adaptive clipping, DP-AdamBC."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fed_nessa.config import ConfigError, FederationConfig, Phase, from_run_config
from fed_nessa.data.shards import Shard
from fed_nessa.federated.adaptive_clip import AdaptiveClip
from fed_nessa.federated.layout import build_net
from fed_nessa.federated.mechanism import BIT_SENSITIVITY, DeviceLevel, local_orders, mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.server_optimizers import AdamBC, server_optimizer
from fed_nessa.model.training import fedavg_delta, local_minibatches
from fed_nessa.privacy.accountants.gaussian import GaussianAccountant
from fed_nessa.privacy.accounting import GAUSSIAN
from fed_nessa.privacy.events import DEVICE, DISTRIBUTED, GAUSSIAN_SUM, DPEvent
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.randomness import ReproducibleNoise
from fed_nessa.sim.fedavg import block_steps, fedavg_block, fedavg_block_sum, pad_block

D_X, D_Y = 24, 16


def _cfg(**extra: object) -> FederationConfig:
    base: dict[str, object] = {"privacy-unit": "device", "device-update": "fedavg", "num-devices": 100,
                               "distributed-mechanism": "gaussian",  # the Gaussian share (skellam: test_skellam_*)
                               "delta": 1e-3, "min-arrivals": 2, "linear-start": "none", "hidden": 8,
                               "local-epochs": 2, "local-batch": 3, "local-lr": 0.5}
    base.update(extra)
    return from_run_config(base)


def _net(cfg: FederationConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_net(cfg, D_X, D_Y)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _shard(n: int, seed: int) -> Shard:
    rng = np.random.default_rng(seed)
    return Shard(enroll=rng.standard_normal((n, D_X)).astype(np.float32),
                 runtime=rng.standard_normal((n, D_Y)).astype(np.float32), speaker=np.zeros(n, np.int64),
                 enroll_model="x", runtime_model="y")


# -- config ----------------------------------------------------------------------------------
def test_fedavg_keys_are_validated_and_fedsgd_stays_the_default() -> None:
    assert from_run_config({}).device_update == "fedsgd"
    with pytest.raises(ConfigError, match="device-update = 'fedavg' is the device-level update"):
        from_run_config({"device-update": "fedavg"})
    with pytest.raises(ConfigError, match="device-update = 'sgd': allowed values fedsgd, fedavg"):
        _cfg(**{"device-update": "sgd"})
    with pytest.raises(ConfigError, match=r"clip-target-quantile = 1.0: allowed range \[0, 1\)"):
        _cfg(**{"clip-target-quantile": 1.0})
    with pytest.raises(ConfigError, match="clip-target-quantile > 0 adapts the clip of DP-FedAvg"):
        _cfg(**{"device-update": "fedsgd", "clip-target-quantile": 0.5})
    with pytest.raises(ConfigError, match=r"clip-target-quantile = -0.1: allowed range \[0, 1\)"):
        _cfg(**{"clip-target-quantile": -0.1})
    for lr in (0.0, -0.5):
        with pytest.raises(ConfigError, match=rf"clip-lr = {lr}: allowed range \(0, 10\]"):
            _cfg(**{"clip-target-quantile": 0.5, "clip-lr": lr})
    assert _cfg(**{"server-optimizer": "adam-bc"}).server_optimizer == "adam-bc"  # the engines build it


def test_device_weight_is_validated_and_needs_the_fedavg_update() -> None:
    assert from_run_config({}).device_weight == "equal" and _cfg(**{"device-weight": "pairs"}).device_weight == "pairs"
    with pytest.raises(ConfigError, match="device-weight = 'size': allowed values equal, pairs"):
        _cfg(**{"device-weight": "size"})
    with pytest.raises(ConfigError, match="device-weight = 'pairs' weighs DP-FedAvg deltas: it needs device-update"):
        _cfg(**{"device-update": "fedsgd", "device-weight": "pairs"})


@pytest.mark.parametrize(("weight", "n", "want"), [("equal", 3, 1.0), ("equal", 500, 1.0), ("pairs", 3, 0.15),
                                                   ("pairs", 20, 1.0), ("pairs", 500, 1.0), ("pairs", 0, 0.0)])
def test_a_devices_update_weight_is_the_share_of_the_stats_cap_its_pairs_fill(weight: str, n: int,
                                                                              want: float) -> None:
    mech = mechanism_for(_cfg(**{"device-weight": weight, "device-stats-pairs": 20}))
    assert mech.update_weight(n) == pytest.approx(want, abs=1e-12)
    assert mech.update_weights([n, n]).tolist() == pytest.approx([want, want], abs=1e-12)
    assert mechanism_for(replace(_cfg(), privacy_unit="example", device_update="fedsgd")).update_weight(n) == 1.0


# -- the device update -----------------------------------------------------------------------
def test_minibatches_cut_each_epochs_order_and_zero_means_full_batch() -> None:
    orders = [np.array([2, 0, 1, 3, 4]), np.array([4, 3, 2, 1, 0])]
    assert [b.tolist() for b in local_minibatches(orders, 2)] == [[2, 0], [1, 3], [4], [4, 3], [2, 1], [0]]
    assert [b.tolist() for b in local_minibatches(orders, 0)] == [[2, 0, 1, 3, 4], [4, 3, 2, 1, 0]]


@pytest.mark.parametrize("clip", [1e-3, 10.0])
def test_the_delta_is_clipped_as_one_vector_and_the_model_is_left_unchanged(clip: float) -> None:
    cfg = _cfg()
    net, shard = _net(cfg), _shard(7, 1)
    before = [p.detach().clone() for p in net.parameters()]
    delta, norm = fedavg_delta(net, shard.enroll, shard.runtime, orders=[np.arange(7)], batch=0, lr=0.5,
                               clip_norm=clip)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert float(delta.norm()) <= clip * (1 + 1e-9)
    assert norm > 1e-3 and (clip < norm) == (float(delta.norm()) < norm - 1e-12)


@pytest.mark.parametrize("clip", [1e-3, 10.0])
def test_a_weight_scales_the_clipped_delta_and_keeps_the_raw_norm(clip: float) -> None:
    cfg = _cfg()
    net, shard = _net(cfg), _shard(7, 1)
    kw: dict[str, Any] = {"orders": [np.arange(7)], "batch": 3, "lr": 0.5, "clip_norm": clip}
    full, norm = fedavg_delta(net, shard.enroll, shard.runtime, **kw)
    part, part_norm = fedavg_delta(net, shard.enroll, shard.runtime, weight=0.35, **kw)
    torch.testing.assert_close(part, 0.35 * full, rtol=1e-12, atol=0)
    assert part_norm == norm and float(part.norm()) <= 0.35 * clip * (1 + 1e-9)
    with pytest.raises(ValueError, match=r"update weight must lie in \[0, 1\].*got 1.5"):
        fedavg_delta(net, shard.enroll, shard.runtime, weight=1.5, **kw)


def test_one_full_batch_step_is_lr_times_the_mean_gradient_the_pseudo_gradient_sign() -> None:
    cfg = _cfg()
    net, shard = _net(cfg), _shard(5, 2)
    delta, _ = fedavg_delta(net, shard.enroll, shard.runtime, orders=[np.arange(5)], batch=0, lr=0.5, clip_norm=1e9)
    x, y = torch.from_numpy(shard.enroll), torch.from_numpy(shard.runtime)
    from fed_nessa.model.training import pair_loss
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(pair_loss(net, x, y, "cosine").mean(), params)
    expect = 0.5 * torch.cat([g.reshape(-1) for g in grads]).double()
    torch.testing.assert_close(delta, expect, rtol=1e-5, atol=1e-7)


def test_the_vectorised_block_agrees_with_each_device_on_the_same_draws() -> None:
    """Devices of different sizes (short last minibatches, fewer steps than the block's most)."""
    cfg = _cfg()
    net = _net(cfg)
    shards = [_shard(n, 10 + j) for j, n in enumerate([1, 4, 7, 9])]
    orders = [local_orders(ReproducibleNoise(j), s.n, cfg.local_epochs) for j, s in enumerate(shards)]
    clip = 0.05
    singles = [fedavg_delta(net, s.enroll, s.runtime, orders=o, batch=cfg.local_batch, lr=cfg.local_lr,
                            clip_norm=clip) for s, o in zip(shards, orders, strict=True)]
    x, y = pad_block([s.enroll for s in shards], [s.runtime for s in shards])
    block = fedavg_block(net, x, y, block_steps(orders, cfg.local_batch), lr=cfg.local_lr, clip_norm=clip)
    torch.testing.assert_close(block.clipped.double(), torch.stack([d for d, _ in singles]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block.norms.double(), torch.tensor([n for _, n in singles], dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    assert bool((block.norms > clip).any()) and bool((block.clipped.norm(dim=1) <= clip * (1 + 1e-5)).all())


def test_the_vectorised_block_weighs_each_device_as_the_device_does() -> None:
    """``device-weight = pairs``: the block's weighted deltas (one by one and summed) are each device's own."""
    cfg = _cfg(**{"device-weight": "pairs", "device-stats-pairs": 6})
    mech, net = mechanism_for(cfg), _net(cfg)
    shards = [_shard(n, 20 + j) for j, n in enumerate([1, 4, 7, 9])]
    orders = [local_orders(ReproducibleNoise(j), s.n, cfg.local_epochs) for j, s in enumerate(shards)]
    singles = [fedavg_delta(net, s.enroll, s.runtime, orders=o, batch=cfg.local_batch, lr=cfg.local_lr,
                            clip_norm=0.05, weight=mech.update_weight(s.n))[0]
               for s, o in zip(shards, orders, strict=True)]
    x, y = pad_block([s.enroll for s in shards], [s.runtime for s in shards])
    steps, weights = block_steps(orders, cfg.local_batch), mech.update_weights([s.n for s in shards])
    assert weights.tolist() == pytest.approx([1 / 6, 4 / 6, 1.0, 1.0])
    block = fedavg_block(net, x, y, steps, lr=cfg.local_lr, clip_norm=0.05, weights=weights)
    torch.testing.assert_close(block.clipped.double(), torch.stack(singles), rtol=1e-4, atol=1e-6)
    summed = fedavg_block_sum(net, x, y, steps, lr=cfg.local_lr, clip_norm=0.05, weights=weights)
    torch.testing.assert_close(summed.total, torch.stack(singles).sum(0), rtol=1e-4, atol=1e-6)
    assert float(block.clipped[0].norm()) <= 0.05 / 6 * (1 + 1e-5)  # the one-pair device weighs a sixth
    # the ClientApp's vector carries the same weight
    out = mech.fedavg_vector(net, shards[0], 0.05, 0.0, ReproducibleNoise(0))
    np.testing.assert_allclose(out, singles[0].numpy().astype(np.float32), rtol=1e-6, atol=1e-9)


def test_the_device_vector_draws_orders_then_the_delta_share_then_the_bit_share() -> None:
    cfg = _cfg()
    mech = mechanism_for(cfg)
    assert isinstance(mech, DeviceLevel)
    net, shard = _net(cfg), _shard(6, 3)
    clip = cfg.device_clip_norm
    out = mech.fedavg_vector(net, shard, clip, 0.01, ReproducibleNoise(7), count_std=0.3)
    noise = ReproducibleNoise(7)
    orders = local_orders(noise, shard.n, cfg.local_epochs)
    delta, norm = fedavg_delta(net, shard.enroll, shard.runtime, orders=orders, batch=cfg.local_batch,
                               lr=cfg.local_lr, clip_norm=clip)
    shares = np.concatenate([noise.normal(tuple(p.shape), 0.01).reshape(-1) for p in net.parameters()
                             if p.requires_grad])
    bit = (1.0 if norm <= clip else 0.0) - BIT_SENSITIVITY + noise.normal((1,), 0.3)[0]
    np.testing.assert_allclose(out, np.append(delta.numpy() + shares, bit).astype(np.float32), rtol=1e-6)
    # without adaptive clipping the ClientApp path (dpsgd_vector) sends the delta alone
    plain = mech.dpsgd_vector(net, shard, 0.01, ReproducibleNoise(7), 1.0)
    np.testing.assert_allclose(plain, out[:-1], rtol=1e-6)


# -- adaptive clipping: the bit's cost -------------------------------------------------------
def test_the_delta_and_the_bit_together_are_charged_the_rounds_sigma() -> None:
    """The ledger charges z; the two releases, accounted as separate Gaussian events, cost exactly that."""
    cfg = _cfg(**{"clip-target-quantile": 0.5, "noise-multiplier": 2.0, "clip-count-noise": 0.05})
    mech = mechanism_for(cfg)
    assert isinstance(mech, DeviceLevel)
    fleet = 100
    plan = noise_plan(cfg, fleet)
    z = plan.dpsgd_sigma
    z_delta, z_bit = mech.delta_sigma(plan, fleet), mech.count_sigma(fleet) / BIT_SENSITIVITY
    assert z == 2.0 and z_delta == pytest.approx(2.041, abs=1e-3)  # docs/privacy.md's figure
    assert z_bit == pytest.approx(0.05 * fleet / 0.5)

    def ev(sigma: float) -> DPEvent:
        return DPEvent(round=1, mechanism=GAUSSIAN_SUM, steps=1, sample_rate=1.0, noise_multiplier=sigma,
                       clip_norm=cfg.device_clip_norm, delta=cfg.delta, mode=DISTRIBUTED, unit=DEVICE)

    acc = GaussianAccountant()
    charged = acc.epsilon([ev(z)] * 10, cfg.delta)
    assert acc.epsilon([ev(z_delta), ev(z_bit)] * 10, cfg.delta) == pytest.approx(charged, rel=1e-9)
    assert acc.epsilon([ev(z_delta)] * 10, cfg.delta) < charged  # the bit is not free
    # shares: the distributed delta and count shares reassemble the released noise
    assert mech.share_std(Phase.DPSGD, plan, 4, 0.2) == pytest.approx(z_delta * 0.2 / 2)
    assert mech.count_share_std(4, fleet) == pytest.approx(mech.count_sigma(fleet) / 2)
    assert mechanism_for(_cfg()).count_share_std(4, fleet) == 0.0


def test_a_count_noise_too_small_to_pay_for_is_one_clear_error() -> None:
    cfg = _cfg(**{"clip-target-quantile": 0.5, "noise-multiplier": 2.0, "clip-count-noise": 0.005})
    mech = mechanism_for(cfg)
    assert isinstance(mech, DeviceLevel)
    with pytest.raises(ValueError, match="clip-count-noise = 0.005: the bit count's noise multiplier 1 is <= "):
        mech.delta_sigma(noise_plan(cfg, 100), 100)


def test_the_clip_moves_geometrically_toward_the_target_quantile() -> None:
    clip = AdaptiveClip.from_config(_cfg(**{"clip-target-quantile": 0.5, "clip-lr": 0.2}))
    assert clip.clip == 0.1
    # all 10 devices under C: fraction 1 > 0.5, C shrinks by exp(-0.2 * 0.5)
    assert clip.next(10 * 0.5, 10).clip == pytest.approx(0.1 * math.exp(-0.1))
    assert clip.next(-10 * 0.5, 10).clip == pytest.approx(0.1 * math.exp(0.1))
    # a fleet whose norms are 1.0: C converges to the median from both sides
    norms = np.linspace(0.5, 1.5, 101)
    for start in (0.01, 100.0):
        c = AdaptiveClip(start, 0.5, 0.2)
        for _ in range(200):
            c = c.next(float(np.sum((norms <= c.clip) - 0.5)), len(norms))
        assert c.clip == pytest.approx(1.0, abs=0.03)


# -- DP-AdamBC ---------------------------------------------------------------------------------
def test_adam_bc_removes_the_noise_variance_from_the_second_moment() -> None:
    """Zero signal, gradients pure noise of std sigma: plain Adam's v ~ sigma^2, the corrected one ~ 0."""
    sigma, gen = 0.3, torch.Generator().manual_seed(0)
    p_bc, p_adam = torch.nn.Parameter(torch.zeros(2000)), torch.nn.Parameter(torch.zeros(2000))
    bc, adam = AdamBC([p_bc], lr=1e-3, gamma=1e-12), torch.optim.Adam([p_adam], lr=1e-3)
    bc.noise_var = sigma ** 2
    for _ in range(3000):
        g = sigma * torch.randn(2000, generator=gen)
        p_bc.grad, p_adam.grad = g.clone(), g.clone()
        bc.step()
        adam.step()
    plain_v = adam.state[p_adam]["exp_avg_sq"] / (1 - 0.999 ** 3000)
    assert float(plain_v.mean()) == pytest.approx(sigma ** 2, rel=0.05)
    raw = bc.state[p_bc]["v"] / (1 - 0.999 ** 3000) - sigma ** 2
    assert abs(float(raw.mean())) < 0.05 * sigma ** 2
    assert float(bc.corrected_second_moment(p_bc).median()) < 0.1 * sigma ** 2


def test_adam_bc_without_noise_is_adam_and_the_factory_builds_every_name() -> None:
    p1, p2 = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    bc, adam = AdamBC([p1], lr=0.01, gamma=1e-30), torch.optim.Adam([p2], lr=0.01, eps=0.0)
    for t in range(5):
        g = torch.arange(5.0) + t
        p1.grad, p2.grad = g.clone(), g.clone()
        bc.step()
        adam.step()
    torch.testing.assert_close(p1.detach()[1:], p2.detach()[1:])
    for name, cls in (("adam", torch.optim.Adam), ("adam-bc", AdamBC), ("sgd", torch.optim.SGD)):
        assert isinstance(server_optimizer(name, [torch.nn.Parameter(torch.ones(1))], 0.1), cls)
    with pytest.raises(ValueError, match="server-optimizer = 'lion': allowed values adam, sgd, adam-bc"):
        server_optimizer("lion", [torch.nn.Parameter(torch.ones(1))], 0.1)


# -- adaptive clipping through a device's round and the server's release ------------------------
def _round(cfg: FederationConfig, tmp: Path, clip: float | None, fleet: int = 100) -> tuple[Any, DeviceLedger]:
    from fed_nessa.config import DevicePolicy
    from fed_nessa.federated.device import RoundRequest, client_round
    from fed_nessa.federated.layout import flat

    policy = DevicePolicy(privacy_unit="device", guaranteed_arrivals=4, min_noise_multiplier=0.1,
                          delta=cfg.delta, epsilon_budget=1000.0)
    ledger = DeviceLedger.open(tmp / "dev", "dev", policy=policy)
    req = RoundRequest(Phase.DPSGD, 1, 4, fleet).at_clip(clip)
    out = client_round(req, _shard(9, 4), flat(list(_net(cfg).parameters())), cfg, ledger, policy)
    return out, ledger


def test_the_devices_ledger_charges_the_noise_its_delta_and_its_bit_actually_carry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stds a device really adds to its delta (per unit of C) and to its bit (per unit of 1/2) are read at
    the mechanism; accounted as two Gaussian events they cost exactly the epsilon the ledger records. A
    device that sized its delta's noise by the round's z alone (the bit's noise ignored) fails here."""
    cfg = _cfg(**{"clip-target-quantile": 0.5, "noise-multiplier": 1.5, "clip-count-noise": 0.05})
    seen: dict[str, float] = {}
    original = DeviceLevel.fedavg_vector

    def spy(self: DeviceLevel, net: torch.nn.Module, shard: Shard, clip: float, delta_std: float, noise: Any,
            count_std: float | None = None, bit_scale: float = 1.0) -> np.ndarray:
        seen.update(clip=clip, delta_std=delta_std, count_std=count_std or 0.0, bit_scale=bit_scale)
        return original(self, net, shard, clip, delta_std, noise, count_std, bit_scale)

    monkeypatch.setattr(DeviceLevel, "fedavg_vector", spy)
    out, ledger = _round(cfg, tmp_path, 0.37)
    assert out.vector is not None and seen["clip"] == 0.37 and seen["count_std"] > 0
    g = 4  # each share is 1/sqrt(g) of the released noise
    z_delta = seen["delta_std"] * math.sqrt(g) / seen["clip"]
    z_bit = seen["count_std"] * math.sqrt(g) / BIT_SENSITIVITY

    def ev(sigma: float) -> DPEvent:
        return DPEvent(round=1, mechanism=GAUSSIAN_SUM, steps=1, sample_rate=1.0, noise_multiplier=sigma,
                       clip_norm=1.0, delta=cfg.delta, mode=DISTRIBUTED, unit=DEVICE)

    acc = GaussianAccountant()
    spent = ledger.epsilon(cfg.delta, accountant=GAUSSIAN)  # the analytic accountant the two events are read by
    assert spent == pytest.approx(acc.epsilon([ev(z_delta), ev(z_bit)], cfg.delta), rel=1e-6)
    assert spent > acc.epsilon([ev(z_delta)], cfg.delta) * 1.0001  # the bit's noise is in the accounting
    (event,) = ledger.events()
    assert event.noise_multiplier == 1.5 and "adaptive clip's centred bit" in event.note
    # the payload: the bit rides scaled, with the delta's share std, inside SecAgg+'s range for the delta
    assert seen["count_std"] * seen["bit_scale"] == pytest.approx(seen["delta_std"])
    mech, plan = mechanism_for(cfg), noise_plan(cfg, 100)
    assert abs(out.vector[-1]) <= mech.payload_bound(Phase.DPSGD, plan, 0.37)


def test_an_adaptive_round_without_a_clip_or_with_a_bad_one_is_declined(tmp_path: Path) -> None:
    cfg = _cfg(**{"clip-target-quantile": 0.5})
    for clip, why in ((None, "states no clip"), (-1.0, "is not a finite number > 0"),
                      (math.inf, "is not a finite number > 0")):
        out, ledger = _round(cfg, tmp_path / str(clip), clip)
        assert out.vector is None and why in str(out.metrics["reason"]) and ledger.events() == []


def test_the_released_clip_moves_to_a_known_quantile_of_the_norms() -> None:
    """A synthetic population of 1,000 devices whose update norms are log-normal (the true 0.3 quantile known):
    each round every device's scaled bit plus its count share (clip_bit, DeviceLevel.bit_scale) is summed as
    SecAgg+ would release it, and the server's ServerModel reads the fraction off the sum and moves C. From a
    clip 30x too small or too large, C ends within 10 % of the true quantile."""
    from fed_nessa.federated.mechanism import clip_bit
    from fed_nessa.federated.server_model import ServerModel

    fleet, target = 1000, 0.3
    cfg = _cfg(**{"clip-target-quantile": target, "clip-lr": 0.2, "noise-multiplier": 1.0,
                  "num-devices": fleet, "delta": 1e-4})
    rng = np.random.default_rng(5)
    norms = np.exp(rng.normal(0.0, 0.5, fleet))
    truth = float(np.quantile(norms, target))
    plan, noise = noise_plan(cfg, fleet), ReproducibleNoise(11)
    for start in (truth / 30, truth * 30):
        model = ServerModel(replace(cfg, device_clip_norm=start), D_X, D_Y, "x", "y")
        p = sum(q.numel() for q in model.net.parameters() if q.requires_grad)
        for _ in range(120):
            clip = model.round_clip(Phase.DPSGD)
            assert clip is not None
            scale = model.mechanism.bit_scale(clip, plan)
            count_std = model.mechanism.share_std(Phase.DPSGD, plan, fleet, clip) / scale  # shares of g = N
            bits = sum(clip_bit(float(n), clip, count_std, noise) * scale for n in norms)
            model.apply(Phase.DPSGD, np.append(np.zeros(p, np.float32), bits), fleet, noise_arrivals=[fleet] * fleet,
                        plan=plan)
        assert model.round_clip(Phase.DPSGD) == pytest.approx(truth, rel=0.1)


def _engine_cfg(tmp: Path, name: str, **over: object) -> FederationConfig:
    base = {"privacy-unit": "device", "device-update": "fedavg", "num-devices": 30, "min-arrivals": 3,
            "delta": 1e-5, "num-server-rounds": 4, "linear-start": "suffstats", "aligner": "nessa",
            "clip-target-quantile": 0.5, "clip-count-noise": 0.5, "noise-multiplier": 2.0,
            "suffstats-noise-multiplier": 2.0, "hidden": 8, "eval-speakers": 20, "validation-speakers": 20,
            "references": False, "run-dir": str(tmp / name), "distributed-mechanism": "gaussian"}
    base.update(over)
    return from_run_config(base)


@pytest.mark.parametrize("numerics", ["exact", "fast"])
def test_a_fleet_run_with_adaptive_clipping_records_its_clips_and_passes_its_audit(tmp_path: Path,
                                                                                   numerics: str) -> None:
    from fed_nessa.config import DevicePolicy
    from fed_nessa.federated.rounds import CLIP_COLUMN, LEDGER_FILE
    from fed_nessa.privacy.audit import audit
    from fed_nessa.sim.fleet_ledgers import ADAPTIVE_CLIPS
    from fed_nessa.sim.runner import run_engine

    policy = DevicePolicy(privacy_unit="device", guaranteed_arrivals=3, min_noise_multiplier=0.2,
                          min_suffstats_noise_multiplier=0.2)
    summary = run_engine(_engine_cfg(tmp_path, "run", **{"fleet-numerics": numerics, "server-optimizer": "adam-bc"}),
                         policy, engine="fleet", quiet=True)
    clips = [e.get(CLIP_COLUMN) for e in summary["rounds"]]
    assert clips[0] is None and clips[1] == 0.1 and len(set(clips[1:])) == 3  # C moves every round
    assert [e["status"] for e in summary["rounds"]] == ["applied"] * 4
    lines = (tmp_path / "run" / LEDGER_FILE).read_text().splitlines()
    recorded = {k: v for line in lines for k, v in _extra(json.loads(line)).get(ADAPTIVE_CLIPS, {}).items()}
    assert recorded == {str(r): c for r, c in zip(range(2, 5), clips[1:], strict=True)}
    result = audit(tmp_path / "run")
    assert result.passed, [f.message for f in result.findings]


def _extra(entry: dict[str, Any]) -> dict[str, Any]:
    """A federation-ledger line's ``extra`` (the signed record's public fields)."""
    for value in (entry, *(v for v in entry.values() if isinstance(v, dict))):
        if isinstance(value.get("extra"), dict):
            return dict(value["extra"])
    return {}


def test_a_bit_count_noise_that_leaves_the_delta_nothing_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    from fed_nessa.config import DevicePolicy
    from fed_nessa.sim.runner import run_engine

    cfg = _engine_cfg(tmp_path, "run", **{"clip-count-noise": 0.01})
    with pytest.raises(ValueError, match="clip-count-noise = 0.01: the bit count's noise multiplier 0.6 is <= "):
        run_engine(cfg, DevicePolicy(), engine="fleet", quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("count_noise", "bit_above_clip"), [(0.05, False), (0.011, True)])
def test_the_payload_bound_holds_the_scaled_bit_whatever_the_count_noise(count_noise: float,
                                                                         bit_above_clip: bool) -> None:
    """The scaled bit's signal is C z_d / z_b: below C at the defaults, above it when z_b < sqrt(2) z (here
    z_b = 2.2 against z = 2), and the payload bound covers it plus the noise headroom either way."""
    cfg = _cfg(**{"clip-target-quantile": 0.5, "noise-multiplier": 2.0, "clip-count-noise": count_noise})
    mech, plan, clip = mechanism_for(cfg), noise_plan(cfg, 100), 0.3
    scale = mech.bit_scale(clip, plan)
    assert scale is not None
    signal, noise = BIT_SENSITIVITY * scale, 12 * mech.vector_sigma(Phase.DPSGD, plan) * clip
    assert (signal > clip) is bit_above_clip
    assert mech.payload_bound(Phase.DPSGD, plan, clip) == pytest.approx(max(clip, signal) + noise)

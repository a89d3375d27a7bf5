"""The written-out DP-FedAvg update (fed_nessa/sim/fedavg_explicit.py) against the general vmap path:
same row orders in, the same clipped deltas, norms and sums out (float tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fed_nessa.sim.fedavg as fedavg
import fed_nessa.sim.fedavg_explicit as fedavg_explicit
from fed_nessa.federated.mechanism import local_orders
from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet
from fed_nessa.randomness import ReproducibleNoise
from fed_nessa.sim.fedavg import (
    BlockSteps,
    block_steps,
    clip_deltas,
    fedavg_block,
    fedavg_block_sum,
    pad_block,
    vmap_deltas,
)
from fed_nessa.sim.fedavg_explicit import Outer, forms_delta, plan

D_X, D_Y = 24, 16
SIZES = [1, 4, 7, 9, 12, 3]  # short last minibatches, devices with fewer steps than the block's most


def _net(cfg: NessaConfig) -> NessaNet:
    net = NessaNet(D_Y, D_X, cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero-initialised last layer, so every branch has a gradient
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return net


def _block(epochs: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, BlockSteps]:
    rng = np.random.default_rng(5)
    enroll = [rng.standard_normal((n, D_X)).astype(np.float32) for n in SIZES]
    runtime = [rng.standard_normal((n, D_Y)).astype(np.float32) for n in SIZES]
    orders = [local_orders(ReproducibleNoise(j), n, epochs) for j, n in enumerate(SIZES)]
    x, y = pad_block(enroll, runtime)
    return x, y, block_steps(orders, batch)


CONFIGS = [
    NessaConfig(hidden=8, depth=1, train_linear=True),
    NessaConfig(hidden=8, depth=1, train_linear=False),
    NessaConfig(hidden=8, depth=2, activation="relu", layer_norm=False, train_linear=True),
    NessaConfig(hidden=6, depth=3, layer_norm=True, train_linear=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["lin+gelu+ln", "frozen-lin", "relu-no-ln-depth2", "frozen-depth3"])
@pytest.mark.parametrize("clip", [1e-3, 10.0])
@pytest.mark.parametrize("route", ["by-cost", "factored", "formed"])
def test_the_written_out_update_is_the_vmap_update(cfg: NessaConfig, clip: float, route: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever way a weight's delta is kept (factored ``lr E^T U`` with Grams for its norm, or formed)."""
    if route != "by-cost":
        monkeypatch.setattr(fedavg_explicit, "forms_delta", lambda part, formed: route == "formed")
    net = _net(cfg)
    assert plan(net, "cosine") is not None
    x, y, steps = _block(epochs=2, batch=3)
    before = [p.detach().clone() for p in net.parameters()]
    expect = clip_deltas(vmap_deltas(net, x, y, steps, lr=0.5), clip)
    monkeypatch.setattr(fedavg, "EXPLICIT_GROUP", 4)  # groups of a block, the last one short
    got = fedavg_block(net, x, y, steps, lr=0.5, clip_norm=clip)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    torch.testing.assert_close(got.clipped, expect.clipped, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.norms, expect.norms, rtol=1e-5, atol=1e-8)
    summed = fedavg_block_sum(net, x, y, steps, lr=0.5, clip_norm=clip)
    torch.testing.assert_close(summed.total, expect.clipped.double().sum(dim=0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(summed.norms, expect.norms, rtol=1e-5, atol=1e-8)
    assert bool((got.clipped.norm(dim=1) <= clip * (1 + 1e-5)).all())


def test_full_batch_steps_and_padding_rows_count_for_nothing() -> None:
    """batch 0 (each epoch one step): one device's padding weights 0 contribute no gradient."""
    net = _net(CONFIGS[0])
    x, y, steps = _block(epochs=3, batch=0)
    expect = clip_deltas(vmap_deltas(net, x, y, steps, lr=0.3), 1e9)
    got = fedavg_block(net, x, y, steps, lr=0.3, clip_norm=1e9)
    torch.testing.assert_close(got.clipped, expect.clipped, rtol=1e-4, atol=1e-6)


def test_other_nets_and_losses_run_the_vmap_path() -> None:
    net = _net(CONFIGS[0])
    assert plan(net, "mse") is None
    assert plan(torch.nn.Sequential(torch.nn.Linear(D_Y, D_X)), "cosine") is None
    partly = _net(CONFIGS[0])
    partly.linear.bias.requires_grad_(False)  # half the linear part trainable: not written out
    assert plan(partly, "cosine") is None
    x, y, steps = _block(epochs=1, batch=4)
    got = fedavg_block(net, x, y, steps, lr=0.5, clip_norm=1.0, loss="mse")
    expect = clip_deltas(vmap_deltas(net, x, y, steps, lr=0.5, loss="mse"), 1.0)
    torch.testing.assert_close(got.clipped, expect.clipped)
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        fedavg_block_sum(net, x, y, steps, lr=0.5, clip_norm=1.0, loss="huber")


def test_a_weight_is_formed_where_its_grams_would_cost_more() -> None:
    """112 rows of a 64 x 192 weight: Grams (n^2 x 256) cost more than the delta; 4 rows of it do not."""
    def part(n: int, gram_u: bool) -> Outer:
        e, u = torch.zeros(2, n, 64), torch.zeros(2, n, 192)
        return Outer(e, u, "k", torch.zeros(2, n, n) if gram_u else None)

    assert forms_delta(part(112, False), e_gram_formed=False)
    assert not forms_delta(part(4, False), e_gram_formed=False)
    assert not forms_delta(part(112, True), e_gram_formed=True)  # nothing left to form for the norm

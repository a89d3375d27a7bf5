"""server-ema: the server's average of the DP-SGD iterates is what is evaluated, gated, shipped and checkpointed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_federated_device import Cfg, _shards
from test_federated_server_model import _stats

from fed_nessa.config import ConfigError, DPMode, LinearStart, Phase, from_run_config
from fed_nessa.federated.layout import flat, trainable
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.federated.weight_average import WeightAverage


def _grad(model: ServerModel, value: float) -> np.ndarray:
    return np.full(sum(p.numel() for p in trainable(model.net)), value, np.float32)


def test_the_average_follows_the_ema_recursion() -> None:
    net = torch.nn.Linear(3, 2)
    avg = WeightAverage(net, 0.5)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update(net)
    for a, s in zip(avg.net.parameters(), start, strict=True):
        torch.testing.assert_close(a, s + 0.5)  # 0.5 x start + 0.5 x (start + 1)
    assert avg.steps == 1


def test_frozen_weights_are_copied_not_averaged() -> None:
    net = torch.nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    avg = WeightAverage(net, 0.9)
    with torch.no_grad():
        net.bias.add_(1.0)
        net.weight.add_(1.0)
    avg.update(net)
    torch.testing.assert_close(avg.net.bias, net.bias)
    assert not torch.allclose(avg.net.weight, net.weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_decay_out_of_range_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(torch.nn.Linear(2, 2), decay)


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_config_refuses_server_ema_out_of_range(value: float) -> None:
    with pytest.raises(ConfigError, match="server-ema"):
        from_run_config({"server-ema": value})


def test_off_by_default_the_comparator_is_the_trained_net() -> None:
    model = ServerModel(Cfg(dp_mode=DPMode.NONE, linear_start=LinearStart.NONE), 5, 4, "X", "Y")
    model.apply(Phase.DPSGD, _grad(model, 0.01), 1)
    assert model.average is None
    assert model.comparator().net is model.net


def test_the_average_starts_at_the_linear_start_and_is_shipped() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE, server_ema=0.5, server_optimizer="sgd", server_lr=1.0)
    shards = _shards()
    model = ServerModel(cfg, 5, 4, "X", "Y")
    model.apply(Phase.SUFFSTATS, _stats(shards), len(shards))
    start = flat(trainable(model.net)).copy()
    assert model.average is None  # no DP-SGD step yet
    model.apply(Phase.DPSGD, _grad(model, 0.01), 1)
    iterate = flat(trainable(model.net))
    shipped = flat(trainable(model.comparator().net))
    np.testing.assert_allclose(shipped, 0.5 * start + 0.5 * iterate, atol=1e-6)
    assert not np.allclose(shipped, iterate)
    np.testing.assert_array_equal(flat(trainable(model.comparator(last_iterate=True).net)), iterate)
    # the frozen linear part is the start's, in both
    torch.testing.assert_close(model.comparator().net.linear.weight, model.net.linear.weight)


def test_restoring_the_linear_start_drops_the_average() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE, server_ema=0.9)
    shards = _shards()
    model = ServerModel(cfg, 5, 4, "X", "Y")
    model.apply(Phase.SUFFSTATS, _stats(shards), len(shards))
    model.apply(Phase.DPSGD, _grad(model, 0.01), 1)
    model.restore_linear_start()
    assert model.average is None and model.comparator().net is model.net


def test_a_checkpoint_keeps_the_average() -> None:
    cfg = Cfg(dp_mode=DPMode.NONE, linear_start=LinearStart.NONE, server_ema=0.9)
    a = ServerModel(cfg, 5, 4, "X", "Y")
    for _ in range(3):
        a.apply(Phase.DPSGD, _grad(a, 0.01), 1)
    b = ServerModel(replace(cfg, seed=1), 5, 4, "X", "Y")
    b.load_state_dict(a.state_dict())
    assert b.average is not None and b.average.steps == 3
    np.testing.assert_array_equal(flat(trainable(b.comparator().net)), flat(trainable(a.comparator().net)))
    b.apply(Phase.DPSGD, _grad(b, 0.01), 1)
    a.apply(Phase.DPSGD, _grad(a, 0.01), 1)
    np.testing.assert_array_equal(flat(trainable(b.comparator().net)), flat(trainable(a.comparator().net)))

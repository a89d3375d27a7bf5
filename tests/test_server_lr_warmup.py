"""server-lr-warmup: the server's learning rate rises linearly over the first DP-SGD steps, also across a resume."""

from __future__ import annotations

import numpy as np
import pytest
from test_federated_device import Cfg

from fed_nessa.config import ConfigError, DPMode, LinearStart, Phase, from_run_config
from fed_nessa.federated.layout import flat, trainable
from fed_nessa.federated.server_model import ServerModel


def _model(warmup: int) -> ServerModel:
    cfg = Cfg(dp_mode=DPMode.NONE, linear_start=LinearStart.NONE, server_optimizer="sgd", server_lr=1.0,
              server_lr_warmup=warmup)
    return ServerModel(cfg, 5, 4, "X", "Y")


def _grad(model: ServerModel, value: float) -> np.ndarray:
    return np.full(sum(p.numel() for p in trainable(model.net)), value, np.float32)


def test_the_rate_rises_over_the_warmup_then_holds() -> None:
    model = _model(4)
    rates = []
    for _ in range(6):
        rates.append(model.step_lr())
        model.apply(Phase.DPSGD, _grad(model, 0.0), 1)
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert _model(0).step_lr() == 1.0


def _first_step(model: ServerModel, gradients: bool) -> np.ndarray:
    before = flat(trainable(model.net)).astype(np.float64)
    model.apply(Phase.DPSGD, _grad(model, 0.01), 1, gradients=gradients)
    return flat(trainable(model.net)).astype(np.float64) - before


@pytest.mark.parametrize(("gradients", "sign"), [(True, -1.0), (False, 1.0)])
def test_the_first_step_moves_the_weights_by_the_warmed_rate(gradients: bool, sign: float) -> None:
    """A gradient sum through the optimiser (SGD: -lr x the mean gradient at its first step), a delta sum added
    (+lr x the mean delta)."""
    model = _model(4)
    per_device = model.mechanism.gradient_units() if gradients else 1
    warmed, plain = _first_step(model, gradients), _first_step(_model(0), gradients)
    np.testing.assert_allclose(plain, sign * 0.01 / per_device, rtol=1e-3)
    np.testing.assert_allclose(warmed, 0.25 * plain, atol=1e-7)


def test_a_resumed_run_continues_the_schedule() -> None:
    model = _model(4)
    for _ in range(2):
        model.apply(Phase.DPSGD, _grad(model, 0.0), 1)
    resumed = _model(4)
    resumed.load_state_dict(model.state_dict())
    assert resumed.step_lr() == model.step_lr() == pytest.approx(0.75)


@pytest.mark.parametrize("value", [-1, 2_000_000])
def test_config_refuses_a_warmup_out_of_range(value: int) -> None:
    with pytest.raises(ConfigError, match="server-lr-warmup"):
        from_run_config({"server-lr-warmup": value})


def _decaying(warmup: int, rounds: int) -> ServerModel:
    cfg = Cfg(dp_mode=DPMode.NONE, linear_start=LinearStart.NONE, server_optimizer="sgd", server_lr=1.0,
              server_lr_warmup=warmup, server_lr_decay="cosine", num_server_rounds=rounds)
    return ServerModel(cfg, 5, 4, "X", "Y")


def _rates(model: ServerModel, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(model.step_lr())
        model.apply(Phase.DPSGD, _grad(model, 0.0), 1)
    return rates


def test_the_cosine_decay_falls_from_the_full_rate_over_the_scheduled_steps() -> None:
    """S = 4 steps: 0.5 (1 + cos(pi s / 4)), s = 0..3; never zero on a scheduled step."""
    expect = [0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(4)]
    assert _rates(_decaying(0, 4), 4) == pytest.approx(expect)
    assert expect[-1] > 0


def test_the_decay_follows_the_warmup_and_a_resume_continues_it() -> None:
    """Warmup 2 then the cosine over the remaining 4 of 6 steps; a resumed model picks up at its step."""
    model = _decaying(2, 6)
    first = _rates(model, 3)
    resumed = _decaying(2, 6)
    resumed.load_state_dict(model.state_dict())
    rest = _rates(resumed, 3)
    assert first + rest == pytest.approx([0.5, 1.0] + [0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(4)])


def test_config_refuses_an_unknown_decay() -> None:
    with pytest.raises(ConfigError, match="server-lr-decay"):
        from_run_config({"server-lr-decay": "step"})

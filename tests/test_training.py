"""The one training function: plain and DP-SGD paths, empty Poisson batches, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet
from fed_nessa.model.losses import cosine_loss
from fed_nessa.model.training import (
    DPConfig,
    TrainConfig,
    dp_sample_rate,
    dp_steps,
    evaluate_loss,
    noisy_gradient_sum,
    train_local,
)
from fed_nessa.randomness import ReproducibleNoise


def _data(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = l2_normalize(rng.standard_normal((n, 6)))
    x = l2_normalize(np.tanh(y @ rng.standard_normal((6, 5))))
    return x, y


def _net(train_linear: bool = True) -> NessaNet:
    return NessaNet(6, 5, NessaConfig(hidden=8, depth=1, train_linear=train_linear))


def test_plain_training_reduces_loss() -> None:
    x, y = _data()
    net = _net()
    before = evaluate_loss(net, x, y)
    res = train_local(net, x, y, TrainConfig(epochs=30, batch_size=8, lr=1e-2))
    assert evaluate_loss(net, x, y) < before - 0.05
    assert res.steps == 30 * 5 and res.noise_multiplier is None


def test_dp_steps_rate_and_determinism() -> None:
    x, y = _data(n=50)
    cfg = TrainConfig(epochs=2, batch_size=10, seed=3)

    def dp(noise: ReproducibleNoise | None = None) -> DPConfig:
        return DPConfig(noise_multiplier=1.0, max_grad_norm=0.5, noise=noise)

    a, b = _net(), _net()
    ra = train_local(a, x, y, cfg, dp(ReproducibleNoise(3)))  # a fresh stream per run: same seed, same draws
    train_local(b, x, y, cfg, dp(ReproducibleNoise(3)))
    assert (ra.steps, ra.sample_rate, ra.noise_multiplier, ra.max_grad_norm) == (10, 0.2, 1.0, 0.5)
    assert ra.steps == dp_steps(50, 10, 2) and dp_sample_rate(50, 10) == 0.2
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # The default source is the OS CSPRNG: the same seed must NOT give the same noise.
    c, d = _net(), _net()
    train_local(c, x, y, cfg, dp())
    train_local(d, x, y, cfg, dp())
    assert any(not torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


def test_model_is_reusable_after_dp_round() -> None:
    x, y = _data()
    net = _net()
    for _ in range(2):  # Opacus hooks must be removed after each call
        train_local(net, x, y, TrainConfig(epochs=1, batch_size=8), DPConfig(1.0, 1.0))
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())


def test_empty_poisson_batches_still_add_noise() -> None:
    # Targets equal the model's own outputs, so every per-example gradient is exactly zero and each
    # step moves the weights by its noise alone. With q = 1/50 over 50 pairs about 36% of the Poisson
    # batches are empty; if those steps skipped the noise the variance ratio would be ~0.64, not 1.
    _, y = _data(n=50)
    net = NessaNet(6, 5, NessaConfig(hidden=64, depth=1, train_linear=False))
    with torch.no_grad():
        x = net(torch.from_numpy(y)).numpy()
    before = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters() if p.requires_grad])
    res = train_local(net, x, y, TrainConfig(epochs=1, batch_size=1, optimizer="sgd", lr=1.0),
                      DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    after = torch.cat([p.detach().reshape(-1) for p in net.parameters() if p.requires_grad])
    ratio = float(((after - before) ** 2).mean()) / res.steps
    assert res.steps == 50 and res.sample_rate == 0.02
    assert abs(ratio - 1.0) < 0.15, ratio


def test_noisy_gradient_sum_is_exact_without_noise_and_noise_has_right_scale() -> None:
    x, y = _data(n=20)
    net = _net(train_linear=False)
    exact = noisy_gradient_sum(net, x, y, batch_size=20, noise_multiplier=0.0, max_grad_norm=1e6,
                               noise=ReproducibleNoise(0))
    net.zero_grad()
    cosine_loss(net(torch.from_numpy(y)), torch.from_numpy(x)).sum().backward()
    ref = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad]).numpy()
    np.testing.assert_allclose(exact, ref, atol=1e-5)
    noisy = noisy_gradient_sum(net, x, y, batch_size=20, noise_multiplier=2.0, max_grad_norm=0.5,
                               noise=ReproducibleNoise(0))
    clipped = noisy_gradient_sum(net, x, y, batch_size=20, noise_multiplier=0.0, max_grad_norm=0.5,
                                 noise=ReproducibleNoise(0))
    noise = noisy - clipped
    assert abs(noise.std() - 1.0) < 0.15  # sigma * C = 2.0 * 0.5


def test_early_stopping_keeps_start_when_training_hurts() -> None:
    x, y = _data()
    xv, yv = _data(seed=5)
    net = _net()
    start = [p.detach().clone() for p in net.parameters()]
    # A validator that always prefers the start: training must end restored to it.
    calls = []

    def validator(model: torch.nn.Module) -> float:
        calls.append(1)
        return 0.0 if len(calls) == 1 else 1.0

    res = train_local(net, x, y, TrainConfig(epochs=10, batch_size=8, patience=2), val=validator)
    assert res.epochs_run == 2 and res.best_val_loss == 0.0
    for p, s in zip(net.parameters(), start):
        torch.testing.assert_close(p.detach(), s)
    train_local(_net(), x, y, TrainConfig(epochs=2), val=(xv, yv))  # pairs -> loss validator


@pytest.mark.parametrize("kwargs,msg", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                                        ({"optimizer": "rmsprop"}, "optimizer"), ({"loss": "hinge"}, "hinge")])
def test_invalid_train_config(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kwargs)


def test_invalid_dp_config_and_data() -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPConfig(1.0, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPConfig(float("nan"), 1.0)
    with pytest.raises(ValueError, match="same number"):
        train_local(_net(), np.zeros((3, 5), np.float32), np.zeros((2, 6), np.float32), TrainConfig())

"""simulations/fedavg_steps_check.py: the noise-free optimisation check behind issue 22's DP-FedAvg finding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fed_nessa.config import FederationConfig, LinearStart
from fed_nessa.data.synthetic import generate_population
from fed_nessa.federated.layout import flat, trainable
from fed_nessa.model.training import pair_loss
from simulations.fedavg_steps_check import (
    _eer,
    _pooled_grad,
    _start,
    adam_curve,
    centred_arm,
    centred_score,
    clipped_fedavg_adam_curve,
    device_cosines,
    dp_start,
    fedavg_curve,
    fedavg_direction,
    mean_free_arm,
    mean_free_loss,
    mean_pull,
    noisy_fedsgd_curve,
    pair_weights,
    pooled_curve,
    pooled_optimizer,
    residual_shift,
)


def test_the_check_starts_at_the_ridge_fit_and_its_updates_move_only_the_residual() -> None:
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    net = _start(pop, cfg)
    linear = [p.detach().clone() for p in net.parameters() if not p.requires_grad]
    assert linear  # the linear part is frozen after the start
    start = 100 * _eer(net, pop, cfg)[1]
    # a zero server step is no update: every round scores the start
    assert [e for _, e in fedavg_curve(net, pop, 2, 0.0, 0.05, lambda: 100 * _eer(net, pop, cfg)[1], 0)] == [start] * 2
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    before = float(pair_loss(net, x, y, "cosine").mean())
    w0 = flat(trainable(net))
    curve = adam_curve(net, x, y, 60, 1e-3, [0, 60], lambda: 0.0)
    assert [s for s, _ in curve] == [0, 60]
    assert float(pair_loss(net, x, y, "cosine").mean()) < before  # Adam on the pooled loss lowers it
    assert not np.array_equal(flat(trainable(net)), w0)
    assert all(torch.equal(a, b) for a, b in zip([p for p in net.parameters() if not p.requires_grad], linear,
                                                 strict=True))  # the linear part is untouched


def test_pair_weights_cap_at_the_statistics_pairs_and_the_cosines_are_of_the_pooled_gradient() -> None:
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    n = np.array([d.n for d in pop.devices])
    w = pair_weights(pop, 50)
    assert np.allclose(w, np.minimum(n, 50) / 50) and w.max() <= 1.0  # <= 1: the sum's sensitivity stays the clip
    net = _start(pop, cfg)
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    pooled = _pooled_grad(net, x, y)
    cos = device_cosines(net, pop, pooled, 10**6)
    assert set(cos) == {"as is", "clipped", "clipped, pair-weighted"} and all(-1 <= v.cos <= 1 for v in cos.values())
    for v in cos.values():  # along and across are the mean's two components: cos = along / |mean|
        assert v.across >= 0 and v.cos == pytest.approx(v.along / np.hypot(v.along, v.across), rel=1e-6)
    # uncapped pair weights times each device's own mean gradient is the pooled gradient; clipping breaks that, and
    # the as-is mean (equal weights) is not the pooled direction either
    grads = np.stack([_pooled_grad(net, torch.tensor(d.enroll), torch.tensor(d.runtime)) for d in pop.devices])
    assert np.allclose(n @ grads / n.sum(), pooled, atol=1e-6)
    assert cos["as is"].cos < 0.999


def test_pooled_arms_are_parsed_and_record_the_pooled_loss() -> None:
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    net = _start(pop, cfg)
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    adam = pooled_optimizer("adam:0.001:0.01", trainable(net))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["eps"] == 0.01 and adam.defaults["lr"] == 0.001
    sgd = pooled_optimizer("sgdm:0.1", trainable(net))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    for bad in ("adam", "sgdm:0.1:2", "lamb:0.1"):
        with pytest.raises(ValueError, match="expected adam:LR"):
            pooled_optimizer(bad, trainable(net))
    before = float(pair_loss(net, x, y, "cosine").mean())
    curve = pooled_curve(net, x, y, 5, pooled_optimizer("sgdm:0.01", trainable(net)), [0, 5], lambda: 1.0)
    assert [s for s, _, _ in curve] == [0, 5] and curve[0][1] == pytest.approx(before, rel=1e-6)
    assert curve[1][1] == pytest.approx(float(pair_loss(net, x, y, "cosine").mean()), rel=1e-6)
    assert curve[1][1] < before  # small SGD steps lower the loss they follow
    assert not centred_arm("adam:0.001") and centred_arm("adam:0.001+centred")
    assert isinstance(pooled_optimizer("adam:0.001+centred", trainable(net)), torch.optim.Adam)
    other = torch.tensor(np.concatenate([d.runtime for d in generate_population(4, seed=2).devices]))
    pooled_curve(net, x, y, 2, pooled_optimizer("adam:0.001", trainable(net)), [], lambda: 1.0, centre_on=other)
    assert residual_shift(net, other).common == pytest.approx(0.0, abs=1e-5)  # no common shift left on them
    assert residual_shift(net, y).residual > 0  # the residual still moved


def test_the_residual_shift_splits_the_residual_and_centring_restores_the_net() -> None:
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    net = _start(pop, cfg)
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    zero = residual_shift(net, y)
    assert zero.linear > 0 and zero.residual == zero.common == zero.varying == 0.0  # the output layer starts at 0
    with torch.no_grad():
        net.residual[-1].bias.add_(0.3)  # a pure common shift: every output moves by the same vector
    shifted = residual_shift(net, y)
    assert shifted.common == pytest.approx(0.3 * np.sqrt(net.residual[-1].bias.numel()), rel=1e-5)
    assert shifted.varying == pytest.approx(0.0, abs=1e-5) and shifted.residual == pytest.approx(shifted.common)
    w = flat(trainable(net))
    seen: list[float] = []
    centred_score(net, y, lambda: seen.append(residual_shift(net, y).common) or 0.0)
    assert seen == [pytest.approx(0.0, abs=1e-5)] and np.array_equal(flat(trainable(net)), w)  # restored after


def test_clipped_fedavg_with_server_adam_moves_only_with_weight() -> None:
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    net = _start(pop, cfg)
    w0 = flat(trainable(net))
    zero = np.zeros(len(pop.devices))
    assert [r for r, _ in clipped_fedavg_adam_curve(net, pop, 3, 1e-3, 0.05, 0.1, zero, [0, 3], lambda: 0.0, 0)] \
        == [0, 3]
    assert np.array_equal(flat(trainable(net)), w0)  # weight 0 everywhere: a zero gradient, no Adam step
    clipped_fedavg_adam_curve(net, pop, 2, 1e-3, 0.05, 0.1, pair_weights(pop, 100), [], lambda: 0.0, 0)
    moved = flat(trainable(net)) - w0
    # each of Adam's first steps moves a weight by about its learning rate, whatever the gradient's size
    assert 0 < np.abs(moved).max() <= 2 * 1.5e-3


def test_the_fedavg_direction_is_the_clipped_gradients_at_a_vanishing_local_step() -> None:
    """One local epoch at a tiny step only sums each device's minibatch gradients at the start: with whole
    minibatches (every device trimmed to a multiple of 16 pairs) that sum is 1/16 of the device's mean gradient times
    its pairs, so the clipped mean points where the clipped gradients' mean points; a real step moves it away."""
    full = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    whole = [replace(d, enroll=d.enroll[:k], runtime=d.runtime[:k], speaker=d.speaker[:k])
             for d in full.devices if (k := 16 * (d.n // 16)) > 0]
    pop = replace(full, devices=whole)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    net = _start(pop, cfg)
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    pooled = _pooled_grad(net, x, y)
    clipped = device_cosines(net, pop, pooled, 10**6)["clipped"]
    tiny = fedavg_direction(net, pop, pooled, 1e-6, seed=1)
    assert tiny.cos == pytest.approx(clipped.cos, abs=1e-3)
    assert tiny.along == pytest.approx(clipped.along, abs=1e-3)
    assert tiny.across == pytest.approx(clipped.across, abs=1e-3)
    moved = fedavg_direction(net, pop, pooled, 0.5, seed=1)
    assert abs(moved.cos - clipped.cos) > 1e-2


def test_the_dp_start_is_the_ridge_start_without_noise_and_moves_with_it() -> None:
    """At a vanishing statistics noise the DP linear start is the ridge fit of the device-level weighted statistics
    (with the cap at the largest device's pairs, the ridge fit of every pair); noise moves it."""
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cap = max(d.n for d in pop.devices)  # every device's statistics at weight 1, the sensitivity at this cap's
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1, device_stats_pairs=cap)
    ridge = _start(pop, cfg)
    quiet, noisy = dp_start(pop, cfg, 1e-12, seed=1), dp_start(pop, cfg, 1.0, seed=1)
    assert torch.allclose(quiet.linear.weight, ridge.linear.weight, atol=1e-4)
    assert torch.allclose(quiet.linear.bias, ridge.linear.bias, atol=1e-4)
    assert not torch.allclose(noisy.linear.weight, ridge.linear.weight, atol=1e-2)
    assert all(not p.requires_grad for p in noisy.linear.parameters())  # frozen, as after the product's start


def test_the_mean_free_loss_is_the_cosine_loss_about_a_centre_and_its_arms_parse() -> None:
    """About a zero centre it is the plain cosine loss; about the enrollment mean, moving every mapped embedding
    toward that mean, which lowers the plain loss at a noisy (DP) linear start, does not lower it."""
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    net = dp_start(pop, cfg, 0.02, seed=1)
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    zero = torch.zeros(x.shape[1])
    assert float(mean_free_loss(net, x, y, zero)) == pytest.approx(float(pair_loss(net, x, y, "cosine").mean()))
    mu = x.mean(0)
    with torch.no_grad():
        plain0, free0 = float(pair_loss(net, x, y, "cosine").mean()), float(mean_free_loss(net, x, y, mu))
        net.residual[-1].bias.add_(0.3 * mu)  # every output moves toward the enrollment mean
        plain1, free1 = float(pair_loss(net, x, y, "cosine").mean()), float(mean_free_loss(net, x, y, mu))
    assert plain1 < plain0  # the plain loss rewards the shift toward the mean...
    assert free1 > free0  # ...the mean-free loss does not
    assert mean_free_arm("adam:0.001+meanfree") and mean_free_arm("adam:0.001+centred+meanfree")
    assert centred_arm("adam:0.001+centred+meanfree") and not centred_arm("adam:0.001+meanfree")
    assert isinstance(pooled_optimizer("adam:0.001+centred+meanfree", trainable(net)), torch.optim.Adam)


def test_noisy_fedsgd_follows_the_loss_it_is_given() -> None:
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    ends = []
    for centre in (None, x.mean(0)):
        net = _start(pop, cfg)
        rows = noisy_fedsgd_curve(net, pop, 3, torch.optim.Adam(trainable(net), lr=1e-3), 0.0, [0, 3],
                                  lambda: 0.0, y, None, seed=1, loss_centre=centre)
        assert [r[0] for r in rows] == [0, 3] and rows[0][2].residual == 0.0 and rows[1][2].residual > 0.0
        ends.append(flat(trainable(net)))
    assert not np.allclose(ends[0], ends[1])


def test_a_noisy_linear_start_pulls_every_output_toward_the_mean_enrollment_embedding() -> None:
    """At the ridge fit the loss's descent has almost no part common to every pair; at a noisy (DP) start it has
    one, along the mean enrollment embedding, and the mapped embeddings are longer and less aligned."""
    pop = generate_population(12, seed=1, eval_speakers=20, eval_utterances=6)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=1)
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    ridge, noisy = mean_pull(_start(pop, cfg), x, y), mean_pull(dp_start(pop, cfg, 0.02, seed=1), x, y)
    assert ridge.common < 0.05 < noisy.common and noisy.cos_mean > 0.9
    assert noisy.output_norm > ridge.output_norm and noisy.pair_cos < ridge.pair_cos

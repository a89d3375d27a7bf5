"""simulations/fedavg_steps_check.py: the noise-free optimisation check behind issue 22's DP-FedAvg finding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fed_nessa.config import FederationConfig, LinearStart
from fed_nessa.data.synthetic import generate_population
from fed_nessa.federated.layout import flat, trainable
from fed_nessa.model.training import pair_loss
from simulations.fedavg_steps_check import _eer, _start, adam_curve, fedavg_curve


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

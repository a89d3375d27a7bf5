"""The global aligner's layout: every party builds the same network and flattens it the same way."""

from __future__ import annotations

import numpy as np
import pytest

from fed_nessa.config import FederationConfig, LinearStart
from fed_nessa.federated.layout import build_net, flat, load_flat, nessa_config, trainable


def _cfg(**changes: object) -> FederationConfig:
    return FederationConfig().replace(**{"hidden": 8, "depth": 1, **changes})


def test_every_party_builds_the_same_network_from_the_run_config() -> None:
    cfg = _cfg()
    a, b = build_net(cfg, 5, 4), build_net(cfg, 5, 4)
    np.testing.assert_array_equal(flat(list(a.parameters())), flat(list(b.parameters())))
    other = build_net(cfg.replace(seed=1), 5, 4)
    assert not np.array_equal(flat(list(a.parameters())), flat(list(other.parameters())))


def test_the_linear_part_is_frozen_after_a_private_linear_start() -> None:
    assert not nessa_config(_cfg(linear_start=LinearStart.SUFFSTATS)).train_linear
    assert nessa_config(_cfg(linear_start=LinearStart.NONE)).train_linear
    frozen = build_net(_cfg(linear_start=LinearStart.SUFFSTATS), 5, 4)
    learned = build_net(_cfg(linear_start=LinearStart.NONE), 5, 4)
    assert len(flat(trainable(frozen))) < len(flat(trainable(learned))) == len(flat(list(learned.parameters())))


def test_flat_and_load_flat_round_trip_and_check_the_length() -> None:
    net = build_net(_cfg(), 5, 4)
    params = list(net.parameters())
    vec = np.arange(len(flat(params)), dtype=np.float32) / 100
    load_flat(params, vec)
    np.testing.assert_array_equal(flat(params), vec)
    assert flat(params).dtype == np.float32
    with pytest.raises(ValueError, match="global model vector has 3 values"):
        load_flat(params, np.zeros(3, np.float32))
    assert flat([]).shape == (0,)

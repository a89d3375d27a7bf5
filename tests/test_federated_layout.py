"""The global aligner's layout: every party builds the same network and flattens it the same way."""

from __future__ import annotations

from pathlib import Path

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


def test_the_network_is_looked_up_by_aligner_name_default_nessa(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from fed_nessa.federated import layout
    from fed_nessa.model.aligners import federated
    from fed_nessa.model.aligners.nessa import NessaNet
    from fed_nessa.model.aligners.network import Architecture, FederatedNet

    assert federated.DEFAULT_FEDERATED_ALIGNER == "nessa"
    assert type(build_net(_cfg(), 5, 4)) is NessaNet
    assert "NessaNet" not in Path(layout.__file__).read_text(encoding="utf-8")

    class TinyNet(FederatedNet):
        def __init__(self, d_y: int, d_x: int) -> None:
            super().__init__()
            self.linear = nn.Linear(d_y, d_x)

        @classmethod
        def from_architecture(cls, d_y: int, d_x: int, arch: Architecture, seed: int) -> TinyNet:
            return cls(d_y, d_x)

        def set_linear(self, W: np.ndarray, b: np.ndarray) -> None:
            raise NotImplementedError

        def set_linear_trainable(self, flag: bool) -> None:
            self.linear.requires_grad_(flag)

    monkeypatch.setitem(federated.FEDERATED_ALIGNERS, "tiny", TinyNet)  # a new aligner: one registry line
    net = build_net(_cfg(), 5, 4, aligner="tiny")
    assert isinstance(net, TinyNet) and len(flat(trainable(net))) == 4 * 5 + 5
    with pytest.raises(ValueError, match=r"no federated aligner 'ridge'; choose one of \['nessa', 'tiny'\]"):
        build_net(_cfg(), 5, 4, aligner="ridge")


def test_a_federated_network_must_implement_the_linear_start() -> None:
    from fed_nessa.model.aligners.network import FederatedNet

    class Incomplete(FederatedNet):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]

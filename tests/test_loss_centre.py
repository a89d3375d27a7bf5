"""The loss about a centre (``loss-centre``): the moved net's gradients, the centre from the released statistics,
its round config, the device's checks, and the fleet engine's device vectors against a direct computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fed_nessa.config import ConfigError, DevicePolicy, Phase, ReplyStatus, from_run_config
from fed_nessa.data.shards import make_shard
from fed_nessa.federated import suffstats
from fed_nessa.federated.device import RoundRequest, client_round, plan_round, round_net
from fed_nessa.federated.layout import build_net, flat, trainable
from fed_nessa.federated.protocol import LOSS_CENTRE_KEY, request_centre, with_centre
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet
from fed_nessa.model.centre import about_centre, centred, centred_targets, check_centre
from fed_nessa.model.losses import cosine_loss
from fed_nessa.privacy.ledger import DeviceLedger, config_sha256

D_X, D_Y = 6, 5


def _net(train_linear: bool) -> NessaNet:
    """A small NESSA net with every part non-zero (the residual's last layer too), so every gradient moves."""
    net = NessaNet(D_Y, D_X, NessaConfig(hidden=8, train_linear=train_linear), seed=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net


def _pairs(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_X, generator=g) + 0.8, torch.randn(n, D_Y, generator=g)


def _mean_free(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The loss about the centre written out: ``1 - cos(f(y) - mu, x / |x| - mu)``, pair by pair."""
    return 1.0 - F.cosine_similarity(net(y) - centre, F.normalize(x, dim=-1) - centre, dim=-1)


@pytest.mark.parametrize("train_linear", [False, True])
def test_the_moved_net_gives_the_gradient_of_the_loss_about_the_centre(train_linear: bool) -> None:
    net, (x, y) = _net(train_linear), _pairs()
    centre = F.normalize(x, dim=-1).mean(0)
    moved, targets = centred(net, x, centre.numpy())
    got = torch.autograd.grad(cosine_loss(moved(y), targets).sum(), trainable(moved))
    want = torch.autograd.grad(_mean_free(net, x, y, centre).sum(), trainable(net))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = torch.autograd.grad(cosine_loss(net(y), x).sum(), trainable(net))
    assert max(float((a - b).abs().max()) for a, b in zip(got, plain, strict=True)) > 1e-3
    # the served net is untouched, and the moved one is the served one minus the centre
    assert moved is not net and torch.equal(net.linear.bias + 0, _net(train_linear).linear.bias)
    torch.testing.assert_close(moved(y), net(y) - centre)


def test_without_a_centre_nothing_moves() -> None:
    net, (x, _y) = _net(False), _pairs()
    got_net, got_x = centred(net, x, None)
    assert got_net is net and got_x is x


def test_centred_targets_agree_for_arrays_and_tensors() -> None:
    x, _ = _pairs()
    centre = np.linspace(-0.2, 0.2, D_X)
    np.testing.assert_allclose(centred_targets(x.numpy(), centre), centred_targets(x, centre).numpy(), atol=1e-6)
    assert centred_targets(x.numpy(), centre).dtype == np.float32


def test_a_bad_centre_or_net_is_refused_with_the_reason() -> None:
    assert check_centre(np.zeros(D_X), D_X) is None
    assert "shape (5,), the enrollment embeddings have 6 dimensions" in str(check_centre(np.zeros(5), D_X))
    assert "NaN or Inf" in str(check_centre(np.array([0.0] * 5 + [np.nan]), D_X))
    with pytest.raises(ValueError, match="NaN or Inf"):
        about_centre(_net(False), np.full(D_X, np.inf))
    with pytest.raises(ValueError, match="Linear has none"):
        about_centre(torch.nn.Linear(D_Y, D_X), np.zeros(D_X))


# -- the centre from the released statistics ----------------------------------------------------
def test_the_statistics_give_the_mean_unit_enrollment_embedding() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, D_X)) + 0.5, rng.normal(size=(40, D_Y))
    gram, cross = suffstats.unpack(suffstats.device_vector(x, y), D_X, D_Y)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(suffstats.enrollment_mean(gram, cross), unit.mean(0), atol=1e-12)
    gram[-1, -1] = -1.0  # noise that leaves no pairs
    with pytest.raises(ValueError, match="count -2 pairs"):
        suffstats.enrollment_mean(gram, cross)


def _cfg(**over: Any) -> Any:
    return from_run_config({"num-devices": 4, "hidden": 8, "dp-mode": "none", "min-arrivals": 2,
                            "secagg-num-shares": 3, "secagg-reconstruction-threshold": 2, **over})


def test_the_server_states_the_released_mean_in_dp_sgd_rounds_only() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, D_X)), rng.normal(size=(30, D_Y))
    model = ServerModel(_cfg(**{"loss-centre": "enrollment-mean"}), D_X, D_Y, "e", "r")
    with pytest.raises(ValueError, match="no statistics round has landed"):
        model.loss_centre(Phase.DPSGD)
    model.apply(Phase.SUFFSTATS, suffstats.device_vector(x, y), 1)
    assert model.loss_centre(Phase.SUFFSTATS) is None
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = model.loss_centre(Phase.DPSGD)
    assert got is not None
    np.testing.assert_allclose(got, unit.mean(0), atol=1e-9)
    plain = ServerModel(_cfg(), D_X, D_Y, "e", "r")
    plain.apply(Phase.SUFFSTATS, suffstats.device_vector(x, y), 1)
    assert plain.loss_centre(Phase.DPSGD) is None


def test_the_config_checks_the_centre() -> None:
    assert _cfg().loss_centre == "none"
    with pytest.raises(ConfigError, match="loss-centre = 'median': allowed values none, enrollment-mean"):
        _cfg(**{"loss-centre": "median"})
    with pytest.raises(ConfigError, match="loss-centre = 'enrollment-mean' takes the mean from the released"):
        _cfg(**{"loss-centre": "enrollment-mean", "linear-start": "none"})


# -- the round config --------------------------------------------------------------------------
def test_the_round_config_carries_the_centre_exactly_as_bytes() -> None:
    centre = np.array([0.1, -0.25, 1 / 3])
    config = with_centre({"round": 2}, centre)
    assert isinstance(config[LOSS_CENTRE_KEY], bytes)
    np.testing.assert_array_equal(request_centre(config), centre)
    assert with_centre({"round": 2}, None) == {"round": 2} and request_centre({"round": 2}) is None
    assert config_sha256(config) != config_sha256(with_centre({"round": 2}, centre + 1e-12))
    for bad in ([0.1, 0.2], b"\x00" * 7):
        with pytest.raises(ValueError, match="is not float64 bytes"):
            request_centre({LOSS_CENTRE_KEY: bad})


# -- the device ------------------------------------------------------------------------------
POLICY = DevicePolicy(allow_non_dp=True)


def _shard(seed: int = 4) -> Any:
    rng = np.random.default_rng(seed)
    return make_shard(rng.normal(size=(9, D_X)) + 0.4, rng.normal(size=(9, D_Y)), np.zeros(9), "e", "r")


def test_a_device_declines_a_centre_that_does_not_fit_its_shard(tmp_path: Path) -> None:
    cfg = _cfg(**{"loss-centre": "enrollment-mean", "privacy-unit": "device", "device-batch": 0})
    ledger = DeviceLedger.open(tmp_path / "dev", "device-00000")
    for centre, why in (((0.0,) * (D_X - 1), "the loss centre has shape (5,)"),
                        ((float("nan"),) * D_X, "NaN or Inf")):
        req = RoundRequest(Phase.DPSGD, 2, 2, 4, centre=centre)
        for outcome in (plan_round(req, _shard(), cfg, ledger, POLICY),
                        client_round(req, _shard(), np.zeros(1, np.float32), cfg, ledger, POLICY)):
            assert outcome.status == ReplyStatus.DECLINED and why in str(outcome.metrics["reason"])
    assert ledger.epsilon(POLICY.delta) == 0.0  # nothing reserved, nothing spent


def test_a_devices_fedsgd_vector_is_its_clipped_mean_free_gradient(tmp_path: Path) -> None:
    """Device level, FedSGD over all pairs, no DP: the vector the device sends is the mean gradient of the loss
    about the round's centre, written out here, clipped to the device clip."""
    cfg = _cfg(**{"loss-centre": "enrollment-mean", "privacy-unit": "device", "device-batch": 0,
                  "device-clip-norm": 1e3})
    shard, centre = _shard(), np.linspace(0.05, 0.3, D_X)
    served = build_net(cfg, D_X, D_Y)
    with torch.no_grad():
        for p in served.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    vector = flat(list(served.parameters()))
    ledger = DeviceLedger.open(tmp_path / "dev", "device-00000")
    req = RoundRequest(Phase.DPSGD, 2, 2, 4, centre=tuple(centre.tolist()))
    out = client_round(req, shard, vector, cfg, ledger, POLICY)
    assert out.status == ReplyStatus.OK and out.vector is not None
    x, y = torch.from_numpy(shard.enroll), torch.from_numpy(shard.runtime)
    grads = torch.autograd.grad(_mean_free(served, x, y, torch.as_tensor(centre, dtype=torch.float32)).mean(),
                                trainable(served))
    np.testing.assert_allclose(out.vector, torch.cat([g.reshape(-1) for g in grads]).numpy(), rtol=1e-4, atol=1e-6)
    moved, centred_shard = round_net(req, cfg, shard, vector)
    np.testing.assert_allclose(flat(list(served.parameters())), vector)  # the global model as received is kept
    assert not np.allclose(centred_shard.enroll, shard.enroll)


# -- the fleet engine --------------------------------------------------------------------------
def test_the_fleet_engines_device_vectors_are_the_mean_free_gradients(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact numerics, device-level FedSGD over all pairs, no DP (so unclipped): each device's vector is its own
    mean gradient of the loss about the round's centre, computed here from the formula."""
    from fed_nessa.data.registry import load_federation_data
    from fed_nessa.sim.fleet import FleetEngine

    monkeypatch.setenv("FED_NESSA_KEY_STORE", str(tmp_path / "keys"))
    cfg = from_run_config({"num-devices": 6, "num-server-rounds": 2, "min-arrivals": 4, "secagg-num-shares": 3,
                           "secagg-reconstruction-threshold": 2, "privacy-unit": "device", "dp-mode": "none",
                           "device-update": "fedsgd", "device-batch": 0,
                           "fleet-numerics": "exact", "aligner": "nessa", "hidden": 8, "eval-speakers": 20,
                           "validation-speakers": 20, "references": False, "loss-centre": "enrollment-mean",
                           "run-dir": str(tmp_path / "run")})
    engine = FleetEngine(cfg, DevicePolicy(privacy_unit="device", allow_non_dp=True),
                         load_federation_data(cfg, None))
    net = engine.model.net
    with torch.no_grad():
        for p in trainable(net):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    centre = np.asarray(engine.fleet.x[:50].mean(0), np.float64)
    engine._centre = centre
    arrived = list(range(6))
    got = engine._device_vectors(arrived, engine.book, 2)
    engine._centre = None
    plain = engine._device_vectors(arrived, engine.book, 2)
    mu = torch.as_tensor(centre, dtype=torch.float32)
    for i, vec in zip(arrived, got, strict=True):
        rows = slice(int(engine.fleet.starts[i]), int(engine.fleet.starts[i + 1]))
        grads = torch.autograd.grad(_mean_free(net, engine.fleet.x[rows], engine.fleet.y[rows], mu).mean(),
                                    trainable(net))
        want = torch.cat([g.reshape(-1) for g in grads]).double()
        np.testing.assert_allclose(vec, want.numpy(), rtol=1e-3, atol=1e-6)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, plain, strict=True)) > 1e-4

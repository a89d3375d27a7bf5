"""The device side of a round (the privacy boundary): events, declines, noise shares, the policy.

Every request the server makes is checked against the device's own policy (fixed in its
ledger header at first open) and budget; noise comes from the OS CSPRNG and noise shares
are sized from the device's own ``g``, never from the server's promise.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fed_nessa.config import DevicePolicy, DPMode, FederationConfig, LinearStart, Phase, ReplyStatus
from fed_nessa.data.shards import Shard, make_shard
from fed_nessa.federated import suffstats
from fed_nessa.federated.device import (
    RoundRequest,
    client_round,
    plan_round,
    planned_event,
    policy_refusal,
    share_std,
    suffstats_vector,
)
from fed_nessa.federated.layout import build_net, load_flat
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.training import noisy_gradient_sum
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.randomness import REPRODUCIBLE_WARNING, ReproducibleNoise

# The real, validated config with small test-sized values; the continuous Gaussian share (its own maths:
# calibration, payload bounds; the integer mechanism's are tests/test_skellam_*.py).
_TEST_DEFAULTS = dict(num_server_rounds=3, batch_size=8, lr=0.01, server_lr=1.0, noise_multiplier=1.0,
                      min_arrivals=4, hidden=8, depth=1, dp_mode=DPMode.DISTRIBUTED, distributed_mechanism="gaussian",
                      linear_start=LinearStart.SUFFSTATS)
#: A device whose policy matches the test config: g = 4 = min-arrivals, a roomy budget.
POLICY = DevicePolicy(epsilon_budget=8.0, guaranteed_arrivals=4)
NON_DP = replace(POLICY, allow_non_dp=True)
#: A test device that allows noise from the public seed (reproducible-noise runs only).
REPLAY = replace(POLICY, allow_reproducible_noise=True)


def Cfg(**changes: object) -> FederationConfig:  # noqa: N802 - reads like the dataclass it builds
    return FederationConfig().replace(**{**_TEST_DEFAULTS, **changes})


#: Devices in the test federation (public; with sample-rate = 0 it does not change q or the sigmas).
FLEET = 4


def req(phase: Phase = Phase.DPSGD, round_num: int = 1, promised: int = 4, fleet: int = FLEET) -> RoundRequest:
    return RoundRequest(phase, round_num, promised, fleet)


def _shards(k: int = 4, n: int = 30, dx: int = 5, dy: int = 4, seed: int = 0) -> list[Shard]:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((dy, dx))
    out = []
    for _ in range(k):
        y = l2_normalize(rng.standard_normal((n, dy)))
        x = l2_normalize(np.tanh(y @ A) + 0.05 * rng.standard_normal((n, dx)))
        out.append(make_shard(x, y, np.arange(n) % 3, "X", "Y"))
    return out


def _model(cfg: FederationConfig) -> np.ndarray:
    """The global model vector every test device (d_x 5, d_y 4) receives."""
    return ServerModel(cfg, 5, 4, "X", "Y").vector()


def _ledger(folder: Path, device_id: str = "d", policy: DevicePolicy = POLICY) -> DeviceLedger:
    return DeviceLedger.open(folder, device_id, policy=policy)


# ----------------------------------------------------------------------------- events and rounds
def test_suffstats_sensitivity_bound() -> None:
    s = _shards(1)[0]
    full = suffstats_vector(s)
    minus_one = suffstats_vector(make_shard(s.enroll[1:], s.runtime[1:], s.speaker[1:], "X", "Y"))
    assert np.linalg.norm(full - minus_one) <= suffstats.SENSITIVITY + 1e-9


def test_planned_events() -> None:
    cfg = Cfg()
    policy = replace(POLICY, delta=1e-6)
    e = planned_event(req(Phase.SUFFSTATS, 1), 30, cfg, policy)
    assert (e.mechanism, e.steps, e.sample_rate, e.clip_norm) == ("gaussian-sum", 1, 1.0, suffstats.SENSITIVITY)
    assert e.delta == 1e-6  # the device's own delta, not the run-config's
    d = planned_event(req(Phase.DPSGD, 2), 40, cfg, policy)
    assert (d.mechanism, d.steps, d.sample_rate, d.mode) == ("dp-sgd", 1, 0.2, "distributed")
    assert "g = 4" in d.note
    loc = planned_event(req(Phase.DPSGD, 2), 40, cfg.replace(dp_mode=DPMode.LOCAL, local_epochs=2), policy)
    assert (loc.steps, loc.mode) == (10, "local")
    assert planned_event(req(Phase.DPSGD, 2), 40, cfg.replace(dp_mode=DPMode.NONE), policy) is None
    # A device-local sample-rate: scaled by fleet / cohort (both public), whatever the device's n.
    sampled = cfg.replace(sample_rate=0.05, clients_per_round=100)
    assert planned_event(req(Phase.DPSGD, 2, fleet=1000), 40, sampled, policy).sample_rate == pytest.approx(0.5)
    assert planned_event(req(Phase.DPSGD, 2), 40, sampled, policy).sample_rate == pytest.approx(0.05)


@pytest.mark.parametrize("mode", [DPMode.LOCAL, DPMode.DISTRIBUTED])
def test_dpsgd_round_records_and_moves_model(tmp_path: Path, mode: DPMode) -> None:
    cfg = Cfg(dp_mode=mode, linear_start=LinearStart.NONE)
    shards = _shards()
    model = ServerModel(cfg, 5, 4, "X", "Y")
    start = model.vector().copy()
    vecs = []
    for i, s in enumerate(shards):
        ledger = _ledger(tmp_path / f"d{i}", f"d{i}")
        out = client_round(req(), s, start, cfg, ledger, POLICY)
        assert out.status == ReplyStatus.OK and out.vector.dtype == np.float32
        assert out.metrics["epsilon_spent"] > 0 and len(ledger.events()) == 1 and not ledger.pending()
        assert out.metrics["noise_arrivals"] == POLICY.guaranteed_arrivals
        if mode == DPMode.LOCAL:
            assert np.linalg.norm(out.vector) <= cfg.update_clip + 1e-5
        assert np.abs(out.vector).max() <= model.payload_bound(Phase.DPSGD, noise_plan(cfg, FLEET))
        vecs.append(out.vector)
    model.apply(Phase.DPSGD, np.sum(vecs, axis=0), len(vecs))
    assert not np.allclose(model.vector(), start)


def test_non_dp_statistics_are_the_exact_vector(tmp_path: Path) -> None:
    cfg = Cfg(dp_mode=DPMode.NONE)
    s = _shards(1)[0]
    ledger = _ledger(tmp_path, policy=NON_DP)
    out = client_round(req(Phase.SUFFSTATS), s, _model(cfg), cfg, ledger, NON_DP)
    assert out.status == ReplyStatus.OK
    np.testing.assert_array_equal(out.vector, suffstats_vector(s).astype(np.float32))
    assert ledger.events() == [] and out.metrics["epsilon_spent"] == 0.0


def test_device_declines_over_budget(tmp_path: Path) -> None:
    cfg = Cfg(dp_mode=DPMode.LOCAL, linear_start=LinearStart.NONE, epsilon_budget=1.0, noise_multiplier=0.5,
              local_epochs=3)
    s = _shards(1)[0]
    policy = replace(POLICY, epsilon_budget=1.0)
    ledger = _ledger(tmp_path, policy=policy)
    out = client_round(req(), s, ServerModel(cfg, 5, 4, "X", "Y").vector(), cfg, ledger, policy)
    assert out.status == ReplyStatus.DECLINED and out.vector is None
    assert "budget" in str(out.metrics["reason"]).lower()
    assert ledger.events() == []
    assert plan_round(req(), s, cfg, ledger, policy).status == ReplyStatus.DECLINED


def test_failure_is_still_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mechanism that fails after its reservation is closed as failed, and still counted."""
    import fed_nessa.federated.device as device

    cfg = Cfg(dp_mode=DPMode.LOCAL, linear_start=LinearStart.NONE)
    s = _shards(1)[0]
    ledger = _ledger(tmp_path)

    def broken(*args: object, **kwargs: object) -> np.ndarray:
        raise ValueError("the mechanism failed mid-round")

    monkeypatch.setattr(device, "_compute", broken)
    with pytest.raises(ValueError, match="mechanism failed"):
        client_round(req(), s, _model(cfg), cfg, ledger, POLICY)
    assert len(ledger.events()) == 1 and not ledger.pending()  # spent conservatively, closed as failed
    assert ledger.entries()[-1]["payload"]["status"] == "failed"


def _dpsgd_noise(tmp_path: Path, cfg: FederationConfig, policy: DevicePolicy, promised: int) -> np.ndarray:
    """The noise share in one distributed DP-SGD vector: the device's vector (reproducible stream)
    minus the clipped-gradient sum of the same Poisson sample (the same stream, no noise)."""
    s = _shards(1)[0]
    cfg = cfg.replace(reproducible_noise=True)
    policy = replace(policy, allow_reproducible_noise=True)
    vector = ServerModel(cfg, 5, 4, "X", "Y").vector()
    noisy = client_round(req(promised=promised), s, vector, cfg, _ledger(tmp_path, "d", policy), policy).vector
    net = build_net(cfg, 5, 4)
    load_flat(list(net.parameters()), vector)
    clipped = noisy_gradient_sum(net, s.enroll, s.runtime, batch_size=cfg.batch_size, noise_multiplier=0.0,
                                 max_grad_norm=cfg.clip_norm, noise=ReproducibleNoise(cfg.seed, "device", "d", 1))
    return (noisy - clipped).astype(np.float64)


def test_distributed_noise_share_is_calibrated(tmp_path: Path) -> None:
    cfg = Cfg(linear_start=LinearStart.NONE, noise_multiplier=2.0, clip_norm=0.5)
    noise = _dpsgd_noise(tmp_path, cfg, POLICY, promised=4)
    assert noise.size > 100
    assert abs(float(np.std(noise)) - 2.0 * 0.5 / math.sqrt(4)) < 0.1  # sigma * C / sqrt(g) = 0.5


# ----------------------------------------------------------------------------- the device's policy
def test_a_reopened_ledger_keeps_its_policy_and_declines_a_raised_budget(tmp_path: Path) -> None:
    """Defect 1: the budget is the device's, fixed in its ledger header at first open.

    A later node config (a re-deployed device) or run-config raising the budget changes
    nothing: the header's policy is restored and the device declines once its own budget is
    spent. (c5b415a opened the ledger without a budget and took it from each run's config.)
    """
    cfg = Cfg(dp_mode=DPMode.LOCAL, linear_start=LinearStart.NONE, noise_multiplier=2.0, local_epochs=1,
              epsilon_budget=2.2)
    s = _shards(1)[0]
    own = replace(POLICY, epsilon_budget=2.2)  # two rounds of eps ~1.6, ~2.1; a third would be ~2.5
    first = _ledger(tmp_path, policy=own)
    vector = ServerModel(cfg, 5, 4, "X", "Y").vector()
    spent = 0
    while client_round(req(round_num=spent + 1), s, vector, cfg, first, own).status == ReplyStatus.OK:
        spent += 1
    assert spent == 2
    eps = first.epsilon(own.delta)
    raised = replace(own, epsilon_budget=100.0)
    reopened = _ledger(tmp_path, policy=raised)
    assert reopened.policy == own and reopened.budget.epsilon == 2.2  # the header's, not the one passed in
    for asked in (2.2, 100.0):
        out = client_round(req(round_num=spent + 1), s, vector, cfg.replace(epsilon_budget=asked), reopened, raised)
        assert out.status == ReplyStatus.DECLINED and out.vector is None
    assert reopened.epsilon(own.delta) == eps and len(reopened.events()) == spent
    header = reopened.entries()[0]["payload"]
    assert header["policy"]["epsilon_budget"] == 2.2 and header["budget"]["epsilon"] == 2.2


def test_a_larger_budget_in_the_run_config_is_declined_with_the_reason(tmp_path: Path) -> None:
    """Defect 1: the run-config's epsilon-budget/delta are a request that can only tighten the policy."""
    cfg = Cfg(epsilon_budget=20.0)
    s = _shards(1)[0]
    ledger = _ledger(tmp_path)
    out = plan_round(req(Phase.SUFFSTATS), s, cfg, ledger, POLICY)
    assert out.status == ReplyStatus.DECLINED
    assert "epsilon budget 20" in str(out.metrics["reason"]) and "policy (epsilon 8" in str(out.metrics["reason"])
    out = client_round(req(Phase.SUFFSTATS), s, np.zeros(1, np.float32), cfg.replace(delta=1e-4), ledger, POLICY)
    assert out.status == ReplyStatus.DECLINED and "delta" in str(out.metrics["reason"])
    assert ledger.events() == []
    # A smaller request tightens it: accepted while within it, declined beyond it.
    assert plan_round(req(), s, cfg.replace(epsilon_budget=4.0), ledger, POLICY).status == ReplyStatus.OK  # ~3.1
    tight = plan_round(req(Phase.SUFFSTATS), s, cfg.replace(epsilon_budget=4.0), ledger, POLICY)  # ~8.0
    assert tight.status == ReplyStatus.DECLINED and "budget" in str(tight.metrics["reason"])


@pytest.mark.parametrize(("phase", "changes", "fragment"), [
    (Phase.DPSGD, {"noise_multiplier": 0.3},
     "noise multiplier 0.3 in phase dpsgd, below this device's policy minimum 0.5"),
    (Phase.SUFFSTATS, {"suffstats_noise_multiplier": 0.2}, "noise multiplier 0.2 in phase suffstats"),
    (Phase.DPSGD, {"dp_mode": DPMode.NONE}, "dp-mode none"),
])
def test_less_noise_than_the_policy_allows_is_declined(tmp_path: Path, phase: Phase, changes: dict,
                                                       fragment: str) -> None:
    """Defect 1: a run asking less noise (or none) than the device's policy minimum is declined."""
    cfg = Cfg(**changes)
    ledger = _ledger(tmp_path)
    out = client_round(req(phase), _shards(1)[0], ServerModel(cfg, 5, 4, "X", "Y").vector(), cfg, ledger, POLICY)
    assert out.status == ReplyStatus.DECLINED and fragment in str(out.metrics["reason"])
    assert ledger.events() == []


def test_a_promise_of_fewer_arrivals_than_the_policy_g_is_declined(tmp_path: Path) -> None:
    """Defect 1/3: a server promising to unmask sums of fewer devices than the device's g is declined."""
    cfg = Cfg()
    ledger = _ledger(tmp_path, policy=replace(POLICY, guaranteed_arrivals=10))
    out = plan_round(req(promised=9), _shards(1)[0], cfg, ledger, POLICY)
    assert out.status == ReplyStatus.DECLINED
    assert ">= 9 devices, fewer than the g = 10" in str(out.metrics["reason"])
    assert plan_round(req(promised=10), _shards(1)[0], cfg, ledger, POLICY).status == ReplyStatus.OK
    # local DP carries the full noise on the device: the promise does not matter there
    local = Cfg(dp_mode=DPMode.LOCAL)
    assert policy_refusal(req(promised=1), 30, local, replace(POLICY, guaranteed_arrivals=10), ledger) is None


def test_participation_and_payload_limits_of_the_policy(tmp_path: Path) -> None:
    cfg = Cfg()
    s = _shards(1, n=30)[0]
    once = replace(POLICY, max_participations=1)
    ledger = _ledger(tmp_path / "a", policy=once)
    assert client_round(req(Phase.SUFFSTATS), s, _model(cfg), cfg, ledger, once).status == ReplyStatus.OK
    out = plan_round(req(round_num=2), s, cfg, ledger, once)
    assert out.status == ReplyStatus.DECLINED and "policy's limit is 1" in str(out.metrics["reason"])
    small = replace(POLICY, max_pairs_per_payload=29)
    out = plan_round(req(Phase.SUFFSTATS), s, cfg, _ledger(tmp_path / "b", policy=small), small)
    assert out.status == ReplyStatus.DECLINED and "30 pairs" in str(out.metrics["reason"])
    out = plan_round(req(Phase.SUFFSTATS), s, cfg.replace(max_pairs_per_device=10), _ledger(tmp_path / "c"), POLICY)
    assert out.status == ReplyStatus.DECLINED


# ----------------------------------------------------------------------------- where the noise comes from
def _twice(tmp_path: Path, cfg: FederationConfig, phase: Phase) -> tuple[np.ndarray, np.ndarray, list]:
    s = _shards(1)[0]
    vector = ServerModel(cfg, 5, 4, "X", "Y").vector()
    outs, ledgers = [], []
    for name in ("first", "second"):  # the same device id, shard, seed, round: identical inputs
        ledger = _ledger(tmp_path / name, "dev-000", REPLAY)
        outs.append(client_round(req(phase, round_num=3), s, vector, cfg, ledger, REPLAY).vector)
        ledgers.append(ledger)
    return outs[0], outs[1], ledgers


@pytest.mark.parametrize("phase", [Phase.SUFFSTATS, Phase.DPSGD])
def test_noise_cannot_be_recomputed_from_public_inputs(tmp_path: Path, phase: Phase) -> None:
    """Defect 2: the noise comes from the OS CSPRNG, not from (seed, round, shard).

    c5b415a derived every device's noise seed from the run's seed, the round and the
    shard, so anyone knowing them could recompute and subtract the noise: two calls with
    the same inputs gave the same vector. Now they differ, and every ledger event says
    where its noise came from.
    """
    cfg = Cfg(linear_start=LinearStart.NONE if phase == Phase.DPSGD else LinearStart.SUFFSTATS)
    a, b, ledgers = _twice(tmp_path, cfg, phase)
    assert not np.allclose(a, b)
    for ledger in ledgers:
        [event] = ledger.events()
        assert "OS CSPRNG" in event.note and "NO differential-privacy guarantee" not in event.note


@pytest.mark.parametrize("phase", [Phase.SUFFSTATS, Phase.DPSGD])
def test_reproducible_noise_replays_and_says_the_guarantee_does_not_hold(tmp_path: Path, phase: Phase) -> None:
    """Defect 2: only the explicit run key ``reproducible-noise`` replays the noise, and the
    ledger event the device signs says that no DP guarantee holds."""
    cfg = Cfg(linear_start=LinearStart.NONE if phase == Phase.DPSGD else LinearStart.SUFFSTATS,
              reproducible_noise=True)
    a, b, ledgers = _twice(tmp_path, cfg, phase)
    np.testing.assert_array_equal(a, b)
    for ledger in ledgers:
        [event] = ledger.events()
        assert REPRODUCIBLE_WARNING in event.note and "NO differential-privacy guarantee" in event.note
    # another round (or device) is another stream
    other = client_round(req(phase, round_num=4), _shards(1)[0], ServerModel(cfg, 5, 4, "X", "Y").vector(), cfg,
                         _ledger(tmp_path / "third", "dev-000", REPLAY), REPLAY).vector
    assert not np.allclose(a, other)


@pytest.mark.parametrize("phase", [Phase.SUFFSTATS, Phase.DPSGD])
def test_a_device_declines_noise_from_the_public_seed_unless_its_policy_allows_it(tmp_path: Path,
                                                                                 phase: Phase) -> None:
    """Issue 17 item 1: the server's ``reproducible-noise = true`` made every device spend epsilon on noise
    the server could recompute and subtract; a default policy now declines before anything is reserved."""
    cfg = Cfg(linear_start=LinearStart.NONE if phase == Phase.DPSGD else LinearStart.SUFFSTATS,
              reproducible_noise=True)
    ledger = _ledger(tmp_path / "dev")
    out = client_round(req(phase), _shards(1)[0], ServerModel(cfg, 5, 4, "X", "Y").vector(), cfg, ledger, POLICY)
    assert out.status == ReplyStatus.DECLINED and out.vector is None
    reason = str(out.metrics["reason"])
    assert "reproducible noise" in reason and "allow-reproducible-noise" in reason
    assert ledger.events() == []
    assert policy_refusal(req(phase), 30, cfg, REPLAY, ledger) is None
    assert policy_refusal(req(phase), 30, cfg.replace(dp_mode=DPMode.NONE), NON_DP, ledger) is None  # no noise at all


# ----------------------------------------------------------------------------- the noise share is the device's
def test_the_noise_share_uses_the_devices_own_g() -> None:
    cfg = Cfg(noise_multiplier=2.0, clip_norm=0.5)
    r = RoundRequest(Phase.DPSGD, 2, 100, 1000)
    assert share_std(r, cfg, POLICY) == pytest.approx(2.0 * 0.5 / math.sqrt(POLICY.guaranteed_arrivals))
    assert share_std(r, cfg, replace(POLICY, guaranteed_arrivals=100)) == pytest.approx(0.1)
    assert share_std(r, cfg.replace(dp_mode=DPMode.LOCAL), replace(POLICY, guaranteed_arrivals=100)) == 1.0


def test_a_larger_promise_from_the_server_does_not_shrink_the_share(tmp_path: Path) -> None:
    """Defect 3: each device sizes its share from its own policy's g.

    c5b415a sized the share ``sigma / sqrt(g)`` with the g the server computed from the
    cohort, so a server promising a large g could make every device add almost no noise.
    Here the server promises 1000 arrivals; the device's policy says g = 4, and its
    statistics noise has std sigma / sqrt(4), not sigma / sqrt(1000).
    """
    cfg = Cfg(suffstats_noise_multiplier=2.0)
    s = _shards(1, n=30, dx=16, dy=16)[0]
    clean = suffstats_vector(s)
    model16 = ServerModel(cfg, 16, 16, "X", "Y").vector()
    noise = np.concatenate([
        client_round(req(Phase.SUFFSTATS, promised=1000), s, model16, cfg, _ledger(tmp_path / f"d{i}"),
                     POLICY).vector.astype(np.float64) - clean for i in range(4)])
    assert noise.size > 1000
    assert abs(float(np.std(noise)) - 2.0 / math.sqrt(4)) < 0.05  # 1.0; the server's g would give 0.06
    out = client_round(req(Phase.SUFFSTATS, promised=1000), s, model16, cfg, _ledger(tmp_path / "m"), POLICY)
    assert out.metrics["noise_arrivals"] == 4  # what the server's solve is told
    # DP-SGD: the same, through the clipped-gradient sum
    dp = _dpsgd_noise(tmp_path / "sgd", Cfg(linear_start=LinearStart.NONE, noise_multiplier=2.0, clip_norm=0.5),
                      POLICY, promised=1000)
    assert abs(float(np.std(dp)) - 2.0 * 0.5 / math.sqrt(4)) < 0.1


def test_a_shard_that_does_not_fit_the_servers_model_declines_before_spending(tmp_path: Path) -> None:
    """A device whose shard dims do not match the global model declines before its ledger reserves anything."""
    cfg = Cfg()
    ledger = _ledger(tmp_path / "dev")
    out = client_round(req(Phase.SUFFSTATS), _shards(1)[0], np.zeros(7, np.float32), cfg, ledger, POLICY)
    assert out.status == ReplyStatus.DECLINED and "server's model has 7 values" in str(out.metrics["reason"])
    assert ledger.events() == []

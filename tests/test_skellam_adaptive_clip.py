"""Adaptive clipping to a private quantile under ``distributed-mechanism = skellam`` (issues 19 and 22).

The device's DP-FedAvg delta and its centred clip bit travel as ONE vector through the integer mechanism
(the bit scaled so both carry one noise std, :func:`fed_nessa.privacy.skellam.joint_l2_clip`), rescaled by
the round's clip so the integer mechanism is the same every round; the server decodes the noisy bit sum
and moves the clip as under the Gaussian.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_skellam_round import _fleet_stats_cfg

from fed_nessa.config import DevicePolicy, Phase, from_run_config
from fed_nessa.federated import skellam_mechanism
from fed_nessa.federated.device import RoundRequest, integer_params, planned_event
from fed_nessa.federated.mechanism import BIT_SENSITIVITY, mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.privacy.accountants.rdp import rdp_to_epsilon
from fed_nessa.privacy.accounting import compute_epsilon
from fed_nessa.privacy.events import SKELLAM, SKELLAM_BIT_FIELD, DPEvent, EventError
from fed_nessa.privacy.ledger import DeviceLedger
from fed_nessa.privacy.skellam import SKELLAM_ORDERS, integer_l1_bound, joint_l2_clip, rounded_l2_norm_bound

torch.set_num_threads(1)
#: The fleet tests' adaptive clip: a count noise of 0.5 x 12 devices (z_b = 12) well above the round's 1.5.
ADAPTIVE = {"device-update": "fedavg", "local-epochs": 2, "local-batch": 3, "local-lr": 0.5,
            "clip-target-quantile": 0.5, "clip-count-noise": 0.5, "clip-lr": 0.5, "device-clip-norm": 0.05,
            "noise-multiplier": 1.5, "aligner": "nessa", "privacy-unit": "device"}
POLICY = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, min_suffstats_noise_multiplier=0.2,
                      min_noise_multiplier=0.2, delta=1e-3, allow_reproducible_noise=True)


def _cfg(**over: Any):
    return from_run_config({"distributed-mechanism": "skellam", "privacy-unit": "device", "delta": 1e-3,
                            "device-update": "fedavg", "clip-target-quantile": 0.5, "clip-count-noise": 0.5,
                            "num-devices": 12, "min-arrivals": 8, "noise-multiplier": 1.5, **over})


def _event(cfg: Any) -> DPEvent:
    req = RoundRequest(Phase.DPSGD, 2, 8, 12, dims=(16, 12))
    event = planned_event(req, 30, cfg, DevicePolicy(guaranteed_arrivals=8, privacy_unit="device"), (16, 12))
    assert event is not None
    return event


def test_the_bit_is_one_more_coordinate_of_one_skellam_event_at_the_joint_bound() -> None:
    """The event records the bit's noise multiplier z_b; its bounds are the rounded joint bound of the delta's
    clip and the bit, and its epsilon is the closed-form Skellam RDP of that one release, recomputed here from
    the config alone (Agarwal et al. Thm 3.5: a l2^2/(2 mu) + min(((2a-1) l2^2 + 6 l1)/(4 mu^2), 3 l1/(2 mu)))."""
    cfg = _cfg()
    ev = _event(cfg)
    z, z_b = 1.5, 0.5 * 12 / 0.5
    p = ev.skellam
    assert p is not None and p[SKELLAM_BIT_FIELD] == z_b and ev.clip_norm == cfg.device_clip_norm
    no_bit = skellam_mechanism.payload_dim(_cfg(**{"clip-target-quantile": 0.0}), Phase.DPSGD, 16, 12)
    assert skellam_mechanism.payload_dim(cfg, Phase.DPSGD, 16, 12) == no_bit + 1
    # the joint vector [delta, (b - 1/2) bit_scale] at the Gaussian's split (z_d from z and z_b)
    z_d = (z ** -2 - z_b ** -2) ** -0.5
    bit_scale = z_d * cfg.device_clip_norm / (z_b * BIT_SENSITIVITY)
    joint = math.hypot(cfg.device_clip_norm, BIT_SENSITIVITY * bit_scale)
    assert joint == pytest.approx(joint_l2_clip(cfg.device_clip_norm, z, z_b), rel=1e-12)
    assert joint == pytest.approx(cfg.device_clip_norm * z_d / z, rel=1e-12)
    scaled = p["scale"] * joint  # k sqrt(padded dim): the clip's integer units
    l2 = math.sqrt(scaled ** 2 + p["dim"] / 4 + math.sqrt(2 * 0.5) * (scaled + math.sqrt(p["dim"]) / 2))  # beta e^-.5
    assert p["l2_bound"] == pytest.approx(min(l2, scaled + math.sqrt(p["dim"])), rel=1e-9)
    assert p["l1_bound"] == pytest.approx(min(math.sqrt(p["dim"]) * p["l2_bound"], p["l2_bound"] ** 2), rel=1e-12)
    assert p["mu"] == pytest.approx((z * scaled) ** 2, rel=1e-9)
    mu, l1, l2b = p["mu"], p["l1_bound"], p["l2_bound"]
    curve = np.array([a * l2b ** 2 / (2 * mu)
                      + min(((2 * a - 1) * l2b ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))
                      for a in SKELLAM_ORDERS])
    by_hand = rdp_to_epsilon(curve, SKELLAM_ORDERS, 1e-3)
    assert compute_epsilon([ev], 1e-3, "skellam", "device") == pytest.approx(by_hand, rel=1e-9)
    # the bit costs nothing beyond the Gaussian split's: the integer-domain release is the one without the bit
    plain = _event(_cfg(**{"clip-target-quantile": 0.0}))
    assert plain.skellam is not None and SKELLAM_BIT_FIELD not in plain.skellam
    assert ev.skellam["l2_bound"] == pytest.approx(plain.skellam["l2_bound"], rel=1e-12)
    assert rounded_l2_norm_bound(scaled, p["beta"], p["dim"]) == p["l2_bound"]
    assert integer_l1_bound(p["l2_bound"], p["dim"]) == p["l1_bound"]


def test_an_edited_bit_noise_multiplier_is_refused_when_read() -> None:
    ev = _event(_cfg())
    assert DPEvent.from_dict(ev.to_dict()) == ev
    record = ev.to_dict()
    for value, fragment in ((record["skellam"][SKELLAM_BIT_FIELD] * 2, "joint bound"),
                            (1.0, "must be a finite number above")):
        edited = {**record, "skellam": {**record["skellam"], SKELLAM_BIT_FIELD: value}}
        with pytest.raises(EventError, match=fragment):
            DPEvent.from_dict(edited)
    # and a bit-carrying mechanism recorded without its bit is no longer the recorded bound
    without = {**record, "skellam": {k: v for k, v in record["skellam"].items() if k != SKELLAM_BIT_FIELD}}
    with pytest.raises(EventError, match="l2_bound"):
        DPEvent.from_dict(without)


def test_each_rounds_clip_rescales_the_input_and_keeps_the_integer_mechanism() -> None:
    """The round's parameters (and so the event) do not depend on the round's clip C_t: the device divides its
    joint vector (norm <= joint bound at C_t) by C_t / C_0, the decode multiplies it back."""
    cfg = _cfg()
    plan = noise_plan(cfg, 12)
    params = integer_params(RoundRequest(Phase.DPSGD, 2, 8, 12, dims=(16, 12)), cfg,
                            DevicePolicy(guaranteed_arrivals=8, privacy_unit="device"), (16, 12))
    mech = mechanism_for(cfg)
    for clip in (0.01, cfg.device_clip_norm, 3.0):
        unit = skellam_mechanism.round_unit(cfg, Phase.DPSGD, clip)
        scale = mech.bit_scale(clip, plan)
        assert scale is not None
        worst = math.hypot(clip, BIT_SENSITIVITY * scale)  # the clipped delta and the bit at their largest
        assert worst / unit == pytest.approx(params.l2_clip, rel=1e-12)
    assert skellam_mechanism.round_unit(cfg, Phase.SUFFSTATS, 3.0) == 1.0


def test_flower_and_fleet_engines_release_the_same_skellam_sums_with_the_bit(tmp_path: Path,
                                                                           applied_sums: list[Any]) -> None:
    """Reproducible noise, exact numerics, statistics then two adaptive DP-FedAvg rounds under skellam: the
    released sums (the bit's scaled sum last) agree up to the rounding the engines' float deltas may flip,
    the clip moves the same way, and the ledgers hold the same events, bit noise recorded."""
    from fed_nessa.sim.fleet import run_fleet
    from fed_nessa.sim.runner import simulate as flower_simulate

    over = {**ADAPTIVE, "num-server-rounds": 3}
    summaries = [flower_simulate(_fleet_stats_cfg(tmp_path, "flower", **over), policy=POLICY, quiet=True)]
    flower = list(applied_sums)
    applied_sums.clear()
    summaries.append(run_fleet(_fleet_stats_cfg(tmp_path, "fleet", **over), POLICY))
    assert [s[0] for s in flower] == [s[0] for s in applied_sums] == ["suffstats", "dpsgd", "dpsgd"]
    clips = [[e["clip_norm"] for e in s["rounds"] if "clip_norm" in e] for s in summaries]
    # the clip follows the decoded bit sum: a rounding flipped by the engines' float deltas (the fleet engine's
    # written-out DP-FedAvg update sums in another order than the ClientApp's autograd) moves it by ~1e-6
    assert clips[0] == pytest.approx(clips[1], rel=1e-5) and len(clips[0]) == 2 and clips[0][1] != clips[0][0]
    cfg = _fleet_stats_cfg(tmp_path, "x", **over)
    card = json.loads((tmp_path / "fleet" / "aligner" / "card.json").read_text())
    d_x, d_y = card["d_x"], card["d_y"]
    dpsgd = [(a, b) for (phase, a, _), (_, b, _) in zip(flower, applied_sums, strict=True) if phase == "dpsgd"]
    assert all(n_a == n_b == 12 for (_, _, n_a), (_, _, n_b) in zip(flower, applied_sums, strict=True))
    for (a, b), clip in zip(dpsgd, clips[0], strict=True):
        assert a.size == skellam_mechanism.payload_dim(cfg, Phase.DPSGD, d_x, d_y)  # the delta, then the bit
        params = skellam_mechanism.round_params(cfg, Phase.DPSGD, noise_plan(cfg, 12), a.size, 1, 8)
        # a rounding the engines' float deltas flip moves a device's vector by one integer unit (x C_t / C_0)
        unit = skellam_mechanism.round_unit(cfg, Phase.DPSGD, clip) / params.scale
        assert np.abs(a - b).max() <= 12 * unit + 1e-5 * np.abs(a).max()
        assert np.abs(a).max() > 100 * unit  # the sums are more than the rounding
    for i in range(12):
        dev = f"device-{i:05d}"
        ledgers = [DeviceLedger.open(tmp_path / run / "devices" / dev, dev) for run in ("flower", "fleet")]
        events = [ledger.events() for ledger in ledgers]
        assert {ev.mechanism for ev in events[0] + events[1]} == {SKELLAM}
        assert [ev.skellam for ev in events[0][:2]] == [ev.skellam for ev in events[1]]
        assert events[1][-1].skellam is not None and SKELLAM_BIT_FIELD in events[1][-1].skellam
        assert ledgers[0].epsilon(1e-3) == pytest.approx(ledgers[1].epsilon(1e-3), rel=1e-9)


def test_the_clip_moves_toward_the_target_quantile_and_the_run_passes_its_audit(tmp_path: Path) -> None:
    """Fast numerics, OS CSPRNG noise, a tiny fleet (count noise 0.1 x 12: the noisy fraction's std is 0.1, five
    of them from the median): from a clip far above every update norm (bits all 1) the clip falls every round,
    from one far below (bits all 0) it rises every round. The audit re-derives every epsilon, and fails the run
    once a ledger's bit noise multiplier is edited."""
    from fed_nessa.privacy.audit import audit
    from fed_nessa.sim.fleet import run_fleet

    policy = DevicePolicy(privacy_unit="device", guaranteed_arrivals=8, min_noise_multiplier=0.2, delta=1e-3,
                          epsilon_budget=200.0)
    clips = {}
    for start in (50.0, 1e-4):
        over = {**ADAPTIVE, "num-server-rounds": 5, "device-clip-norm": start, "clip-lr": 1.0,
                "noise-multiplier": 0.5, "clip-count-noise": 0.1, "epsilon-budget": 200.0,
                "reproducible-noise": False, "fleet-numerics": "fast", "linear-start": "none"}
        summary = run_fleet(_fleet_stats_cfg(tmp_path, f"run-{start:g}", **over), policy)
        assert [e["status"] for e in summary["rounds"]] == ["applied"] * 5
        clips[start] = [e["clip_norm"] for e in summary["rounds"]]
    assert clips[50.0][0] == 50.0 and all(b < a for a, b in zip(clips[50.0], clips[50.0][1:], strict=False)), clips
    assert clips[1e-4][0] == 1e-4 and all(b > a for a, b in zip(clips[1e-4], clips[1e-4][1:], strict=False)), clips
    run = tmp_path / "run-50"
    result = audit(run, write=False)
    assert result.passed, [f.message for f in result.findings]
    # edit one device's recorded bit noise multiplier (z_b -> 1 z_b): the event is refused when read, the audit fails
    path = next((run / "devices").rglob("privacy-ledger.jsonl"))
    lines = path.read_text().splitlines()
    key = f'"{SKELLAM_BIT_FIELD}":'
    assert any(key in line for line in lines)
    path.write_text("\n".join(line.replace(key, key + "1", 1) for line in lines) + "\n")
    edited = audit(run, write=False)
    assert not edited.passed
    assert any("skellam event of round" in f.message and f.device == path.parent.name for f in edited.findings)


def test_a_bit_count_noise_that_leaves_the_update_no_budget_is_one_clear_error() -> None:
    """z_b = 0.01 x 12 / (1/2) = 0.24 < 1.5: under skellam the plan (which a budget-split needs the shards'
    sizes for) refuses the ``clip-count-noise``, naming it, as the Gaussian's launch check does."""
    cfg = _cfg(**{"clip-count-noise": 0.01, "num-server-rounds": 3, "linear-start": "none", "aligner": "nessa"})
    with pytest.raises(ValueError, match="clip-count-noise = 0.01: the adaptive clip's bit noise multiplier"):
        noise_plan(cfg, 12, (16, 12))

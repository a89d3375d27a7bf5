"""The device side of a round: THE privacy boundary.

This is the only code that reads a shard's pairs into a mechanism or spends epsilon.
It answers two questions per round, both from the device's own shard, ledger and policy:

* **plan** (:func:`plan_round`, no training): is the round for the models the device's shard
  was embedded with (:func:`shard_refusal`), and would it stay within the device's
  policy and budget? A request beyond the policy (a larger budget or delta, less noise,
  fewer promised arrivals than the policy's ``g``, a non-DP round, a round with noise from the
  public seed (``reproducible-noise``) unless the policy allows it, too many participations,
  more pairs than a payload may hold) is declined with the reason.
* **compute** (:func:`client_round`): reserve the DP event in the ledger (fsynced before
  the mechanism runs), compute the vector with noise from the OS CSPRNG, complete the
  event. Phases:

``suffstats`` (the private linear start, one round)
    the device's sufficient statistics of L2-normalised pairs
    (:mod:`fed_nessa.federated.suffstats`, L2 sensitivity 1) plus Gaussian noise.
``dpsgd``
    ``local``: Opacus DP-SGD with the full noise on every step, the weight delta sent;
    ``distributed``: ONE sum of per-example clipped gradients of a secret Poisson sample
    plus a noise share of std ``sigma * C / sqrt(g)``, ``g`` the device's own policy's.

``privacy-unit = device`` (distributed only): the device clips its WHOLE round contribution,
the statistics weighted by ``min(1, K / n)`` (K = ``device-stats-pairs``, sensitivity K) and
the mean gradient over all its pairs clipped to ``device-clip-norm``, plus a noise share; no
sampling, so the event is a Gaussian sum with q = 1. The device's policy sets its unit, its
participation limit and the fewest rounds between two participations (``min-separation``).
``device-batch`` bounds the pairs the mean gradient is computed on (a secret uniform subset
from the device's noise stream; compute only, no amplification claimed).

Noise shares are sized from the device's policy, never from a number the server sends:
the server's promise of ``g`` arrivals can only make a device decline, never shrink its
noise. Nothing derived from the data leaves except the vector and the reply metrics of
:data:`fed_nessa.federated.protocol.REPLY_METRIC_KEYS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
from torch import nn

from fed_nessa.config import DevicePolicy, DPMode, FederationConfig, Phase, ReplyStatus
from fed_nessa.data.shards import Shard
from fed_nessa.federated import skellam_mechanism, suffstats
from fed_nessa.federated.integer_mechanism import IntegerMechanismParams
from fed_nessa.federated.layout import build_net, load_flat, parameter_counts
from fed_nessa.federated.mechanism import BIT_SENSITIVITY, event_noise_source, mechanism_for
from fed_nessa.federated.noise_plan import NoisePlan, noise_plan
from fed_nessa.federated.secagg_field import to_flower
from fed_nessa.model.centre import about_centre, centred_targets, check_centre
from fed_nessa.privacy.events import (
    DISTRIBUTED,
    SKELLAM,
    DPEvent,
)
from fed_nessa.privacy.ledger import DeviceLedger, model_sha256
from fed_nessa.randomness import REPRODUCIBLE_WARNING, NoiseSource, noise_source


class ModelIds(TypedDict):
    """The federation's model ids as a round states them (keywords of :class:`RoundRequest`)."""

    enroll_model: str
    runtime_model: str


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of a device this round (from the plan or the fit config)."""

    phase: Phase
    round: int
    promised_arrivals: int
    fleet_size: int  # devices in the federation (public; scales q and the calibrated sigmas)
    #: The server's federation-ledger key fingerprint, as the round config states it (pinned by the device).
    server_key_fingerprint: str | None = None
    #: SHA-256 of the whole round config as received (:func:`fed_nessa.privacy.ledger.config_sha256`).
    config_sha256: str | None = None
    #: The federation's model ids as the round config states them (None: not stated, not checked).
    enroll_model: str | None = None
    runtime_model: str | None = None
    #: The device's OWN shard dimensions (d_x, d_y), set by the device from its shard (never from the server):
    #: they size the integer mechanism's payload, which its budget-split calibration depends on.
    dims: tuple[int, int] | None = None
    #: The DP-SGD round's loss centre as the round config states it (``loss-centre``; None: the plain cosine
    #: loss). Public: the device clips the gradient of the loss about it as it clips any loss's.
    centre: tuple[float, ...] | None = None

    #: The round's clip as the round config states it (adaptive clipping: the server's public C_t; None: the
    #: run's fixed ``device-clip-norm``). Set by :meth:`at_clip` only, so callers that build a request from
    #: string keywords (model ids) cannot set it by accident.
    clip: float | None = field(default=None, init=False)

    def at_clip(self, clip: float | None) -> RoundRequest:
        """This request stating the round's clip (a copy)."""
        out = dataclasses.replace(self)
        object.__setattr__(out, "clip", clip)  # frozen: the one place the field is written
        return out

    def with_dims(self, shard: Shard) -> RoundRequest:
        """This request sized by the device's own shard (a copy that keeps the round's clip: ``replace``
        alone would reset the ``init=False`` field)."""
        return dataclasses.replace(self, dims=(shard.d_x, shard.d_y)).at_clip(self.clip)


@dataclass(frozen=True)
class ClientOutcome:
    """A device's reply: its contribution to the secure sum, or a decline with its reason."""

    status: ReplyStatus
    vector: np.ndarray | None
    metrics: dict[str, float | int | str] = field(default_factory=dict)


def _plan(req: RoundRequest, cfg: FederationConfig) -> NoisePlan:
    """The run's noise plan as this device computes it (the fleet size and its own shard's dimensions)."""
    return noise_plan(cfg, req.fleet_size, req.dims)


def _sigma(req: RoundRequest, cfg: FederationConfig) -> float:
    return _phase_sigma(_plan(req, cfg), req.phase)


def _phase_sigma(plan: NoisePlan, phase: Phase) -> float:
    return plan.suffstats_sigma if phase == Phase.SUFFSTATS else plan.dpsgd_sigma


def _noise_floor(phase: Phase, policy: DevicePolicy) -> tuple[float, str]:
    """The policy's smallest accepted noise multiplier in ``phase``, and its key."""
    if phase == Phase.SUFFSTATS:
        return policy.min_suffstats_noise_multiplier, "min-suffstats-noise-multiplier"
    return policy.min_noise_multiplier, "min-noise-multiplier"


def sample_rate(req: RoundRequest, n: int, cfg: FederationConfig) -> float:
    """This device's Poisson rate for the round (its sample itself stays secret)."""
    return mechanism_for(cfg).device_sample_rate(n, req.fleet_size)


def share_std(req: RoundRequest, cfg: FederationConfig, policy: DevicePolicy) -> float:
    """This device's noise std for the round: the run's mechanism, sized by its OWN policy's g (and the
    round's public clip, where the server adapts it)."""
    return mechanism_for(cfg).share_std(req.phase, _plan(req, cfg), policy.guaranteed_arrivals,
                                        req.clip if req.phase == Phase.DPSGD else None)


def clip_refusal(req: RoundRequest, cfg: FederationConfig) -> str | None:
    """Why the round's clip cannot be used: adaptive clipping needs the server's C_t in the round config, a
    finite number > 0 (the noise is sized by it, so any such C keeps the accounted multiplier)."""
    if req.phase != Phase.DPSGD or cfg.clip_target_quantile <= 0:
        return None
    if req.clip is None:
        return "declined: the run adapts the clip (clip-target-quantile > 0) and the round config states no clip"
    if not math.isfinite(req.clip) or req.clip <= 0:
        return f"declined: the round's clip {req.clip!r} is not a finite number > 0"
    return None


def planned_event(req: RoundRequest, n: int, cfg: FederationConfig, policy: DevicePolicy,
                  dims: tuple[int, int] | None = None) -> DPEvent | None:
    """The DP event a device with ``n`` pairs would spend in this round (None without DP): the run's
    mechanism's (:meth:`fed_nessa.federated.mechanism.Mechanism.event`), or the integer mechanism's.

    ``dims`` (the shard's d_x, d_y) size the integer mechanism's payload (needed with ``skellam``).
    """
    if cfg.dp_mode == DPMode.NONE:
        return None
    if cfg.integer_noise:
        if dims is None:
            raise ValueError("the integer mechanism's event needs the shard's dimensions (d_x, d_y)")
        return _skellam_event(req, n, cfg, policy, dims)
    return mechanism_for(cfg).event(req.phase, req.round, n, req.fleet_size, _sigma(req, cfg), policy.delta,
                                    policy.guaranteed_arrivals)


def integer_params(req: RoundRequest, cfg: FederationConfig, policy: DevicePolicy,
                   dims: tuple[int, int]) -> IntegerMechanismParams:
    """This device's parameters of a skellam round: the public ones, its noise share sized by its OWN g."""
    plan = noise_plan(cfg, req.fleet_size, dims)
    dim = skellam_mechanism.payload_dim(cfg, req.phase, *dims)
    params = skellam_mechanism.round_params(cfg, req.phase, plan, dim, req.round, req.promised_arrivals)
    return skellam_mechanism.device_params(params, policy.guaranteed_arrivals)


def _skellam_event(req: RoundRequest, n: int, cfg: FederationConfig, policy: DevicePolicy,
                   dims: tuple[int, int]) -> DPEvent:
    """The integer mechanism's event: a full sum, or at the example level's DP-SGD a Poisson-subsampled one."""
    params = integer_params(req, cfg, policy, dims)
    sigma = _sigma(req, cfg)
    mech = mechanism_for(cfg)
    z_bit = mech.bit_noise_multiplier(req.fleet_size) if mech.carries_bit(req.phase) else None
    source = REPRODUCIBLE_WARNING if cfg.reproducible_noise else "rounding and noise from the OS CSPRNG"
    if not skellam_mechanism.sums_examples(cfg):
        rows = "one vector, conditionally rounded"
    elif req.phase == Phase.SUFFSTATS:
        rows = "the sum of the pairs' rows rounded once, coupled bound"
    else:
        rows = "the clipped-gradient sum of a secret Poisson sample rounded once, coupled bound"
    if z_bit is not None:
        rows += (f"; the DP-FedAvg delta clipped to the round's public C and the adaptive clip's centred bit "
                 f"(sensitivity {BIT_SENSITIVITY:g}, count noise multiplier {z_bit:.6g}) as one more coordinate, one "
                 f"vector of the joint bound at clip_norm (the starting C), rescaled by C / clip_norm")
    q = sample_rate(req, n, cfg) if skellam_mechanism.sums_examples(cfg) and req.phase == Phase.DPSGD else 1.0
    return DPEvent(round=req.round, mechanism=SKELLAM, steps=1, sample_rate=q, noise_multiplier=sigma,
                   clip_norm=mech.sensitivity(req.phase), delta=policy.delta, mode=DISTRIBUTED,
                   unit=str(cfg.privacy_unit), noise_source=event_noise_source(cfg),
                   skellam=skellam_mechanism.event_parameters(params, sigma, z_bit),
                   note=f"integer Skellam share in SecAgg+'s field ({params.bits} bits, {rows}, randomised Hadamard "
                        f"rotation from the public round seed); share sized for g = {policy.guaranteed_arrivals} "
                        f"arrivals; {source}")


def plan_below_floor(plan: NoisePlan, phases: Sequence[Phase], cfg: FederationConfig,
                     policy: DevicePolicy) -> list[str]:
    """Why every device of ``policy`` will decline a phase of this run before round 1 (empty: none will).

    The simulator's one look at its devices' policy ahead of the rounds (the same floors
    :func:`policy_refusal` applies to each request): a plan whose noise multiplier is below the floor
    would otherwise run on, every device declining, the DP-SGD rounds starting from a random net.
    """
    if cfg.dp_mode == DPMode.NONE:
        return []
    out = []
    for phase in dict.fromkeys(phases):
        sigma, (floor, key) = _phase_sigma(plan, phase), _noise_floor(phase, policy)
        if sigma < floor:
            out.append(f"the plan's {phase} noise multiplier {sigma:.4g} is below the devices' {key} {floor:g}: "
                       "every device will decline that phase")
    return out


def policy_refusal(req: RoundRequest, n: int, cfg: FederationConfig, policy: DevicePolicy,
                   ledger: DeviceLedger) -> str | None:
    """Why this request goes beyond the device's policy (None when it does not)."""
    if cfg.dp_mode == DPMode.NONE and not policy.allow_non_dp:
        return "declined: the run adds no DP noise (dp-mode none) and this device's policy does not allow it"
    if cfg.dp_mode != DPMode.NONE and cfg.reproducible_noise and not policy.allow_reproducible_noise:
        return ("declined: the run asks for reproducible noise (reproducible-noise = true: derived from the public "
                "seed, so the server can subtract it) and this device's policy does not allow it "
                "(allow-reproducible-noise)")
    if cfg.dp_mode != DPMode.NONE:
        sigma, (floor, _) = _sigma(req, cfg), _noise_floor(req.phase, policy)
        if sigma < floor:
            return (f"declined: the run asks for noise multiplier {sigma:g} in phase {req.phase}, below this "
                    f"device's policy minimum {floor:g}")
    if cfg.dp_mode == DPMode.DISTRIBUTED and req.promised_arrivals < policy.guaranteed_arrivals:
        return (f"declined: the server promises to unmask sums of >= {req.promised_arrivals} devices, fewer than "
                f"the g = {policy.guaranteed_arrivals} this device's noise share is sized for")
    unit_refusal = mechanism_for(cfg).policy_refusal(policy.privacy_unit)
    if unit_refusal:
        return unit_refusal
    if ledger.participations() >= policy.max_participations:
        return (f"declined: this device has joined {ledger.participations()} round(s), its policy's limit is "
                f"{policy.max_participations}")
    separation = separation_refusal(req.round, ledger.rounds(), policy)
    if separation:
        return separation
    bound = min(policy.max_pairs_per_payload, cfg.max_pairs_per_device)
    carried = mechanism_for(cfg).carried_pairs(n)  # device level: at most device-stats-pairs, whatever n
    if req.phase == Phase.SUFFSTATS and carried > bound:
        return (f"declined: the device holds {n} pairs, more than one statistics payload may carry ({bound}: "
                "max-pairs-per-device of the run, max-pairs-per-payload of the policy)")
    return None


def separation_refusal(round_num: int, joined: set[int] | list[int], policy: DevicePolicy) -> str | None:
    """Why joining ``round_num`` breaks the policy's ``min-separation`` from the rounds already joined."""
    if policy.min_separation <= 1 or not joined:
        return None
    closest = min(joined, key=lambda r: abs(round_num - r))
    if abs(round_num - closest) < policy.min_separation:
        return (f"declined: round {round_num} is {abs(round_num - closest)} round(s) from round {closest} this "
                f"device joined; its policy's min-separation is {policy.min_separation}")
    return None


def model_refusal(req: RoundRequest, enroll_model: str, runtime_model: str) -> str | None:
    """Why this device's data (embedded with ``enroll_model`` / ``runtime_model``) does not fit the round.

    A round for other models would train the federation's aligner on pairs of the wrong
    embedding spaces; the device declines before anything is reserved. None when the ids
    match or the round states none.
    """
    wants = (req.enroll_model, req.runtime_model)
    has = (enroll_model, runtime_model)
    if all(w is None or w == h for w, h in zip(wants, has, strict=True)):
        return None
    return (f"declined: the round is for models {req.enroll_model} (enroll) / {req.runtime_model} (runtime), "
            f"this device's shard holds {enroll_model} (enroll) / {runtime_model} (runtime)")


def shard_refusal(req: RoundRequest, shard: Shard) -> str | None:
    """Why this device's shard does not fit the round (model ids), before anything is reserved."""
    return model_refusal(req, shard.enroll_model, shard.runtime_model)


def centre_refusal(req: RoundRequest, shard: Shard) -> str | None:
    """Why the round's loss centre cannot centre this device's targets (a wrong length, NaN or Inf)."""
    if req.centre is None:
        return None
    why = check_centre(req.centre, shard.d_x)
    return None if why is None else f"declined: {why}"


def round_net(req: RoundRequest, cfg: FederationConfig, shard: Shard,
              global_vector: np.ndarray) -> tuple[nn.Module, Shard]:
    """The net and the pairs a DP-SGD round's loss is taken on: the global model as received, or with the
    round's loss centre the net moved by it and the enrollment rows centred (fed_nessa/model/centre.py)."""
    net = build_net(cfg, shard.d_x, shard.d_y)
    load_flat(list(net.parameters()), np.asarray(global_vector, np.float32))
    if req.centre is None:
        return net, shard
    centre = np.asarray(req.centre, np.float64)
    return about_centre(net, centre), dataclasses.replace(shard, enroll=centred_targets(shard.enroll, centre))


def server_pin_refusal(req: RoundRequest, ledger: DeviceLedger) -> str | None:
    """Why the server's key is not the one this device pinned (None when it is, or nothing is pinned yet)."""
    pinned = getattr(ledger, "pinned_server_fingerprint", None)
    if pinned and req.server_key_fingerprint != pinned:
        return (f"declined: the server's key fingerprint {str(req.server_key_fingerprint)[:16]} is not the "
                f"{pinned[:16]} this device pinned in its ledger (a different or re-keyed server)")
    return None


def received_record(req: RoundRequest, global_vector: np.ndarray) -> dict[str, object]:
    """What the device signs into the round's reserve entry: the model and config it received."""
    return {"round": req.round, "model_sha256": model_sha256(global_vector), "config_sha256": req.config_sha256,
            "server_key_fingerprint": req.server_key_fingerprint}


def _policy_of(ledger: DeviceLedger, fallback: DevicePolicy) -> DevicePolicy:
    """The policy in force: the ledger header's (restored on every reopen) wins."""
    return ledger.policy or fallback


def plan_round(req: RoundRequest, shard: Shard, cfg: FederationConfig, ledger: DeviceLedger,
               policy: DevicePolicy) -> ClientOutcome:
    """Policy and budget check only: would this round stay within what the device allows?"""
    policy = _policy_of(ledger, policy)
    req = req.with_dims(shard)
    refusal = (server_pin_refusal(req, ledger) or shard_refusal(req, shard) or clip_refusal(req, cfg)
               or centre_refusal(req, shard) or policy_refusal(req, shard.n, cfg, policy, ledger))
    if refusal is not None:
        return ClientOutcome(ReplyStatus.DECLINED, None, {"reason": refusal})
    event = planned_event(req, shard.n, cfg, policy, (shard.d_x, shard.d_y))
    if event is None:
        return ClientOutcome(ReplyStatus.OK, None, {"epsilon_spent": 0.0})
    decision = ledger.check_budget(event, cfg.epsilon_budget, cfg.delta)
    metrics: dict[str, float | int | str] = {
        "epsilon_spent": float(decision.epsilon_now), "epsilon_if_run": float(decision.epsilon_if_run)}
    if not decision.allowed:
        metrics["reason"] = decision.reason
        return ClientOutcome(ReplyStatus.DECLINED, None, metrics)
    return ClientOutcome(ReplyStatus.OK, None, metrics)


def client_round(req: RoundRequest, shard: Shard, global_vector: np.ndarray, cfg: FederationConfig,
                 ledger: DeviceLedger, policy: DevicePolicy) -> ClientOutcome:
    """Compute this device's contribution, spending (and recording) privacy only if the policy allows."""
    policy = _policy_of(ledger, policy)
    req = req.with_dims(shard)
    plan = plan_round(req, shard, cfg, ledger, policy)
    if plan.status != ReplyStatus.OK:
        return plan
    expected = parameter_counts(cfg, shard.d_x, shard.d_y)[0]
    if np.asarray(global_vector).size != expected:  # checked before anything is reserved or spent
        return ClientOutcome(ReplyStatus.DECLINED, None, {
            "reason": f"declined: the server's model has {np.asarray(global_vector).size} values, a model for this "
                      f"device's shard (d_x {shard.d_x}, d_y {shard.d_y}) has {expected}"})
    event = planned_event(req, shard.n, cfg, policy, (shard.d_x, shard.d_y))
    seq = ledger.reserve(event, received_record(req, global_vector)) if event is not None else None
    noise = noise_source(cfg.reproducible_noise, cfg.seed, "device", ledger.device_id, req.round)
    try:
        vector = _compute(req, shard, global_vector, cfg, policy, noise)
    except BaseException:
        if seq is not None:
            ledger.complete(seq, float(ledger.epsilon(policy.delta)), status="failed")
        raise
    metrics: dict[str, float | int | str] = {"epsilon_spent": 0.0, "noise_arrivals": policy.guaranteed_arrivals}
    if seq is not None:
        eps = float(ledger.epsilon(policy.delta))
        ledger.complete(seq, eps, status="done")
        metrics["epsilon_spent"] = eps
    return ClientOutcome(ReplyStatus.OK, vector, metrics)


def suffstats_vector(shard: Shard) -> np.ndarray:
    """The un-noised statistics of one device (unit-norm rows bound every pair's contribution)."""
    return suffstats.device_vector(shard.enroll, shard.runtime)


def _compute(req: RoundRequest, shard: Shard, global_vector: np.ndarray, cfg: FederationConfig,
             policy: DevicePolicy, noise: NoiseSource) -> np.ndarray:
    """The device's vector: its (weighted) statistics or its DP-SGD contribution, plus its noise share."""
    mech = mechanism_for(cfg)
    if cfg.integer_noise:
        return _integer_vector(req, shard, global_vector, cfg, policy, noise)
    std = share_std(req, cfg, policy)
    if req.phase == Phase.SUFFSTATS:
        vec = suffstats_vector(shard) * mech.stats_weight(shard.n)
        if std > 0:
            vec = vec + noise.normal(vec.shape, std)
        return np.asarray(vec, np.float32)
    net, shard = round_net(req, cfg, shard, global_vector)
    scale = None if req.clip is None else mech.bit_scale(req.clip, noise_plan(cfg, req.fleet_size))
    return mech.dpsgd_vector(net, shard, std, noise, sample_rate(req, shard.n, cfg), clip=req.clip, bit_scale=scale)


def _integer_vector(req: RoundRequest, shard: Shard, global_vector: np.ndarray, cfg: FederationConfig,
                    policy: DevicePolicy, noise: NoiseSource) -> np.ndarray:
    """The device's field elements (as Flower's exact quantizer reads them: ``u - 2^(bits-1)``): its un-noised
    contribution (its weighted statistics, its clipped-gradient sum or its one clipped vector), rounded once
    and Skellam-noised in the field."""
    mech = mechanism_for(cfg)
    params = integer_params(req, cfg, policy, (shard.d_x, shard.d_y))
    if req.phase == Phase.SUFFSTATS:
        vector = suffstats_vector(shard) * mech.stats_weight(shard.n)
    else:
        net, shard = round_net(req, cfg, shard, global_vector)
        # adaptive clipping: the delta clipped to the round's C and the bit scaled for it (no Gaussian share: 0),
        # then in the units of the round's parameters (skellam_mechanism.round_unit)
        scale = None if req.clip is None else mech.bit_scale(req.clip, _plan(req, cfg))
        vector = mech.dpsgd_vector(net, shard, 0.0, noise, sample_rate(req, shard.n, cfg), clip=req.clip,
                                   bit_scale=scale)
        vector = np.asarray(vector, np.float64) / skellam_mechanism.round_unit(cfg, req.phase, req.clip)
    return to_flower(skellam_mechanism.encode_device(vector, params, noise), params)

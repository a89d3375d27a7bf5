"""The noise mechanism of a round: one object per privacy unit, the one place its numbers are computed.

The device (to clip and add its noise share), the server (to size SecAgg+'s range and floor the
statistics solve by the released noise) and both engines must agree on four numbers, so they
all ask the run's :class:`Mechanism` (:func:`mechanism_for`):

* :meth:`Mechanism.sensitivity`: the L2 bound of one privacy unit's contribution to a phase's sum;
* :meth:`Mechanism.share_std`: one device's noise std, all of it (``local``) or its ``1/sqrt(g)``
  share sized by its OWN policy's g (``distributed``), nothing without DP;
* :meth:`Mechanism.released_variance`: the per-coordinate DP noise variance of a released sum;
* :meth:`Mechanism.payload_bound`: the largest coordinate an honest device's vector can have;

and every other question whose answer depends on the unit: the DP event a device records
(:meth:`Mechanism.event`), whether a device's policy accepts the unit (:meth:`Mechanism.policy_refusal`),
the units its guarantee implies (:meth:`Mechanism.implied_units`) and whether the integer mechanism
rounds a sum of clipped examples once, with the coupled bound (:meth:`Mechanism.sums_examples`).

The privacy unit is the only thing that differs between the two registered mechanisms: one
utterance pair (:class:`ExampleLevel`, per-example clipping) or one whole device
(:class:`DeviceLevel`, the device's whole round contribution clipped). A new unit is one class
here and one :data:`MECHANISMS` line; no other module of ``fed_nessa/federated/`` (nor the fleet
engine) compares the unit (``tests/test_federated_mechanism_unit.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from fed_nessa.config import (
    AlignerChoice,
    DeviceUpdate,
    DeviceWeight,
    DPMode,
    FederationConfig,
    LinearStart,
    Phase,
    PrivacyUnit,
)
from fed_nessa.data.shards import Shard
from fed_nessa.federated import suffstats
from fed_nessa.federated.layout import flat, trainable
from fed_nessa.model.training import (
    DPConfig,
    TrainConfig,
    device_update,
    dp_sample_rate,
    dp_steps,
    fedavg_delta,
    noisy_gradient_sum,
    train_local,
    with_noise_share,
)
from fed_nessa.privacy.events import (
    DISTRIBUTED,
    DP_SGD,
    GAUSSIAN_SUM,
    LOCAL,
    OS_CSPRNG,
    PUBLIC_FIELDS,
    PUBLIC_SEED,
    SKELLAM,
    DPEvent,
)
from fed_nessa.privacy.skellam import joint_l2_clip
from fed_nessa.randomness import REPRODUCIBLE_WARNING, NoiseSource

if TYPE_CHECKING:  # the plan is built from the mechanism's rules (noise_plan imports this module)
    from fed_nessa.federated.noise_plan import NoisePlan

#: Noise is bounded at this many standard deviations when sizing SecAgg+'s range.
PAYLOAD_SIGMAS = 12.0
#: Example level, ``aligner = auto``: clipped examples per unit of noise std in one DP-SGD round above
#: which DP NESSA is tried. Set off the reported study from the tuning evidence over 1,000 rounds
#: (docs/results.md "How the self-set protocol was chosen", "A larger server step at low signal"): losses at
#: signal <= 8.6k (3k devices at epsilon 8, 10k at epsilon 1; Adam lr <= 2e-3), wins at >= 17.6k (10k at
#: epsilon 3 and 8), and at 13.9k (10k at epsilon 3 under skellam, population seed 1) a loss at lr 2e-3 and a
#: win at the fleet rule's low-signal lr 4e-3 (which loses at 4.8k: 10k at epsilon 1, seed 1). The threshold sits
#: just below that smallest measured win; nothing between 4.8k and 13.9k was measured at the larger step. The gate
#: checks every run.
AUTO_SIGNAL_THRESHOLD = 13_000.0

#: The adaptive clip's bit is sent centred, ``1[norm <= C] - 1/2``: adding or removing one device
#: moves the released count by at most 1/2 (Andrew et al. 2021).
BIT_SENSITIVITY = 0.5


def event_noise_source(cfg: FederationConfig) -> str:
    """An event's structured noise source: what the audit reads (the note only says it in words)."""
    return PUBLIC_SEED if cfg.reproducible_noise else OS_CSPRNG


def noise_words(cfg: FederationConfig) -> str:
    """Where a Gaussian share's noise comes from, in the words of an event's note."""
    return REPRODUCIBLE_WARNING if cfg.reproducible_noise else "noise from the OS CSPRNG"


def max_sampled(cfg: FederationConfig, sample_rate: float) -> float:
    """A bound on the pairs one device's Poisson sample holds (sizes the DP-SGD payload)."""
    if sample_rate <= 0:
        return 4.0 * cfg.batch_size
    mean = min(sample_rate, 1.0) * cfg.max_pairs_per_device
    return max(4.0 * mean, mean + 8.0 * math.sqrt(mean) + 8.0)


class Mechanism(ABC):
    """The Gaussian sum mechanism of one privacy unit, in the run's noise placement (``dp-mode``)."""

    unit: ClassVar[PrivacyUnit]
    #: What one unit is, in words (a device's refusal names what the round would bound).
    bounds: ClassVar[str]
    #: The units this mechanism's guarantee also covers (a bound on a whole device bounds each of its pairs).
    implies: ClassVar[tuple[PrivacyUnit, ...]] = ()
    #: Whether a device's whole round contribution is clipped as ONE vector (no per-example sampling):
    #: the engines' vectorised DP-SGD maths pick their strategy by it, never by the unit's name.
    clips_whole_device: ClassVar[bool] = False

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg

    @property
    def dp(self) -> bool:
        return self.cfg.dp_mode != DPMode.NONE

    @abstractmethod
    def sensitivity(self, phase: Phase) -> float:
        """L2 bound of one unit's contribution to the phase's released sum."""

    @abstractmethod
    def stats_weight(self, n: int) -> float:
        """The weight of a device's sufficient statistics (so one unit moves them by <= the sensitivity)."""

    def stats_weights(self, n: np.ndarray) -> np.ndarray | None:
        """:meth:`stats_weight` of every device at once from their pair counts ``n`` (None: all 1)."""
        return np.array([self.stats_weight(int(k)) for k in n], np.float64)

    def update_weight(self, n: int) -> float:
        """The weight of a unit's clipped DP-FedAvg delta in the round's sum (1; device level: ``device-weight``)."""
        return 1.0

    def update_weights(self, n: Sequence[int]) -> torch.Tensor:
        """:meth:`update_weight` of a block's devices from their pair counts, as the vectorised update takes them."""
        return torch.tensor([self.update_weight(int(k)) for k in n], dtype=torch.float64)

    @abstractmethod
    def carried_pairs(self, n: int) -> int:
        """How many pairs' weight a device with ``n`` pairs puts into one statistics payload."""

    @abstractmethod
    def sends_gradients(self) -> bool:
        """Whether a DP-SGD round's sum holds gradients (else the devices' local model deltas)."""

    @abstractmethod
    def gradient_units(self) -> int:
        """How many clipped gradients one device's DP-SGD vector holds on average (the server's mean)."""

    @abstractmethod
    def payload_bound(self, phase: Phase, plan: NoisePlan, clip: float | None = None) -> float:
        """Largest |coordinate| an honest device's vector can have (sizes SecAgg+'s range; ``clip``: the round's)."""

    @abstractmethod
    def dpsgd_vector(self, net: nn.Module, shard: Shard, std: float, noise: NoiseSource,
                     sample_rate: float, clip: float | None = None, bit_scale: float | None = None) -> np.ndarray:
        """A device's DP-SGD round contribution from ``net`` (the global model) with noise share ``std``.

        ``clip`` / ``bit_scale``: the round's public clip and the adaptive clip's bit factor
        (:meth:`bit_scale`; None: a fixed clip, no bit). Runs on the device only
        (:mod:`fed_nessa.federated.device`, the privacy boundary); the fleet engine's exact numerics
        reproduce its draw order.
        """

    @staticmethod
    def sigma(phase: Phase, plan: NoisePlan) -> float:
        """The phase's noise multiplier (noise std of the released sum per unit of sensitivity)."""
        return plan.suffstats_sigma if phase == Phase.SUFFSTATS else plan.dpsgd_sigma

    @abstractmethod
    def event(self, phase: Phase, round_num: int, n: int, fleet: int, sigma: float, delta: float,
              g: int) -> DPEvent:
        """The Gaussian DP event a device with ``n`` pairs records for a round (its policy's ``delta`` and g)."""

    @abstractmethod
    def sums_examples(self) -> bool:
        """Whether a device's integer-mechanism vector is a SUM of clipped examples, rounded once with the
        coupled bound (``beta = 0``), rather than the whole unit's one vector, conditionally rounded."""

    def device_sample_rate(self, n: int, fleet: int) -> float:
        """A device's Poisson rate for a DP-SGD round of ``fleet`` devices (its sample itself stays secret)."""
        return self.cfg.round_sample_rate(n, fleet, self.cfg.cohort_size(fleet))

    def implied_units(self) -> tuple[PrivacyUnit, ...]:
        """The other units a guarantee at this unit covers: their figures are implied (and reported)."""
        return self.implies

    def policy_refusal(self, policy_unit: str) -> str | None:
        """Why a device whose policy budgets per ``policy_unit`` declines this unit's rounds (None: it accepts).

        A round at this unit bounds only what it clips; a policy at a unit it does not cover wants more.
        """
        if policy_unit == self.unit or policy_unit in self.implies:
            return None
        return (f"declined: this device's policy budgets per {policy_unit} and the round is {self.unit}-level "
                f"(it would bound {self.bounds}, not {MECHANISMS[policy_unit].bounds})")

    @abstractmethod
    def event_mechanism(self, phase: Phase) -> str:
        """The accounted mechanism of a phase's event (a Gaussian sum, or Poisson-subsampled DP-SGD)."""

    @abstractmethod
    def public_sample_rate(self, phase: Phase, fleet: int) -> float | None:
        """The phase's sampling rate where it is public and fleet-wide (None: it depends on a device's data)."""

    @abstractmethod
    def plan_sample_rate(self, fleet: int, cohort: int) -> float:
        """The noise plan's DP-SGD q for ``cohort`` of ``fleet`` devices (0: each device's own 1/ceil(n/B))."""

    @abstractmethod
    def plan_signal(self, cohort: int, q: float, sigma: float) -> float:
        """The auto rule's statistic: clipped units in one DP-SGD round's sum per unit of noise std."""

    @abstractmethod
    def auto_choice(self, rounds: int, signal: float) -> tuple[AlignerChoice, str]:
        """``aligner = auto``: the aligner the plan ships before round 1 and why (``rounds``: DP-SGD rounds)."""

    def public_parameters(self, phase: Phase, plan: NoisePlan) -> dict[str, object] | None:
        """The public DP parameters every device's event of a ``phase`` round must carry (None without DP).

        The server signs them into its federation-ledger entry of the round, and the audit compares
        each device's signed event with them: two parties' records of one mechanism must agree.
        """
        if not self.dp:
            return None
        mechanism = SKELLAM if self.cfg.integer_noise else self.event_mechanism(phase)
        values = (mechanism, str(self.cfg.privacy_unit), str(self.cfg.dp_mode),
                  self.sigma(phase, plan), float(self.sensitivity(phase)), self.public_sample_rate(phase, plan.fleet))
        return dict(zip(PUBLIC_FIELDS, values, strict=True))

    def vector_sigma(self, phase: Phase, plan: NoisePlan) -> float:
        """The noise multiplier on the vector's coordinates: the accounted :meth:`sigma`, unless part of the
        round's budget pays for something else in the same sum (the adaptive clip's bit, :class:`DeviceLevel`)."""
        return self.sigma(phase, plan)

    def share_std(self, phase: Phase, plan: NoisePlan, g: int, clip: float | None = None) -> float:
        """One device's noise std: the full noise locally, a ``1/sqrt(g)`` share distributed (g: its policy's).

        ``clip``: the round's sensitivity where the server sets it per round (the adaptive clip's C,
        public in the round config); None: the phase's fixed :meth:`sensitivity`.
        """
        if not self.dp:
            return 0.0
        full = self.vector_sigma(phase, plan) * (self.sensitivity(phase) if clip is None else clip)
        return self._share(full, g)

    def _share(self, full: float, g: int) -> float:
        """The one place a noise share is sized: all of ``full`` locally, ``full / sqrt(g)`` distributed."""
        return full / math.sqrt(g) if self.cfg.dp_mode == DPMode.DISTRIBUTED else full

    def released_variance(self, phase: Phase, plan: NoisePlan, arrivals: Sequence[int],
                          clip: float | None = None) -> float:
        """Per-coordinate DP noise variance of a sum released from devices whose policies' g are ``arrivals``."""
        return float(sum(self.share_std(phase, plan, g, clip) ** 2 for g in arrivals))

    def bit_scale(self, clip: float, plan: NoisePlan) -> float | None:
        """The public factor an adaptive clip's bit is sent at (None: the round sends no bit; :class:`DeviceLevel`)."""
        return None

    def carries_bit(self, phase: Phase) -> bool:
        """Whether a ``phase`` round's vector ends with the adaptive clip's scaled bit (one more coordinate)."""
        return False

    def bit_noise_multiplier(self, fleet: int) -> float | None:
        """The bit count's noise multiplier ``z_b`` (its noise std over the bit's sensitivity; None: no bit)."""
        return None

    def integer_clip(self, phase: Phase, sigma: float, fleet: int) -> float:
        """The L2 bound, at the run's starting clip, of the vector the integer mechanism encodes at noise
        multiplier ``sigma``: the phase's :meth:`sensitivity`, or with the adaptive clip's bit the update and bit
        joined (:func:`fed_nessa.privacy.skellam.joint_l2_clip`)."""
        z_bit = self.bit_noise_multiplier(fleet) if self.carries_bit(phase) else None
        return self.sensitivity(phase) if z_bit is None else joint_l2_clip(self.sensitivity(phase), sigma, z_bit)


class ExampleLevel(Mechanism):
    """One utterance pair: unit-norm statistics rows, per-example clipped DP-SGD gradients."""

    unit = PrivacyUnit.EXAMPLE
    bounds = "one pair"

    def sensitivity(self, phase: Phase) -> float:
        return suffstats.SENSITIVITY if phase == Phase.SUFFSTATS else self.cfg.clip_norm

    def stats_weight(self, n: int) -> float:
        return 1.0

    def stats_weights(self, n: np.ndarray) -> np.ndarray | None:
        return None  # every pair at weight 1

    def carried_pairs(self, n: int) -> int:
        return n

    def sends_gradients(self) -> bool:
        """Distributed mode sends one clipped-gradient sum; local mode (and ``dp-mode none``) a model delta."""
        return self.cfg.dp_mode == DPMode.DISTRIBUTED

    def gradient_units(self) -> int:
        return self.cfg.batch_size

    def payload_bound(self, phase: Phase, plan: NoisePlan, clip: float | None = None) -> float:
        """A statistics vector holds <= ``max-pairs-per-device`` unit rows; a DP-SGD sum <= the largest
        Poisson sample's clipped gradients (each coordinate <= C); local mode sends a clipped delta.
        The noise term assumes the full sigma (g = 1), so no honest device saturates whatever its g."""
        noise = PAYLOAD_SIGMAS * self.sigma(phase, plan) * self.sensitivity(phase) if self.dp else 0.0
        if phase == Phase.SUFFSTATS:
            return float(self.cfg.max_pairs_per_device) + noise
        if self.cfg.dp_mode == DPMode.DISTRIBUTED:
            return self.cfg.clip_norm * max_sampled(self.cfg, plan.sample_rate) + noise
        return float(self.cfg.update_clip)

    def event_mechanism(self, phase: Phase) -> str:
        return GAUSSIAN_SUM if phase == Phase.SUFFSTATS else DP_SGD

    def event(self, phase: Phase, round_num: int, n: int, fleet: int, sigma: float, delta: float,
              g: int) -> DPEvent:
        """The statistics sum (q = 1), or DP-SGD: one clipped-gradient sum at the device's Poisson rate
        (distributed), or Opacus' steps at ``batch / n`` (local)."""
        cfg = self.cfg
        distributed = cfg.dp_mode == DPMode.DISTRIBUTED
        mode = DISTRIBUTED if distributed else LOCAL
        source = noise_words(cfg)
        share = f"; noise share sized for g = {g} arrivals" if distributed else ""
        if phase == Phase.SUFFSTATS:
            return DPEvent(round=round_num, mechanism=GAUSSIAN_SUM, steps=1, sample_rate=1.0,
                           noise_multiplier=sigma, clip_norm=self.sensitivity(phase),
                           delta=delta, mode=mode, noise_source=event_noise_source(cfg),
                           note=f"sufficient statistics of unit-norm pairs{share}; {source}")
        q = self.device_sample_rate(n, fleet) if distributed else dp_sample_rate(n, cfg.batch_size)
        steps = 1 if distributed else dp_steps(n, cfg.batch_size, cfg.local_epochs)
        what = "one clipped-gradient sum per round" if distributed else "Opacus DP-SGD, full noise on the device"
        return DPEvent(round=round_num, mechanism=DP_SGD, steps=steps, sample_rate=q,
                       noise_multiplier=sigma, clip_norm=cfg.clip_norm, delta=delta,
                       mode=mode, noise_source=event_noise_source(cfg), note=f"{what}{share}; {source}")

    def sums_examples(self) -> bool:
        return True  # the unit is one example: a device's vector sums several units

    def plan_sample_rate(self, fleet: int, cohort: int) -> float:
        return self.cfg.round_sample_rate(1, fleet, cohort) if self.cfg.sample_rate > 0 else 0.0

    def plan_signal(self, cohort: int, q: float, sigma: float) -> float:
        cfg = self.cfg
        per_device = cfg.expected_pairs_per_device * q if q > 0 else min(cfg.batch_size, cfg.expected_pairs_per_device)
        return cohort * per_device / max(sigma * cfg.clip_norm, 1e-12)

    def auto_choice(self, rounds: int, signal: float) -> tuple[AlignerChoice, str]:
        """DP NESSA when the signal reaches :data:`AUTO_SIGNAL_THRESHOLD` (or without a linear start to fall
        back on), else the DP linear start alone."""
        go = rounds > 0 and (signal >= AUTO_SIGNAL_THRESHOLD or self.cfg.linear_start != LinearStart.SUFFSTATS)
        reason = (f"aligner auto: {signal:.0f} clipped examples per unit noise std per round "
                  f"{'>=' if go else '<'} {AUTO_SIGNAL_THRESHOLD:.0f}: "
                  + ("DP-SGD NESSA rounds, then the promotion gate" if go else "the DP linear start alone"))
        return (AlignerChoice.NESSA if go else AlignerChoice.LINEAR), reason

    def public_sample_rate(self, phase: Phase, fleet: int) -> float | None:
        """1 for the statistics sum; a fleet-wide ``sample-rate`` of distributed DP-SGD (``sample-rate = 0``
        or local mode: each device's rate depends on its pair count, so it is not cross-checked)."""
        if phase == Phase.SUFFSTATS:
            return 1.0
        if self.cfg.dp_mode == DPMode.DISTRIBUTED and self.cfg.sample_rate > 0:
            return self.cfg.round_sample_rate(1, fleet, self.cfg.cohort_size(fleet))
        return None

    def dpsgd_vector(self, net: nn.Module, shard: Shard, std: float, noise: NoiseSource,
                     sample_rate: float, clip: float | None = None, bit_scale: float | None = None) -> np.ndarray:
        """Distributed: ONE sum of per-example clipped gradients of a secret Poisson sample at ``sample_rate``
        plus the share; local: Opacus DP-SGD with the full noise on every step, the (clipped) delta sent."""
        cfg = self.cfg
        if cfg.dp_mode == DPMode.DISTRIBUTED:
            return noisy_gradient_sum(net, shard.enroll, shard.runtime, batch_size=cfg.batch_size,
                                      noise_multiplier=std / cfg.clip_norm, max_grad_norm=cfg.clip_norm, noise=noise,
                                      sample_rate=sample_rate)
        before = flat(trainable(net))
        dp = DPConfig(std / cfg.clip_norm, cfg.clip_norm, noise=noise) if self.dp else None
        train_local(net, shard.enroll, shard.runtime,
                    TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed), dp)
        delta = flat(trainable(net)) - before
        norm = float(np.linalg.norm(delta))
        if norm > cfg.update_clip:  # bounds SecAgg+'s range; not a privacy mechanism
            delta *= cfg.update_clip / norm
        return delta


class DeviceLevel(Mechanism):
    """One whole device: its statistics weighted to <= K pairs, its mean gradient clipped as one vector."""

    unit = PrivacyUnit.DEVICE
    bounds = "everything the device holds"
    implies = (PrivacyUnit.EXAMPLE,)
    clips_whole_device = True

    def sensitivity(self, phase: Phase) -> float:
        if phase == Phase.SUFFSTATS:
            return self.cfg.device_stats_pairs * suffstats.SENSITIVITY
        return self.cfg.device_clip_norm

    def stats_weight(self, n: int) -> float:
        return min(1.0, self.cfg.device_stats_pairs / max(n, 1))

    def carried_pairs(self, n: int) -> int:
        """At most ``device-stats-pairs`` pairs' weight, whatever ``n``."""
        return min(n, self.cfg.device_stats_pairs)

    def update_weight(self, n: int) -> float:
        """The weight of a device's clipped DP-FedAvg delta in the round's sum (``device-weight``): 1, or the share
        of ``device-stats-pairs`` its ``n`` pairs fill (:meth:`carried_pairs`, the weighting of its statistics).
        At most 1, so one device still moves the sum by at most the clip: the sensitivity and the ledger's
        charge are unchanged. Why: a device with few pairs fits them in its local epoch and its delta points
        away from the fleet's (docs/results.md "Why these DP-FedAvg rounds do not pay yet")."""
        if self.cfg.device_weight == DeviceWeight.EQUAL:
            return 1.0
        return self.carried_pairs(n) / self.cfg.device_stats_pairs

    def sends_gradients(self) -> bool:
        return True  # the device's clipped mean gradient, DP or not

    def gradient_units(self) -> int:
        return 1

    def payload_bound(self, phase: Phase, plan: NoisePlan, clip: float | None = None) -> float:
        """The clipped vector plus :data:`PAYLOAD_SIGMAS` of its full noise. The adaptive clip's scaled bit
        (:meth:`bit_scale`) has the same noise and a signal of at most ``C z_d / z_b``: <= C unless the bit's
        count noise is barely above the round's budget (``z_b < sqrt(2) z``), where the bound grows with it."""
        sens = self.sensitivity(phase) if clip is None or phase == Phase.SUFFSTATS else clip
        signal = sens
        scale = self.bit_scale(sens, plan) if phase == Phase.DPSGD else None
        if scale is not None:
            signal = max(sens, BIT_SENSITIVITY * scale)
        return signal + (PAYLOAD_SIGMAS * self.vector_sigma(phase, plan) * sens if self.dp else 0.0)

    def event_mechanism(self, phase: Phase) -> str:
        return GAUSSIAN_SUM  # one Gaussian sum per participation, q = 1: no amplification is claimed

    def event(self, phase: Phase, round_num: int, n: int, fleet: int, sigma: float, delta: float,
              g: int) -> DPEvent:
        """One Gaussian sum per participation at the device's whole-contribution sensitivity, q = 1."""
        what = (f"sufficient statistics weighted min(1, {self.cfg.device_stats_pairs}/n)" if phase == Phase.SUFFSTATS
                else self._dpsgd_what(fleet, sigma))
        return DPEvent(round=round_num, mechanism=GAUSSIAN_SUM, steps=1, sample_rate=1.0, noise_multiplier=sigma,
                       clip_norm=self.sensitivity(phase), delta=delta, mode=DISTRIBUTED,
                       unit=self.unit.value, noise_source=event_noise_source(self.cfg),
                       note=f"device level: {what}; no sampling; noise share sized for g = "
                            f"{g} arrivals; {noise_words(self.cfg)}")

    def _dpsgd_what(self, fleet: int, sigma: float) -> str:
        """What a device-level DP-SGD event releases, in words (the adaptive clip's joint release spelled out)."""
        if self.cfg.device_update != DeviceUpdate.FEDAVG:
            return "mean gradient over all the device's pairs, clipped as one vector"
        if self.cfg.clip_target_quantile <= 0:
            return "DP-FedAvg model delta, clipped as one vector"
        from fed_nessa.federated.noise_plan import noise_plan  # the plan is built from this module's rules

        plan = noise_plan(self.cfg, fleet)
        return (f"DP-FedAvg model delta clipped to the round's public C (clip_norm is the starting C) with noise "
                f"multiplier {self.vector_sigma(Phase.DPSGD, plan):.6g}, and in the same sum the adaptive clip's "
                f"centred bit (sensitivity {BIT_SENSITIVITY:g}, noise std {self.count_sigma(fleet):.6g}): jointly "
                f"one Gaussian sum of noise multiplier {sigma:.6g}, the one charged")

    def sums_examples(self) -> bool:
        return False  # the device's one weighted or clipped vector is the unit

    def plan_sample_rate(self, fleet: int, cohort: int) -> float:
        return 1.0  # no sampling

    def plan_signal(self, cohort: int, q: float, sigma: float) -> float:
        return cohort / max(sigma * self.cfg.device_clip_norm, 1e-12)

    def auto_choice(self, rounds: int, signal: float) -> tuple[AlignerChoice, str]:
        """No calibrated threshold at this unit: DP NESSA rounds run whenever there are any, the gate decides."""
        reason = (f"aligner auto, device level: {signal:.0f} devices per unit noise std per round; no calibrated "
                  "threshold at this unit, so DP-SGD NESSA rounds run and the promotion gate decides")
        return (AlignerChoice.NESSA if rounds > 0 else AlignerChoice.LINEAR), reason

    def public_sample_rate(self, phase: Phase, fleet: int) -> float | None:
        return 1.0

    def dpsgd_vector(self, net: nn.Module, shard: Shard, std: float, noise: NoiseSource,
                     sample_rate: float, clip: float | None = None, bit_scale: float | None = None) -> np.ndarray:
        """``fedsgd``: the mean gradient over ``device-batch`` secretly drawn pairs (a compute bound, no
        amplification claimed), clipped as ONE vector to ``device-clip-norm``, plus the share;
        ``fedavg``: :meth:`fedavg_vector` at the round's ``clip`` (default ``device-clip-norm``), with the
        adaptive clip's bit when ``bit_scale`` is given: its count share is ``std / bit_scale``
        (= :meth:`count_share_std`, since the scale is the ratio of the two noise stds)."""
        if self.cfg.device_update == DeviceUpdate.FEDAVG:
            clip = self.cfg.device_clip_norm if clip is None else clip
            if bit_scale is None:
                return self.fedavg_vector(net, shard, clip, std, noise)
            return self.fedavg_vector(net, shard, clip, std, noise, count_std=std / bit_scale, bit_scale=bit_scale)
        rows = device_subset(noise.uniform(shard.n), self.cfg.device_batch)
        return device_update(net, shard.enroll[rows], shard.runtime[rows], clip_norm=self.cfg.device_clip_norm,
                             noise_std=std, noise=noise)


    # -- DP-FedAvg and its adaptive clip ------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """Whether the clip follows a private quantile of the update norms (``clip-target-quantile > 0``)."""
        return self.cfg.clip_target_quantile > 0

    def count_sigma(self, fleet: int) -> float:
        """Noise std of the released count of adaptive-clip bits (``clip-count-noise`` x the fleet)."""
        return self.cfg.clip_count_noise * fleet

    def vector_sigma(self, phase: Phase, plan: NoisePlan) -> float:
        """A DP-SGD round with adaptive clipping: the delta's :meth:`delta_sigma` (the bit pays the rest of z)."""
        return self.delta_sigma(plan, plan.fleet) if phase == Phase.DPSGD else self.sigma(phase, plan)

    def bit_scale(self, clip: float, plan: NoisePlan) -> float | None:
        """The factor the centred bit (and its count share) is multiplied by in the payload: the delta's noise
        std over the count's, ``z_d C / sigma_b``, so the bit coordinate carries the same noise std as a
        delta coordinate and a signal of at most ``C z_d / (2 sigma_b) = C z_d / z_b`` (<= C once
        ``z_b >= sqrt(2) z``; :meth:`payload_bound` covers it either way) instead of widening SecAgg+'s range
        by ``sigma_b``. Without DP: ``C`` (the bit in [-C/2, C/2]). Public: the server divides the released
        coordinate by it. None without adaptive clipping."""
        if not self.adaptive:
            return None
        if not self.dp:
            return clip
        return self.delta_sigma(plan, plan.fleet) * clip / self.count_sigma(plan.fleet)

    def delta_sigma(self, plan: NoisePlan, fleet: int) -> float:
        """The noise multiplier of the delta sum, so that the delta AND the bit together spend ``plan``'s sigma.

        Each round releases two Gaussian sums of one device: the deltas (sensitivity C, noise
        ``z_d C``) and the centred bits (sensitivity 1/2, noise ``sigma_b``). Scaled to unit noise
        they are one Gaussian mechanism with sensitivity ``sqrt(1/z_d^2 + (1/2 / sigma_b)^2)``, i.e.
        one Gaussian sum with multiplier ``z = (z_d^-2 + (sigma_b / (1/2))^-2)^-1/2`` (Andrew et al.
        2021, Thm 1). The ledger charges ``z`` (the plan's sigma), so ``z_d`` is solved from it.
        """
        z = self.sigma(Phase.DPSGD, plan)
        if not (self.dp and self.adaptive):
            return z
        z_bit = self.bit_noise_multiplier(fleet)
        assert z_bit is not None  # DP with adaptive clipping
        if z_bit <= z:
            raise ValueError(f"clip-count-noise = {self.cfg.clip_count_noise:g}: the bit count's noise multiplier "
                             f"{z_bit:.3g} is <= the round's {z:.3g}, so the bit alone would spend the budget")
        return float((z ** -2 - z_bit ** -2) ** -0.5)

    def carries_bit(self, phase: Phase) -> bool:
        return phase == Phase.DPSGD and self.dp and self.adaptive

    def bit_noise_multiplier(self, fleet: int) -> float | None:
        return self.count_sigma(fleet) / BIT_SENSITIVITY if self.dp and self.adaptive else None

    def count_share_std(self, g: int, fleet: int) -> float:
        """One device's noise std on its centred bit (0 without DP or without adaptive clipping)."""
        return self._share(self.count_sigma(fleet), g) if self.dp and self.adaptive else 0.0

    def fedavg_vector(self, net: nn.Module, shard: Shard, clip: float, delta_std: float, noise: NoiseSource,
                      count_std: float | None = None, bit_scale: float = 1.0) -> np.ndarray:
        """A device's DP-FedAvg contribution: its clipped pseudo-gradient plus its share, then (adaptive
        clipping) one more coordinate, ``bit_scale (1[norm <= clip] - 1/2 + count share)`` (:func:`clip_bit`).

        Draw order (the vectorised engine reproduces it): ``local-epochs`` row orders
        (:func:`local_orders`), the delta's share tensor by tensor, the bit's share.
        """
        cfg = self.cfg
        orders = local_orders(noise, shard.n, cfg.local_epochs)
        delta, norm = fedavg_delta(net, shard.enroll, shard.runtime, orders=orders, batch=cfg.local_batch,
                                   lr=cfg.local_lr, clip_norm=clip, weight=self.update_weight(shard.n))
        out = with_noise_share(delta.numpy(), [p for p in net.parameters() if p.requires_grad], delta_std, noise)
        if count_std is None:
            return out
        return with_bit(out, norm, clip, count_std, bit_scale, noise)


def with_bit(vector: np.ndarray, norm: float, clip: float, count_std: float, bit_scale: float,
             noise: NoiseSource) -> np.ndarray:
    """``vector`` (a device's noised DP-FedAvg delta) and one more float32 coordinate, the adaptive clip's bit
    ``bit_scale x (1[norm <= clip] - 1/2 + count share)`` (:func:`clip_bit`; the share drawn after the delta's).
    The one place the payload's bit coordinate is formed: the device, the fleet and the block engines."""
    return np.append(vector, np.float32(clip_bit(norm, clip, count_std, noise) * bit_scale))


def clip_bit(norm: float, clip: float, count_std: float, noise: NoiseSource) -> float:
    """A device's centred adaptive-clip bit ``1[norm <= clip] - 1/2`` plus its count share (drawn after the
    delta's share: the device's and the fleet engine's draw order)."""
    bit = (1.0 if norm <= clip else 0.0) - BIT_SENSITIVITY
    if count_std > 0:
        bit += float(np.asarray(noise.normal((1,), count_std))[0])
    return bit


def local_orders(noise: NoiseSource, n: int, epochs: int) -> list[np.ndarray]:
    """One secret permutation of a device's ``n`` rows per local epoch (argsort of uniforms, stable)."""
    return [np.argsort(noise.uniform(n), kind="stable") for _ in range(epochs)]


def device_subset(uniforms: np.ndarray, batch: int) -> np.ndarray:
    """The rows of a device-level round: the ``batch`` with the smallest uniforms, in order (0: all).

    A compute bound, not a privacy mechanism: the clipped mean over these rows is still
    one vector of norm <= clip, and no amplification is claimed from drawing them.
    """
    n = len(uniforms)
    if batch <= 0 or batch >= n:
        return np.arange(n)
    return np.sort(np.argsort(uniforms, kind="stable")[:batch])


#: The registered mechanisms, by privacy unit (a new unit: one class above and one line here).
MECHANISMS: dict[str, type[Mechanism]] = {PrivacyUnit.EXAMPLE: ExampleLevel, PrivacyUnit.DEVICE: DeviceLevel}


def mechanism_for(cfg: FederationConfig) -> Mechanism:
    """The run's mechanism (its ``privacy-unit``)."""
    return MECHANISMS[cfg.privacy_unit](cfg)


def public_parameters(phase: Phase, cfg: FederationConfig, plan: NoisePlan) -> dict[str, object] | None:
    """The run's public DP parameters of a ``phase`` round under its plan (:meth:`Mechanism.public_parameters`)."""
    return mechanism_for(cfg).public_parameters(phase, plan)

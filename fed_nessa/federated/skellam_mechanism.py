"""``distributed-mechanism = skellam``: the integer mechanism of one round, as server and device build it.

Both sides build the round's :class:`~fed_nessa.federated.integer_mechanism.IntegerMechanismParams`
from public values only (the config, the noise plan with its fleet size, the payload's size, the
round and the promised g), so the server sizes SecAgg+'s field and decodes with exactly the numbers
each device encoded with. What differs per device is its noise share: sized for its OWN policy's g
(:func:`device_params`), never for a number the server sends, as with the Gaussian shares.

The four numbers every mechanism answers (docs/privacy.md "The integer mechanism"):

* sensitivity after rounding: ``norm_bound`` integer units (:func:`sensitivity_after_rounding` in
  input units). Device level: one contribution's rounded L2 norm, checked exactly on the device
  (conditional rounding). Example level: the device rounds the SUM of its clipped examples once, and
  the rounded sums of two neighbouring inputs are within the coupled bound ``c + sqrt(d)``;
* each device's noise share: Skellam of variance ``(sigma x scale x clip)^2 / g``;
* the released variance: the same per-coordinate variance as the Gaussian's, ``sum_i (sigma C)^2 / g_i``
  (the inverse rotation is orthonormal, so it keeps the variance of i.i.d. noise);
* the accounting event: a :data:`~fed_nessa.privacy.events.SKELLAM` event with the scale, bit
  width, L2 and L1 bounds, mu and the rotation's dimension (:func:`event_parameters`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fed_nessa.config import FederationConfig, Phase
from fed_nessa.federated import suffstats
from fed_nessa.federated.codec import SecAggCodec, make_codec
from fed_nessa.federated.integer_mechanism import (
    IntegerMechanismParams,
    build_params,
    decode,
    encode,
    modular_sum,
)
from fed_nessa.federated.layout import parameter_counts
from fed_nessa.federated.mechanism import max_sampled, mechanism_for
from fed_nessa.federated.secagg_field import field_sum_from_flower, flower_settings, to_flower
from fed_nessa.privacy.accounting import RDP, compute_epsilon
from fed_nessa.privacy.events import DISTRIBUTED, SKELLAM, SKELLAM_BIT_FIELD, DPEvent
from fed_nessa.privacy.skellam import DEFAULT_BETA
from fed_nessa.randomness import NoiseSource

if TYPE_CHECKING:  # the plan calibrates with this module (noise_plan imports it)
    from fed_nessa.federated.noise_plan import NoisePlan

#: Round-config key: the field's bit width as the server built it (what the devices' payloads fit).
BITS_KEY = "integer-bits"


def rotation_seed(seed: int, round_num: int) -> int:
    """The round's PUBLIC rotation seed (SHA-256 of the run seed and the round): every party derives it."""
    digest = hashlib.sha256(f"fed-nessa/skellam-rotation/{int(seed)}/{int(round_num)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sums_examples(cfg: FederationConfig) -> bool:
    """Whether a device's vector is a SUM of clipped examples (example level), rounded once with the coupled
    bound (``beta = 0``); else it is the whole unit (device level), conditionally rounded. The mechanism decides."""
    return mechanism_for(cfg).sums_examples()


def vectors_per_device(cfg: FederationConfig, phase: Phase, sample_rate: float) -> int:
    """Clipped vectors one device's sum is sized for: every pair it may carry (statistics), the bound on its
    Poisson sample (DP-SGD, as the Gaussian's payload bound), or its one vector (device level)."""
    if not sums_examples(cfg):
        return 1
    if phase == Phase.SUFFSTATS:
        return cfg.max_pairs_per_device
    return math.ceil(max_sampled(cfg, sample_rate))


def payload_dim(cfg: FederationConfig, phase: Phase, d_x: int, d_y: int) -> int:
    """Values one device's vector of ``phase`` holds (statistics, or the trainable parameters and, with the
    adaptive clip, its scaled bit as one more coordinate)."""
    if phase == Phase.SUFFSTATS:
        return suffstats.vector_size(d_x, d_y)
    bit = 1 if mechanism_for(cfg).carries_bit(phase) else 0
    return parameter_counts(cfg, d_x, d_y)[1] + bit


def round_unit(cfg: FederationConfig, phase: Phase, clip: float | None) -> float:
    """Input units per encoded unit in a round at the adaptive clip's ``clip`` (1 at a fixed clip).

    The round's parameters are built at the run's starting clip (``device-clip-norm``): a device divides
    its vector, the update clipped to ``clip`` and its bit scaled by ``bit_scale(clip)`` (both linear in the
    clip), by ``clip / device-clip-norm`` before encoding, and the server multiplies the decoded sum back.
    So the integer mechanism (scale, bounds, noise, field) is the same every round, one event covers a span
    of rounds, and each round's released noise is still ``z_d x clip`` per coordinate.
    """
    if clip is None or not mechanism_for(cfg).carries_bit(phase):
        return 1.0
    return clip / cfg.device_clip_norm


def round_params(cfg: FederationConfig, phase: Phase, plan: NoisePlan, dim: int, round_num: int,
                 promised: int) -> IntegerMechanismParams:
    """The round's public parameters: sums of at least ``promised`` devices, the field for the whole fleet.

    Their ``device_variance`` is the WHOLE noise (a device whose g is 1): the bit width and the
    decoder's bound are sized for it, so no honest device's share, whatever its g, can make a sum
    look wrapped (as the Gaussian's payload bound assumes the full sigma). A device then takes its
    share (:func:`device_params`). Sizing for every device of the fleet (not the round's cohort,
    which a device does not know when it plans) costs at most log2(fleet / cohort) bits and lets
    every party build the parameters alone. The scale is the largest of
    :data:`~fed_nessa.federated.integer_mechanism.SCALE_CANDIDATES` whose field fits 31 bits; beta is
    0 at the example level (the coupled bound), TFF's default at the device level. Raises ValueError
    (one line) when none fits.
    """
    return phase_params(cfg, phase, mechanism_for(cfg).sigma(phase, plan), plan.sample_rate, plan.fleet, dim,
                        round_num, promised)


def phase_params(cfg: FederationConfig, phase: Phase, sigma: float, sample_rate: float, fleet: int, dim: int,
                 round_num: int, promised: int) -> IntegerMechanismParams:
    """:func:`round_params` from the public numbers themselves (what the budget-split calibration varies)."""
    mech = mechanism_for(cfg)
    whole = build_params(dim, mech.integer_clip(phase, sigma, fleet), sigma, rotation_seed(cfg.seed, round_num),
                         1, max(fleet, promised), vectors_per_device(cfg, phase, sample_rate),
                         beta=0.0 if sums_examples(cfg) else DEFAULT_BETA)
    return dataclasses.replace(whole, min_devices=promised)


def calibration_epsilon(cfg: FederationConfig, fleet: int, dims: tuple[int, int],
                        phases: Sequence[tuple[Phase, float, float, int]]) -> float:
    """Epsilon (the devices' RDP accountant, at the run's delta and unit) of the integer mechanism's releases
    ``(phase, sigma, q, rounds)`` composed: the skellam events a device would record, at the parameters the
    rounds would build (their scale and so their bounds change with sigma)."""
    events = []
    for phase, sigma, q, rounds in phases:
        params = phase_params(cfg, phase, sigma, q, fleet, payload_dim(cfg, phase, *dims), 1, 1)
        mech = mechanism_for(cfg)
        z_bit = mech.bit_noise_multiplier(fleet) if mech.carries_bit(phase) else None
        events.append(DPEvent(1, SKELLAM, rounds, q, sigma, mech.sensitivity(phase), cfg.delta, DISTRIBUTED,
                              last_round=rounds, unit=str(cfg.privacy_unit),
                              skellam=event_parameters(params, sigma, z_bit)))
    return compute_epsilon(events, cfg.delta, RDP, str(cfg.privacy_unit))


def device_params(params: IntegerMechanismParams, g: int) -> IntegerMechanismParams:
    """The round's ``params`` (:func:`round_params`: the whole noise) with the share of a device sized for ``g``."""
    return dataclasses.replace(params, device_variance=params.device_variance / g)


def sensitivity_after_rounding(params: IntegerMechanismParams) -> float:
    """One contribution's L2 bound after rounding, in the input's units (>= the clip)."""
    return params.norm_bound / params.scale


def central_mu(params: IntegerMechanismParams, sigma: float) -> float:
    """The Skellam variance of a sum over g devices sized for g: ``(sigma x scale x clip)^2``."""
    return (sigma * params.scale * params.l2_clip) ** 2


def released_variance(params: IntegerMechanismParams, sigma: float, arrivals: Sequence[int]) -> float:
    """Per-coordinate DP noise variance of the decoded sum (input units), devices sized for ``arrivals``."""
    return float(sum(central_mu(params, sigma) / g for g in arrivals)) / params.scale ** 2


def event_parameters(params: IntegerMechanismParams, sigma: float,
                     bit_noise_multiplier: float | None = None) -> dict[str, float]:
    """What the device's :data:`~fed_nessa.privacy.events.SKELLAM` event records (``DPEvent.skellam``), with the
    adaptive clip's bit count noise multiplier where the vector carries the bit (the audit re-derives the
    joint bound from it: :func:`fed_nessa.privacy.events.check_skellam_parameters`)."""
    out = {"scale": params.scale, "bits": params.bits, "l2_bound": params.norm_bound, "l1_bound": params.l1_bound,
           "mu": central_mu(params, sigma), "dim": params.padded_dim, "beta": params.beta}
    if bit_noise_multiplier is not None:
        out[SKELLAM_BIT_FIELD] = bit_noise_multiplier
    return out


def encode_device(vector: np.ndarray, params: IntegerMechanismParams, noise: NoiseSource) -> np.ndarray:
    """The device's field elements: its vector (one, or the sum of its clipped examples) projected, rotated,
    rounded once; one Skellam share."""
    return encode(np.asarray(vector, np.float64), params, noise)


@dataclasses.dataclass(frozen=True)
class IntegerCodec:
    """The SecAgg+ codec of a skellam round: field elements in, the decoded float sum out.

    The same surface as :class:`~fed_nessa.federated.codec.SecAggCodec` where the round protocol
    needs it (``encode``, ``decode``, ``to_config``, ``flower_ranges``, ``device_error_std``).
    """

    params: IntegerMechanismParams
    #: Input units per encoded unit (:func:`round_unit`): a device's vector is divided by it before encoding,
    #: the decoded sum multiplied by it.
    unit: float = 1.0

    def to_encoded(self, vector: np.ndarray) -> np.ndarray:
        """A device's vector (input units) in the units the round's parameters encode."""
        return np.asarray(vector, np.float64) / self.unit

    def encode(self, field_elements: np.ndarray) -> tuple[np.ndarray, int]:
        """Field elements as the float vector Flower's (exact) quantizer maps back to them; no count coordinate."""
        values = np.asarray(field_elements)
        if values.shape != (self.params.padded_dim,) or values.min() < 0 or values.max() >= self.params.modulus:
            raise ValueError(f"a skellam payload is {self.params.padded_dim} field elements in "
                             f"[0, 2^{self.params.bits})")
        return to_flower(values, self.params), 0

    def decode(self, mean_payload: np.ndarray, n_arrived: int) -> tuple[np.ndarray, int]:
        """The decoded SUM (float32, input units) from Flower's mean; WrapAroundError for a refused sum."""
        field = field_sum_from_flower(np.asarray(mean_payload).reshape(-1), n_arrived, self.params)
        return (decode(field, self.params, n_arrived) * self.unit).astype(np.float32), 0

    def decode_field(self, encodings: np.ndarray, n_arrived: int) -> np.ndarray:
        """The decoded sum straight from the devices' field elements (a simulator's modular sum)."""
        return self.decode_sum(modular_sum(encodings, self.params), n_arrived)

    def decode_sum(self, field_sum: np.ndarray, n_arrived: int) -> np.ndarray:
        """The decoded sum (float32, input units) of ``n_arrived`` devices from the modular sum of their field
        elements (what SecAgg+ reveals; a simulator may add it up in parts); WrapAroundError for a refused sum."""
        return (decode(np.asarray(field_sum, np.int64), self.params, n_arrived) * self.unit).astype(np.float32)

    def flower_ranges(self) -> tuple[float, int, int]:
        """SecAgg+'s clipping range, quantization range and modulus: the identity on this field."""
        s = flower_settings(self.params)
        return s.clipping_range, s.quantization_range, s.modulus_range

    def device_error_std(self) -> float:
        """A bound on one device's rounding error std per coordinate (input units): 1/2, one rounding per device."""
        return 0.5 * self.unit / self.params.scale

    def to_config(self) -> dict[str, int]:
        """What the round config states of the field (every device builds the same alone)."""
        return {BITS_KEY: self.params.bits}


#: What a round encodes with: the integer field (``skellam``) or the Gaussian's scaled SecAgg+ range.
RoundCodec = SecAggCodec | IntegerCodec


def round_codec(cfg: FederationConfig, phase: Phase, plan: NoisePlan, dims: tuple[int, int], round_num: int,
                promised: int, cohort: int, payload_bound: float, clip: float | None = None) -> RoundCodec:
    """The server's codec of a round: the integer field (``skellam``, at the adaptive clip's ``clip`` where the
    round states one: :func:`round_unit`), else the Gaussian's scaled range."""
    if cfg.integer_noise:
        dim = payload_dim(cfg, phase, *dims)
        return IntegerCodec(round_params(cfg, phase, plan, dim, round_num, promised), round_unit(cfg, phase, clip))
    return make_codec(payload_bound, cfg.secagg_clipping_range, cfg.secagg_quantization_range, cohort)


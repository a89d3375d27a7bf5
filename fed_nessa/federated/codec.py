"""SecAgg+ glue: fit a device's vector into the quantization range, count saturation, decode the sum.

Flower's SecAgg+ (``secaggplus_mod`` + ``SecAggPlusWorkflow``) quantizes every
coordinate a device sends to ``q`` integer levels over ``[-c, c]`` (``c`` the
clipping range) with stochastic rounding, *clips* whatever lies outside, and
returns to the server only the mean over the devices that arrived. Two things
can silently corrupt that aggregate, so this module makes both visible:

* **saturation**: a coordinate outside ``[-c, c]`` is clipped without notice.
  Every device scales its vector by ``scale = headroom * c / payload_bound``
  (``payload_bound`` is the largest magnitude an honest vector can have in the
  phase), so honest coordinates stay inside ``headroom * c``. Each device checks
  its own scaled vector *before* encoding and fails locally (:class:`SaturationError`,
  nothing sent) if any coordinate would be clipped: one device can neither corrupt
  the sum silently nor halt the round for everyone. The extra count coordinate is
  kept as a diagnostic only (honest devices send 0; a dishonest one can put any
  value there, so the server logs it and never acts on it).
* **wrap-around**: the sum of ``n`` quantized values must stay below the
  modulus (2**32); :mod:`fed_nessa.config` rejects ``n * q >= 2**32``.

Every device sends the same weight (no ``num_examples``), so the decoded
aggregate is a plain SUM whose sensitivity does not depend on data sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from fed_nessa.config import SECAGG_MODULUS_RANGE
from fed_nessa.errors import FedNessaError

# The weight every device sends to SecAgg+ and the workflow's max_weight: equal, so the
# workflow's "weighted mean" is the plain mean and its weight factor is exactly q.
CONSTANT_WEIGHT = 1
MAX_WEIGHT = 1.0
# Share of the clipping range honest coordinates may use (the rest is a safety margin).
DEFAULT_HEADROOM = 0.5
MAX_SATURATION_CAP = 255


class SaturationError(FedNessaError, RuntimeError):
    """A device's vector would be clipped by SecAgg+'s quantization range: it is not sent."""


@dataclass(frozen=True)
class SecAggCodec:
    """How vectors of one round are scaled into, and decoded from, SecAgg+'s range.

    Built by the server (:func:`make_codec`), sent to the devices in the round's
    config (:meth:`to_config` / :meth:`from_config`), so both sides use the
    same numbers.
    """

    payload_bound: float
    clipping_range: float
    quantization_range: int
    scale: float
    saturation_cap: int
    saturation_unit: float

    def encode(self, vector: np.ndarray) -> tuple[np.ndarray, int]:
        """Return ``(payload, 0)``: the scaled vector plus the (zero) diagnostic count coordinate.

        ``payload`` is float64 (SecAgg+ quantizes it). A vector with a non-finite value or
        with any coordinate beyond the clipping range raises here, on the device, before
        anything is masked or sent.
        """
        v = np.asarray(vector, dtype=np.float64).reshape(-1)
        if not np.isfinite(v).all():
            raise ValueError("update vector has non-finite values; refusing to send it")
        scaled = v * self.scale
        saturated = int(np.count_nonzero(np.abs(scaled) > self.clipping_range))
        if saturated:
            raise SaturationError(
                f"{saturated} coordinate(s) of this device's vector exceed SecAgg+'s clipping range after "
                f"scaling (largest |value| {float(np.abs(v).max()):.4g} vs the round's payload bound "
                f"{self.payload_bound:.4g}); not sent: the device drops out of this round")
        return np.append(scaled, 0.0), 0

    def decode(self, mean_payload: np.ndarray, n_arrived: int) -> tuple[np.ndarray, int]:
        """From SecAgg+'s mean over ``n_arrived`` devices, return ``(sum_vector, saturated_total)``.

        ``sum_vector`` is float32 in the devices' original units; the
        saturation total is exact because the count unit is far above the
        quantization error of ``n_arrived`` devices (see :func:`make_codec`).
        """
        if n_arrived < 1:
            raise ValueError("cannot decode an aggregate of zero devices")
        total = np.asarray(mean_payload, dtype=np.float64).reshape(-1) * n_arrived
        saturated = int(round(total[-1] / self.saturation_unit)) if self.saturation_cap else 0
        return (total[:-1] / self.scale).astype(np.float32), max(saturated, 0)

    @property
    def step(self) -> float:
        """One quantization step in the devices' own units."""
        return 2.0 * self.clipping_range / self.quantization_range / self.scale

    def sum_error_bound(self, n_arrived: int) -> float:
        """Worst-case per-coordinate error of a decoded sum (stochastic rounding, one step per device)."""
        return n_arrived * self.step

    def device_error_std(self) -> float:
        """Upper bound on the std of one device's stochastic-rounding error per coordinate, in its units.

        Rounding to a grid of step ``s`` picks a neighbour with probability ``p``; the error's
        variance ``p (1 - p) s^2`` is at most ``s^2 / 4``.
        """
        return 0.5 * self.step

    def flower_ranges(self) -> tuple[float, int, int]:
        """SecAgg+'s clipping range, quantization range and modulus for this codec's rounds."""
        return self.clipping_range, self.quantization_range, SECAGG_MODULUS_RANGE

    def to_config(self) -> dict[str, float | int]:
        """Flat, ConfigRecord-safe form (keys prefixed ``codec-``)."""
        return {f"codec-{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict) -> SecAggCodec:
        """Inverse of :meth:`to_config`; a missing key is a clear error."""
        try:
            return cls(
                payload_bound=float(config["codec-payload_bound"]),
                clipping_range=float(config["codec-clipping_range"]),
                quantization_range=int(config["codec-quantization_range"]),
                scale=float(config["codec-scale"]),
                saturation_cap=int(config["codec-saturation_cap"]),
                saturation_unit=float(config["codec-saturation_unit"]),
            )
        except KeyError as exc:
            raise ValueError(f"round config lacks the SecAgg+ codec key {exc.args[0]!r}") from None


def make_codec(payload_bound: float, clipping_range: float, quantization_range: int, cohort: int,
               headroom: float = DEFAULT_HEADROOM) -> SecAggCodec:
    """The codec for a round of at most ``cohort`` devices.

    The saturation count is capped so that one count unit is at least four
    times the worst-case quantization error of the whole cohort's sum, which
    makes the decoded total exact (rounding to the nearest unit).
    """
    if not payload_bound > 0 or not math.isfinite(payload_bound):
        raise ValueError(f"payload bound must be a positive finite number, got {payload_bound!r}")
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
    if cohort < 1:
        raise ValueError(f"cohort must be >= 1, got {cohort}")
    room = headroom * clipping_range
    step = 2.0 * clipping_range / quantization_range
    # The count is a diagnostic only: when the cohort's rounding error is too large to carry it
    # exactly (fleet scale), it is switched off (cap 0) rather than refusing the round.
    cap = max(0, min(MAX_SATURATION_CAP, int(room / (4.0 * cohort * step))))
    return SecAggCodec(
        payload_bound=float(payload_bound),
        clipping_range=float(clipping_range),
        quantization_range=int(quantization_range),
        scale=room / payload_bound,
        saturation_cap=cap,
        saturation_unit=room / cap if cap else room,
    )


def saturation_note(saturated_total: int, round_num: int) -> str | None:
    """The diagnostic for a non-zero reported count (honest devices never send one).

    Any device can write any value into the count coordinate, so it is reported, never
    acted on: devices check their own range before encoding.
    """
    if saturated_total > 0:
        return (f"round {round_num}: the secure sum's diagnostic count coordinate reads {saturated_total}; "
                "honest devices send 0 (they refuse to send a saturated vector), so some device sent a "
                "non-protocol value there. Diagnostic only: not acted on.")
    return None

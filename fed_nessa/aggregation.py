"""SecAgg+ glue: fit a device's vector into the quantization range, count saturation, decode the sum.

Flower's SecAgg+ (``secaggplus_mod`` + ``SecAggPlusWorkflow``) quantizes every
coordinate a device sends to ``q`` integer levels over ``[-c, c]`` (``c`` the
clipping range) with stochastic rounding, *clips* whatever lies outside, and
returns to the server only the mean over the devices that arrived. Two things
can silently corrupt that aggregate, so this module makes both visible:

* **saturation**: a coordinate outside ``[-c, c]`` is clipped without notice.
  Every device scales its vector by ``scale = headroom * c / payload_bound``
  (``payload_bound`` is the largest magnitude an honest vector can have in the
  phase), so honest coordinates stay inside ``headroom * c``. It also counts
  the coordinates that would still be clipped and appends that count (capped)
  as one extra coordinate: it travels through the same secure sum, so the
  server learns only the *total* count over the cohort, never which device
  saturated. The server fails loudly when the total is above zero.
* **wrap-around**: the sum of ``n`` quantized values must stay below the
  modulus (2**32); :mod:`fed_nessa.config` rejects ``n * q >= 2**32``.

Every device sends the same weight (no ``num_examples``), so the decoded
aggregate is a plain SUM whose sensitivity does not depend on data sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# The weight every device sends to SecAgg+ and the workflow's max_weight: equal, so the
# workflow's "weighted mean" is the plain mean and its weight factor is exactly q.
CONSTANT_WEIGHT = 1
MAX_WEIGHT = 1.0
# Share of the clipping range honest coordinates may use (the rest is a safety margin).
DEFAULT_HEADROOM = 0.5
MAX_SATURATION_CAP = 255


class SaturationError(RuntimeError):
    """The secure sum reports coordinates clipped by SecAgg+'s quantizer: the aggregate is wrong."""


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
        """Return ``(payload, saturated)``: the scaled vector + the count coordinate, and the count.

        ``payload`` is float64 (SecAgg+ quantizes it); coordinates beyond the
        clipping range are left for the quantizer to clip but are counted.
        """
        v = np.asarray(vector, dtype=np.float64).reshape(-1)
        if not np.isfinite(v).all():
            raise ValueError("update vector has non-finite values; refusing to send it")
        scaled = v * self.scale
        saturated = int(np.count_nonzero(np.abs(scaled) > self.clipping_range))
        count_coord = min(saturated, self.saturation_cap) * self.saturation_unit
        return np.append(scaled, count_coord), saturated

    def decode(self, mean_payload: np.ndarray, n_arrived: int) -> tuple[np.ndarray, int]:
        """From SecAgg+'s mean over ``n_arrived`` devices, return ``(sum_vector, saturated_total)``.

        ``sum_vector`` is float32 in the devices' original units; the
        saturation total is exact because the count unit is far above the
        quantization error of ``n_arrived`` devices (see :func:`make_codec`).
        """
        if n_arrived < 1:
            raise ValueError("cannot decode an aggregate of zero devices")
        total = np.asarray(mean_payload, dtype=np.float64).reshape(-1) * n_arrived
        saturated = int(round(total[-1] / self.saturation_unit))
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
    cap = min(MAX_SATURATION_CAP, int(room / (4.0 * cohort * step)))
    if cap < 1:
        raise ValueError(
            f"secagg-quantization-range {quantization_range} is too coarse for {cohort} devices per round: "
            "the saturation count cannot be carried exactly; raise it"
        )
    return SecAggCodec(
        payload_bound=float(payload_bound),
        clipping_range=float(clipping_range),
        quantization_range=int(quantization_range),
        scale=room / payload_bound,
        saturation_cap=cap,
        saturation_unit=room / cap,
    )


def check_saturation(saturated_total: int, round_num: int) -> None:
    """Fail loudly when any coordinate of the round's secure sum was clipped."""
    if saturated_total > 0:
        raise SaturationError(
            f"round {round_num}: {saturated_total} coordinate(s) saturated SecAgg+'s quantization range "
            "(a device's vector exceeded its payload bound); the aggregate is not released. Raise "
            "secagg-clipping-range or fix the payload bound."
        )

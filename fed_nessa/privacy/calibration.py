"""Noise multipliers calibrated to a target epsilon (the inverse of the accountant).

A run that says "spend 40 % of epsilon 8 on the statistics round and the rest on 1,000
DP-SGD rounds at q = 0.02" needs the two sigmas that make the composition land exactly on
the budget. Every party computes them from public numbers with the same accountant (RDP,
the devices' budget accountant), so the server and every device agree bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from fed_nessa.privacy.accounting import RDP, compute_epsilon
from fed_nessa.privacy.events import DISTRIBUTED, DP_SGD, GAUSSIAN_SUM, DPEvent

#: Bracket and precision of the search (relative).
SIGMA_RANGE = (0.05, 2000.0)
RELATIVE_TOLERANCE = 1e-4


def _epsilon(sigma: float, prior_sigma: float | None, sample_rate: float, steps: int, delta: float) -> float:
    events = []
    if prior_sigma is not None:
        events.append(DPEvent(1, GAUSSIAN_SUM, 1, 1.0, prior_sigma, 1.0, delta, DISTRIBUTED))
    events.append(DPEvent(2, DP_SGD, steps, sample_rate, sigma, 1.0, delta, DISTRIBUTED))
    return compute_epsilon(events, delta, RDP)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Epsilon at ``delta`` of one Gaussian sum at noise multiplier ``sigma`` alone (RDP; the inverse of
    ``sigma_for_epsilon(epsilon, delta)``)."""
    return _epsilon(sigma, None, 1.0, 1, delta)


@functools.lru_cache(maxsize=1024)
def sigma_for_epsilon(epsilon: float, delta: float, sample_rate: float = 1.0, steps: int = 1,
                      prior_sigma: float | None = None) -> float:
    """The smallest sigma with epsilon(prior Gaussian sum at ``prior_sigma`` + ``steps`` Poisson-subsampled
    Gaussian steps at ``sample_rate``) <= ``epsilon`` at ``delta`` (RDP).

    Raises ValueError when even the largest sigma cannot fit (the prior alone spends the budget).
    """
    return smallest_sigma(lambda sigma: _epsilon(sigma, prior_sigma, sample_rate, steps, delta), epsilon,
                          f"delta {delta:g}, q {sample_rate:g}, {steps} step(s), prior sigma {prior_sigma}")


def smallest_sigma(epsilon_at: Callable[[float], float], epsilon: float, what: str) -> float:
    """The smallest noise multiplier in :data:`SIGMA_RANGE` (within :data:`RELATIVE_TOLERANCE`) whose
    ``epsilon_at(sigma)`` is <= ``epsilon``: the one search every mechanism's calibration uses.

    Bisection keeps ``epsilon_at(hi) <= epsilon``, so the result never exceeds the budget even where
    ``epsilon_at`` is not monotone (the integer mechanism's scale steps with sigma). Raises ValueError
    naming ``what`` when even the largest sigma does not fit.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    lo, hi = SIGMA_RANGE
    if epsilon_at(hi) > epsilon:
        raise ValueError(f"no noise multiplier up to {hi:g} keeps epsilon <= {epsilon:g} ({what})")
    if epsilon_at(lo) <= epsilon:
        return lo
    while hi / lo > 1 + RELATIVE_TOLERANCE:
        mid = math.sqrt(lo * hi)
        if epsilon_at(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi

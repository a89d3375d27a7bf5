"""The exact epsilon of full-batch Gaussian sums (q = 1), in closed form.

Gaussian mechanisms with noise multipliers z_i compose (adaptively) to one Gaussian
mechanism with mu = sqrt(sum 1/z_i^2) (Dong, Roth & Su 2019, mu-GDP), whose exact
delta(epsilon) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018) is
inverted by bisection. A third, analytic method beside RDP and PLD: the device-level
histories are exactly such Gaussians, so this is the reference both must bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from fed_nessa.privacy.accountants.accountant import Accountant, History
from fed_nessa.privacy.events import DPEvent

GAUSSIAN = "gaussian"
#: Bisection steps on epsilon (the bracket halves each step: far below any reported digit).
BISECTION_STEPS = 100


class GaussianAccountant(Accountant):
    """mu-GDP composition and the analytic Gaussian's delta(epsilon), inverted; q = 1 histories only."""

    name = GAUSSIAN
    subsampled = False

    def epsilon(self, events: Sequence[DPEvent], delta: float) -> float:
        """mu summed event by event (not over merged groups): the audit's figures stay bit for bit."""
        spent = [ev for ev in events if ev.steps]
        _check_full_batch(float(ev.sample_rate) for ev in spent)
        return _invert(math.sqrt(sum(ev.steps / ev.noise_multiplier ** 2 for ev in spent)), delta)

    def epsilon_of_history(self, groups: History, delta: float) -> float:
        _check_full_batch(q for q, _, _ in groups)
        return _invert(math.sqrt(sum(steps / sigma ** 2 for _, sigma, steps in groups)), delta)


def _check_full_batch(rates: Iterable[float]) -> None:
    if any(q < 1.0 for q in rates):
        raise ValueError("the gaussian accountant covers q = 1 histories only (no subsampling)")


def _invert(mu: float, delta: float) -> float:
    """The smallest epsilon with delta(epsilon) <= ``delta`` for a mu-GDP mechanism (0.0 for mu = 0)."""
    from scipy.stats import norm

    if mu == 0.0:
        return 0.0

    def delta_of(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi

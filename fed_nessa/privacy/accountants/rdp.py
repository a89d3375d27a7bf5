"""Opacus' Rényi-DP analysis of the Poisson-subsampled Gaussian: an analytic upper bound.

RDP curves of every event are added, then converted to (epsilon, delta) once. What devices
budget with (the default everywhere). A :data:`~fed_nessa.privacy.events.SKELLAM` event enters
with its own RDP curve (:func:`fed_nessa.privacy.skellam.curve_at`), so a history that mixes the
integer mechanism with Gaussian events composes here exactly as RDP composes.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np

from fed_nessa.privacy.accountants.accountant import Accountant, History, history
from fed_nessa.privacy.events import SKELLAM, DPEvent

RDP = "rdp"
#: Opacus' default RDP orders, so a device using Opacus' RDPAccountant and an
#: auditor using this module get the same number.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


class RDPAccountant(Accountant):
    """RDP composed by addition over (q, sigma, steps) groups, converted with Opacus' ``get_privacy_spent``."""

    name = RDP
    covers_integer = True
    #: The orders the curves are evaluated at (a subclass may evaluate more).
    orders: tuple[float, ...] = RDP_ORDERS

    def epsilon(self, events: Sequence[DPEvent], delta: float) -> float:
        """Gaussian events merged into groups as before; skellam events each by their own curve."""
        gaussian = [ev for ev in events if ev.mechanism != SKELLAM]
        total = sum((self.event_rdp(ev) for ev in events if ev.mechanism == SKELLAM and ev.steps),
                    start=self._groups_rdp(history(gaussian)))
        return rdp_to_epsilon(total, self.orders, delta) if total.any() else 0.0

    def epsilon_of_history(self, groups: History, delta: float) -> float:
        return rdp_to_epsilon(self._groups_rdp(groups), self.orders, delta)

    def _groups_rdp(self, groups: History) -> np.ndarray:
        return sum((_one_step(q, sigma, self.orders) * steps for q, sigma, steps in groups),
                   start=np.zeros(len(self.orders)))

    def event_rdp(self, ev: DPEvent) -> np.ndarray:
        """One event's RDP curve at :attr:`orders` (all its steps)."""
        if ev.mechanism == SKELLAM:
            from fed_nessa.privacy.skellam import curve_at, event_release

            return curve_at(event_release(ev), self.orders)
        return _one_step(float(ev.sample_rate), float(ev.noise_multiplier), self.orders) * ev.steps

    def curve(self, events: Sequence[DPEvent], delta: float) -> list[float]:
        """Incremental: one running RDP total, converted after each event."""
        total = np.zeros(len(self.orders))
        out = []
        for ev in events:
            if ev.steps:
                total = total + self.event_rdp(ev)
            out.append(rdp_to_epsilon(total, self.orders, delta) if total.any() else 0.0)
        return out


@functools.lru_cache(maxsize=4096)
def _one_step_cached(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    # compute_rdp is ~0.3 s per call (series over fractional orders) and linear in
    # steps, so one step per (q, sigma) is computed once and scaled.
    from opacus.accountants.analysis import rdp as rdp_analysis

    values = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    return tuple(float(v) for v in np.atleast_1d(values))


def _one_step(q: float, sigma: float, orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    return np.asarray(_one_step_cached(q, sigma, orders))


def rdp_to_epsilon(rdp: Sequence[float] | np.ndarray, orders: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve given at ``orders``, by Opacus' conversion.

    The one RDP -> (epsilon, delta) conversion of the project (Balle et al. 2020, as Opacus
    implements it), so every mechanism's accountant (the Gaussian's here, the integer mechanism's in
    :mod:`fed_nessa.privacy.skellam`) converts the same way.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        # "optimal order is the largest/smallest alpha": the bound is still valid, only looser.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp, dtype=np.float64),
                                                delta=delta)
    return float(eps)

"""Epsilon from a history of DP events, with three independent accountants.

The events are the record; epsilon is always *derived*. Three accountants:

- ``"rdp"``: Opacus' Rényi-DP analysis of the Poisson-subsampled Gaussian
  (``opacus.accountants.analysis.rdp``), composed over every event by adding RDP
  curves, then converted once. An analytic upper bound; what devices budget with.
- ``"prv"``: Opacus' PRV accountant (Gopi et al. 2021), fed the same history.
- ``"pld"``: Google's ``dp_accounting`` privacy-loss-distribution accountant:
  ``PoissonSampledDpEvent(GaussianDpEvent)`` self-composed ``steps`` times,
  composed over events. Independent code from a different team: the auditor's
  second opinion.

PRV and PLD are numerically tight (they differ by their discretisation error,
~0.01); RDP is a looser bound, so ``rdp >= pld`` up to that error. Composition
is commutative, so events with identical (q, sigma) are merged for speed.

A span of K rounds (``DPEvent.last_round``) needs nothing special: its
``steps`` already counts every step of the span. :class:`EpsilonMemo` lets the
audit compute each *distinct* history once: a fleet of 10,000 devices that ran
the same schedule has 10,000 ledgers but one history to account.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from fed_nessa.privacy.events import DEVICE, EXAMPLE, UNITS, DPEvent

RDP = "rdp"
PRV = "prv"
PLD = "pld"
ACCOUNTANTS: tuple[str, ...] = (RDP, PRV, PLD)

#: Opacus' default RDP orders, so a device using Opacus' RDPAccountant and an
#: auditor using this module get the same number.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
#: PRV: Opacus' default error budget on epsilon (the returned value is its upper end).
PRV_EPS_ERROR = 0.01
#: PLD value discretisation: pessimistic rounding, so the result stays an upper bound;
#: 1e-3 and 1e-4 agree to 3 decimals on the field-notes table and 1e-3 is ~10x faster.
PLD_DISCRETIZATION = 1e-3

#: Largest L2 change of a device-level contribution when ONE example of the device changes,
#: in units of the device clip: both the old and the new contribution have norm <= clip.
EXAMPLE_PER_DEVICE_SENSITIVITY = 2.0

History = list[tuple[float, float, int]]  # (sample_rate, noise_multiplier, steps)
#: A history as the accountants see it, in order: one (q, sigma, steps) per event.
AccountingKey = tuple[tuple[float, float, int, str], ...]


class UnitNotCoveredError(ArithmeticError):
    """A device-level epsilon was asked of a history with example-level events (no device bound)."""


def for_unit(events: Sequence[DPEvent], unit: str = EXAMPLE) -> list[DPEvent]:
    """The events as the accountants must see them for a guarantee in ``unit``.

    ``example``: an example-level event as recorded; a device-level event with its noise
    multiplier halved, because changing one example changes the device's clipped
    contribution by at most :data:`EXAMPLE_PER_DEVICE_SENSITIVITY` x clip.
    ``device``: device-level events as recorded; an example-level event that spent anything
    bounds nothing about a whole device (only group privacy would), so the history is not
    covered and :class:`UnitNotCoveredError` is raised.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == DEVICE:
        uncovered = [ev for ev in events if ev.unit != DEVICE and ev.steps > 0]
        if uncovered:
            raise UnitNotCoveredError(f"{len(uncovered)} example-level event(s) (first: round {uncovered[0].round}) "
                                      "give no device-level guarantee")
        return list(events)
    return [ev if ev.unit == EXAMPLE else dataclasses.replace(
        ev, noise_multiplier=ev.noise_multiplier / EXAMPLE_PER_DEVICE_SENSITIVITY) for ev in events]


def history(events: Sequence[DPEvent]) -> History:
    """Merge events into (q, sigma, total steps) groups; zero-step events drop out.

    Merging every event with the same (q, sigma), not only consecutive ones, is
    exact because composition is commutative.
    """
    totals: dict[tuple[float, float], int] = {}
    for ev in events:
        if ev.steps == 0:
            continue
        key = (float(ev.sample_rate), float(ev.noise_multiplier))
        totals[key] = totals.get(key, 0) + ev.steps
    return [(q, sigma, steps) for (q, sigma), steps in totals.items()]


def compute_epsilon(events: Sequence[DPEvent], delta: float, accountant: str = RDP, unit: str = EXAMPLE) -> float:
    """Epsilon at ``delta`` of all ``events`` composed, for a guarantee in ``unit`` (0.0 for an empty history)."""
    _check_args(delta, accountant)
    groups = history(for_unit(events, unit))
    if not groups:
        return 0.0
    if accountant == RDP:
        return _rdp_epsilon(_rdp_total(groups), delta)
    if accountant == PRV:
        return _prv_epsilon(groups, delta)
    return _pld_epsilon(groups, delta)


def epsilon_curve(events: Sequence[DPEvent], delta: float, accountant: str = RDP,
                  unit: str = EXAMPLE) -> list[float]:
    """Epsilon after each event in order (for plots and for checking reported values)."""
    _check_args(delta, accountant)
    events = for_unit(events, unit)
    if accountant == RDP:
        total = np.zeros(len(RDP_ORDERS))
        curve = []
        for ev in events:
            if ev.steps:
                total = total + _rdp_one_step(float(ev.sample_rate), float(ev.noise_multiplier)) * ev.steps
            curve.append(_rdp_epsilon(total, delta) if total.any() else 0.0)
        return curve
    if accountant == PLD:
        acc = _pld_accountant()
        curve = []
        for ev in events:
            if ev.steps:
                acc.compose(_pld_event(float(ev.sample_rate), float(ev.noise_multiplier)), ev.steps)
                curve.append(float(acc.get_epsilon(delta)))
            else:
                curve.append(curve[-1] if curve else 0.0)
        return curve
    return [compute_epsilon(events[: i + 1], delta, PRV) for i in range(len(events))]


def gaussian_epsilon(events: Sequence[DPEvent], delta: float, unit: str = DEVICE) -> float:
    """Exact epsilon of a history of full-batch Gaussian sums (q = 1), in closed form.

    Gaussian mechanisms with noise multipliers z_i compose (adaptively) to one Gaussian
    mechanism with mu = sqrt(sum 1/z_i^2) (Dong, Roth & Su 2019, mu-GDP), whose exact
    delta(epsilon) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang 2018) is
    inverted by bisection. A third, analytic method beside RDP and PLD: the device-level
    histories here are exactly such Gaussians, so this is the reference both must bound.
    """
    from scipy.stats import norm

    seen = for_unit(events, unit)
    if any(ev.sample_rate < 1.0 for ev in seen if ev.steps):
        raise ValueError("gaussian_epsilon covers q = 1 histories only (no subsampling)")
    mu = math.sqrt(sum(ev.steps / ev.noise_multiplier ** 2 for ev in seen))
    if mu == 0.0:
        return 0.0

    def delta_of(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def accounting_key(events: Sequence[DPEvent]) -> AccountingKey:
    """Exactly what :func:`epsilon_curve` and :func:`compute_epsilon` read of ``events``.

    Everything else (round, last_round, note, mode, clip norm, mechanism name)
    cannot change an epsilon, so two ledgers with equal keys have equal curves;
    keeping the order keeps the per-event curve exact. The unit is kept: it decides how
    an event enters each guarantee (:func:`for_unit`).
    """
    return tuple((float(ev.sample_rate), float(ev.noise_multiplier), int(ev.steps), ev.unit) for ev in events)


class EpsilonMemo:
    """:func:`epsilon_curve` memoised on (:func:`accounting_key`, delta, accountant).

    Why: the audit replays every device's ledger through two accountants, and a
    PLD composition costs ~0.1-1 s; at fleet scale most devices share one
    schedule, so each distinct history is composed once per accountant.
    ``hits``/``misses`` say how much was shared. One memo per audit keeps the
    memory bounded by the run audited.
    """

    def __init__(self) -> None:
        self._curves: dict[tuple[AccountingKey, float, str, str], tuple[float, ...]] = {}
        self.hits = 0
        self.misses = 0

    def curve(self, events: Sequence[DPEvent], delta: float, accountant: str = RDP,
              unit: str = EXAMPLE) -> list[float]:
        """Epsilon after each event, as :func:`epsilon_curve` gives it (a fresh list)."""
        key = (accounting_key(events), float(delta), accountant, unit)
        found = self._curves.get(key)
        if found is None:
            self.misses += 1
            found = self._curves[key] = tuple(epsilon_curve(events, delta, accountant, unit))
        else:
            self.hits += 1
        return list(found)

    def epsilon(self, events: Sequence[DPEvent], delta: float, accountant: str = RDP, unit: str = EXAMPLE) -> float:
        """Epsilon of all ``events`` (0.0 for an empty history), from the memoised curve."""
        return self.curve(events, delta, accountant, unit)[-1] if events else 0.0

    def stats(self) -> dict[str, int]:
        """Curves computed (``misses``: one per distinct history and accountant) and reused (``hits``)."""
        return {"misses": self.misses, "hits": self.hits}


def _check_args(delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


@functools.lru_cache(maxsize=4096)
def _rdp_one_step_cached(q: float, sigma: float) -> tuple[float, ...]:
    # compute_rdp is ~0.3 s per call (series over fractional orders) and linear in
    # steps, so one step per (q, sigma) is computed once and scaled.
    from opacus.accountants.analysis import rdp as rdp_analysis

    values = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS))
    return tuple(float(v) for v in np.atleast_1d(values))


def _rdp_one_step(q: float, sigma: float) -> np.ndarray:
    return np.asarray(_rdp_one_step_cached(q, sigma))


def _rdp_total(groups: History) -> np.ndarray:
    return sum((_rdp_one_step(q, sigma) * steps for q, sigma, steps in groups),
               start=np.zeros(len(RDP_ORDERS)))


def _rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    return rdp_to_epsilon(rdp, RDP_ORDERS, delta)


def rdp_to_epsilon(rdp: Sequence[float] | np.ndarray, orders: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve given at ``orders``, by Opacus' conversion.

    The one RDP -> (epsilon, delta) conversion of the project (Balle et al. 2020, as Opacus
    implements it), so every mechanism's accountant converts the same way.
    """
    import warnings

    from opacus.accountants.analysis import rdp as rdp_analysis

    with warnings.catch_warnings():
        # "optimal order is the largest/smallest alpha": the bound is still valid, only looser.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp, dtype=np.float64),
                                                delta=delta)
    return float(eps)


def _prv_epsilon(groups: History, delta: float) -> float:
    import warnings

    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    # Opacus' history layout is (noise_multiplier, sample_rate, steps).
    acc.history = [(sigma, q, steps) for q, sigma, steps in groups]
    with warnings.catch_warnings():
        # q == 1 makes log(1 - q) = -inf inside the PRV pdf: harmless, masked by np.where.
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    if not math.isfinite(eps):
        raise ArithmeticError(f"PRV accountant returned {eps} for history {groups}")
    return eps


def _pld_accountant():
    from dp_accounting.pld import pld_privacy_accountant

    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _pld_event(q: float, sigma: float):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def _pld_epsilon(groups: History, delta: float) -> float:
    acc = _pld_accountant()
    for q, sigma, steps in groups:
        acc.compose(_pld_event(q, sigma), steps)
    return float(acc.get_epsilon(delta))

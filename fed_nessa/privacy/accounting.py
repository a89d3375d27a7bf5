"""Epsilon from a history of DP events: the unit of the guarantee, then an accountant by name.

The events are the record; epsilon is always *derived*. The accountants themselves live in
:mod:`fed_nessa.privacy.accountants` behind one interface and a registry:

- ``"rdp"``: Opacus' Rényi-DP analysis of the Poisson-subsampled Gaussian, an analytic upper
  bound; what devices budget with.
- ``"prv"``: Opacus' PRV accountant (Gopi et al. 2021), fed the same history.
- ``"pld"``: Google's ``dp_accounting`` privacy-loss-distribution accountant: independent
  code from a different team, the auditor's second opinion.
- ``"gaussian"``: the exact closed form of full-batch (q = 1) Gaussian sums, the reference the
  device-level histories are checked against.

PRV and PLD are numerically tight (they differ by their discretisation error,
~0.01); RDP is a looser bound, so ``rdp >= pld`` up to that error. Composition
is commutative, so events with identical (q, sigma) are merged for speed.

This module keeps what is not an accountant's business: which events a guarantee in a unit
sees (:func:`for_unit`), the argument checks, and the memo. A span of K rounds
(``DPEvent.last_round``) needs nothing special: its ``steps`` already counts every step of the
span. :class:`EpsilonMemo` lets the audit compute each *distinct* history once: a fleet of
10,000 devices that ran the same schedule has 10,000 ledgers but one history to account.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fed_nessa.privacy.accountants import (
    ACCOUNTANTS,
    GAUSSIAN,
    PLD,
    PRV,
    RDP,
    SKELLAM_ACCOUNTANT,
    Accountant,
    History,
    create_accountant,
    history,
)
from fed_nessa.privacy.events import DEVICE, EXAMPLE, SKELLAM, UNITS, DPEvent

# Re-exported: the ledgers, budget, statement, audit and commands import these names from here.
__all__ = ["ACCOUNTANTS", "EXAMPLE_PER_DEVICE_SENSITIVITY", "GAUSSIAN", "PLD", "PRV", "RDP", "AccountingKey",
           "EpsilonMemo", "History", "MechanismNotCoveredError", "SKELLAM_ACCOUNTANT", "UnitNotCoveredError",
           "accounting_key", "compute_epsilon", "epsilon_curve", "for_unit", "gaussian_epsilon", "history"]

#: Largest L2 change of a device-level contribution when ONE example of the device changes,
#: in units of the device clip: both the old and the new contribution have norm <= clip.
EXAMPLE_PER_DEVICE_SENSITIVITY = 2.0

#: A history as the accountants see it, in order: one (q, sigma, steps, unit, skellam parameters) per event.
AccountingKey = tuple[tuple[float, float, int, str, tuple[tuple[str, float], ...]], ...]


class MechanismNotCoveredError(ValueError):
    """An accountant was asked for a history holding a mechanism it does not analyse (the integer one)."""


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
    return [ev if ev.unit == EXAMPLE else _per_example(ev) for ev in events]


def _per_example(ev: DPEvent) -> DPEvent:
    """A device-level event as one example's guarantee sees it: sensitivity x :data:`EXAMPLE_PER_DEVICE_SENSITIVITY`.

    A Gaussian event's noise multiplier is divided by it; a skellam event's L2 and L1 bounds are
    multiplied by it (the change is the difference of two rounded vectors, each within the bounds).
    """
    factor = EXAMPLE_PER_DEVICE_SENSITIVITY
    if ev.skellam is None:
        return dataclasses.replace(ev, noise_multiplier=ev.noise_multiplier / factor)
    bounds = {**ev.skellam, "l2_bound": ev.skellam["l2_bound"] * factor, "l1_bound": ev.skellam["l1_bound"] * factor}
    return dataclasses.replace(ev, noise_multiplier=ev.noise_multiplier / factor, skellam=bounds)


def compute_epsilon(events: Sequence[DPEvent], delta: float, accountant: str = RDP, unit: str = EXAMPLE) -> float:
    """Epsilon at ``delta`` of all ``events`` composed, for a guarantee in ``unit`` (0.0 for an empty history)."""
    acc = _accountant(delta, accountant, events)
    return acc.epsilon(for_unit(events, unit), delta)


def epsilon_curve(events: Sequence[DPEvent], delta: float, accountant: str = RDP,
                  unit: str = EXAMPLE) -> list[float]:
    """Epsilon after each event in order (for plots and for checking reported values)."""
    acc = _accountant(delta, accountant, events)
    return acc.curve(for_unit(events, unit), delta)


def gaussian_epsilon(events: Sequence[DPEvent], delta: float, unit: str = DEVICE) -> float:
    """Exact epsilon of a history of full-batch Gaussian sums (q = 1): the ``"gaussian"`` accountant."""
    return compute_epsilon(events, delta, GAUSSIAN, unit)


def accounting_key(events: Sequence[DPEvent]) -> AccountingKey:
    """Exactly what :func:`epsilon_curve` and :func:`compute_epsilon` read of ``events``.

    Everything else (round, last_round, note, mode, clip norm, mechanism name: a skellam event is
    told apart by its parameters) cannot change an epsilon, so two ledgers with equal keys have equal curves;
    keeping the order keeps the per-event curve exact. The unit is kept: it decides how
    an event enters each guarantee (:func:`for_unit`).
    """
    return tuple((float(ev.sample_rate), float(ev.noise_multiplier), int(ev.steps), ev.unit,
                  tuple(sorted((ev.skellam or {}).items()))) for ev in events)


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


def _accountant(delta: float, accountant: str, events: Sequence[DPEvent] = ()) -> Accountant:
    """The registered accountant, after checking ``delta`` and that it covers every event's mechanism
    (each bad input is one clear error)."""
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    acc = create_accountant(accountant)
    if not acc.covers_integer and any(ev.mechanism == SKELLAM for ev in events):
        raise MechanismNotCoveredError(f"the {accountant} accountant has no {SKELLAM} mechanism; a history with the "
                                       f"integer mechanism is accounted by {RDP} or {SKELLAM_ACCOUNTANT}")
    return acc

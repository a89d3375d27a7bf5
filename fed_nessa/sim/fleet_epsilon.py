"""The fleet engine's epsilon after each round, as the progress bar and the per-round summary show it.

A fleet device reserves its whole DP-SGD phase as one span (fed_nessa.sim.fleet), so its ledger
holds every step from the first DP-SGD round on, and its final epsilon is known only then. After
round ``r`` the figure shown is each device's ledger events for rounds <= r, a span counted for
the rounds of it the device was scheduled in up to r (whether or not it dropped out, as the
ledger charges it): max and median over devices. At the last round this is exactly the ledgers'
epsilon. Identical histories are composed once (:class:`fed_nessa.privacy.accounting.EpsilonMemo`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
from collections.abc import Sequence

from fed_nessa.privacy.accounting import EpsilonMemo, UnitNotCoveredError
from fed_nessa.privacy.events import DPEvent
from fed_nessa.privacy.ledger import DeviceLedger


def events_up_to(events: Sequence[DPEvent], scheduled: Sequence[int], r: int) -> list[DPEvent]:
    """``events`` as of the end of round ``r``: later events dropped, a span cut to its scheduled rounds <= r."""
    out = []
    for ev in events:
        if ev.round > r:
            continue
        if ev.last_round is not None and ev.last_round > r:
            lo = bisect.bisect_left(scheduled, ev.round)
            steps = min(ev.steps, bisect.bisect_right(scheduled, r) - lo)
            if steps <= 0:
                continue
            ev = dataclasses.replace(ev, steps=steps, last_round=r)
        out.append(ev)
    return out


class SpentEpsilon:
    """Epsilon max and median over a fleet's devices after each round (see the module docstring)."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self._memo = EpsilonMemo()
        self._events: list[list[DPEvent]] | None = None

    def changed(self) -> None:
        """The ledgers gained events (a statistics round, the spans' reservation): read them again."""
        self._events = None

    def after(self, r: int, ledgers: Sequence[DeviceLedger], deltas: Sequence[float],
              scheduled: dict[int, list[int]]) -> dict[str, float]:
        """``epsilon_max`` and ``epsilon_median`` after round ``r``."""
        if self._events is None:
            self._events = [ledger.events() for ledger in ledgers]
        values = [self._epsilon(events_up_to(ev, scheduled.get(i, []), r), deltas[i])
                  for i, ev in enumerate(self._events)]
        values = values or [0.0]
        return {"epsilon_max": max(values), "epsilon_median": statistics.median(values)}

    def _epsilon(self, events: list[DPEvent], delta: float) -> float:
        try:
            return float(self._memo.epsilon(events, delta, unit=self.unit))
        except UnitNotCoveredError:
            return math.inf

"""The one interface every accountant implements (the shape of Opacus' ``accountants/accountant.py``).

An accountant turns a history of DP events into epsilon at a delta. It is stateless here (the
events are the record, kept by the ledgers), so one instance serves every device. The events it
is given are already as the guarantee's unit needs them (:func:`fed_nessa.privacy.accounting.for_unit`):
an accountant reads only each event's sample rate, noise multiplier and steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from fed_nessa.privacy.events import DPEvent

History = list[tuple[float, float, int]]  # (sample_rate, noise_multiplier, steps)


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


class Accountant(ABC):
    """Epsilon of a composed history of (Poisson-subsampled) Gaussian events.

    A new accountant is one module with a subclass and one line in :mod:`.registry`.
    """

    #: The name ledgers, budgets, the audit and the CLI use for this accountant.
    name: ClassVar[str]
    #: Whether it covers Poisson-subsampled events (q < 1); a closed form for full-batch sums does not.
    subsampled: ClassVar[bool] = True
    #: Whether it covers the integer mechanism's events (:data:`~fed_nessa.privacy.events.SKELLAM`);
    #: one that does not refuses a history holding one (:func:`fed_nessa.privacy.accounting.compute_epsilon`).
    covers_integer: ClassVar[bool] = False

    def epsilon(self, events: Sequence[DPEvent], delta: float) -> float:
        """Epsilon at ``delta`` of all ``events`` composed (0.0 when nothing was spent)."""
        groups = history(events)
        return self.epsilon_of_history(groups, delta) if groups else 0.0

    @abstractmethod
    def epsilon_of_history(self, groups: History, delta: float) -> float:
        """Epsilon of a non-empty merged history (:func:`history`)."""

    def curve(self, events: Sequence[DPEvent], delta: float) -> list[float]:
        """Epsilon after each event in order; by default every prefix accounted afresh.

        Accountants that compose incrementally (RDP, PLD) override this for speed.
        """
        return [self.epsilon(events[: i + 1], delta) for i in range(len(events))]

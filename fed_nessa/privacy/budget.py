"""The budget rule a device applies before it joins a round.

A device joins only if the epsilon of *everything it has reserved so far plus
the planned event* stays within its budget at its delta. Checking the planned
event (not only the past) is what makes "every device's epsilon <= budget" hold
at all times instead of being discovered one round too late.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fed_nessa.errors import FedNessaError
from fed_nessa.privacy.accounting import RDP, UnitNotCoveredError, compute_epsilon
from fed_nessa.privacy.events import EXAMPLE, DPEvent


class BudgetExceededError(FedNessaError, ValueError):
    """An event was about to be reserved although it would cross the device's budget."""


@dataclass(frozen=True)
class BudgetDecision:
    """Whether the planned event fits, with both epsilons so the reply can say why."""

    allowed: bool
    epsilon_now: float
    epsilon_if_run: float
    reason: str


def validate_budget(epsilon_budget: float, delta: float) -> None:
    if not (isinstance(epsilon_budget, (int, float)) and math.isfinite(epsilon_budget)
            and epsilon_budget > 0):
        raise ValueError(f"epsilon budget must be a finite number > 0, got {epsilon_budget!r}")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_budget(events: Sequence[DPEvent], planned: DPEvent, epsilon_budget: float,
                 delta: float, accountant: str = RDP, unit: str = EXAMPLE) -> BudgetDecision:
    """Decide whether ``planned`` may run given the ``events`` already reserved.

    ``unit`` is the unit the budget is stated in; a device-level budget declines any event
    that would leave its history without a device-level bound (an example-level event).
    """
    validate_budget(epsilon_budget, delta)
    try:
        eps_now = compute_epsilon(events, delta, accountant, unit)
        eps_if_run = compute_epsilon([*events, planned], delta, accountant, unit)
    except UnitNotCoveredError as exc:
        return BudgetDecision(False, math.inf, math.inf,
                              f"declined: this device budgets per {unit}; {exc}")
    if eps_if_run <= epsilon_budget:
        return BudgetDecision(True, eps_now, eps_if_run,
                              f"epsilon {eps_now:.4g} -> {eps_if_run:.4g} stays within the budget "
                              f"{epsilon_budget:g} at delta {delta:g} ({accountant}, per {unit})")
    return BudgetDecision(False, eps_now, eps_if_run,
                          f"declined: round {planned.round} would take epsilon from {eps_now:.4g} to "
                          f"{eps_if_run:.4g}, over the budget {epsilon_budget:g} at delta {delta:g} "
                          f"({accountant}, per {unit})")

"""The server's release rule, as a pure function of public counts.

Distributed DP rests on it: every device sizes its noise share for ``g`` arrivals
(its own policy's ``g``, never larger than what the server promised), so a sum of
fewer devices would carry less noise than every ledger records. The rule is applied
*before* SecAgg+'s unmasking stage: below ``g`` arrivals the server never asks for
the unmasking shares, so no sum exists to be misused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fed_nessa.config import FederationConfig

#: SecAgg+ needs at least this many devices in a round.
MIN_SECAGG_DEVICES = 3


def promised_arrivals(cfg: FederationConfig, cohort_size: int | None) -> int:
    """g for a round: the fewest devices whose sum the server will unmask and release.

    ``max(min-arrivals, ceil(min-arrival-fraction x cohort))``; sent to every device in
    the round's plan so each can decline a promise below its own policy's ``g``.
    """
    if not cohort_size:
        return int(cfg.min_arrivals)
    return max(int(cfg.min_arrivals), math.ceil(cfg.min_arrival_fraction * cohort_size))


@dataclass(frozen=True)
class ReleaseDecision:
    release: bool
    reason: str


def may_start(accepted: int, promised: int) -> ReleaseDecision:
    """Whether a SecAgg+ round is worth starting: enough devices accepted the plan."""
    need = max(promised, MIN_SECAGG_DEVICES)
    if accepted < need:
        return ReleaseDecision(False, f"{accepted} device(s) accepted the plan, fewer than the {need} "
                                      "a release needs: no SecAgg+ round")
    return ReleaseDecision(True, f"{accepted} device(s) accepted (>= {need})")


def may_unmask(arrived: int, promised: int) -> ReleaseDecision:
    """Whether the server may ask for unmasking shares for ``arrived`` masked vectors."""
    if arrived < promised:
        return ReleaseDecision(False, f"only {arrived} masked vector(s) arrived, fewer than the promised "
                                      f"g = {promised}: not unmasked, nothing released")
    return ReleaseDecision(True, f"{arrived} masked vector(s) arrived (>= g = {promised})")

"""The release rule: g from the run config and the cohort; start and unmask only with enough devices."""

from __future__ import annotations

from fed_nessa.config import FederationConfig
from fed_nessa.federated.release import MIN_SECAGG_DEVICES, may_start, may_unmask, promised_arrivals


def test_promised_arrivals_is_the_larger_of_the_floor_and_the_fraction() -> None:
    cfg = FederationConfig().replace(min_arrivals=4, min_arrival_fraction=0.5)
    assert promised_arrivals(cfg, None) == 4 and promised_arrivals(cfg, 0) == 4
    assert promised_arrivals(cfg, 40) == 20 and promised_arrivals(cfg, 41) == 21  # ceil
    assert promised_arrivals(cfg, 5) == 4  # never below min-arrivals


def test_may_start_needs_g_accepted_and_a_secagg_cohort() -> None:
    assert not may_start(9, 10).release and "fewer than the 10" in may_start(9, 10).reason
    assert may_start(10, 10).release
    assert not may_start(MIN_SECAGG_DEVICES - 1, 1).release and may_start(MIN_SECAGG_DEVICES, 1).release


def test_may_unmask_needs_g_masked_vectors() -> None:
    decision = may_unmask(4, 5)
    assert not decision.release and "only 4 masked vector(s) arrived, fewer than the promised g = 5" in decision.reason
    assert may_unmask(5, 5).release and may_unmask(6, 5).release

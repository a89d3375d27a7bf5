"""The accountant registry and each accountant behind the one interface, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_nessa.privacy.accountants import (
    ACCOUNTANT_REGISTRY,
    ACCOUNTANTS,
    GAUSSIAN,
    PLD,
    PRV,
    RDP,
    SKELLAM_ACCOUNTANT,
    Accountant,
    create_accountant,
)
from fed_nessa.privacy.accounting import compute_epsilon, epsilon_curve
from fed_nessa.privacy.events import DEVICE, DPEvent

torch.set_num_threads(1)
DELTA = 1e-5


def _ev(q: float, sigma: float, steps: int, r: int = 1, unit: str = "example") -> DPEvent:
    mechanism = "gaussian-sum" if (q, steps) == (1.0, 1) else "dp-sgd"
    return DPEvent(round=r, mechanism=mechanism, steps=steps, sample_rate=q, noise_multiplier=sigma,
                   clip_norm=1.0, delta=DELTA, mode="distributed", unit=unit)


def _analytic_gaussian(sigma: float) -> float:
    """Balle & Wang (2018) by a root finder independent of the accountant's bisection."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def delta_of(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - np.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    return float(brentq(lambda e: delta_of(e) - DELTA, 1e-6, 50))


def test_the_registry_names_every_accountant_once_and_builds_it() -> None:
    assert set(ACCOUNTANT_REGISTRY) == {RDP, PRV, PLD, GAUSSIAN, SKELLAM_ACCOUNTANT}
    for name, cls in ACCOUNTANT_REGISTRY.items():
        acc = create_accountant(name)
        assert isinstance(acc, Accountant) and isinstance(acc, cls) and acc.name == name


def test_budgetable_accountants_are_those_that_cover_subsampling() -> None:
    # The closed form covers q = 1 only: a reference for the audit, never a device's budget.
    assert ACCOUNTANTS == (RDP, PRV, PLD, SKELLAM_ACCOUNTANT)
    assert GAUSSIAN not in ACCOUNTANTS


@pytest.mark.parametrize("name", ["gdp", "", "RDP", None])
def test_an_unknown_name_is_one_clear_error(name) -> None:
    with pytest.raises(ValueError, match=r"accountant must be one of \('rdp', 'prv', 'pld', 'gaussian', 'skellam'\)"):
        create_accountant(name)
    with pytest.raises(ValueError, match="accountant must be one of"):
        compute_epsilon([_ev(0.1, 1.0, 1)], DELTA, name)


# Hand-computed in tests/test_privacy_accounting.py (the field-notes table, Opacus 1.6, delta 1e-5).
@pytest.mark.parametrize("name,expected,tol", [(RDP, 3.44, 0.006), (PRV, 2.86, 0.006), (PLD, 2.86, 0.03)])
def test_each_subsampled_accountant_on_the_field_notes_case(name: str, expected: float, tol: float) -> None:
    assert create_accountant(name).epsilon([_ev(0.1, 1.0, 10)], DELTA) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("name,tol", [(GAUSSIAN, 1e-6), (PLD, 0.01), (PRV, 0.02)])
def test_one_gaussian_sum_matches_the_analytic_gaussian(name: str, tol: float) -> None:
    exact = _analytic_gaussian(2.0)
    assert create_accountant(name).epsilon([_ev(1.0, 2.0, 1)], DELTA) == pytest.approx(exact, abs=tol)
    assert create_accountant(RDP).epsilon([_ev(1.0, 2.0, 1)], DELTA) >= exact


def test_gaussian_composes_as_mu_gdp() -> None:
    # Four sums at sigma 4 are one Gaussian at mu = sqrt(4 / 16) = 1/2, i.e. one sum at sigma 2.
    four = [_ev(1.0, 4.0, 1, r) for r in range(4)]
    assert create_accountant(GAUSSIAN).epsilon(four, DELTA) == pytest.approx(_analytic_gaussian(2.0), abs=1e-6)


def test_gaussian_refuses_subsampled_histories() -> None:
    with pytest.raises(ValueError, match="q = 1"):
        create_accountant(GAUSSIAN).epsilon([_ev(0.1, 1.0, 10)], DELTA)


@pytest.mark.parametrize("name", list(ACCOUNTANT_REGISTRY))
def test_nothing_spent_is_zero(name: str) -> None:
    acc = create_accountant(name)
    assert acc.epsilon([], DELTA) == 0.0
    assert acc.epsilon([_ev(1.0, 2.0, 0)], DELTA) == 0.0
    assert acc.curve([_ev(1.0, 2.0, 0)], DELTA) == [0.0]


@pytest.mark.parametrize("name", [RDP, PLD, GAUSSIAN])
def test_the_incremental_curve_equals_each_prefix_accounted_afresh(name: str) -> None:
    events = [_ev(1.0, 3.0, 1, r) for r in range(3)] + [_ev(1.0, 3.0, 0, 3), _ev(1.0, 2.0, 1, 4)]
    acc = create_accountant(name)
    fresh = [acc.epsilon(events[: i + 1], DELTA) for i in range(len(events))]
    assert acc.curve(events, DELTA) == pytest.approx(fresh, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("unit", ["example", DEVICE])
def test_the_prv_curve_of_device_level_events_ends_at_the_total(unit: str) -> None:
    # The PRV curve used to account each prefix per example whatever the unit asked, after the
    # unit's view was already applied: sigma / 4 per example (sigma / 2 per device), overstating both.
    events = [_ev(1.0, 6.0, 1, r, unit=DEVICE) for r in range(2)]
    total = compute_epsilon(events, DELTA, PRV, unit)
    assert epsilon_curve(events, DELTA, PRV, unit)[-1] == pytest.approx(total, abs=1e-9)


def test_the_gaussian_sums_mu_event_by_event_as_it_always_did() -> None:
    # Merging 29 equal events into one group changes mu in its last bit; the audit's figures must not move.
    import math

    from fed_nessa.privacy.accountants.gaussian import _invert

    events = [_ev(1.0, 20.0, 1, r, unit=DEVICE) for r in range(29)]
    mu = math.sqrt(sum(1 / 20.0 ** 2 for _ in events))
    assert create_accountant(GAUSSIAN).epsilon(events, DELTA) == _invert(mu, DELTA)

"""Accountants: known values, agreement between independent implementations, curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_nessa.privacy.accounting import compute_epsilon, epsilon_curve, history
from fed_nessa.privacy.events import DPEvent

torch.set_num_threads(1)
DELTA = 1e-5


def _ev(q: float, sigma: float, steps: int, r: int = 1) -> DPEvent:
    if q == 1.0 and steps == 1:
        return DPEvent(round=r, mechanism="gaussian-sum", steps=1, sample_rate=1.0, noise_multiplier=sigma,
                       clip_norm=1.0, delta=DELTA, mode="distributed")
    return DPEvent(round=r, mechanism="dp-sgd", steps=steps, sample_rate=q, noise_multiplier=sigma,
                   clip_norm=1.0, delta=DELTA, mode="local")


# The field-notes table (Opacus 1.6, delta 1e-5).
KNOWN = [(0.1, 1.0, 10, 3.44, 2.86), (0.1, 1.0, 30, 4.85, 4.19), (0.1, 1.0, 100, 7.90, 7.06),
         (0.1, 1.0, 50, 5.88, 5.16), (0.2, 0.8, 25, 12.35, 10.93), (0.1, 1.5, 100, 3.92, 3.55)]


@pytest.mark.parametrize("q,sigma,steps,eps_rdp,eps_prv", KNOWN)
def test_known_values_of_the_field_notes_table(q, sigma, steps, eps_rdp, eps_prv) -> None:
    events = [_ev(q, sigma, steps)]
    assert compute_epsilon(events, DELTA, "rdp") == pytest.approx(eps_rdp, abs=0.006)
    assert compute_epsilon(events, DELTA, "prv") == pytest.approx(eps_prv, abs=0.006)
    # PLD is independent code (Google dp_accounting) and tight like PRV.
    assert compute_epsilon(events, DELTA, "pld") == pytest.approx(eps_prv, abs=0.03)


def test_splitting_steps_over_rounds_changes_nothing() -> None:
    one = [_ev(0.1, 1.0, 30)]
    three = [_ev(0.1, 1.0, 10, r) for r in (1, 2, 3)]
    for acc in ("rdp", "pld"):
        assert compute_epsilon(three, DELTA, acc) == pytest.approx(compute_epsilon(one, DELTA, acc), rel=1e-9)


def test_history_merges_equal_parameters_and_drops_zero_steps() -> None:
    events = [_ev(0.1, 1.0, 10), _ev(0.2, 1.0, 5), _ev(0.1, 1.0, 0), _ev(0.1, 1.0, 7)]
    assert sorted(history(events)) == [(0.1, 1.0, 17), (0.2, 1.0, 5)]
    assert compute_epsilon([], DELTA, "rdp") == 0.0
    assert compute_epsilon([_ev(0.1, 1.0, 0)], DELTA, "pld") == 0.0


def test_more_noise_means_less_epsilon_and_more_steps_more() -> None:
    for acc in ("rdp", "prv", "pld"):
        a = compute_epsilon([_ev(0.1, 1.0, 50)], DELTA, acc)
        assert compute_epsilon([_ev(0.1, 2.0, 50)], DELTA, acc) < a
        assert compute_epsilon([_ev(0.1, 1.0, 80)], DELTA, acc) > a


def test_gaussian_sum_matches_the_analytic_gaussian_mechanism() -> None:
    # One Gaussian mechanism, sensitivity 1, std sigma: exact epsilon from Balle & Wang (2018).
    from scipy.optimize import brentq
    from scipy.stats import norm

    sigma = 2.0

    def delta_of(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - np.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    exact = brentq(lambda e: delta_of(e) - DELTA, 1e-6, 50)
    events = [_ev(1.0, sigma, 1)]
    assert compute_epsilon(events, DELTA, "pld") == pytest.approx(exact, abs=0.01)
    assert compute_epsilon(events, DELTA, "prv") == pytest.approx(exact, abs=0.02)
    assert compute_epsilon(events, DELTA, "rdp") >= exact


# Agreement tolerance used by the audit: PLD (tight) never exceeds RDP (an upper bound) by more
# than its discretisation error, and RDP overshoots PLD by at most 35% + 0.2 on these histories.
REALISTIC = [
    [_ev(0.05, 0.6, 2000)],
    [_ev(1.0, 3.0, 1, r) for r in range(40)],
    [_ev(0.1, 1.0, 10, r) for r in range(30)] + [_ev(1.0, 2.0, 1, 31)],
    [_ev(0.5, 1.2, 20, r) for r in range(10)],
    [_ev(0.08, 3.0, 500)],
    [_ev(0.25, 0.9, 4, r) for r in range(5)] + [_ev(0.1, 1.4, 12, r) for r in range(5, 25)],
]


@pytest.mark.slow
@pytest.mark.parametrize("events", REALISTIC, ids=range(len(REALISTIC)))
def test_independent_accountants_agree_on_realistic_histories(events) -> None:
    rdp, prv, pld = (compute_epsilon(events, DELTA, a) for a in ("rdp", "prv", "pld"))
    assert pld == pytest.approx(prv, rel=0.01, abs=0.03)
    assert pld <= rdp * 1.001 + 0.01
    assert rdp <= 1.35 * pld + 0.2


def test_curve_is_monotone_and_ends_at_the_total() -> None:
    events = [_ev(0.1, 1.0, 10, r) for r in range(4)] + [_ev(0.1, 1.0, 0, 4), _ev(1.0, 3.0, 1, 5)]
    for acc in ("rdp", "pld"):
        curve = epsilon_curve(events, DELTA, acc)
        assert len(curve) == len(events)
        assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:]))
        assert curve[-1] == pytest.approx(compute_epsilon(events, DELTA, acc), rel=1e-6, abs=1e-6)
        assert curve[4] == curve[3]


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon([_ev(0.1, 1.0, 1)], DELTA, "gdp")
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon([_ev(0.1, 1.0, 1)], 0.0)


@pytest.mark.parametrize("accountant", ["rdp", "pld", "prv"])
def test_a_span_accounts_exactly_as_its_per_round_events(accountant: str) -> None:
    rounds = 40
    span = DPEvent(round=1, last_round=rounds, mechanism="dp-sgd", steps=rounds, sample_rate=0.02,
                   noise_multiplier=1.5, clip_norm=1.0, delta=DELTA, mode="distributed")
    per_round = [_ev(0.02, 1.5, 1, r) for r in range(1, rounds + 1)]
    gs = _ev(1.0, 5.0, 1, 0)
    assert compute_epsilon([gs, span], DELTA, accountant) == pytest.approx(
        compute_epsilon([gs, *per_round], DELTA, accountant), rel=1e-9)
    assert epsilon_curve([gs, span], DELTA, accountant)[-1] == pytest.approx(
        epsilon_curve([gs, *per_round], DELTA, accountant)[-1], rel=1e-3, abs=1e-3)


def test_memo_reuses_curves_across_rounds_and_notes_and_matches_the_direct_curve() -> None:
    from dataclasses import replace

    from fed_nessa.privacy.accounting import EpsilonMemo, accounting_key

    a = [_ev(1.0, 5.0, 1, 0), _ev(0.05, 1.2, 20, 1)]
    b = [replace(a[0], note="other device"), replace(a[1], round=7, last_round=26)]  # same schedule, shifted
    c = [a[1], a[0]]  # same events, other order: another curve
    assert accounting_key(a) == accounting_key(b) != accounting_key(c)
    memo = EpsilonMemo()
    for acc in ("rdp", "pld"):
        assert memo.curve(a, DELTA, acc) == epsilon_curve(a, DELTA, acc)
        assert memo.curve(b, DELTA, acc) == epsilon_curve(b, DELTA, acc)
        assert memo.curve(c, DELTA, acc) == epsilon_curve(c, DELTA, acc)
        assert memo.epsilon([], DELTA, acc) == 0.0
    assert memo.stats() == {"misses": 4, "hits": 2}  # b reused a's curve, per accountant
    memo.curve(a, DELTA, "rdp").append(99.0)  # callers get a fresh list: the memo is not corrupted
    assert memo.curve(a, DELTA, "rdp") == epsilon_curve(a, DELTA, "rdp")

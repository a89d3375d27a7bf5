"""One-run audit statistics: closed forms, Clopper–Pearson equivalence, soundness on simulated DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fed_nessa.canary.stats import (
    clopper_pearson_lower,
    epsilon_lower_bound_cp,
    epsilon_lower_bound_one_run,
    guesses,
    one_run_audit,
    p_value_one_run,
    roc_auc,
    tpr_at_fpr,
)


def test_all_guesses_correct_has_a_closed_form() -> None:
    # delta = 0: P[Bin(r, q) >= r] = q^r < 0.05  <=>  q < 0.05^(1/r); epsilon = logit(q).
    for r in (10, 100, 500):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound_one_run(r, r, r, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_chance_level_guessing_gives_zero() -> None:
    assert epsilon_lower_bound_one_run(1000, 1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound_one_run(1000, 0, 0, 1e-5) == 0.0
    assert epsilon_lower_bound_cp(1000, 510) == 0.0


def test_delta_zero_is_exactly_clopper_pearson() -> None:
    for r, v in [(100, 80), (1000, 600), (50, 49), (300, 200)]:
        a = epsilon_lower_bound_one_run(r, r, v, 0.0, 0.95)
        assert a == pytest.approx(epsilon_lower_bound_cp(r, v, 0.95), abs=1e-5)


def test_clopper_pearson_matches_scipy_exact_interval() -> None:
    # scipy's two-sided exact interval at 90% has the one-sided 95% lower bound as its low end.
    ci = stats.binomtest(37, 50).proportion_ci(confidence_level=0.90, method="exact")
    assert clopper_pearson_lower(37, 50, 0.95) == pytest.approx(ci.low, rel=1e-9)


def test_delta_and_more_canaries_weaken_the_bound() -> None:
    base = epsilon_lower_bound_one_run(1000, 200, 190, 0.0)
    with_delta = epsilon_lower_bound_one_run(1000, 200, 190, 1e-5)
    more_m = epsilon_lower_bound_one_run(100000, 200, 190, 1e-5)
    assert base > with_delta > more_m > 0
    assert p_value_one_run(1000, 200, 190, 1.0, 1e-5) >= p_value_one_run(1000, 200, 190, 1.0, 0.0)


def test_bound_is_sound_on_simulated_randomized_response() -> None:
    # Each canary's guess is epsilon-DP randomized response: the lower bound must stay below epsilon.
    rng = np.random.default_rng(0)
    for eps in (0.5, 2.0, 4.0):
        m = 4000
        included = rng.random(m) < 0.5
        correct = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        guess_in = np.where(correct, included, ~included)
        scores = guess_in.astype(float) + 1e-3 * rng.random(m)  # a tie-broken score that carries the guess
        res = one_run_audit(scores, included, delta=0.0)
        assert res.epsilon_lower_bound <= eps
        assert res.epsilon_lower_bound > 0.5 * eps  # and it is not vacuous


def test_perfect_attack_gives_a_large_bound_and_auc_one() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    scores = included + 0.01 * rng.random(1000)
    res = one_run_audit(scores, included, delta=1e-5)
    assert res.auroc == 1.0 and res.tpr_at_fpr["0.01"] == 1.0
    assert res.epsilon_lower_bound > 4.0
    assert res.correct == res.guesses


def test_random_scores_give_no_leak() -> None:
    rng = np.random.default_rng(2)
    included = rng.random(2000) < 0.5
    res = one_run_audit(rng.normal(size=2000), included, delta=1e-5)
    assert res.epsilon_lower_bound < 0.3
    assert abs(res.auroc - 0.5) < 0.05


def test_guesses_roc_and_tpr_helpers() -> None:
    s = np.array([0.1, 0.9, 0.5, 0.3, 0.7])
    assert guesses(s, 2, 1).tolist() == [-1, 1, 0, 0, 1]
    inc = np.array([False, True, True, False, True])
    assert roc_auc(s, inc) == 1.0
    assert tpr_at_fpr(s, inc, 0.0) == 1.0
    assert roc_auc(-s, inc) == 0.0
    with pytest.raises(ValueError):
        guesses(s, 3, 3)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound_one_run(10, 5, 6, 0.0)
    with pytest.raises(ValueError):
        one_run_audit([0.1, float("nan")], [True, False], 1e-5)
    with pytest.raises(ValueError):
        one_run_audit([0.1], [True, False], 1e-5)

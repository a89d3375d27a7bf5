"""The Skellam accounting: the closed form against the numerical divergence, subsampling, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_nessa.privacy.accountants.rdp import rdp_to_epsilon
from fed_nessa.privacy.skellam import (
    NUMERICAL_TAIL_SDS,
    SKELLAM_ORDERS,
    SkellamRelease,
    audit_release,
    audit_shift,
    calibrate_variance,
    integer_l1_bound,
    numerical_divergence,
    numerical_divergences,
    numerical_rdp,
    poisson_subsampled_rdp,
    release_rdp,
    rounded_l2_norm_bound,
    skellam_epsilon,
    skellam_log_pmf,
    skellam_rdp,
)


@pytest.mark.parametrize("variance", [0.5, 2.0, 10.0, 100.0, 1e4])
@pytest.mark.parametrize("order", [2, 3, 5, 8, 16, 32])
@pytest.mark.parametrize("shift", [1, 2, 5, 20])
def test_closed_form_bounds_the_numerical_divergence(variance: float, order: int, shift: int) -> None:
    numerical = numerical_divergence(order, shift, variance)
    assert numerical > 0
    assert skellam_rdp(order, shift, shift, variance) >= numerical


def test_closed_form_bounds_vector_shifts() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        shift = rng.integers(-4, 5, size=int(rng.integers(2, 30)))
        variance = float(rng.choice([1.0, 7.0, 60.0, 900.0]))
        order = int(rng.choice([2, 4, 9, 20]))
        l2, l1 = float(np.linalg.norm(shift)), float(np.abs(shift).sum())
        assert skellam_rdp(order, l2, l1, variance) >= numerical_rdp(order, shift, variance)


def test_numerical_divergence_tends_to_the_gaussian_and_the_bound_is_tight_there() -> None:
    """At large variance both computations approach a Delta^2/(2 mu): a numerical sum of 0 would fail."""
    order, shift, variance = 8, 5, 1e4
    gaussian = order * shift ** 2 / (2 * variance)
    numerical = numerical_divergence(order, shift, variance)
    assert numerical == pytest.approx(gaussian, rel=1e-3)
    assert skellam_rdp(order, shift, shift, variance) == pytest.approx(numerical, rel=1e-2)


def test_log_pmf_is_normalised_and_has_the_variance_including_the_far_tail() -> None:
    k = np.arange(-400, 401)
    for variance in (0.3, 4.0, 50.0):
        pmf = np.exp(skellam_log_pmf(k, variance))
        assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
        assert (pmf * k ** 2).sum() == pytest.approx(variance, rel=1e-9)
    # where scipy's ive underflows, the Bessel series takes over (finite, decreasing)
    tail = skellam_log_pmf(np.array([300, 400, 800]), 1.0)
    assert np.isfinite(tail).all() and tail[0] > tail[1] > tail[2]


def test_rounded_l2_norm_bound_matches_the_formula() -> None:
    c, d, beta = 100.0, 1024, math.exp(-0.5)
    expected = math.sqrt(c ** 2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2))
    assert rounded_l2_norm_bound(c, beta, d) == pytest.approx(expected)
    assert rounded_l2_norm_bound(c, 0.0, d) == c + math.sqrt(d)
    assert rounded_l2_norm_bound(1.0, 1e-300, 4) == 1.0 + 2.0  # the always-true bound is the smaller
    with pytest.raises(ValueError):
        rounded_l2_norm_bound(1.0, 1.0, 4)


def test_integer_l1_bound() -> None:
    assert integer_l1_bound(3.0, 100) == 9.0  # |v| <= v^2 for integers
    assert integer_l1_bound(100.0, 16) == 400.0  # Cauchy-Schwarz


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_subsampling_of_a_gaussian_base_is_opacus_exact_rdp(q: float) -> None:
    """A Gaussian base (eps(a) = a/(2 s^2)) subsampled: Opacus' exact integer-order RDP (Mironov et al. 2019)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    sigma = 1.2
    base = np.array([a / (2 * sigma ** 2) for a in SKELLAM_ORDERS])
    ours = poisson_subsampled_rdp(base, q)
    exact = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(SKELLAM_ORDERS)))
    assert np.allclose(ours, exact, rtol=1e-9, atol=0.0)
    assert np.all(ours <= base)
    assert np.array_equal(poisson_subsampled_rdp(base, 1.0), base)


def test_subsampling_matches_the_expansion_written_out() -> None:
    """The binomial expansion term by term in plain arithmetic, for a few small orders and any RDP curve."""
    q = 0.1
    base = [0.3 * a + 0.02 * a * a for a in range(2, 12)]
    ours = poisson_subsampled_rdp(base, q)
    for i, a in enumerate(range(2, 12)):
        total = (1 - q) ** (a - 1) * (a * q - q + 1)
        total += sum(math.comb(a, ell) * (1 - q) ** (a - ell) * q ** ell * math.exp((ell - 1) * base[ell - 2])
                     for ell in range(2, a + 1))
        assert ours[i] == pytest.approx(min(math.log(total) / (a - 1), base[i]), rel=1e-12)


def _log_renyi_moment(log_p: np.ndarray, log_r: np.ndarray, order: int) -> float:
    """log sum p^a r^(1-a): (a - 1) D_a(p || r) on a common support."""
    from scipy.special import logsumexp

    return float(logsumexp(order * log_p + (1 - order) * log_r))


def _subsampled_pair(shift: int, variance: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """log pmfs of P = Sk(variance) and the mixture (1-q) P + q (P + shift) on a support that holds both."""
    width = int(NUMERICAL_TAIL_SDS * math.sqrt(variance)) + 50
    k = np.arange(-width - 64 * abs(shift), width + 64 * abs(shift) + 1)
    log_p, log_q = skellam_log_pmf(k, variance), skellam_log_pmf(k - shift, variance)
    return log_p, np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)


@pytest.mark.parametrize(("shift", "variance", "q"), [(1, 2.0, 0.2), (3, 10.0, 0.05), (2, 1.0, 0.5), (5, 40.0, 0.3)])
def test_both_directions_of_a_subsampled_skellam_are_within_the_expansion(shift: int, variance: float,
                                                                          q: float) -> None:
    """Summed numerically over the support: removing an example (mixture || P) IS the expansion of the exact
    per-order divergences, and adding one (P || mixture) is no larger: what lets the accountant drop Zhu & Wang's
    factor 3 for this symmetric mechanism."""
    orders = tuple(range(2, 33))
    log_p, log_mix = _subsampled_pair(shift, variance, q)
    base = numerical_divergences(orders, shift, variance)
    bound = poisson_subsampled_rdp(base, q)
    for i, a in enumerate(orders):
        remove = _log_renyi_moment(log_mix, log_p, a) / (a - 1)
        add = _log_renyi_moment(log_p, log_mix, a) / (a - 1)
        assert remove <= bound[i] * (1 + 1e-6)
        if bound[i] < base[i]:  # the expansion, not the cap at the unsampled curve
            assert remove == pytest.approx(bound[i], rel=1e-6)
        assert add <= remove * (1 + 1e-9) + 1e-15


def _randomised_response_moments(u: np.ndarray, q: float, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log E_P[(1-q+qL)^a] and log E_P[(1-q+qL)^(1-a)] for randomised response of likelihood ratio u >= 1."""
    log_p, log_1p = -np.log1p(1 / u), -np.log1p(u)  # P(L = 1/u) = u/(1+u), P(L = u) = 1/(1+u)
    lo, hi = np.log1p(q * (1 / u - 1)), np.log1p(q * (u - 1))
    remove = np.logaddexp(log_p + order * lo, log_1p + order * hi)
    add = np.logaddexp(log_p + (1 - order) * lo, log_1p + (1 - order) * hi)
    return remove, add


def test_the_lemma_removal_dominates_addition_for_every_randomised_response() -> None:
    """The lemma behind the accountant (docs/privacy.md): every symmetric pair's privacy-loss law is a mixture of
    randomised-response pairs, and for each of those the removal moment is at least the addition moment, at every
    order >= 1 and rate q. On a grid (the proof is in the docs)."""
    u = np.exp(np.concatenate([np.linspace(1e-4, 1, 60), np.linspace(1, 30, 120)]))[:, None]
    order = np.concatenate([np.linspace(1.01, 3, 40), np.arange(3, 257)])[None, :]
    for q in (1e-4, 0.01, 0.04, 0.2, 0.5, 0.9, 0.999):
        remove, add = _randomised_response_moments(u, q, order)
        assert np.all(remove - add >= -1e-12)


def test_an_asymmetric_pair_can_exceed_the_expansion_when_added() -> None:
    """Why the symmetry matters: for P = (1/2, 1/2) and Q = (0.999, 0.001) adding the example diverges more than the
    expansion (the removal direction) allows, so the factor-free form is not a bound for every mechanism."""
    log_p, log_q, q = np.log([0.5, 0.5]), np.log([0.999, 0.001]), 0.5
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    orders = tuple(range(2, 17))
    base = np.array([_log_renyi_moment(log_q, log_p, a) / (a - 1) for a in orders])
    bound = poisson_subsampled_rdp(base, q)
    add = np.array([_log_renyi_moment(log_p, log_mix, a) / (a - 1) for a in orders])
    assert np.any(add > bound * 1.01)


def test_large_variance_epsilon_approaches_the_gaussian_at_equal_noise() -> None:
    l2, l1, sigma = 3000.0, 3000.0 * 362, 1.0
    variance = (sigma * l2) ** 2
    sk = skellam_epsilon([SkellamRelease(l2, l1, variance, 1.0, 10)], 1e-5)
    gauss = rdp_to_epsilon([10 * a / (2 * sigma ** 2) for a in SKELLAM_ORDERS], SKELLAM_ORDERS, 1e-5)
    assert gauss <= sk <= gauss * 1.01


def test_composition_adds_rdp_curves() -> None:
    a = SkellamRelease(10.0, 30.0, 400.0, 1.0, 3)
    b = SkellamRelease(10.0, 30.0, 900.0, 0.1, 50)
    total = release_rdp(a) + release_rdp(b)
    assert skellam_epsilon([a, b], 1e-5) == pytest.approx(rdp_to_epsilon(total, SKELLAM_ORDERS, 1e-5))
    assert np.allclose(release_rdp(SkellamRelease(10.0, 30.0, 400.0, 1.0, 6)), 2 * release_rdp(a))
    assert skellam_epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize(("q", "steps"), [(1.0, 1), (1.0, 20), (0.05, 200)])
def test_calibration_round_trips(q: float, steps: int) -> None:
    l2, l1, eps, delta = 200.0, 5000.0, 4.0, 1e-5
    mu = calibrate_variance(eps, delta, l2, l1, q, steps)
    assert skellam_epsilon([SkellamRelease(l2, l1, mu, q, steps)], delta) <= eps
    assert skellam_epsilon([SkellamRelease(l2, l1, mu * (1 - 1e-4), q, steps)], delta) > eps


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="variance > 0"):
        SkellamRelease(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        SkellamRelease(1.0, 1.0, 1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="integer orders"):
        skellam_rdp(1, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        release_rdp(SkellamRelease(1.0, 1.0, 1.0), orders=(2, 4))
    with pytest.raises(ValueError, match="epsilon"):
        calibrate_variance(0.0, 1e-5, 1.0, 1.0)


def test_audit_shift_stays_within_the_norm() -> None:
    for l2, dim in ((3.7, 100), (50.0, 100), (2902.5, 131072), (0.5, 10)):
        shift = audit_shift(l2, dim)
        assert shift.size <= dim and float(np.linalg.norm(shift)) <= max(l2, 1.0)


def test_audit_release_passes_the_accounted_release_and_catches_a_low_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from fed_nessa.privacy import skellam

    release = SkellamRelease(60.0, integer_l1_bound(60.0, 1024), 60.0 ** 2 * 1.1, 1.0, 3)
    ratio = audit_release(release, 1024, orders=tuple(range(2, 17)))
    assert 0.9 < ratio <= 1.0
    sub = SkellamRelease(60.0, integer_l1_bound(60.0, 1024), 60.0 ** 2 * 1.1, 0.05, 40)
    assert audit_release(sub, 1024, orders=tuple(range(2, 17))) <= 1.0
    # a closed form that forgot half the Gaussian term is caught
    monkeypatch.setattr(skellam, "skellam_rdp", lambda a, l2, l1, mu: a * l2 ** 2 / (4 * mu))
    with pytest.raises(ArithmeticError, match="closed form"):
        audit_release(release, 1024, orders=tuple(range(2, 17)))


@pytest.mark.parametrize("variance", [1e4, 1e6, 1e8, 1e9])
def test_the_asymptotic_bessel_expansion_is_scipys_ive_where_both_hold(variance: float) -> None:
    """The audit's pmf above ~2^31 (where scipy's ive returns NaN) is Debye's expansion: equal to ive below."""
    from scipy.special import ive

    from fed_nessa.privacy.skellam import log_ive_asymptotic

    k = np.array([0.0, 1.0, 10.0, 1000.0, 3 * math.sqrt(variance), 12 * math.sqrt(variance)])
    np.testing.assert_allclose(log_ive_asymptotic(k, variance), np.log(ive(k, variance)), rtol=1e-11, atol=1e-10)
    assert np.isnan(ive(10.0, 4e9)) and np.isfinite(log_ive_asymptotic(np.array([10.0]), 4e9)).all()

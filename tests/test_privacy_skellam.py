"""The Skellam accounting: the closed form against the numerical divergence, subsampling, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_nessa.privacy.accountants.rdp import rdp_to_epsilon
from fed_nessa.privacy.skellam import (
    SKELLAM_ORDERS,
    SkellamRelease,
    audit_release,
    audit_shift,
    calibrate_variance,
    integer_l1_bound,
    numerical_divergence,
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
def test_zhu_wang_bounds_the_exact_subsampled_gaussian(q: float) -> None:
    """A Gaussian base (eps(a) = a/(2 s^2)) subsampled: the general bound >= Opacus' exact integer-order RDP."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    sigma = 1.2
    base = np.array([a / (2 * sigma ** 2) for a in SKELLAM_ORDERS])
    bound = poisson_subsampled_rdp(base, q)
    exact = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(SKELLAM_ORDERS)))
    assert np.all(bound >= exact * (1 - 1e-9))
    assert bound[0] == pytest.approx(exact[0], rel=1e-6)  # tight at order 2
    assert np.all(bound <= base)
    assert np.array_equal(poisson_subsampled_rdp(base, 1.0), base)


def test_zhu_wang_matches_the_theorem_written_out() -> None:
    """Theorem 6 of Zhu & Wang (2019) term by term in plain arithmetic, for a few small orders."""
    q = 0.1
    base = [0.3 * a + 0.02 * a * a for a in range(2, 12)]  # any RDP curve
    ours = poisson_subsampled_rdp(base, q)
    for i, a in enumerate(range(2, 12)):
        total = (1 - q) ** (a - 1) * (a * q - q + 1) + math.comb(a, 2) * q ** 2 * (1 - q) ** (a - 2) * math.exp(base[0])
        total += 3 * sum(math.comb(a, ell) * (1 - q) ** (a - ell) * q ** ell * math.exp((ell - 1) * base[ell - 2])
                         for ell in range(3, a + 1))
        assert ours[i] == pytest.approx(min(math.log(total) / (a - 1), base[i]), rel=1e-12)


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

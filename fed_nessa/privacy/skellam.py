"""Accounting of the distributed Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021).

What is released: the modular sum of integer vectors ``y_i + s_i``, where ``y_i`` is device
i's scaled, rotated, conditionally rounded contribution (``||y_i||_2 <= N`` exactly: the
device re-draws its rounding until it is) and ``s_i`` its integer Skellam share. A sum of
independent Skellams is Skellam, so the integer sum is ``sum_i y_i + Sk(mu)`` with ``mu`` the
summed per-coordinate VARIANCE; the modular reduction and everything the server does after
it are post-processing. So the whole accounting is that of one Skellam mechanism on an
integer query whose L2 and L1 sensitivities are the *rounded* bounds below.

Everything is in the integer domain (after scaling): sensitivities and ``mu`` are integers'
units, so the scale enters only through the rounding bounds and the discretisation term.

Pure functions, two independent computations:

- :func:`skellam_rdp`: the closed-form bound (Agarwal et al. 2021, Theorem 3.5 / Corollary 3.6),
  composed by adding RDP curves, Poisson subsampling by the binomial expansion that is exact for the
  removal of an example and bounds its addition for this symmetric mechanism (:func:`poisson_subsampled_rdp`),
  converted with the project's one conversion (:func:`fed_nessa.privacy.accountants.rdp.rdp_to_epsilon`);
- :func:`numerical_rdp`: the Rényi divergence ``D_a(Sk(mu) + Delta || Sk(mu))`` summed over the
  support, coordinate by coordinate (the audit's second opinion; the bound must exceed it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from fed_nessa.privacy.accountants.rdp import rdp_to_epsilon
from fed_nessa.privacy.events import DPEvent

#: Integer RDP orders, contiguous from 2: the Skellam bound holds at integer orders and
#: the subsampling expansion at order a needs the base curve at every order 2..a.
SKELLAM_ORDERS: tuple[int, ...] = tuple(range(2, 257))
#: TFF's default conditional-rounding parameter (Kairouz et al. 2021): a draw is kept with
#: probability >= 1 - beta, and the bound below holds with it.
DEFAULT_BETA = math.exp(-0.5)
#: Support of the numerical divergence: this many standard deviations (plus the shift) each side.
NUMERICAL_TAIL_SDS = 12.0
#: Largest variance at which :func:`skellam_log_pmf` sums the Bessel series for an underflowing tail.
SERIES_MAX_VARIANCE = 1e7
#: From this variance on, :func:`skellam_log_pmf` uses the asymptotic expansion (error O(mu^-5/2)).
ASYMPTOTIC_MIN_VARIANCE = 1e7
#: Bracket and precision (relative) of the variance calibration.
VARIANCE_RANGE = (1e-6, 1e30)
RELATIVE_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class SkellamRelease:
    """One kind of release, ``steps`` times: an integer query of sensitivities (l2, l1) plus Sk(variance).

    ``sample_rate`` < 1 is a Poisson-subsampled release (example-level DP-SGD); 1 is a full sum.
    """

    l2_sensitivity: float
    l1_sensitivity: float
    variance: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not (self.l2_sensitivity >= 0 and self.l1_sensitivity >= 0 and self.variance > 0):
            raise ValueError(f"Skellam release needs sensitivities >= 0 and a variance > 0, got {self}")
        if not (0.0 < self.sample_rate <= 1.0) or self.steps < 0:
            raise ValueError(f"Skellam release needs 0 < sample_rate <= 1 and steps >= 0, got {self}")


def rounded_l2_norm_bound(scaled_clip: float, beta: float, dim: int) -> float:
    """The L2 sensitivity after rounding of an input whose sensitivity is ``scaled_clip`` (``c``).

    ``beta > 0`` (the device level: the vector is the whole unit): Kairouz, Liu & Steinke (ICML
    2021), Theorem 1 / eq. (2), as TFF's ``rounded_l2_norm_bound``: randomised rounding keeps the
    norm below ``sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2))`` with probability >= 1 - beta;
    the device re-draws until it is within, so it holds for every released vector.

    ``beta = 0`` (the example level: a device rounds the SUM of its clipped examples once):
    ``c + sqrt(d)``, the coupled bound. Two neighbouring sums ``s`` and ``s + x`` (``||x|| <= c``)
    rounded with the same uniforms differ by ``floor(x_j)`` or ``ceil(x_j)`` in every coordinate,
    so by ``x + e`` with ``|e_j| < 1``: ``||.|| < c + sqrt(d)``. The release is a mixture over the
    uniforms, of one law for both neighbours, of Skellam mechanisms whose inputs are that close, so
    by the quasi-convexity of Renyi divergence its RDP is at most the Skellam RDP at that bound. It
    is also the norm bound of one rounded vector of norm <= c (``|e_j| < 1`` again).
    """
    if scaled_clip < 0 or dim < 1 or not (0.0 <= beta < 1.0):
        raise ValueError(f"need scaled_clip >= 0, dim >= 1, 0 <= beta < 1, got {scaled_clip}, {dim}, {beta}")
    always = scaled_clip + math.sqrt(dim)
    if beta == 0.0:
        return always
    likely = math.sqrt(scaled_clip ** 2 + dim / 4.0
                       + math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_clip + math.sqrt(dim) / 2.0))
    return min(always, likely)


def integer_l1_bound(l2_bound: float, dim: int) -> float:
    """L1 bound of an integer vector in ``dim`` coordinates with L2 norm <= ``l2_bound``.

    Cauchy-Schwarz gives ``sqrt(d) l2``; for integers ``|v| <= v^2`` gives ``l2^2``.
    """
    return min(math.sqrt(dim) * l2_bound, l2_bound ** 2)


class BitNoiseTooSmallError(ValueError):
    """The adaptive clip's bit count has no more noise than the round's budget: nothing is left for the update."""


def joint_l2_clip(clip: float, noise_multiplier: float, bit_noise_multiplier: float) -> float:
    """L2 bound of a device's update clipped to ``clip`` joined by its adaptive-clip bit, the bit scaled so
    both carry one noise std (the vector :func:`fed_nessa.federated.mechanism.DeviceLevel.bit_scale` builds).

    The update's noise multiplier ``z_d`` and the bit count's ``z_b`` (noise std over the bit's sensitivity
    1/2) make one mechanism of multiplier ``z = (z_d^-2 + z_b^-2)^-1/2`` (Andrew et al. 2021, Thm 1); at the
    common noise std ``z_d clip`` the joint vector's bound is ``clip z_d / z = clip / sqrt(1 - (z / z_b)^2)``.
    So one Skellam mechanism of multiplier ``z`` on a vector within this bound is the update and the bit
    released together, accounted exactly as one event. Raises :class:`BitNoiseTooSmallError` when
    ``z_b <= z``.
    """
    if not bit_noise_multiplier > noise_multiplier > 0:
        raise BitNoiseTooSmallError(f"the adaptive clip's bit noise multiplier {bit_noise_multiplier:.6g} must exceed "
                                    f"the round's {noise_multiplier:.6g}, or the bit alone would spend the budget")
    return clip / math.sqrt(1.0 - (noise_multiplier / bit_noise_multiplier) ** 2)


def skellam_rdp(order: int, l2: float, l1: float, variance: float) -> float:
    """RDP at integer ``order`` of Sk(variance) added to an integer query of sensitivities (l2, l1).

    Agarwal, Kairouz & Liu (2021), Theorem 3.5 with mu the per-coordinate variance:
    ``a l2^2/(2 mu) + min(((2a - 1) l2^2 + 6 l1)/(4 mu^2), 3 l1/(2 mu))``: the Gaussian's term
    plus a discretisation surcharge that vanishes as mu grows. Checked against
    :func:`numerical_rdp` in the tests.
    """
    if order < 2 or int(order) != order:
        raise ValueError(f"the Skellam bound holds at integer orders >= 2, got {order}")
    a, mu = float(order), float(variance)
    return a * l2 ** 2 / (2 * mu) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))


def _base_curve(release: SkellamRelease, orders: Sequence[int]) -> np.ndarray:
    return np.array([skellam_rdp(a, release.l2_sensitivity, release.l1_sensitivity, release.variance)
                     for a in orders])


def poisson_subsampled_rdp(base: Sequence[float] | np.ndarray, sample_rate: float) -> np.ndarray:
    """RDP at orders 2..A of a symmetric additive mechanism whose RDP is ``base`` (at orders 2..A) on a Poisson sample.

    ``eps'(a) = log[(1-q)^(a-1)(aq - q + 1) + sum_{l=2..a} C(a,l) (1-q)^(a-l) q^l e^((l-1) eps(l))] / (a - 1)``,
    never above ``eps(a)`` (subsampling is a mixture; joint convexity). Computed in log space.

    Why it bounds both directions of add/remove (docs/privacy.md "Poisson subsampling of a symmetric mechanism"):
    with the other examples and the rounding's uniforms fixed, the neighbours' outputs are ``P = Sk + y`` and
    ``Q = Sk + y + e``. Removing the example gives ``D_a((1-q)P + qQ || P)``, whose binomial expansion at an integer
    order is exactly this sum with ``e^((l-1) D_l(Q||P))`` (Mironov, Talwar & Zhang 2019, eq. for A_a; Zhu & Wang
    2019's formula without their factor 3), and ``D_l(Q||P) <= eps(l)``. Adding it gives ``D_a(P || (1-q)P + qQ)``,
    which is no larger here: the Skellam is symmetric, so ``z -> 2y + e - z`` swaps P and Q; the privacy-loss law of
    such a pair is a mixture of randomised-response pairs, and for each of those the remove direction's moment is
    at least the add direction's (the proof in docs/privacy.md; checked numerically in the tests). The mixture over
    the others' sample and the uniforms is handled by the joint quasi-convexity of Renyi divergence.
    Zhu & Wang's general Theorem 6 (a factor 3 on every term of order >= 3) is for mechanisms without that symmetry.
    """
    from scipy.special import gammaln, logsumexp

    eps = np.asarray(base, dtype=np.float64)
    if sample_rate >= 1.0:
        return eps.copy()
    if not 0.0 < sample_rate < 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    log_q, log_1q = math.log(sample_rate), math.log1p(-sample_rate)
    out = np.empty_like(eps)
    for i, a in enumerate(range(2, 2 + len(eps))):
        ls = np.arange(2, a + 1)
        log_binom = gammaln(a + 1) - gammaln(ls + 1) - gammaln(a - ls + 1)
        first = (a - 1) * log_1q + math.log(a * sample_rate - sample_rate + 1)
        rest = log_binom + (a - ls) * log_1q + ls * log_q + (ls - 1) * eps[ls - 2]
        out[i] = min(float(logsumexp(np.concatenate([[first], rest]))) / (a - 1), float(eps[i]))
    return out


def release_rdp(release: SkellamRelease, orders: Sequence[int] = SKELLAM_ORDERS) -> np.ndarray:
    """RDP curve of ``release`` (all its steps) at ``orders`` (contiguous from 2)."""
    if tuple(orders) != tuple(range(2, 2 + len(orders))):
        raise ValueError("Skellam orders must be the contiguous integers 2..A "
                         "(the subsampling expansion needs every order)")
    one = poisson_subsampled_rdp(_base_curve(release, orders), release.sample_rate)
    return one * release.steps


def curve_at(release: SkellamRelease, orders: Sequence[float]) -> np.ndarray:
    """``release``'s RDP at any ``orders`` > 1: the bound at each integer order, and at a fractional order
    (or one below 2) the bound at the next integer order >= 2, an upper bound because Rényi divergence
    does not decrease with the order. So the integer mechanism composes with Gaussian curves at
    Opacus' orders (:class:`fed_nessa.privacy.accountants.rdp.RDPAccountant`)."""
    ceilings = [max(2, math.ceil(a)) for a in orders]
    return _integer_curve(release, max(ceilings))[np.array(ceilings) - 2]


@functools.lru_cache(maxsize=1024)
def _integer_curve(release: SkellamRelease, top: int) -> np.ndarray:
    # a fleet's ledgers repeat one release per round: its curve is computed once
    return release_rdp(release, tuple(range(2, top + 1)))


def event_release(ev: DPEvent) -> SkellamRelease:
    """What a recorded :data:`~fed_nessa.privacy.events.SKELLAM` event charges (its recorded bounds and mu)."""
    if ev.skellam is None:
        raise ValueError(f"round {ev.round}: a {ev.mechanism} event records no skellam parameters")
    p = ev.skellam
    return SkellamRelease(float(p["l2_bound"]), float(p["l1_bound"]), float(p["mu"]), float(ev.sample_rate), ev.steps)


def skellam_epsilon(releases: Sequence[SkellamRelease], delta: float,
                    orders: Sequence[int] = SKELLAM_ORDERS) -> float:
    """Epsilon at ``delta`` of every release composed (RDP curves added, converted once)."""
    if not releases:
        return 0.0
    total = sum((release_rdp(r, orders) for r in releases), start=np.zeros(len(orders)))
    return rdp_to_epsilon(total, orders, delta)


def calibrate_variance(epsilon: float, delta: float, l2: float, l1: float, sample_rate: float = 1.0,
                       steps: int = 1, prior: Sequence[SkellamRelease] = ()) -> float:
    """The smallest central variance mu (within :data:`RELATIVE_TOLERANCE`) whose epsilon is <= ``epsilon``.

    ``steps`` releases of sensitivities (l2, l1) at ``sample_rate``, composed after ``prior``.
    Raises ValueError when no variance in :data:`VARIANCE_RANGE` fits.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")

    def eps_at(mu: float) -> float:
        return skellam_epsilon([*prior, SkellamRelease(l2, l1, mu, sample_rate, steps)], delta)

    lo, hi = VARIANCE_RANGE
    if eps_at(hi) > epsilon:
        raise ValueError(f"no Skellam variance up to {hi:g} keeps epsilon <= {epsilon:g} at delta {delta:g}")
    if eps_at(lo) <= epsilon:
        return lo
    while hi / lo > 1 + RELATIVE_TOLERANCE:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps_at(mid) <= epsilon else (mid, hi)
    return hi


def skellam_log_pmf(k: np.ndarray, variance: float) -> np.ndarray:
    """log P(Sk = k) for the symmetric Skellam of variance mu: ``log(e^-mu I_|k|(mu))``.

    scipy's ``ive`` where it does not underflow, up to :data:`ASYMPTOTIC_MIN_VARIANCE` (above ~2^31 it
    returns NaN); from there :func:`log_ive_asymptotic`; in the far tail, where ``ive`` underflows,
    the Bessel series ``I_k(x) = sum_m (x/2)^(2m+k) / (m! (m+k)!)`` summed in log space (only below
    :data:`SERIES_MAX_VARIANCE`: its length grows with mu).
    """
    from scipy.special import gammaln, ive, logsumexp

    x = float(variance)
    order = np.abs(np.asarray(k)).astype(np.float64)
    if x >= ASYMPTOTIC_MIN_VARIANCE:
        return log_ive_asymptotic(order, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(ive(order, x))
    tail = ~np.isfinite(out)
    if tail.any() and x > SERIES_MAX_VARIANCE:
        raise ArithmeticError(f"Skellam pmf underflows at variance {variance:g} beyond the Bessel series' reach")
    if tail.any():
        m = np.arange(int(2 * x) + 200, dtype=np.float64)[None, :]
        kk = order[tail][:, None]
        series = (2 * m + kk) * math.log(x / 2) - gammaln(m + 1) - gammaln(m + kk + 1)
        out[tail] = logsumexp(series, axis=1) - x
    return out


def log_ive_asymptotic(order: np.ndarray, x: float) -> np.ndarray:
    """``log(e^-x I_nu(x))`` by Debye's uniform asymptotic expansion (DLMF 10.41.3, four terms), for large x.

    With ``r = sqrt(nu^2 + x^2)`` and ``t = nu / r``: ``nu eta - x = nu^2 / (r + x) - nu asinh(nu / x)``
    (no cancellation between terms of size x) and ``u_k(t) / nu^k`` is a polynomial in ``t^2`` over
    ``r^k``, so the expansion holds uniformly in ``nu >= 0``; its truncation error is O(r^-5)
    (below 1e-30 at r >= 1e6). Tested against scipy's ``ive`` where both hold.
    """
    nu = np.asarray(order, np.float64)
    r = np.hypot(nu, x)
    t2 = (nu / r) ** 2
    series = ((3 - 5 * t2) / (24 * r)
              + (81 - 462 * t2 + 385 * t2 ** 2) / (1152 * r ** 2)
              + (30375 - 369603 * t2 + 765765 * t2 ** 2 - 425425 * t2 ** 3) / (414720 * r ** 3)
              + (4465125 - 94121676 * t2 + 349922430 * t2 ** 2 - 446185740 * t2 ** 3 + 185910725 * t2 ** 4)
              / (39813120 * r ** 4))
    return nu * nu / (r + x) - nu * np.arcsinh(nu / x) - 0.5 * np.log(2 * math.pi * r) + np.log1p(series)


def numerical_divergence(order: float, shift: int, variance: float) -> float:
    """``D_order(Sk(mu) + shift || Sk(mu))`` for one coordinate, summed over the support.

    Independent of :func:`skellam_rdp`: the pmf from the Bessel function, the sum over
    ``k`` within :data:`NUMERICAL_TAIL_SDS` standard deviations of both means and of the tilted
    mean ``order * shift``. Raises ArithmeticError if the pmf underflows inside that window
    (the sum would then be wrong, not merely truncated).
    """
    return float(numerical_divergences((order,), shift, variance)[0])


def numerical_divergences(orders: Sequence[float], shift: int, variance: float) -> np.ndarray:
    """:func:`numerical_divergence` at every order, the pmf evaluated once on the widest order's window."""
    if shift == 0:
        return np.zeros(len(orders))
    from scipy.special import logsumexp

    width = NUMERICAL_TAIL_SDS * math.sqrt(variance) + 50.0
    tilt = [int(a * shift) for a in orders]
    lo = min(0, *tilt) - int(width)
    hi = max(0, *tilt) + int(width)
    k = np.arange(lo, hi + 1)
    log_p, log_q = skellam_log_pmf(k - shift, variance), skellam_log_pmf(k, variance)
    if not (np.isfinite(log_p).all() and np.isfinite(log_q).all()):
        raise ArithmeticError(f"Skellam pmf underflows in [{lo}, {hi}] at variance {variance:g}")
    return np.array([float(logsumexp(a * log_p + (1 - a) * log_q)) / (a - 1) for a in orders])


def numerical_rdp(order: float, shift: Sequence[int] | np.ndarray, variance: float) -> float:
    """``D_order`` of the product mechanism for an integer ``shift`` vector: the per-coordinate sum."""
    return float(numerical_rdp_curve((order,), shift, variance)[0])


def numerical_rdp_curve(orders: Sequence[float], shift: Sequence[int] | np.ndarray, variance: float) -> np.ndarray:
    """:func:`numerical_rdp` at every order (each distinct shift value's pmf evaluated once)."""
    values, counts = np.unique(np.asarray(shift, dtype=np.int64), return_counts=True)
    return np.sum([c * numerical_divergences(orders, int(v), variance) for v, c in zip(values, counts)], axis=0)


#: Orders the audit's numerical check evaluates (contiguous from 2; the summed divergence costs
#: one pass over the support per order, so fewer than the accountant's).
AUDIT_ORDERS: tuple[int, ...] = tuple(range(2, 65))


def audit_shift(l2: float, dim: int) -> np.ndarray:
    """The integer shift the audit evaluates for an L2 sensitivity ``l2`` in ``dim`` coordinates.

    Entries as equal as possible over as many coordinates as the norm allows (``m = min(dim,
    floor(l2^2))`` coordinates of ``v = floor(l2 / sqrt(m))``, as many raised to ``v + 1`` as the
    squared norm still allows): per unit of squared norm, small entries diverge most. A concrete
    vector within the recorded bound, not a supremum over all of them.
    """
    budget = max(1, math.floor(l2 * l2))
    m = min(dim, budget)
    value = max(1, math.isqrt(budget // m))
    raised = min(m, (budget - m * value * value) // (2 * value + 1))
    shift = np.full(m, value, dtype=np.int64)
    shift[:raised] += 1
    return shift


def audit_release(release: SkellamRelease, dim: int, orders: Sequence[int] = AUDIT_ORDERS) -> float:
    """Second opinion on one release: raises ArithmeticError if the divergence summed numerically at
    :func:`audit_shift` (subsampled and composed as accounted) exceeds the closed-form RDP at any order.

    Returns the largest ratio numerical / closed form (<= 1; near 1 where the bound is tight).
    """
    shift = audit_shift(release.l2_sensitivity, dim)
    numerical = numerical_rdp_curve(orders, shift, release.variance)
    numerical = poisson_subsampled_rdp(numerical, release.sample_rate) * release.steps
    closed = release_rdp(release, orders)
    worst = int(np.argmax(numerical / closed))
    if numerical[worst] > closed[worst] * (1 + 1e-9):
        raise ArithmeticError(f"Skellam RDP at order {orders[worst]}: closed form {closed[worst]:.6g} < numerical "
                              f"divergence {numerical[worst]:.6g} for {release}")
    return float(numerical[worst] / closed[worst])

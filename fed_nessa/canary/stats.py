"""From a canary attack to an epsilon lower bound with a confidence level.

Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run"
(arXiv 2305.08846): m canaries are each included in the training data
independently with probability 1/2; after one training run the auditor guesses
"in" for the k_+ highest-scoring canaries and "out" for the k_- lowest and
abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses v
out of r is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) plus a
delta term (their Theorem 3.1 / Algorithm 2), so observing many correct guesses
rejects small epsilons. The bound is the largest epsilon rejected at the
stated confidence.

With delta = 0 the test is exactly a one-sided Clopper–Pearson bound on the
guess precision, mapped through the logit: :func:`epsilon_lower_bound_cp`.

Choosing (k_+, k_-) after looking at the scores would invalidate the
confidence, so :func:`one_run_audit` tries a grid fixed in advance and applies
a Bonferroni correction over it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value_one_run(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP (an upper bound on it)."""
    _check_counts(m, r, v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))
    # alpha = max_i P[v - i <= Binomial(r, q) < v] / i: the most delta can buy per extra guess.
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound_one_run(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                                tol: float = 1e-6) -> float:
    """Largest epsilon rejected at ``confidence``: the mechanism is not (epsilon, delta)-DP."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value_one_run(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_one_run(m, r, v, hi, delta) < level:  # p grows with epsilon
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value_one_run(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def clopper_pearson_lower(v: int, r: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson lower confidence bound on a binomial proportion."""
    if not 0 <= v <= r:
        raise ValueError(f"need 0 <= successes ({v}) <= trials ({r})")
    if v == 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - confidence, v, r - v + 1))


def epsilon_lower_bound_cp(r: int, v: int, confidence: float = 0.95) -> float:
    """The delta = 0 bound via Clopper–Pearson: logit of the precision's lower bound."""
    p_lo = clopper_pearson_lower(v, r, confidence)
    if p_lo <= 0.5:
        return 0.0
    return math.inf if p_lo >= 1.0 else math.log(p_lo / (1.0 - p_lo))


def guesses(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("included") for the k_pos highest scores, -1 for the k_neg lowest, 0 = abstain."""
    n = len(scores)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > n:
        raise ValueError(f"need k_pos + k_neg <= {n} canaries, got {k_pos} + {k_neg}")
    order = np.argsort(scores, kind="stable")
    out = np.zeros(n, dtype=int)
    if k_neg:
        out[order[:k_neg]] = -1
    if k_pos:
        out[order[n - k_pos:]] = 1
    return out


def roc_auc(scores: np.ndarray, included: np.ndarray) -> float:
    """Area under the ROC curve of scores vs inclusion (Mann–Whitney, ties count 1/2)."""
    pos, neg = scores[included], scores[~included]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(scores: np.ndarray, included: np.ndarray, fpr: float) -> float:
    """Largest true-positive rate of a threshold rule whose false-positive rate is <= ``fpr``."""
    pos, neg = np.sort(scores[included]), np.sort(scores[~included])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allowed = int(math.floor(fpr * len(neg)))  # negatives allowed above the threshold
    threshold = neg[len(neg) - allowed - 1] if allowed < len(neg) else -np.inf
    return float(np.mean(pos > threshold))


@dataclass(frozen=True)
class OneRunAudit:
    """The attack's outcome and the bound it supports."""

    m: int
    included: int
    k_pos: int
    k_neg: int
    guesses: int
    correct: int
    confidence: float
    grid_size: int
    delta: float
    epsilon_lower_bound: float  # Steinke et al. with delta, Bonferroni over the grid
    epsilon_lower_bound_cp: float  # delta = 0, Clopper–Pearson, same guesses and correction
    auroc: float
    tpr_at_fpr: dict[str, float]


def default_grid(m: int) -> list[tuple[int, int]]:
    """(k_pos, k_neg) pairs fixed before seeing the scores: symmetric, 2%..50% of m each side."""
    fractions = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
    return sorted({(max(1, int(f * m)), max(1, int(f * m))) for f in fractions if 2 * max(1, int(f * m)) <= m})


def one_run_audit(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, delta: float,
                  confidence: float = 0.95, grid: Sequence[tuple[int, int]] | None = None) -> OneRunAudit:
    """Best bound over a fixed (k_pos, k_neg) grid, each test at confidence corrected by Bonferroni."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError("scores and included must be equal-length, non-empty 1-d sequences")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    m = len(s)
    grid = list(grid) if grid is not None else default_grid(m)
    if not grid:
        raise ValueError(f"no (k_pos, k_neg) grid fits {m} canaries")
    per_test = 1.0 - (1.0 - confidence) / len(grid)
    truth = np.where(inc, 1, -1)
    best: tuple[float, float, int, int, int, int] | None = None
    for k_pos, k_neg in grid:
        g = guesses(s, k_pos, k_neg)
        r = int(np.count_nonzero(g))
        v = int(np.sum(g == truth))
        eps = epsilon_lower_bound_one_run(m, r, v, delta, per_test)
        eps_cp = epsilon_lower_bound_cp(r, v, per_test)
        if best is None or (eps, eps_cp) > best[:2]:
            best = (eps, eps_cp, k_pos, k_neg, r, v)
    assert best is not None
    eps, eps_cp, k_pos, k_neg, r, v = best
    return OneRunAudit(m=m, included=int(inc.sum()), k_pos=k_pos, k_neg=k_neg, guesses=r, correct=v,
                       confidence=confidence, grid_size=len(grid), delta=delta, epsilon_lower_bound=eps,
                       epsilon_lower_bound_cp=eps_cp, auroc=roc_auc(s, inc),
                       tpr_at_fpr={str(f): tpr_at_fpr(s, inc, f) for f in (0.01, 0.05, 0.1)})

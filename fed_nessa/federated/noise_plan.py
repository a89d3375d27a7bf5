"""The noise multipliers, the sampling rate and the shipped aligner of a run, from its public config.

The device (to noise and account) and the server (to size SecAgg+'s range, floor the
statistics solve and pick its phases) must use the same numbers, so both call
:func:`noise_plan` with the same public inputs (the config and the fleet size).

* ``budget-split = 0``: the sigmas are the keys ``suffstats-noise-multiplier`` and
  ``noise-multiplier``.
* ``budget-split = f``: the statistics round's sigma is calibrated to spend
  ``f x epsilon-budget`` alone, the DP-SGD sigma so that the statistics round plus every
  DP-SGD round a device is scheduled for lands on ``epsilon-budget`` (RDP).

``aligner = auto`` decides, before round 1, whether DP-SGD rounds can beat the DP linear
start: the decision statistic is the expected number of clipped examples in one round's
released sum per unit of noise std, ``cohort x expected-pairs-per-device x q / sigma``
(signal grows with the fleet, the DP noise does not; field-notes "DP NESSA needs fleet
scale"). Below :data:`fed_nessa.federated.mechanism.AUTO_SIGNAL_THRESHOLD` the run is the linear
start alone, and with a budget split the statistics round then gets the whole budget. The
threshold is set off the reported study, from tuning evidence over 1,000 full-participation rounds (docs/results.md
"How the self-set protocol was chosen"); the promotion gate still checks every run it passes.

``privacy-unit = device``: every participation is one Gaussian sum with q = 1 (no sampling,
so no amplification), and the calibration composes exactly those. The auto rule's threshold
was measured for example-level rounds only, so a device-level ``auto`` run always tries DP
NESSA rounds and leaves the choice to the promotion gate (the plan's reason says so).

What depends on the unit (q, the signal, the auto decision) is the run's mechanism's
(:class:`fed_nessa.federated.mechanism.Mechanism`); this module composes them with the budget.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fed_nessa.config import AlignerChoice, FederationConfig, LinearStart, Phase
from fed_nessa.federated.integer_mechanism import FieldTooSmallError
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.skellam_mechanism import calibration_epsilon
from fed_nessa.privacy.calibration import sigma_for_epsilon, smallest_sigma
from fed_nessa.privacy.skellam import BitNoiseTooSmallError


@dataclass(frozen=True)
class NoisePlan:
    suffstats_sigma: float
    dpsgd_sigma: float
    dpsgd_rounds_per_device: int  # DP-SGD steps a device is scheduled for (the calibration's count)
    sample_rate: float = 0.0  # the DP-SGD rounds' q (0: the landed per-device 1/ceil(n/B))
    aligner: AlignerChoice = AlignerChoice.NESSA  # LINEAR: no DP-SGD round is run
    signal: float = math.inf  # the auto rule's statistic (examples per noise std per round)
    reason: str = ""
    fleet: int = 0  # the fleet size the plan was built for (every round's config and public parameters use it)


def dpsgd_rounds(cfg: FederationConfig) -> int:
    stats = cfg.suffstats_rounds if cfg.linear_start == LinearStart.SUFFSTATS else 0
    return max(cfg.num_server_rounds - stats, 0)


def _split(cfg: FederationConfig, q: float, rounds: int, fleet: int,
           dims: tuple[int, int] | None) -> tuple[float, float]:
    if cfg.budget_split <= 0:
        return cfg.suffstats_noise_multiplier, cfg.noise_multiplier
    uses_stats = cfg.linear_start == LinearStart.SUFFSTATS
    s_sigma = (_stats_sigma(cfg, cfg.budget_split * cfg.epsilon_budget, fleet, dims) if uses_stats
               else cfg.suffstats_noise_multiplier)
    if rounds == 0:
        return s_sigma, cfg.noise_multiplier
    return s_sigma, _dpsgd_sigma(cfg, q, rounds, s_sigma if uses_stats else None, fleet, dims)


def _stats_sigma(cfg: FederationConfig, epsilon: float, fleet: int, dims: tuple[int, int] | None) -> float:
    """The statistics round's sigma that spends ``epsilon`` alone, for the run's mechanism."""
    if not cfg.integer_noise:
        return sigma_for_epsilon(epsilon, cfg.delta)
    d = _dims(dims)
    return _integer_sigma(cfg, epsilon, fleet, d, ((Phase.SUFFSTATS, 1.0, 1),), None)


def _dpsgd_sigma(cfg: FederationConfig, q: float, rounds: int, prior: float | None, fleet: int,
                 dims: tuple[int, int] | None) -> float:
    """The DP-SGD sigma that lands ``prior``'s statistics round plus ``rounds`` DP-SGD rounds on the budget."""
    if not cfg.integer_noise:
        return sigma_for_epsilon(cfg.epsilon_budget, cfg.delta, q, rounds, prior)
    return _integer_sigma(cfg, cfg.epsilon_budget, fleet, _dims(dims), ((Phase.DPSGD, q, rounds),), prior)


def _dims(dims: tuple[int, int] | None) -> tuple[int, int]:
    if dims is None:
        raise ValueError("budget-split under distributed-mechanism 'skellam' calibrates against the integer "
                         "mechanism's epsilon, which depends on the payload's size: the noise plan needs the "
                         "shards' dimensions (d_x, d_y)")
    return dims


@functools.lru_cache(maxsize=64)
def _integer_sigma(cfg: FederationConfig, epsilon: float, fleet: int, dims: tuple[int, int],
                   searched: tuple[tuple[Phase, float, int], ...], prior: float | None) -> float:
    """The smallest sigma of the ``searched`` releases (phase, q, rounds) whose composition with the statistics
    round at ``prior`` (None: none) keeps the integer mechanism's epsilon <= ``epsilon`` (the Gaussian's search)."""
    before = [] if prior is None else [(Phase.SUFFSTATS, prior, 1.0, 1)]

    def epsilon_at(sigma: float) -> float:
        try:
            return calibration_epsilon(cfg, fleet, dims, [*before, *((p, sigma, q, n) for p, q, n in searched)])
        except (FieldTooSmallError, BitNoiseTooSmallError):
            # more noise than the field holds, or than the adaptive clip's bit count leaves the update: above every
            # sigma a round can use, so the search moves down (a plan that still lands there fails when its
            # round builds the field, or at the run's check of the bit's noise, with that error)
            return 0.0

    return smallest_sigma(epsilon_at, epsilon, f"the integer mechanism, delta {cfg.delta:g}, {searched}")


def noise_plan(cfg: FederationConfig, fleet: int, dims: tuple[int, int] | None = None) -> NoisePlan:
    """The sigmas, q and shipped aligner for a fleet of ``fleet`` devices (cohorts from ``clients-per-round``).

    What depends on the privacy unit (q, the auto rule's signal and its decision) is the run's
    mechanism's (:mod:`fed_nessa.federated.mechanism`). ``dims`` (the shards' d_x, d_y) size the
    integer mechanism's payload: a ``budget-split`` under ``skellam`` needs them."""
    mech = mechanism_for(cfg)
    dp_cohort = cfg.cohort_size(fleet)
    rounds = math.ceil(dpsgd_rounds(cfg) * dp_cohort / max(fleet, 1))
    q = mech.plan_sample_rate(fleet, dp_cohort)
    s_sigma, sigma = _split(cfg, q, rounds, fleet, dims)
    if cfg.integer_noise and rounds and mech.carries_bit(Phase.DPSGD):
        try:
            mech.integer_clip(Phase.DPSGD, sigma, fleet)
        except BitNoiseTooSmallError as exc:  # the Gaussian's launch check, where skellam's plan is first built
            raise BitNoiseTooSmallError(f"clip-count-noise = {cfg.clip_count_noise:g}: {exc}") from exc
    signal = mech.plan_signal(dp_cohort, q, sigma) if rounds else 0.0
    uses_stats = cfg.linear_start == LinearStart.SUFFSTATS
    choice = AlignerChoice(cfg.aligner)
    if choice == AlignerChoice.AUTO:
        choice, reason = mech.auto_choice(rounds, signal)
    else:
        reason = f"aligner {choice} (set in the run config)"
    if choice == AlignerChoice.LINEAR and uses_stats:
        if cfg.budget_split > 0:
            s_sigma = _stats_sigma(cfg, cfg.epsilon_budget, fleet, dims)
        return NoisePlan(s_sigma, sigma, 0, q, AlignerChoice.LINEAR, signal, reason, fleet)
    return NoisePlan(s_sigma, sigma, rounds, q, AlignerChoice.NESSA, signal, reason, fleet)

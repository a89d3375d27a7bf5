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

import math
from dataclasses import dataclass

from fed_nessa.config import AlignerChoice, FederationConfig, LinearStart
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.privacy.calibration import sigma_for_epsilon


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


def _split(cfg: FederationConfig, q: float, rounds: int) -> tuple[float, float]:
    if cfg.budget_split <= 0:
        return cfg.suffstats_noise_multiplier, cfg.noise_multiplier
    uses_stats = cfg.linear_start == LinearStart.SUFFSTATS
    s_sigma = (sigma_for_epsilon(cfg.budget_split * cfg.epsilon_budget, cfg.delta) if uses_stats
               else cfg.suffstats_noise_multiplier)
    if rounds == 0:
        return s_sigma, cfg.noise_multiplier
    return s_sigma, sigma_for_epsilon(cfg.epsilon_budget, cfg.delta, q, rounds, s_sigma if uses_stats else None)


def noise_plan(cfg: FederationConfig, fleet: int) -> NoisePlan:
    """The sigmas, q and shipped aligner for a fleet of ``fleet`` devices (cohorts from ``clients-per-round``).

    What depends on the privacy unit (q, the auto rule's signal and its decision) is the run's
    mechanism's (:mod:`fed_nessa.federated.mechanism`)."""
    mech = mechanism_for(cfg)
    dp_cohort = cfg.cohort_size(fleet)
    rounds = math.ceil(dpsgd_rounds(cfg) * dp_cohort / max(fleet, 1))
    q = mech.plan_sample_rate(fleet, dp_cohort)
    s_sigma, sigma = _split(cfg, q, rounds)
    signal = mech.plan_signal(dp_cohort, q, sigma) if rounds else 0.0
    uses_stats = cfg.linear_start == LinearStart.SUFFSTATS
    choice = AlignerChoice(cfg.aligner)
    if choice == AlignerChoice.AUTO:
        choice, reason = mech.auto_choice(rounds, signal)
    else:
        reason = f"aligner {choice} (set in the run config)"
    if choice == AlignerChoice.LINEAR and uses_stats:
        if cfg.budget_split > 0:
            s_sigma = sigma_for_epsilon(cfg.epsilon_budget, cfg.delta)
        return NoisePlan(s_sigma, sigma, 0, q, AlignerChoice.LINEAR, signal, reason, fleet)
    return NoisePlan(s_sigma, sigma, rounds, q, AlignerChoice.NESSA, signal, reason, fleet)

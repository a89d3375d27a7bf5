"""Opacus' PRV accountant (Gopi et al. 2021): numerically tight, fed the same history as RDP."""

from __future__ import annotations

import math
import warnings

from fed_nessa.privacy.accountants.accountant import Accountant, History

PRV = "prv"
#: Opacus' default error budget on epsilon (the returned value is its upper end).
PRV_EPS_ERROR = 0.01


class PRVAccountant(Accountant):
    """Privacy random variables composed by FFT; no incremental curve (each prefix afresh)."""

    name = PRV

    def epsilon_of_history(self, groups: History, delta: float) -> float:
        from opacus.accountants import PRVAccountant as OpacusPRV

        acc = OpacusPRV()
        # Opacus' history layout is (noise_multiplier, sample_rate, steps).
        acc.history = [(sigma, q, steps) for q, sigma, steps in groups]
        with warnings.catch_warnings():
            # q == 1 makes log(1 - q) = -inf inside the PRV pdf: harmless, masked by np.where.
            warnings.simplefilter("ignore", RuntimeWarning)
            eps = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        if not math.isfinite(eps):
            raise ArithmeticError(f"PRV accountant returned {eps} for history {groups}")
        return eps

"""Which devices take part in a round: public, reproducible from (seed, round).

Both engines use this one rule, so a fleet-engine run and a Flower run of the same config
sample the same devices. The schedule is public (it depends on the seed and the round
only), so a device can know in advance the rounds it will be asked to join; no privacy
amplification is claimed from it.
"""

from __future__ import annotations

import numpy as np

from fed_nessa.config import FederationConfig, Phase


def sample_positions(fleet: int, cfg: FederationConfig, round_num: int, phase: str = "") -> np.ndarray:
    """Sorted positions (0..fleet-1) of the devices sampled in ``round_num``.

    The statistics rounds split ALL devices into ``suffstats-rounds`` disjoint blocks: every
    device contributes its statistics once. DP-SGD rounds take ``clients-per-round`` devices
    (all of them when it is 0: full participation).
    """
    if phase == Phase.SUFFSTATS:
        order = np.random.default_rng([cfg.seed, 0]).permutation(fleet)
        block = np.array_split(order, cfg.suffstats_rounds)[(round_num - 1) % cfg.suffstats_rounds]
        return np.sort(block)
    k = cfg.cohort_size(fleet)
    if k >= fleet:
        return np.arange(fleet)
    rng = np.random.default_rng([cfg.seed, round_num])
    return np.sort(rng.choice(fleet, size=k, replace=False))

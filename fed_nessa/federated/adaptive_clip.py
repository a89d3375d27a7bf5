"""The server side of adaptive clipping to a private quantile of the update norms (Andrew et al. 2021).

Each device sends, beside its clipped delta, its centred bit ``1[norm <= C] - 1/2`` with a noise
share (:meth:`fed_nessa.federated.mechanism.DeviceLevel.fedavg_vector`); SecAgg+ releases only the
noisy sum. The server reads the noisy fraction of devices whose update fitted under C and moves C
geometrically toward the target quantile: ``C <- C exp(-clip-lr (fraction - quantile))``. This is
post-processing of a released, accounted sum (the bit's cost is in the round's sigma, see
:meth:`~fed_nessa.federated.mechanism.DeviceLevel.delta_sigma`), so the next round's C is public.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fed_nessa.config import FederationConfig
from fed_nessa.federated.mechanism import BIT_SENSITIVITY


@dataclass(frozen=True)
class AdaptiveClip:
    """The current clip and the rule that moves it (immutable: each round returns the next one)."""

    clip: float
    quantile: float
    lr: float

    @classmethod
    def from_config(cls, cfg: FederationConfig) -> AdaptiveClip:
        """Round 1 clips to ``device-clip-norm``; the target and the step are the run config's."""
        return cls(cfg.device_clip_norm, cfg.clip_target_quantile, cfg.clip_lr)

    def next(self, centred_bit_sum: float, n_arrived: int) -> AdaptiveClip:
        """The clip of the next round from the released (noisy) sum of ``n_arrived`` centred bits."""
        fraction = centred_bit_sum / max(n_arrived, 1) + BIT_SENSITIVITY
        return AdaptiveClip(self.clip * math.exp(-self.lr * (fraction - self.quantile)), self.quantile, self.lr)

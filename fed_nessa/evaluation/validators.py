"""Validators that score a model by the evaluation protocol, for early stopping.

:func:`fed_nessa.model.training.train_local` accepts any
:class:`fed_nessa.model.training.Validator` (a callable ``model -> float``,
lower is better). The EER-based one lives here, not in ``model``, because it
needs the evaluation protocol: training must not depend on evaluation, so the
caller builds the validator and injects it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fed_nessa.evaluation.protocol import evaluate_trials

__all__ = ["EERValidator"]


@dataclass(frozen=True)
class EERValidator:
    """Cross-model EER on validation speakers: the quantity the aligner is for.

    A loss can fall while speaker discrimination gets worse (the map fits the
    training voices); selecting on EER guards against that.
    """

    enroll: np.ndarray
    runtime: np.ndarray
    speaker: np.ndarray
    utterance: np.ndarray

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        model.eval()
        mapped = model(torch.from_numpy(np.ascontiguousarray(self.runtime, dtype=np.float32))).numpy()
        enroll = self.enroll
        map_x = getattr(model, "map_x", None)
        if map_x is not None:  # shared-space models map the profile side too
            enroll = map_x(torch.from_numpy(np.ascontiguousarray(enroll, dtype=np.float32))).numpy()
        model.train()
        return evaluate_trials(enroll, mapped, self.speaker, self.utterance).eer

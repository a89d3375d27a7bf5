"""Per-example alignment losses.

DP-SGD clips each example's gradient separately, which bounds one pair's
influence only if the loss is a *sum of per-example terms*: term i may depend on
pair i and on constants, never on other pairs of the batch. Batch-coupled
(contrastive) terms are therefore not offered here. Every function returns the
vector of per-example losses; reduction is the caller's (Opacus needs "mean" or
"sum" consistently, see :mod:`fed_nessa.model.training`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(pred_i, target_i)`` per row: the scoring the aligner serves is cosine."""
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error per row between L2-normalised vectors (= 2 - 2 cos for unit rows)."""
    p = F.normalize(pred, dim=-1, eps=1e-8)
    t = F.normalize(target, dim=-1, eps=1e-8)
    return (p - t).pow(2).sum(dim=-1)


def cosine_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine plus raw (un-normalised) MSE: keeps pre-normalisation outputs near unit norm."""
    return cosine_loss(pred, target) + (pred - target).pow(2).sum(dim=-1)


LOSSES: dict[str, LossFn] = {
    "cosine": cosine_loss,
    "mse": mse_loss,
    "cosine+mse": cosine_mse_loss,
}


def get_loss(name: str) -> LossFn:
    """Look a per-example loss up by name (clear error listing the choices)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None

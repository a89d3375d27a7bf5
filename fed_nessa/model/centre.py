"""The cosine loss about a centre: ``1 - cos(f(y) - mu, x - mu)``, ``mu`` the mean enrollment embedding.

Why: from a DP linear start the start's noise lengthens every output in directions that carry no
speaker, and the cheapest way down the plain cosine loss is then to add the mean enrollment
direction to every output. That raises every score alike, so the EER rises while the loss falls
(docs/results.md "What drives the detour"). About the mean, a shift common to every output earns
nothing; only what tells speakers apart does. Each term still depends on one pair and public
constants, so per-example and per-device clipping bound it exactly as before.

It is built once, as a change of the net and its targets, so every loss path the engines have
(Opacus, the vectorised ghost clipping, the written-out NESSA steps) computes it unchanged: the
net's linear bias moves by ``-mu`` (so it outputs ``f(y) - mu``) and the targets become the unit
enrollment rows minus ``mu``. A parameter's gradient does not depend on where the bias stood, so a
device's gradient or model delta on the moved net IS that of the loss about ``mu`` for the
unmoved one. The served aligner is the unmoved net.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from fed_nessa.model.aligners.nessa import NessaNet

Rows = TypeVar("Rows", np.ndarray, torch.Tensor)


def check_centre(centre: np.ndarray | list[float] | tuple[float, ...], d_x: int) -> str | None:
    """Why ``centre`` cannot centre targets of dimension ``d_x`` (None: it can)."""
    c = np.asarray(centre, dtype=np.float64)
    if c.shape != (d_x,):
        return f"the loss centre has shape {c.shape}, the enrollment embeddings have {d_x} dimensions"
    if not np.all(np.isfinite(c)):
        return "the loss centre holds NaN or Inf"
    return None


def about_centre(net: nn.Module, centre: np.ndarray) -> nn.Module:
    """A copy of ``net`` whose output is ``net(y) - centre`` (its linear bias moved; same trainable flags)."""
    if not isinstance(net, NessaNet):
        raise ValueError(f"the loss about a centre moves a NESSA net's linear bias; {type(net).__name__} has none")
    why = check_centre(centre, net.linear.out_features)
    if why:
        raise ValueError(why)
    out = copy.deepcopy(net)
    with torch.no_grad():
        out.linear.bias.sub_(torch.as_tensor(np.asarray(centre), dtype=out.linear.bias.dtype,
                                             device=out.linear.bias.device))
    return out


def centred_targets(x: Rows, centre: np.ndarray) -> Rows:
    """The enrollment rows as unit vectors minus ``centre`` (the cosine loss reads only their direction,
    so normalising first leaves the loss at a zero centre unchanged)."""
    if isinstance(x, torch.Tensor):
        c = torch.as_tensor(np.asarray(centre), dtype=x.dtype, device=x.device)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) - c
    a = np.asarray(x)
    unit = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    return np.asarray(unit - np.asarray(centre, dtype=np.float64), dtype=a.dtype)


def centred(net: nn.Module, x: Rows, centre: np.ndarray | None) -> tuple[nn.Module, Rows]:
    """The net and the enrollment rows a loss about ``centre`` is taken on (both as given without a centre)."""
    if centre is None:
        return net, x
    return about_centre(net, centre), centred_targets(x, centre)

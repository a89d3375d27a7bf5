"""The server's exponential moving average of the DP-SGD weights (``server-ema``).

Each DP-SGD step moves the global aligner by a released sum that carries fresh DP noise; the last
iterate therefore wanders around the optimum by about ``lr x`` the noise. Averaging the iterates
(Polyak-Ruppert; an EMA as in De et al. 2022, "Unlocking high-accuracy differentially private image
classification through scale") cancels much of that wander at no privacy cost: the average is a
function of the released sums only (post-processing), computed by the server, never by a device.

The average starts at the weights the first DP-SGD step started from (the DP linear start where
there is one), so for the first ~``1 / (1 - decay)`` rounds it leans on them. Only the trainable
weights are averaged; the frozen linear part is copied as it is.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """``avg <- decay x avg + (1 - decay) x weights`` after every DP-SGD step, on a copy of the net."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"server-ema = {decay!r}: the average's decay must be in (0, 1)")
        self.decay = decay
        self.net = copy.deepcopy(net)
        self.steps = 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Fold ``net``'s current weights in (after a step); frozen tensors and buffers follow ``net``."""
        for avg, cur in zip(self.net.parameters(), net.parameters(), strict=True):
            if cur.requires_grad:
                avg.mul_(self.decay).add_(cur, alpha=1.0 - self.decay)
            else:
                avg.copy_(cur)
        for avg_b, cur_b in zip(self.net.buffers(), net.buffers(), strict=True):
            avg_b.copy_(cur_b)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "steps": self.steps, "decay": self.decay}

    @classmethod
    def restored(cls, net: nn.Module, state: dict[str, Any]) -> WeightAverage:
        """The average a checkpoint holds (``net`` gives its architecture)."""
        avg = cls(net, float(state["decay"]))
        avg.net.load_state_dict(state["net"])
        avg.steps = int(state["steps"])
        return avg

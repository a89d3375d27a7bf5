"""What a layer type must provide for ghost clipping, and the tensors every rule shares.

A rule is per layer *type* (the shape of Opacus' ``grad_sample/``): from the layer's input
``a_e`` and the loss gradient at its output ``d_e`` (both held by one batched backward pass) it
gives per-example squared gradient norms and (clip-weighted) gradient sums, per example group
when asked. A new layer type is one module with a :class:`GhostLayer` and one line in
:mod:`.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Captured:
    """One trainable layer as the forward pass saw it: the module, its input, its output."""

    module: nn.Module
    inp: torch.Tensor
    out: torch.Tensor


def requires_grad(p: torch.nn.Parameter | None) -> bool:
    """Whether ``p`` exists and is trained (a frozen or absent parameter contributes nothing)."""
    return p is not None and p.requires_grad


def group_sum(per_example: torch.Tensor, seg: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Sum over examples, or per group of ``seg`` (one row per group) when ``seg`` is given."""
    if seg is None:
        return per_example.sum(0)
    acc = torch.zeros((groups, *per_example.shape[1:]), dtype=per_example.dtype, device=per_example.device)
    return acc.index_add_(0, seg, per_example)


def group_sq_norm(per_example: torch.Tensor, seg: torch.Tensor, groups: int) -> torch.Tensor:
    """Squared norm of each group's sum of the (2-D) rows."""
    acc = torch.zeros((groups, per_example.shape[1]), dtype=per_example.dtype, device=per_example.device)
    return acc.index_add_(0, seg, per_example).pow(2).sum(1)


def padded(t: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Rows of ``t`` laid out as ``(groups, width, features)``, zero where a group has fewer rows."""
    out = torch.zeros((groups, width, t.shape[1]), dtype=t.dtype, device=t.device)
    out[seg, pos] = t
    return out


class GhostLayer(ABC):
    """Per-example gradient norms and sums of one layer type, from its input and output gradient."""

    @abstractmethod
    def sq_norms(self, layer: Captured, d: torch.Tensor) -> torch.Tensor:
        """Each example's squared gradient norm over the layer's trained parameters: ``(rows,)``."""

    @abstractmethod
    def grads(self, layer: Captured, fd: torch.Tensor, seg: torch.Tensor | None,
              groups: int) -> dict[int, torch.Tensor]:
        """Gradient of ``sum_e f_e loss_e`` per trained parameter (keyed by ``id``), per group when ``seg``."""

    @abstractmethod
    def device_sq_norms(self, layer: Captured, fd: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                        groups: int, width: int) -> torch.Tensor:
        """Squared norm of each group's (weighted) gradient sum: ``(groups,)``."""

    def device_grads(self, layer: Captured, fd: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                     groups: int, width: int) -> dict[int, torch.Tensor]:
        """Each group's gradient sum; by default :meth:`grads` per group (rules with a faster batched form override)."""
        return self.grads(layer, fd, seg, groups)

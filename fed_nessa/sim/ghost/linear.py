"""``nn.Linear``: a per-example weight gradient is the outer product ``d_e a_e^T``.

So ``|g_e|^2 = |d_e|^2 |a_e|^2 (+ |d_e|^2 for the bias)``, the clipped sum is ``(f d)^T a``,
and per-group sums are one batched matmul on zero-padded rows (never one outer product per
example when the groups are devices).
"""

from __future__ import annotations

import torch
from torch import nn

from fed_nessa.sim.ghost.base import Captured, GhostLayer, group_sq_norm, group_sum, padded, requires_grad


class LinearGhost(GhostLayer):
    """Ghost norms and sums of ``nn.Linear``."""

    def sq_norms(self, layer: Captured, d: torch.Tensor) -> torch.Tensor:
        m = _linear(layer)
        d2 = d.pow(2).sum(1)
        out = torch.zeros_like(d2)
        if m.weight.requires_grad:
            out = out + d2 * layer.inp.pow(2).sum(1)
        if requires_grad(m.bias):
            out = out + d2
        return out

    def grads(self, layer: Captured, fd: torch.Tensor, seg: torch.Tensor | None,
              groups: int) -> dict[int, torch.Tensor]:
        m = _linear(layer)
        out: dict[int, torch.Tensor] = {}
        if m.weight.requires_grad:
            out[id(m.weight)] = (fd.T @ layer.inp if seg is None
                                 else group_sum(fd[:, :, None] * layer.inp[:, None, :], seg, groups))
        if requires_grad(m.bias):
            out[id(m.bias)] = group_sum(fd, seg, groups)
        return out

    def device_grads(self, layer: Captured, fd: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                     groups: int, width: int) -> dict[int, torch.Tensor]:
        m = _linear(layer)
        out: dict[int, torch.Tensor] = {}
        if m.weight.requires_grad:
            out[id(m.weight)] = torch.bmm(padded(fd, pos, seg, groups, width).transpose(1, 2),
                                          padded(layer.inp, pos, seg, groups, width))
        if requires_grad(m.bias):
            out[id(m.bias)] = torch.zeros((groups, fd.shape[1]), dtype=fd.dtype,
                                          device=fd.device).index_add_(0, seg, fd)
        return out

    def device_sq_norms(self, layer: Captured, fd: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                        groups: int, width: int) -> torch.Tensor:
        """From per-group Gram matrices: ``|sum w d a^T|^2 = sum (w d.w d')(a.a')``."""
        m = _linear(layer)
        out = torch.zeros(groups, dtype=fd.dtype, device=fd.device)
        if m.weight.requires_grad:
            d_pad = padded(fd, pos, seg, groups, width)
            a_pad = padded(layer.inp, pos, seg, groups, width)
            gram = torch.bmm(d_pad, d_pad.transpose(1, 2)) * torch.bmm(a_pad, a_pad.transpose(1, 2))
            out = out + gram.sum((1, 2))
        if requires_grad(m.bias):
            out = out + group_sq_norm(fd, seg, groups)
        return out


def _linear(layer: Captured) -> nn.Linear:
    assert isinstance(layer.module, nn.Linear)
    return layer.module

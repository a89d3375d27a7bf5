"""``nn.LayerNorm``: a per-example gradient is elementwise, ``d_e * xhat_e`` (weight) and ``d_e`` (bias).

``xhat`` is the normalised input, recomputed from the saved input (as LayerNorm does).
"""

from __future__ import annotations

import torch
from torch import nn

from fed_nessa.sim.ghost.base import Captured, GhostLayer, group_sq_norm, group_sum, requires_grad


class LayerNormGhost(GhostLayer):
    """Ghost norms and sums of ``nn.LayerNorm`` (small vectors: summed per group directly)."""

    def sq_norms(self, layer: Captured, d: torch.Tensor) -> torch.Tensor:
        m = _layer_norm(layer)
        d2 = d.pow(2).sum(1)
        out = torch.zeros_like(d2)
        if requires_grad(m.weight):
            out = out + (d * _xhat(layer)).pow(2).sum(1)
        if requires_grad(m.bias):
            out = out + d2
        return out

    def grads(self, layer: Captured, fd: torch.Tensor, seg: torch.Tensor | None,
              groups: int) -> dict[int, torch.Tensor]:
        m = _layer_norm(layer)
        out: dict[int, torch.Tensor] = {}
        if requires_grad(m.weight):
            out[id(m.weight)] = group_sum(fd * _xhat(layer), seg, groups)
        if requires_grad(m.bias):
            out[id(m.bias)] = group_sum(fd, seg, groups)
        return out

    def device_sq_norms(self, layer: Captured, fd: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                        groups: int, width: int) -> torch.Tensor:
        m = _layer_norm(layer)
        out = torch.zeros(groups, dtype=fd.dtype, device=fd.device)
        if requires_grad(m.weight):
            out = out + group_sq_norm(fd * _xhat(layer), seg, groups)
        if requires_grad(m.bias):
            out = out + group_sq_norm(fd, seg, groups)
        return out


def _layer_norm(layer: Captured) -> nn.LayerNorm:
    assert isinstance(layer.module, nn.LayerNorm)
    return layer.module


def _xhat(layer: Captured) -> torch.Tensor:
    ln = _layer_norm(layer)
    mean = layer.inp.mean(dim=-1, keepdim=True)
    var = layer.inp.var(dim=-1, unbiased=False, keepdim=True)
    return (layer.inp - mean) / torch.sqrt(var + ln.eps)

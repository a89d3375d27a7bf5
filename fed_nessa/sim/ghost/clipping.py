"""Ghost clipping: per-example (and per-device) clipped gradient sums from one backward pass.

DP-SGD needs ``sum_e min(1, C / |g_e|) g_e`` over a Poisson sample. For the aligner's
layers (``nn.Linear``, ``nn.LayerNorm``) a per-example gradient is an outer product or an
elementwise product of two small vectors that one batched backward pass already holds: the
layer's input ``a_e`` and the loss gradient at its output ``d_e``. So

* ``|g_e|^2 = sum over layers of |d_e|^2 |a_e|^2 (+ |d_e|^2 for a bias)`` (Linear) or
  ``|d_e * xhat_e|^2 + |d_e|^2`` (LayerNorm), and
* the clipped sum is ``(f d)^T a`` etc., with ``f_e = min(1, C / (|g_e| + 1e-6))``
  (Opacus' clip factor, so both engines clip identically).

Per-device sums (the fleet engine's exact numerics) are the same products summed per device.
The per-layer maths is looked up per layer type (:mod:`fed_nessa.sim.ghost.registry`); a
trainable layer of an unregistered type is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fed_nessa.model.losses import get_loss
from fed_nessa.sim.ghost.base import Captured
from fed_nessa.sim.ghost.registry import ghost_rule

#: Opacus' guard in its clip factor ``C / (norm + 1e-6)``.
CLIP_EPS = 1e-6


def _trainable_layers(net: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for module in net.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        ghost_rule(module)  # an unregistered type fails here, before any pass
        layers.append(module)
    return layers


def _forward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, list[Captured]]:
    layers = _trainable_layers(net)
    seen: list[Captured] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(Captured(mod, i[0].detach(), o)))
             for m in layers]
    try:
        per_example = get_loss(loss)(net(y), x)
    finally:
        for h in hooks:
            h.remove()
    return per_example, seen


def clipped_gradient_sums(net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, *, loss: str = "cosine",
                          segments: torch.Tensor | None = None, groups: int = 1,
                          clip_enabled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, norms)``: the clipped per-example gradient sum as one flat vector in the order of
    the net's trainable parameters (``(groups, P)`` per ``segments`` group when given), and the
    per-example gradient norms. ``clip_enabled=False`` sums the unclipped gradients (non-DP)."""
    params = [p for p in net.parameters() if p.requires_grad]
    total_size = sum(p.numel() for p in params)
    if len(x) == 0:
        shape = (total_size,) if segments is None else (groups, total_size)
        return torch.zeros(shape, dtype=torch.float32, device=x.device), torch.zeros(0, device=x.device)
    per_example, layers = _forward(net, x, y, loss)
    deltas = torch.autograd.grad(per_example.sum(), [layer.out for layer in layers])
    sq = torch.zeros(len(x), dtype=per_example.dtype, device=x.device)
    for layer, d in zip(layers, deltas, strict=True):
        sq = sq + ghost_rule(layer.module).sq_norms(layer, d)
    norms = torch.sqrt(sq)
    f = (clip / (norms + CLIP_EPS)).clamp(max=1.0) if clip_enabled else torch.ones_like(norms)
    grads: dict[int, torch.Tensor] = {}
    for layer, d in zip(layers, deltas, strict=True):
        grads.update(ghost_rule(layer.module).grads(layer, f[:, None] * d, segments, groups))
    if segments is None:
        flat = torch.cat([grads[id(p)].reshape(-1) for p in params])
    else:
        flat = torch.cat([grads[id(p)].reshape(groups, -1) for p in params], dim=1)
    return flat.detach(), norms.detach()


@dataclass
class _DeviceRows:
    """One forward/backward over every device's rows, sorted by device, as both device-level paths need it."""

    layers: list[Captured]
    deltas: tuple[torch.Tensor, ...]
    segments: torch.Tensor  # device of each (sorted) row
    pos: torch.Tensor  # row's position within its device
    width: int  # rows of the largest device (the padding width)
    weights: torch.Tensor  # (rows, 1): 1 / rows of the row's device (the mean)


def _device_pass(net: nn.Module, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor, groups: int,
                 loss: str) -> _DeviceRows:
    counts = torch.bincount(segments, minlength=groups)
    if len(x) == 0 or bool((counts == 0).any()):
        raise ValueError("every device needs at least one pair for a device-level update")
    order = torch.argsort(segments, stable=True)
    x, y, segments = x[order], y[order], segments[order]
    starts = torch.cumsum(counts, 0) - counts
    per_example, layers = _forward(net, x, y, loss)
    deltas = torch.autograd.grad(per_example.sum(), [layer.out for layer in layers])
    return _DeviceRows(layers, deltas, segments, torch.arange(len(segments), device=x.device) - starts[segments],
                       int(counts.max()), (1.0 / counts.to(per_example.dtype))[segments][:, None])


def device_clipped_vectors(net: nn.Module, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor, groups: int,
                           clip: float, *, loss: str = "cosine", clip_enabled: bool = True) -> torch.Tensor:
    """Each group's (device's) mean gradient over its rows, clipped as ONE vector: ``(groups, P)``.

    Device-level DP clips a device's whole round contribution, so the norm that matters is
    that of the device's mean gradient, not of each example's. Per-device Linear weight
    gradients are ``(w d)^T a`` over the device's rows, computed for every device at once
    with one batched matmul on zero-padded rows (never one outer product per example).
    ``segments`` maps each row to its group; every group must have >= 1 row. The clip factor
    is Opacus' ``min(1, C / (norm + 1e-6))``, as on a device (``model.training.device_update``).
    """
    params = [p for p in net.parameters() if p.requires_grad]
    rows = _device_pass(net, x, y, segments, groups, loss)
    pos, segments, width, w = rows.pos, rows.segments, rows.width, rows.weights
    grads: dict[int, torch.Tensor] = {}
    for layer, d in zip(rows.layers, rows.deltas, strict=True):
        grads.update(ghost_rule(layer.module).device_grads(layer, w * d, pos, segments, groups, width))
    flat = torch.cat([grads[id(p)].reshape(groups, -1) for p in params], dim=1).detach()
    if clip_enabled:
        norms = torch.linalg.vector_norm(flat, dim=1)
        flat = flat * (clip / (norms + CLIP_EPS)).clamp(max=1.0)[:, None]
    return flat


def device_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, segments: torch.Tensor, groups: int,
                       clip: float, *, loss: str = "cosine", clip_enabled: bool = True) -> torch.Tensor:
    """``sum over devices of clip(mean gradient)`` as one flat vector, without per-device vectors.

    The same number as ``device_clipped_vectors(...).sum(0)`` (tests/test_device_level.py), at a
    fraction of the memory: each device's gradient norm comes from the Gram matrices of its
    rows (``|sum w d a^T|^2 = sum (w d.w d')(a.a')``), then one weighted pass sums
    ``f_device w_e g_e`` over all rows.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    rows = _device_pass(net, x, y, segments, groups, loss)
    w = rows.weights
    factor = torch.ones(groups, dtype=w.dtype, device=w.device)
    if clip_enabled:
        sq = torch.zeros(groups, dtype=w.dtype, device=w.device)
        for layer, d in zip(rows.layers, rows.deltas, strict=True):
            sq = sq + ghost_rule(layer.module).device_sq_norms(layer, w * d, rows.pos, rows.segments, groups,
                                                                rows.width)
        factor = (clip / (torch.sqrt(sq) + CLIP_EPS)).clamp(max=1.0)
    scale = w * factor[rows.segments][:, None]
    grads: dict[int, torch.Tensor] = {}
    for layer, d in zip(rows.layers, rows.deltas, strict=True):
        grads.update(ghost_rule(layer.module).grads(layer, scale * d, None, 1))
    return torch.cat([grads[id(p)].reshape(-1) for p in params]).detach()

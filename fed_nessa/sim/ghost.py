"""Per-example clipped gradient sums without per-example gradient tensors ("ghost" norms).

DP-SGD needs ``sum_e min(1, C / |g_e|) g_e`` over a Poisson sample. For the aligner's
layers (``nn.Linear``, ``nn.LayerNorm``) a per-example gradient is an outer product or an
elementwise product of two small vectors that one batched backward pass already holds: the
layer's input ``a_e`` and the loss gradient at its output ``d_e``. So

* ``|g_e|^2 = sum over layers of |d_e|^2 |a_e|^2 (+ |d_e|^2 for a bias)`` (Linear) or
  ``|d_e * xhat_e|^2 + |d_e|^2`` (LayerNorm), and
* the clipped sum is ``(f d)^T a`` etc., with ``f_e = min(1, C / (|g_e| + 1e-6))``
  (Opacus' clip factor, so both engines clip identically).

Per-device sums (the fleet engine's exact numerics) are the same products summed per device.
Only Linear, LayerNorm and parameter-free modules are supported; anything else is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fed_nessa.model.losses import get_loss

#: Opacus' guard in its clip factor ``C / (norm + 1e-6)``.
CLIP_EPS = 1e-6


@dataclass
class _Layer:
    module: nn.Module
    inp: torch.Tensor
    out: torch.Tensor


def _trainable_layers(net: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for module in net.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, nn.Linear | nn.LayerNorm):
            raise TypeError(f"ghost clipping supports Linear and LayerNorm only, found {type(module).__name__}")
        layers.append(module)
    return layers


def _forward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, list[_Layer]]:
    layers = _trainable_layers(net)
    seen: list[_Layer] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(_Layer(mod, i[0].detach(), o)))
             for m in layers]
    try:
        per_example = get_loss(loss)(net(y), x)
    finally:
        for h in hooks:
            h.remove()
    return per_example, seen


def _xhat(layer: _Layer) -> torch.Tensor:
    ln = layer.module
    assert isinstance(ln, nn.LayerNorm)
    mean = layer.inp.mean(dim=-1, keepdim=True)
    var = layer.inp.var(dim=-1, unbiased=False, keepdim=True)
    return (layer.inp - mean) / torch.sqrt(var + ln.eps)


def _sq_norms(layer: _Layer, d: torch.Tensor) -> torch.Tensor:
    d2 = d.pow(2).sum(1)
    m = layer.module
    if isinstance(m, nn.Linear):
        out = torch.zeros_like(d2)
        if m.weight.requires_grad:
            out = out + d2 * layer.inp.pow(2).sum(1)
        if m.bias is not None and m.bias.requires_grad:
            out = out + d2
        return out
    out = torch.zeros_like(d2)
    if m.weight is not None and m.weight.requires_grad:
        out = out + (d * _xhat(layer)).pow(2).sum(1)
    if m.bias is not None and m.bias.requires_grad:
        out = out + d2
    return out


def _grads(layer: _Layer, fd: torch.Tensor, seg: torch.Tensor | None, groups: int) -> dict[int, torch.Tensor]:
    """Gradient of ``sum_e f_e loss_e`` for the layer's parameters, per group when ``seg`` is given."""
    m = layer.module
    out: dict[int, torch.Tensor] = {}

    def total(per_example: torch.Tensor) -> torch.Tensor:
        if seg is None:
            return per_example.sum(0)
        acc = torch.zeros((groups, *per_example.shape[1:]), dtype=per_example.dtype, device=per_example.device)
        return acc.index_add_(0, seg, per_example)

    if isinstance(m, nn.Linear):
        if m.weight.requires_grad:
            out[id(m.weight)] = (fd.T @ layer.inp if seg is None
                                 else total(fd[:, :, None] * layer.inp[:, None, :]))
        if m.bias is not None and m.bias.requires_grad:
            out[id(m.bias)] = total(fd)
        return out
    if m.weight is not None and m.weight.requires_grad:
        out[id(m.weight)] = total(fd * _xhat(layer))
    if m.bias is not None and m.bias.requires_grad:
        out[id(m.bias)] = total(fd)
    return out


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
        sq = sq + _sq_norms(layer, d)
    norms = torch.sqrt(sq)
    f = (clip / (norms + CLIP_EPS)).clamp(max=1.0) if clip_enabled else torch.ones_like(norms)
    grads: dict[int, torch.Tensor] = {}
    for layer, d in zip(layers, deltas, strict=True):
        grads.update(_grads(layer, f[:, None] * d, segments, groups))
    if segments is None:
        flat = torch.cat([grads[id(p)].reshape(-1) for p in params])
    else:
        flat = torch.cat([grads[id(p)].reshape(groups, -1) for p in params], dim=1)
    return flat.detach(), norms.detach()


def _padded(t: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    out = torch.zeros((groups, width, t.shape[1]), dtype=t.dtype, device=t.device)
    out[seg, pos] = t
    return out


@dataclass
class _DeviceRows:
    """One forward/backward over every device's rows, sorted by device, as both device-level paths need it."""

    layers: list[_Layer]
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
        fd = w * d
        m = layer.module
        if not isinstance(m, nn.Linear):
            grads.update(_grads(layer, fd, segments, groups))  # LayerNorm: small vectors, summed per device
            continue
        if m.weight.requires_grad:
            grads[id(m.weight)] = torch.bmm(_padded(fd, pos, segments, groups, width).transpose(1, 2),
                                            _padded(layer.inp, pos, segments, groups, width))
        if m.bias is not None and m.bias.requires_grad:
            grads[id(m.bias)] = torch.zeros((groups, fd.shape[1]), dtype=fd.dtype,
                                            device=fd.device).index_add_(0, segments, fd)
    flat = torch.cat([grads[id(p)].reshape(groups, -1) for p in params], dim=1).detach()
    if clip_enabled:
        norms = torch.linalg.vector_norm(flat, dim=1)
        flat = flat * (clip / (norms + CLIP_EPS)).clamp(max=1.0)[:, None]
    return flat


def _device_sq_norms(layer: _Layer, fd: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor, groups: int,
                     width: int) -> torch.Tensor:
    """Squared norm of each device's (weighted) gradient sum for one layer, from per-device Gram matrices."""
    m = layer.module

    def summed_sq(per_example: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros((groups, per_example.shape[1]), dtype=per_example.dtype, device=per_example.device)
        return acc.index_add_(0, seg, per_example).pow(2).sum(1)

    out = torch.zeros(groups, dtype=fd.dtype, device=fd.device)
    if isinstance(m, nn.Linear):
        if m.weight.requires_grad:
            d_pad = _padded(fd, pos, seg, groups, width)
            a_pad = _padded(layer.inp, pos, seg, groups, width)
            gram = torch.bmm(d_pad, d_pad.transpose(1, 2)) * torch.bmm(a_pad, a_pad.transpose(1, 2))
            out = out + gram.sum((1, 2))
        if m.bias is not None and m.bias.requires_grad:
            out = out + summed_sq(fd)
        return out
    if m.weight is not None and m.weight.requires_grad:
        out = out + summed_sq(fd * _xhat(layer))
    if m.bias is not None and m.bias.requires_grad:
        out = out + summed_sq(fd)
    return out


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
            sq = sq + _device_sq_norms(layer, w * d, rows.pos, rows.segments, groups, rows.width)
        factor = (clip / (torch.sqrt(sq) + CLIP_EPS)).clamp(max=1.0)
    scale = w * factor[rows.segments][:, None]
    grads: dict[int, torch.Tensor] = {}
    for layer, d in zip(rows.layers, rows.deltas, strict=True):
        grads.update(_grads(layer, scale * d, None, 1))
    return torch.cat([grads[id(p)].reshape(-1) for p in params]).detach()

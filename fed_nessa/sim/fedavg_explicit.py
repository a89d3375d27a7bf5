"""DP-FedAvg's block update for the NESSA net, written out by hand: no per-device weight copies.

:func:`fed_nessa.sim.fedavg.fedavg_block` with ``torch.func.vmap`` keeps every device's copy of the
trainable weights and rewrites it (and its gradient) at every local step: at 10^5 devices that
memory traffic, not the arithmetic, is the round's cost (BENCHMARKS.md, DP-FedAvg). This module
computes the same plain-SGD steps for :class:`~fed_nessa.model.aligners.nessa.NessaNet` without
those copies, from one identity of a linear layer under SGD:

    W_s = W_0 - lr * sum_{t<s} E_t^T U_t     (U_t: the layer's input rows at step t, E_t: d loss / d output)

so at step s the layer's output is ``U_s W_0^T - lr * (U_s U_{<s}^T) E_{<s} + b_s`` and the gradient
it passes down is ``E_s W_0 - lr * (E_s E_{<s}^T) U_{<s}``: the shared ``W_0`` and the device's own
rows (a few dozen per device) instead of a device copy of ``W``. The delta ``start - end`` of a
weight is ``lr * E^T U`` over all the device's step rows, formed once at the end; biases and the
LayerNorm's affine are small and stepped as they are. Same maths as the vmap path (and as the
ClientApp's :func:`~fed_nessa.model.training.fedavg_delta`); float32 rounding differs (the delta is
formed directly, not as the difference of two nearby weights), to float tolerance
(tests/test_sim_fedavg_explicit.py).

Only what it is written for runs here: a :class:`NessaNet` (exact class) whose residual is
``[Linear, LayerNorm?, GELU(exact)|ReLU] * depth + Linear``, every residual parameter trainable,
the linear part all trainable or all frozen, the cosine loss. :func:`plan` says ``None`` for
anything else and the caller runs the general vmap path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fed_nessa.model.aligners.nessa import NessaNet

#: The one loss written out here (the engines' DP-FedAvg loss).
EXPLICIT_LOSS = "cosine"
#: ``F.cosine_similarity``'s eps in :func:`fed_nessa.model.losses.cosine_loss`.
COSINE_EPS = 1e-8


@dataclass(frozen=True)
class Hidden:
    """One hidden layer of the residual: ``act(LN(u W^T + b))``."""

    linear: nn.Linear
    norm: nn.LayerNorm | None
    relu: bool  # False: exact GELU


@dataclass(frozen=True)
class Plan:
    """The NESSA net's layers in forward order, as the explicit update reads them."""

    linear: nn.Linear
    train_linear: bool
    hidden: tuple[Hidden, ...]
    last: nn.Linear


def plan(net: nn.Module, loss: str) -> Plan | None:
    """The explicit update's reading of ``net``, or ``None`` where it is not written for it (vmap runs)."""
    if type(net) is not NessaNet or loss != EXPLICIT_LOSS:
        return None
    layers = list(net.residual)
    hidden: list[Hidden] = []
    i = 0
    while i < len(layers) - 1:
        lin = layers[i]
        if not isinstance(lin, nn.Linear) or lin.bias is None:
            return None
        i += 1
        norm = None
        if isinstance(layers[i], nn.LayerNorm):
            norm = layers[i]
            if norm.weight is None or norm.bias is None or tuple(norm.normalized_shape) != (lin.out_features,):
                return None
            i += 1
        act = layers[i]
        if isinstance(act, nn.GELU) and act.approximate == "none":
            relu = False
        elif isinstance(act, nn.ReLU):
            relu = True
        else:
            return None
        hidden.append(Hidden(lin, norm, relu))
        i += 1
    last = layers[-1]
    if not hidden or i != len(layers) - 1 or not isinstance(last, nn.Linear) or last.bias is None:
        return None
    if not all(p.requires_grad for p in net.residual.parameters()):
        return None
    flags = {p.requires_grad for p in net.linear.parameters()}
    if len(flags) != 1 or net.linear.bias is None:
        return None
    return Plan(net.linear, flags.pop(), tuple(hidden), last)


class _Layer:
    """One linear layer stepped by the identity above: ``W_0`` shared, the devices' ``U``/``E`` rows kept."""

    def __init__(self, lin: nn.Linear, k: int, n: int, inputs: torch.Tensor | None) -> None:
        w = lin.weight.detach()
        self.w0 = w
        self.b = lin.bias.detach().expand(k, -1).clone()  # type: ignore[union-attr]
        self.b0 = lin.bias.detach()  # type: ignore[union-attr]
        self.u = inputs if inputs is not None else w.new_zeros(k, n, w.shape[1])  # [k, n, in]
        self.e = w.new_zeros(k, n, w.shape[0])  # [k, n, out]: d loss / d output, row by row

    def forward(self, u_s: torch.Tensor, lo: int, lr: float, base: torch.Tensor | None = None,
                gram: torch.Tensor | None = None) -> torch.Tensor:
        """Output at step rows ``lo:lo+B`` (``u_s`` its input rows); ``base``: ``u_s W_0^T`` and ``gram``:
        ``u_s U_{<s}^T`` where precomputed."""
        out = base if base is not None else torch.matmul(u_s, self.w0.t())
        out = out + self.b[:, None]
        if lo:
            if gram is None:
                gram = torch.bmm(u_s, self.u[:, :lo].transpose(1, 2))
            out = torch.baddbmm(out, gram, self.e[:, :lo], alpha=-lr)
        return out

    def backward(self, e_s: torch.Tensor, lo: int, lr: float) -> torch.Tensor:
        """The gradient passed to the input: ``e_s W_s`` with ``W_s`` the step's weight."""
        out = torch.matmul(e_s, self.w0)
        if lo:
            gram = torch.bmm(e_s, self.e[:, :lo].transpose(1, 2))
            out = torch.baddbmm(out, gram, self.u[:, :lo], alpha=-lr)
        return out

    def record(self, lo: int, hi: int, e_s: torch.Tensor, lr: float, u_s: torch.Tensor | None = None) -> None:
        """Keep the step's rows and step the bias."""
        self.e[:, lo:hi] = e_s
        if u_s is not None:
            self.u[:, lo:hi] = u_s
        self.b.sub_(e_s.sum(dim=1), alpha=lr)

    def deltas(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``start - end`` of the weight (``lr E^T U``) and of the bias."""
        return lr * torch.bmm(self.e.transpose(1, 2), self.u), self.b0 - self.b


def _activation(a: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation and its derivative at ``a``."""
    if relu:
        d = (a > 0).to(a.dtype)
        return a * d, d
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return a * cdf, cdf + a * pdf


def _cosine_grad(o: torch.Tensor, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """d/d o of ``sum_i coef_i (1 - cos(o_i, x_i))``."""
    on = torch.linalg.vector_norm(o, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    cos = (o * x).sum(dim=-1, keepdim=True) / (on * xn)
    return -coef[..., None] * (x / (on * xn) - cos * o / (on * on))


def explicit_deltas(p: Plan, names: list[str], net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    rows: torch.Tensor, weights: torch.Tensor, lr: float) -> torch.Tensor:
    """Every device's ``start - end`` after its local steps, ``[k, trainable params]`` in ``names`` order.

    ``x``/``y``: ``[k, rows, d]`` padded pairs; ``rows``/``weights``: ``[k, steps, batch]`` as
    :class:`fed_nessa.sim.fedavg.BlockSteps` (weight 0 on padding, the step's loss the weighted mean).
    """
    k, steps, width = rows.shape
    n = steps * width
    device = torch.arange(k, device=x.device)[:, None]
    flat = rows.reshape(k, n)
    xr, yr = x[device, flat], y[device, flat]  # [k, n, d]: the device's rows in step order
    coef = weights / weights.sum(dim=2, keepdim=True).clamp(min=1.0)  # [k, steps, batch]
    first = p.hidden[0].linear
    # layers fed by y share the input rows: one Gram, one GEMM for their W_0 parts
    gram_y = torch.bmm(yr, yr.transpose(1, 2))  # [k, n, n]
    base_y = torch.matmul(yr, torch.cat([p.linear.weight.detach(), first.weight.detach()]).t())
    if not p.train_linear:
        base_y[..., :p.linear.out_features] += p.linear.bias.detach()  # type: ignore[operator]
    lin = _Layer(p.linear, k, n, yr) if p.train_linear else None
    layers = [_Layer(h.linear, k, n, yr if i == 0 else None) for i, h in enumerate(p.hidden)]
    last = _Layer(p.last, k, n, None)
    norms = [(h.norm.weight.detach().expand(k, -1).clone(), h.norm.bias.detach().expand(k, -1).clone())
             if h.norm is not None else None for h in p.hidden]
    d_out = p.linear.out_features
    for s in range(steps):
        lo, hi = s * width, (s + 1) * width
        # forward
        direct = base_y[:, lo:hi, :d_out]  # y W^T (+ b when frozen)
        if lin is not None:
            direct = lin.forward(yr[:, lo:hi], lo, lr, direct, gram_y[:, lo:hi, :lo])
        u = yr[:, lo:hi]
        cache = []
        for i, (h, layer) in enumerate(zip(p.hidden, layers, strict=True)):
            pre = (layer.forward(u, lo, lr, base_y[:, lo:hi, d_out:], gram_y[:, lo:hi, :lo]) if i == 0
                   else layer.forward(u, lo, lr))
            if h.norm is not None:
                mu = pre.mean(dim=-1, keepdim=True)
                var = (pre - mu).pow(2).mean(dim=-1, keepdim=True)
                rstd = torch.rsqrt(var + h.norm.eps)
                z = (pre - mu) * rstd
                gamma, beta = norms[i]  # type: ignore[misc]
                a = z * gamma[:, None] + beta[:, None]
            else:
                z, rstd, a = pre, pre, pre
            act, slope = _activation(a, h.relu)
            cache.append((u, z, rstd, slope))
            u = act
        o = direct + last.forward(u, lo, lr)
        # backward
        e = _cosine_grad(o, xr[:, lo:hi], coef[:, s])
        if lin is not None:
            lin.record(lo, hi, e, lr)
        down = last.backward(e, lo, lr)
        last.record(lo, hi, e, lr, u)
        for i in reversed(range(len(p.hidden))):
            h, layer = p.hidden[i], layers[i]
            u_in, z, rstd, slope = cache[i]
            da = down * slope
            if h.norm is not None:
                gamma, beta = norms[i]  # type: ignore[misc]
                dz = da * gamma[:, None]
                d_gamma, d_beta = (da * z).sum(dim=1), da.sum(dim=1)
                dpre = rstd * (dz - dz.mean(dim=-1, keepdim=True) - z * (dz * z).mean(dim=-1, keepdim=True))
                gamma.sub_(d_gamma, alpha=lr)
                beta.sub_(d_beta, alpha=lr)
            else:
                dpre = da
            if i > 0:
                down = layer.backward(dpre, lo, lr)
            layer.record(lo, hi, dpre, lr, None if i == 0 else u_in)
    out: dict[str, torch.Tensor] = {}
    if lin is not None:
        out["linear.weight"], out["linear.bias"] = lin.deltas(lr)
    modules = dict(net.named_modules())
    for h, layer, affine in zip(p.hidden, layers, norms, strict=True):
        name = _name(modules, h.linear)
        out[f"{name}.weight"], out[f"{name}.bias"] = layer.deltas(lr)
        if h.norm is not None and affine is not None:
            norm_name = _name(modules, h.norm)
            out[f"{norm_name}.weight"] = h.norm.weight.detach() - affine[0]
            out[f"{norm_name}.bias"] = h.norm.bias.detach() - affine[1]
    name = _name(modules, p.last)
    out[f"{name}.weight"], out[f"{name}.bias"] = last.deltas(lr)
    return torch.cat([out[nm].reshape(k, -1) for nm in names], dim=1)


def _name(modules: dict[str, nn.Module], module: nn.Module) -> str:
    return next(n for n, m in modules.items() if m is module)

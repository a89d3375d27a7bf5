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
from dataclasses import dataclass, field

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
        norm: nn.LayerNorm | None = None
        candidate = layers[i]
        if isinstance(candidate, nn.LayerNorm):
            norm = candidate
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


class Workspace:
    """The group's large buffers, kept from one group of a block to the next: fresh multi-MB tensors
    cost page faults on every group (measured: ~15 % of the update). A buffer is reused only after the
    previous group's :class:`Trained` has been consumed (the block loops do so)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised float buffer ``name`` of ``shape`` (the same one while the shape repeats)."""
        buf = self._bufs.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.device != like.device:
            buf = like.new_empty(shape)
            self._bufs[name] = buf
        return buf


class _Layer:
    """One linear layer stepped by the identity above: ``W_0`` shared, the devices' ``U``/``E`` rows kept."""

    def __init__(self, name: str, w0: torch.Tensor, b0: torch.Tensor, k: int, n: int, inputs: torch.Tensor | None,
                 work: Workspace) -> None:
        self.w0, self.b0 = w0, b0
        self.b = b0.expand(k, -1).clone()  # the devices' current biases
        # [k, n, in] and [k, n, out] (d loss / d output): every row is written by its step before it is read
        self.u = inputs if inputs is not None else work.take(f"{name}.u", (k, n, w0.shape[1]), w0)
        self.e = work.take(f"{name}.e", (k, n, w0.shape[0]), w0)

    def forward(self, u_s: torch.Tensor, lo: int, lr: float, base: torch.Tensor | None = None,
                gram: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
        """Output at step rows ``lo:lo+B`` (``u_s`` its input rows); ``base``: ``u_s W_0^T`` and ``gram``:
        ``u_s U_{<s}^T`` where precomputed; ``add``: a tensor the output is added to (the GEMM accumulates
        into it: one elementwise pass fewer)."""
        if base is not None:
            out = base + self.b[:, None]
        elif add is not None:
            out = add + self.b[:, None]
            out.view(-1, out.shape[-1]).addmm_(u_s.reshape(-1, u_s.shape[-1]), self.w0.t())
        else:
            out = torch.matmul(u_s, self.w0.t()) + self.b[:, None]
        if lo:
            if gram is None:
                gram = torch.bmm(u_s, self.u[:, :lo].transpose(1, 2))
            out.baddbmm_(gram, self.e[:, :lo], alpha=-lr)  # in place: ``out`` is this step's own tensor
        return out

    def backward(self, e_s: torch.Tensor, lo: int, lr: float) -> torch.Tensor:
        """The gradient passed to the input: ``e_s W_s`` with ``W_s`` the step's weight."""
        out = torch.matmul(e_s, self.w0)
        if lo:
            gram = torch.bmm(e_s, self.e[:, :lo].transpose(1, 2))
            out.baddbmm_(gram, self.u[:, :lo], alpha=-lr)
        return out

    def record(self, lo: int, hi: int, e_s: torch.Tensor, lr: float, u_s: torch.Tensor | None = None) -> None:
        """Keep the step's rows and step the bias."""
        self.e[:, lo:hi] = e_s
        if u_s is not None:
            self.u[:, lo:hi] = u_s
        self.b.sub_(e_s.sum(dim=1), alpha=lr)


@dataclass(frozen=True)
class Outer:
    """A weight's delta ``lr * E^T U`` per device, kept factored; ``key`` names ``E`` (shared Grams)."""

    e: torch.Tensor  # [k, n, out]
    u: torch.Tensor  # [k, n, in]
    key: str
    gram_u: torch.Tensor | None = None  # U U^T where already formed


@dataclass(frozen=True)
class Trained:
    """A group of devices after their local steps: each trainable tensor's delta, ``start - end``, by name.

    A weight's delta stays factored (``lr E^T U``) unless :meth:`sq_norms` finds forming it cheaper than its
    Grams: then ``E^T U`` is formed once per device (``formed``, no ``lr``) and serves the norm, the rows
    :meth:`write` copies and the sum :meth:`summed` takes, instead of a second GEMM."""

    lr: float
    parts: dict[str, Outer | torch.Tensor]  # a factored weight delta, or the delta itself [k, m]
    work: Workspace
    formed: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> E^T U [k, out, in]

    def sq_norms(self) -> torch.Tensor:
        """Each device's ``||start - end||^2`` (float64 ``[k]``). A weight's by whichever costs fewer
        multiply-adds (:func:`forms_delta`): its Grams, ``||E^T U||_F^2 = sum((E E^T) * (U U^T))`` (no delta
        formed; ``E E^T`` shared by the weights of one ``E``), or the delta ``E^T U`` itself, kept."""
        grams: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for name, part in self.parts.items():
            if isinstance(part, Outer) and forms_delta(part, part.key in grams):
                delta = torch.bmm(part.e.transpose(1, 2), part.u,
                                  out=self.work.take(f"delta.{name}", _delta_shape(part), part.e))
                self.formed[name] = delta
                sq = torch.linalg.vector_norm(delta.flatten(1), dim=1).double().pow(2) * self.lr ** 2
            elif isinstance(part, Outer):
                if part.key not in grams:
                    grams[part.key] = torch.bmm(part.e, part.e.transpose(1, 2),
                                                out=self.work.take(f"gram.{part.key}", _gram_shape(part.e), part.e))
                gram_u = part.gram_u if part.gram_u is not None else torch.bmm(
                    part.u, part.u.transpose(1, 2), out=self.work.take("gram.u", _gram_shape(part.u), part.u))
                sq = (grams[part.key] * gram_u).sum(dim=(1, 2), dtype=torch.float64) * self.lr ** 2
            else:
                sq = part.double().pow(2).sum(dim=1)
            total = sq if total is None else total + sq
        assert total is not None
        return total

    def scaled(self, factor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each ``E`` times ``lr * factor`` (per device), once per key (the factored weights' only)."""
        scale = (self.lr * factor).float()[:, None, None]
        keys = {part.key: part.e for name, part in self.parts.items()
                if isinstance(part, Outer) and name not in self.formed}
        return {key: torch.mul(e, scale, out=self.work.take(f"scaled.{key}", tuple(e.shape), e))
                for key, e in keys.items()}

    def write(self, names: list[str], factor: torch.Tensor, out: torch.Tensor) -> None:
        """Each device's delta times ``factor`` into the rows of ``out`` ``[k, params]``, in ``names`` order."""
        es = self.scaled(factor)
        offset = 0
        for name in names:
            part = self.parts[name]
            if isinstance(part, Outer):
                size = part.e.shape[2] * part.u.shape[2]
                view = out[:, offset:offset + size].view(-1, part.e.shape[2], part.u.shape[2])
                if name in self.formed:
                    torch.mul(self.formed[name], (self.lr * factor).to(out.dtype)[:, None, None], out=view)
                else:
                    torch.bmm(es[part.key].transpose(1, 2), part.u, out=view)
            else:
                size = part.shape[1]
                out[:, offset:offset + size] = part.double() * factor[:, None]
            offset += size

    def summed(self, names: list[str], factor: torch.Tensor) -> torch.Tensor:
        """``sum_j factor_j * delta_j`` (float64 ``[params]``): a formed weight's by one GEMV over its devices'
        deltas, a factored one's by one GEMM over all the devices' rows."""
        es = self.scaled(factor)
        pieces = []
        for name in names:
            part = self.parts[name]
            if isinstance(part, Outer) and name in self.formed:
                delta = self.formed[name]
                pieces.append(torch.mv(delta.flatten(1).t(), (self.lr * factor).to(delta.dtype)).double())
            elif isinstance(part, Outer):
                e, u = es[part.key], part.u
                pieces.append(torch.mm(e.reshape(-1, e.shape[2]).t(), u.reshape(-1, u.shape[2])).double().reshape(-1))
            else:
                pieces.append((part.double() * factor[:, None]).sum(dim=0))
        return torch.cat(pieces)


def forms_delta(part: Outer, e_gram_formed: bool) -> bool:
    """Whether forming ``E^T U`` costs fewer multiply-adds than the norm's Grams. Factored: the Grams
    (``n^2 out`` unless ``E E^T`` is already formed for its key, ``n^2 in`` unless ``U U^T`` is given), their
    elementwise product (``n^2``) and the sum's GEMM (``n out in``). Formed: the delta (``n out in``), its norm
    and the sum's GEMV over it (``out in`` each). A weight with few rows per device keeps its Grams."""
    n, out, inp = part.e.shape[1], part.e.shape[2], part.u.shape[2]
    gram = (0 if e_gram_formed else n * n * out) + (0 if part.gram_u is not None else n * n * inp)
    return 2 * out * inp < gram + n * n


def _delta_shape(part: Outer) -> tuple[int, int, int]:
    return (part.e.shape[0], part.e.shape[2], part.u.shape[2])


def _gram_shape(t: torch.Tensor) -> tuple[int, int, int]:
    return (t.shape[0], t.shape[1], t.shape[1])


def _activation(a: torch.Tensor, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation and its derivative at ``a``."""
    if relu:
        d = (a > 0).to(a.dtype)
        return a * d, d
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return a * cdf, cdf + a * pdf


def _cosine_grad(o: torch.Tensor, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """d/d o of ``sum_i coef_i (1 - cos(o_i, x_i))``: ``-coef/(|o||x|) x + coef cos/|o|^2 o``, two full-size
    passes (the row scalars are formed first: on these ``[k, 16, 256]`` steps the elementwise passes cost as
    much as the GEMMs)."""
    on = torch.linalg.vector_norm(o, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    xn = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    inv = (on * xn).reciprocal()
    c = coef[..., None]
    cos = torch.linalg.vecdot(o, x)[..., None] * inv
    return torch.addcmul(x * (-c * inv), o, c * cos / (on * on))


def _layer_norm(pre: torch.Tensor, eps: float, gamma: torch.Tensor,
                beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``LN(pre)`` with the devices' own affine, its normalised ``z`` and ``1/std``."""
    mu = pre.mean(dim=-1, keepdim=True)
    centred = pre - mu
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)
    z = centred * rstd
    return z * gamma[:, None] + beta[:, None], z, rstd


def train(p: Plan, net: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
          lr: float, work: Workspace) -> Trained:
    """Every device's local SGD steps; the deltas kept factored (:class:`Trained`).

    ``x``/``y``: ``[k, rows, d]`` padded pairs; ``rows``/``weights``: ``[k, steps, batch]`` as
    :class:`fed_nessa.sim.fedavg.BlockSteps` (weight 0 on padding, each step's loss the weighted mean).
    The linear part and the first hidden layer both read ``y``: one layer here (their weights stacked),
    one Gram ``Y Y^T`` for both.
    """
    k, steps, width = rows.shape
    n = steps * width
    flat = (rows.reshape(k, n) + torch.arange(k, device=x.device)[:, None] * x.shape[1]).reshape(-1)
    # [k, n, d]: each device's rows in step order
    xr = torch.index_select(x.reshape(-1, x.shape[2]), 0, flat,
                            out=work.take("x", (k * n, x.shape[2]), x)).view(k, n, -1)
    yr = torch.index_select(y.reshape(-1, y.shape[2]), 0, flat,
                            out=work.take("y", (k * n, y.shape[2]), y)).view(k, n, -1)
    coef = weights / weights.sum(dim=2, keepdim=True).clamp(min=1.0)  # [k, steps, batch]
    d = p.linear.out_features
    first = p.hidden[0].linear
    lin_w, lin_b = p.linear.weight.detach(), p.linear.bias.detach()  # type: ignore[union-attr]
    first_b = first.bias.detach()  # type: ignore[union-attr]
    if p.train_linear:
        fed = _Layer("fed", torch.cat([lin_w, first.weight.detach()]), torch.cat([lin_b, first_b]), k, n, yr, work)
        fixed = None
    else:
        fed = _Layer("fed", first.weight.detach(), first_b, k, n, yr, work)
        fixed = torch.addmm(lin_b, yr.reshape(k * n, -1), lin_w.t(),  # the frozen linear part's output
                            out=work.take("fixed", (k * n, d), yr)).view(k, n, d)
    base = torch.mm(yr.reshape(k * n, -1), fed.w0.t(), out=work.take("base", (k * n, fed.w0.shape[0]), yr))
    base = base.view(k, n, -1)
    gram_y = torch.bmm(yr, yr.transpose(1, 2), out=work.take("gram.y", (k, n, n), yr))  # [k, n, n]
    deeper = [_Layer(f"hidden{i}", h.linear.weight.detach(), h.linear.bias.detach(),  # type: ignore[union-attr]
                     k, n, None, work) for i, h in enumerate(p.hidden[1:], start=1)]
    last = _Layer("last", p.last.weight.detach(), p.last.bias.detach(), k, n, None, work)  # type: ignore[union-attr]
    affine = [(h.norm.weight.detach().expand(k, -1).clone(), h.norm.bias.detach().expand(k, -1).clone())
              if h.norm is not None else None for h in p.hidden]
    for s in range(steps):
        lo, hi = s * width, (s + 1) * width
        # forward
        pre_y = fed.forward(yr[:, lo:hi], lo, lr, base[:, lo:hi], gram_y[:, lo:hi, :lo])
        direct, pre = (pre_y[..., :d], pre_y[..., d:]) if fixed is None else (fixed[:, lo:hi], pre_y)
        u, cache = yr[:, lo:hi], []
        for i, h in enumerate(p.hidden):
            if i:
                pre = deeper[i - 1].forward(u, lo, lr)
            ln = affine[i]
            a, z, rstd = _layer_norm(pre, h.norm.eps, *ln) if h.norm is not None and ln is not None else (pre, pre, pre)
            act, slope = _activation(a, h.relu)
            cache.append((u, z, rstd, slope))
            u = act
        e = _cosine_grad(last.forward(u, lo, lr, add=direct), xr[:, lo:hi], coef[:, s])
        # backward
        down = last.backward(e, lo, lr)
        last.record(lo, hi, e, lr, u)
        for i in reversed(range(len(p.hidden))):
            u_in, z, rstd, slope = cache[i]
            da = down * slope
            ln = affine[i]
            if ln is not None:
                dz = da * ln[0][:, None]
                ln[0].sub_((da * z).sum(dim=1), alpha=lr)
                ln[1].sub_(da.sum(dim=1), alpha=lr)
                da = rstd * (dz - dz.mean(dim=-1, keepdim=True) - z * (dz * z).mean(dim=-1, keepdim=True))
            if i:
                down = deeper[i - 1].backward(da, lo, lr)
                deeper[i - 1].record(lo, hi, da, lr, u_in)
            else:
                fed.record(lo, hi, torch.cat([e, da], dim=-1) if fixed is None else da, lr)
    return Trained(lr, _parts(p, net, fed, deeper, last, affine, gram_y, fixed is None), work)


def _parts(p: Plan, net: nn.Module, fed: _Layer, deeper: list[_Layer], last: _Layer,
           affine: list[tuple[torch.Tensor, torch.Tensor] | None], gram_y: torch.Tensor,
           train_linear: bool) -> dict[str, Outer | torch.Tensor]:
    """The trained tensors' deltas by parameter name (``start - end``; weights factored)."""
    names = {m: n for n, m in net.named_modules()}
    d = p.linear.out_features if train_linear else 0
    parts: dict[str, Outer | torch.Tensor] = {}
    if train_linear:
        parts["linear.weight"] = Outer(fed.e[..., :d], fed.u, "out", gram_y)
        parts["linear.bias"] = fed.b0[:d] - fed.b[:, :d]
    first = names[p.hidden[0].linear]
    parts[f"{first}.weight"] = Outer(fed.e[..., d:], fed.u, "first", gram_y)
    parts[f"{first}.bias"] = fed.b0[d:] - fed.b[:, d:]
    for i, h in enumerate(p.hidden):
        if i:
            layer = deeper[i - 1]
            parts[f"{names[h.linear]}.weight"] = Outer(layer.e, layer.u, f"hidden{i}")
            parts[f"{names[h.linear]}.bias"] = layer.b0 - layer.b
        ln = affine[i]
        if h.norm is not None and ln is not None:
            parts[f"{names[h.norm]}.weight"] = h.norm.weight.detach() - ln[0]
            parts[f"{names[h.norm]}.bias"] = h.norm.bias.detach() - ln[1]
    parts[f"{names[p.last]}.weight"] = Outer(last.e, last.u, "out")
    parts[f"{names[p.last]}.bias"] = last.b0 - last.b
    return parts

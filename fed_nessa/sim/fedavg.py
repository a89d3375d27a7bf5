"""DP-FedAvg's device update for a whole block of devices at once.

The same maths as :func:`fed_nessa.model.training.fedavg_delta` (the device side, run by the
Flower ClientApp through :meth:`fed_nessa.federated.mechanism.DeviceLevel.fedavg_vector`), for
``k`` devices in one batched pass: each device's rows are padded to the block's largest device,
each local step gathers every device's minibatch (weight 0 on padding, so a device whose epoch
has fewer steps simply stops moving). The NESSA net's steps are written out
(:mod:`fed_nessa.sim.fedavg_explicit`: no per-device weight copies, the norms from Gram matrices;
tests/test_sim_fedavg_explicit.py), any other net runs ``vmap(grad(...))`` over per-device weight
copies (:func:`vmap_deltas`). Same row orders in, the same clipped deltas out to float tolerance
(tests/test_device_fedavg.py). Noise is not added here: the engine adds the shares, per device
(exact numerics, :func:`device_payloads`) or as one draw of their sum (fast numerics,
:func:`fedavg_block_sum`, with the adaptive clip's :func:`bit_sum`). The fleet and the block engines
build their payloads with these functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fed_nessa.federated.mechanism import BIT_SENSITIVITY, Mechanism, with_bit
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.model.losses import get_loss
from fed_nessa.model.training import device_clip_factor, local_minibatches, with_noise_share
from fed_nessa.randomness import NoiseSource
from fed_nessa.sim.fedavg_explicit import Plan as ExplicitPlan
from fed_nessa.sim.fedavg_explicit import Workspace
from fed_nessa.sim.fedavg_explicit import plan as explicit_plan
from fed_nessa.sim.fedavg_explicit import train as explicit_train

#: Devices the written-out update steps together inside a block: their step tensors stay in the L2 cache
#: (BENCHMARKS.md, DP-FedAvg).
EXPLICIT_GROUP = 64


@dataclass(frozen=True)
class BlockSteps:
    """The local SGD steps of a block, padded: ``rows[j, s]`` are device j's minibatch at step s."""

    rows: torch.Tensor  # [k, steps, batch] long, indices into the device's padded rows
    weights: torch.Tensor  # [k, steps, batch] float, 1 on real rows, 0 on padding


@dataclass(frozen=True)
class BlockDeltas:
    """What a block of devices computed before noise: clipped pseudo-gradients and their raw norms."""

    clipped: torch.Tensor  # [k, params] float32, each row of norm <= clip
    norms: torch.Tensor  # [k] float32, the unclipped norms (the adaptive clip's bit: norm <= C)


def block_steps(orders: Sequence[Sequence[np.ndarray]], batch: int) -> BlockSteps:
    """Pad every device's :func:`local_minibatches` to the block's most steps and widest minibatch."""
    per_device = [local_minibatches(list(o), batch) for o in orders]
    steps = max(len(s) for s in per_device)
    width = max(len(b) for s in per_device for b in s)
    rows = np.zeros((len(orders), steps, width), np.int64)  # padding points at row 0: always a real row
    weights = np.zeros((len(orders), steps, width), np.float32)
    for j, device_steps in enumerate(per_device):
        for s, mb in enumerate(device_steps):
            rows[j, s, :len(mb)] = mb
            weights[j, s, :len(mb)] = 1.0
    return BlockSteps(torch.from_numpy(rows), torch.from_numpy(weights))


def pad_block(enroll: Sequence[np.ndarray], runtime: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack devices' pairs into ``[k, most rows, d]`` tensors (zero rows past a device's own)."""
    n = max(len(e) for e in enroll)
    x = torch.zeros(len(enroll), n, enroll[0].shape[1])
    y = torch.zeros(len(runtime), n, runtime[0].shape[1])
    for j, (e, r) in enumerate(zip(enroll, runtime, strict=True)):
        x[j, :len(e)] = torch.as_tensor(np.asarray(e, np.float32))
        y[j, :len(r)] = torch.as_tensor(np.asarray(r, np.float32))
    return x, y


def fedavg_block(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: BlockSteps, *, lr: float,
                 clip_norm: float, weights: torch.Tensor | None = None, loss: str = "cosine") -> BlockDeltas:
    """Every device of a block trains its own copy of ``net`` (plain SGD) and clips ``start - end`` to C.

    ``weights`` (``[k]``, each <= 1; None: all 1) scales each clipped delta, as the device's
    :meth:`~fed_nessa.federated.mechanism.DeviceLevel.update_weight` does; the norms stay the raw ones.

    ``x``/``y``: ``[k, rows, d]`` padded pairs (:func:`pad_block`); ``steps``: :func:`block_steps`.
    ``net`` is left unchanged; a net with its own ``pair_loss`` is refused (its forward is not its loss).
    The NESSA net runs the written-out update (:mod:`fed_nessa.sim.fedavg_explicit`: no per-device
    weight copies), :data:`EXPLICIT_GROUP` devices at a time; any other net :func:`vmap_deltas`.
    """
    layout, names = _layout(net, loss)
    if layout is None:
        return clip_deltas(vmap_deltas(net, x, y, steps, lr=lr, loss=loss), clip_norm, weights)
    rows, mask = steps.rows.to(x.device), steps.weights.to(x.device)
    k = x.shape[0]
    clipped = x.new_empty(k, sum(p.numel() for p in net.parameters() if p.requires_grad))
    norms = torch.empty(k, dtype=torch.float64, device=x.device)
    work = Workspace()
    with torch.no_grad():
        for g in range(0, k, EXPLICIT_GROUP):
            part = slice(g, g + EXPLICIT_GROUP)
            trained = explicit_train(layout, net, x[part], y[part], rows[part], mask[part], lr, work)
            norms[part] = trained.sq_norms().sqrt()
            trained.write(names, _weighted(device_clip_factor(norms[part], clip_norm), weights, part), clipped[part])
    return BlockDeltas(clipped, norms.float())


@dataclass(frozen=True)
class BlockSum:
    """Fast numerics' view of a block: its clipped deltas summed, and each device's raw norm (the bits)."""

    total: torch.Tensor  # [params] float64
    norms: torch.Tensor  # [k] float32


def fedavg_block_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: BlockSteps, *, lr: float,
                     clip_norm: float, weights: torch.Tensor | None = None, loss: str = "cosine") -> BlockSum:
    """:func:`fedavg_block`'s clipped deltas summed over the block (what fast numerics adds up), without
    forming each device's delta on the written-out path (one GEMM per weight over all the devices' rows)."""
    layout, names = _layout(net, loss)
    if layout is None:
        deltas = clip_deltas(vmap_deltas(net, x, y, steps, lr=lr, loss=loss), clip_norm, weights)
        return BlockSum(deltas.clipped.double().sum(dim=0), deltas.norms)
    rows, mask = steps.rows.to(x.device), steps.weights.to(x.device)
    total = torch.zeros(sum(p.numel() for p in net.parameters() if p.requires_grad), dtype=torch.float64,
                        device=x.device)
    norms = []
    work = Workspace()
    with torch.no_grad():
        for g in range(0, x.shape[0], EXPLICIT_GROUP):
            part = slice(g, g + EXPLICIT_GROUP)
            trained = explicit_train(layout, net, x[part], y[part], rows[part], mask[part], lr, work)
            norm = trained.sq_norms().sqrt()
            total += trained.summed(names, _weighted(device_clip_factor(norm, clip_norm), weights, part))
            norms.append(norm)
    return BlockSum(total, torch.cat(norms).float())


def _layout(net: nn.Module, loss: str) -> tuple[ExplicitPlan | None, list[str]]:
    """The written-out update's reading of ``net`` (``None``: the vmap path) and the trainable names;
    a net with its own ``pair_loss`` is refused (its forward is not its loss)."""
    if getattr(net, "pair_loss", None) is not None:
        raise ValueError(f"{type(net).__name__} defines its own pair_loss: the vectorised update supports "
                         "nets whose loss is loss(net(y), x)")
    get_loss(loss)  # an unknown loss is refused by name on either path
    return explicit_plan(net, loss), [n for n, p in net.named_parameters() if p.requires_grad]


def clip_deltas(delta: torch.Tensor, clip_norm: float, weights: torch.Tensor | None = None) -> BlockDeltas:
    """Each row clipped as one vector to ``clip_norm`` and scaled by its weight (float64 norms and factor, as the
    device does)."""
    norms = torch.linalg.vector_norm(delta.double(), dim=1)
    clipped = delta.double() * _weighted(device_clip_factor(norms, clip_norm), weights, slice(None))[:, None]
    return BlockDeltas(clipped.float(), norms.float())


def _weighted(factor: torch.Tensor, weights: torch.Tensor | None, part: slice) -> torch.Tensor:
    """The clip factors of ``part`` of a block times the devices' update weights (unchanged without weights)."""
    return factor if weights is None else factor * weights[part].to(factor)


def vmap_deltas(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: BlockSteps, *, lr: float,
                loss: str = "cosine") -> torch.Tensor:
    """The general path: ``start - end`` per device, ``[k, trainable params]``, by ``vmap(grad(...))``
    over per-device weight copies (any net whose loss is ``loss(net(y), x)``)."""
    from torch.func import functional_call, grad, vmap

    loss_fn = get_loss(loss)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    frozen = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
    start = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}

    def device_loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                    wb: torch.Tensor) -> torch.Tensor:
        per_pair = loss_fn(functional_call(net, {**params, **frozen}, (yb,)), xb)
        return (per_pair * wb).sum() / wb.sum().clamp(min=1.0)

    step = vmap(grad(device_loss))
    k = x.shape[0]
    device = torch.arange(k, device=x.device)[:, None]
    rows, weights = steps.rows.to(x.device), steps.weights.to(x.device)
    params = {n: p.expand(k, *p.shape).clone() for n, p in start.items()}
    for s in range(rows.shape[1]):
        idx = rows[:, s]
        grads = step(params, x[device, idx], y[device, idx], weights[:, s])
        params = {n: params[n] - lr * grads[n] for n in names}
    return torch.cat([(start[n] - params[n]).reshape(k, -1) for n in names], dim=1)


def round_clip(mech: Mechanism, plan: NoisePlan, clip: float | None) -> tuple[float, float | None]:
    """A DP-FedAvg round's clip and the adaptive clip's bit scale: the C_t the round config states (``clip``)
    and its bit's public factor (:meth:`~fed_nessa.federated.mechanism.Mechanism.bit_scale`), or at a fixed
    clip ``device-clip-norm`` and no bit. An adaptive run's round that states no clip is refused."""
    if clip is None:
        if mech.cfg.clip_target_quantile > 0:
            raise ValueError("clip-target-quantile > 0: the DP-SGD round's config states no clip (C_t)")
        return mech.cfg.device_clip_norm, None
    return clip, mech.bit_scale(clip, plan)


def device_payloads(deltas: BlockDeltas, params: Sequence[nn.Parameter], clip: float, scale: float | None,
                    stds: Sequence[float], streams: Sequence[NoiseSource]) -> list[np.ndarray]:
    """Each device's DP-FedAvg payload of a block, as its device builds it
    (:meth:`~fed_nessa.federated.mechanism.DeviceLevel.fedavg_vector`): its clipped delta plus its Gaussian share
    of std ``stds[j]`` (0: none; the integer mechanism's encoder draws its own share) tensor by tensor, then, with
    the adaptive clip (``scale``, :func:`round_clip`), its bit with its count share ``std / scale``
    (:func:`~fed_nessa.federated.mechanism.with_bit`), all from its own stream in that order."""
    host = deltas.clipped.cpu().numpy().astype(np.float64)
    norms = deltas.norms.cpu().numpy()
    out = []
    for j, (std, stream) in enumerate(zip(stds, streams, strict=True)):
        vec = with_noise_share(host[j], list(params), std, stream)
        out.append(vec if scale is None else with_bit(vec, float(norms[j]), clip, std / scale, scale, stream))
    return out


def bit_sum(deltas: BlockDeltas | BlockSum, clip: float) -> float:
    """Fast numerics: a block's centred adaptive-clip bits ``1[norm <= clip] - 1/2`` summed, without their count
    shares (those are in the engine's one draw of the summed noise, the bit coordinate's std the delta's)."""
    return float(((deltas.norms <= clip).double() - BIT_SENSITIVITY).sum())

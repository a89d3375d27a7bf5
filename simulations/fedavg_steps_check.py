"""Why a few DP-FedAvg rounds do not improve a ridge start: the optimisation alone, without noise or clipping.

Issue 22's DP-FedAvg rounds made the DP linear start worse at every tuned step size
(results/device_fedavg_tuning.csv). This check asks the noise-free question on a small population that is
never reported (population seed 1, 300 devices, its own evaluation speakers): from the ridge fit of the pooled
pairs (the non-private linear start; the linear part is then frozen, as in the protocol), how does the
residual MLP's EER move

- under full-batch steps on the pooled gradient with Adam (the best a server can do with one aggregate per
  round and no noise: FedSGD on every pair), and
- under noise-free, unclipped FedAvg rounds (one local epoch of SGD over each device's pairs in minibatches,
  the mean pseudo-gradient applied with plain SGD at the server),

and how far the device-weighted mean gradient points from the pooled one: as is, with every device's gradient
clipped to one norm (as device level clips it: every device's norm is above its clip), and clipped then weighted by
the pairs the device's statistics carry (``min(n, device-stats-pairs)``, the weighting its DP linear start was fit
under; a weight <= 1 keeps the sum's sensitivity at the clip). With ``--adam-rounds R`` it also runs R noise-free
FedAvg rounds as device level does them bar the noise (every delta clipped to ``device-clip-norm``, the mean applied
with server Adam as a gradient), once with every device weighing the same and once pair-weighted. It prints a
markdown table; the docs cite it (docs/results.md "Device-level DP-FedAvg at 10^5 devices").

With ``--pooled ARM ...`` it also runs full-batch arms on the pooled loss with other server optimisers (Adam with a
larger epsilon, Reddi et al. 2021's tau; SGD with momentum; ``+centred``: the residual's mean output over 30 other
devices' runtime embeddings taken out after every step) and prints the pooled loss beside the EER. With
``--shift STEP ...`` it follows full-batch Adam's first steps and splits what the residual adds into a shift common to
every output and a part that varies by input, and scores the aligner with the common shift taken out. For each
local learning rate of ``--local-lrs`` (default 0.05, the tuned arms') it prints the same along / across split for
the devices' clipped DP-FedAvg deltas: where a round's local epoch takes the update. It also prints where the cosine
loss's descent points over the pairs (:func:`mean_pull`: its part common to every pair, along the mean enrollment
embedding at a noisy start).

With ``--dp-start SIGMA`` everything starts from a device-level DP linear start (:func:`dp_start`) instead of the
noise-free ridge fit (``--start-seed``: another draw of its noise); ``--noisy-fedsgd ARM ...`` runs device-level
FedSGD steps (every device's clipped gradient, plus noise ``--noise-ratio`` times the signal's norm) and prints the
residual's common shift; a ``+meanfree`` suffix trains on the cosine loss about the pairs' mean enrollment embedding
(:func:`mean_free_loss`). ``--fedavg-rounds 0`` skips the unclipped FedAvg rounds (slow on thousands of devices).

    python -m simulations.fedavg_steps_check [--devices 300] [--seed 1] [--steps 400] [--adam-rounds 0]
        [--pooled adam:LR[:EPS] sgdm:LR ...] [--shift STEP ...] [--local-lrs 0.05 ...] [--dp-start SIGMA]
        [--start-seed SEED] [--noisy-fedsgd ARM ...] [--noise-ratio 2.2] [--fedavg-rounds 5]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fed_nessa.config import DeviceUpdate, DeviceWeight, FederationConfig, LinearStart, Phase, PrivacyUnit
from fed_nessa.data.population import Scenario
from fed_nessa.data.synthetic import SyntheticPopulation, generate_population
from fed_nessa.evaluation.gate import validation_eers
from fed_nessa.federated import suffstats
from fed_nessa.federated.layout import build_net, flat, load_flat, nessa_config, trainable
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.release import promised_arrivals
from fed_nessa.model.aligners.base import AlignerInfo
from fed_nessa.model.aligners.nessa import NessaAligner, NessaNet
from fed_nessa.model.losses import cosine_loss
from fed_nessa.model.training import fedavg_delta, pair_loss


def _linear_start(pop: SyntheticPopulation, cfg: FederationConfig, stats: np.ndarray, noise_std: float) -> NessaNet:
    """The NESSA net at the ridge fit of the summed statistics ``stats``, solved as the server solves a release
    with per-value noise ``noise_std``; its linear part frozen."""
    d_x, d_y = pop.devices[0].enroll.shape[1], pop.devices[0].runtime.shape[1]
    net = build_net(cfg, d_x, d_y)
    assert isinstance(net, NessaNet)  # the protocol's aligner
    gram, cross = suffstats.unpack(np.asarray(stats, np.float64), d_x, d_y)
    net.set_linear(*suffstats.solve(gram, cross, nessa_config(cfg).ridge_alpha, noise_std=noise_std))
    return net


def _summed_stats(pop: SyntheticPopulation, weight: Callable[[int], float]) -> np.ndarray:
    """The devices' sufficient statistics, each times ``weight(n)``, summed one device at a time."""
    d_x, d_y = pop.devices[0].enroll.shape[1], pop.devices[0].runtime.shape[1]
    total = np.zeros(suffstats.vector_size(d_x, d_y))
    for d in pop.devices:
        total += suffstats.device_vector(d.enroll, d.runtime) * weight(d.n)
    return total


def _start(pop: SyntheticPopulation, cfg: FederationConfig) -> NessaNet:
    """The NESSA net at the ridge fit of every pair (no noise), its linear part frozen."""
    return _linear_start(pop, cfg, _summed_stats(pop, lambda n: 1.0), 0.0)


def dp_start(pop: SyntheticPopulation, cfg: FederationConfig, sigma: float, seed: int) -> NessaNet:
    """The NESSA net at a device-level DP linear start: the devices' statistics weighted as device level weighs
    them, plus the Gaussian noise a release of every device's share carries at statistics noise multiplier
    ``sigma`` (each share sized for the promised g of a fleet of this size), solved as the server solves it.
    What the product's first round gives, bar the integer mechanism's rounding (a tuning aid: numpy noise)."""
    dev = replace(cfg, privacy_unit=PrivacyUnit.DEVICE)
    mech = mechanism_for(dev)
    stats = _summed_stats(pop, mech.stats_weight)
    g = promised_arrivals(dev, len(pop.devices))
    std = math.sqrt(mech.released_variance(Phase.SUFFSTATS, NoisePlan(sigma, 1.0, 0), [g] * len(pop.devices)))
    return _linear_start(pop, cfg, stats + np.random.default_rng(seed).normal(0.0, std, stats.shape), std)


def _eer(net: torch.nn.Module, pop: SyntheticPopulation, cfg: FederationConfig) -> tuple[float, float]:
    """(not updating, this net) EER on the population's own evaluation speakers."""
    d_x, d_y = pop.devices[0].enroll.shape[1], pop.devices[0].runtime.shape[1]
    aligner = NessaAligner(AlignerInfo(d_x=d_x, d_y=d_y, enroll_model=pop.enroll_model,
                                       runtime_model=pop.runtime_model), nessa_config(cfg))
    aligner.net = net
    eers = validation_eers({"dp-nessa": aligner}, pop.eval, Scenario(pop.enroll_model, pop.runtime_model))
    return eers["none"], eers["dp-nessa"]


def _loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
    """The pairs' mean cosine loss, or with ``centre`` the :func:`mean_free_loss` about it."""
    return pair_loss(net, x, y, "cosine").mean() if centre is None else mean_free_loss(net, x, y, centre)


def _pooled_grad(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 centre: torch.Tensor | None = None) -> np.ndarray:
    grads = torch.autograd.grad(_loss(net, x, y, centre), trainable(net))
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


def _device_grads(net: torch.nn.Module, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  centre: torch.Tensor | None = None) -> np.ndarray:
    """Every device's gradient over all its ``(enroll, runtime)`` pairs, one row each."""
    return np.stack([_pooled_grad(net, x, y, centre) for x, y in pairs])


def _device_pairs(pop: SyntheticPopulation) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor(d.enroll), torch.tensor(d.runtime)) for d in pop.devices]


def adam_curve(net: NessaNet, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
               at: Sequence[int], score: Callable[[], float]) -> list[tuple[int, float]]:
    """Full-batch Adam on the pooled loss; the EER at each step in ``at``."""
    curve = pooled_curve(net, x, y, steps, torch.optim.Adam(trainable(net), lr=lr), at, score)
    return [(step, eer) for step, _, eer in curve]


def mean_free_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The cosine loss between the mapped runtime embedding and the enrollment one, both minus ``centre`` (the mean
    enrollment embedding): moving every output toward the mean no longer lowers it. From a DP linear start the plain
    cosine loss's descent has a part common to every pair along the mean enrollment direction (raising every score
    alike: the EER rises), which this removes; still one term per pair, so per-pair or per-device clipping bounds it."""
    return cosine_loss(net(y) - centre, x - centre).mean()


def pooled_curve(net: NessaNet, x: torch.Tensor, y: torch.Tensor, steps: int, opt: torch.optim.Optimizer,
                 at: Sequence[int], score: Callable[[], float], centre_on: torch.Tensor | None = None,
                 loss_centre: torch.Tensor | None = None) -> list[tuple[int, float, float]]:
    """Full-batch steps of ``opt`` on the pooled loss; (step, pooled loss, EER) at each step in ``at``. With
    ``centre_on`` (runtime embeddings the server holds itself), each step is followed by taking the residual's mean
    output over them out of its last bias (:func:`recentre`). With ``loss_centre`` the steps follow
    :func:`mean_free_loss` (the pooled loss printed is that loss)."""
    def loss() -> torch.Tensor:
        return _loss(net, x, y, loss_centre)

    def point(step: int) -> tuple[int, float, float]:
        with torch.no_grad():
            return step, float(loss()), score()

    out = [point(0)] if 0 in at else []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss().backward()
        opt.step()
        if centre_on is not None:
            recentre(net, centre_on)
        if step in at:
            out.append(point(step))
    return out


def _output_layer(net: NessaNet) -> torch.nn.Linear:
    last = net.residual[-1]
    assert isinstance(last, torch.nn.Linear)  # the residual MLP's output layer
    return last


def recentre(net: NessaNet, y: torch.Tensor) -> None:
    """Take the residual's mean output over ``y`` out of its last bias: no shift common to every output is left."""
    with torch.no_grad():
        _output_layer(net).bias.sub_(net.residual(y).mean(0))


@dataclass(frozen=True)
class Shift:
    """What the residual adds to the linear map's outputs: mean norms of the linear output and of the residual, the
    norm of the residual's mean over the pairs (a shift common to every output) and the residual's mean distance
    from that mean (what varies by input)."""

    linear: float
    residual: float
    common: float
    varying: float


def residual_shift(net: NessaNet, y: torch.Tensor) -> Shift:
    """The :class:`Shift` of ``net`` on runtime embeddings ``y``."""
    with torch.no_grad():
        lin, res = net.linear(y), net.residual(y)
        mean = res.mean(0)
        return Shift(float(lin.norm(dim=1).mean()), float(res.norm(dim=1).mean()), float(mean.norm()),
                     float((res - mean).norm(dim=1).mean()))


def centred_score(net: NessaNet, y: torch.Tensor, score: Callable[[], float]) -> float:
    """``score()`` with the residual's mean output over ``y`` taken out of its last bias (the common shift
    removed), the net restored after."""
    bias = _output_layer(net).bias
    saved = bias.detach().clone()
    recentre(net, y)
    try:
        return score()
    finally:
        with torch.no_grad():
            bias.copy_(saved)


#: A pooled arm's suffix: re-centre the residual after every step on embeddings of other speakers (:func:`recentre`).
CENTRED = "+centred"
#: A pooled arm's suffix: steps on :func:`mean_free_loss` about the pairs' mean enrollment embedding.
MEAN_FREE = "+meanfree"


def centred_arm(arm: str) -> bool:
    return arm.removesuffix(MEAN_FREE).endswith(CENTRED)


def mean_free_arm(arm: str) -> bool:
    return arm.endswith(MEAN_FREE)


def pooled_optimizer(arm: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``adam:LR[:EPS]`` (Adam, EPS its epsilon, Reddi et al.'s tau; default 1e-8) or ``sgdm:LR`` (momentum 0.9);
    a ``+centred`` or ``+meanfree`` suffix (:func:`centred_arm`, :func:`mean_free_arm`) leaves the optimiser as is."""
    kind, *values = arm.removesuffix(MEAN_FREE).removesuffix(CENTRED).split(":")
    if kind == "adam" and len(values) in (1, 2):
        return torch.optim.Adam(params, lr=float(values[0]), eps=float(values[1]) if len(values) == 2 else 1e-8)
    if kind == "sgdm" and len(values) == 1:
        return torch.optim.SGD(params, lr=float(values[0]), momentum=0.9)
    raise ValueError(f"optimizer arm {arm!r}: expected adam:LR[:EPS] or sgdm:LR")


def fedavg_curve(net: torch.nn.Module, pop: SyntheticPopulation, rounds: int, server_lr: float, local_lr: float,
                 score: Callable[[], float], seed: int) -> list[tuple[int, float]]:
    """Noise-free, unclipped FedAvg rounds (one local epoch, minibatches of 16, server SGD without momentum)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(1, rounds + 1):
        deltas = [fedavg_delta(net, d.enroll, d.runtime, orders=[rng.permutation(d.n)], batch=16, lr=local_lr,
                               clip_norm=float("inf"))[0].numpy() for d in pop.devices]
        load_flat(trainable(net), flat(trainable(net)) - server_lr * np.mean(deltas, 0).astype(np.float32))
        out.append((r, score()))
    return out


def pair_weights(pop: SyntheticPopulation, cap: int) -> np.ndarray:
    """Each device's weight when its update counts like the pairs its statistics carry: ``min(n, cap) / cap``, as
    the product's ``device-weight = pairs`` weighs it (:meth:`DeviceLevel.update_weight`)."""
    cfg = replace(FederationConfig(), privacy_unit=PrivacyUnit.DEVICE, device_update=DeviceUpdate.FEDAVG,
                  device_weight=DeviceWeight.PAIRS, device_stats_pairs=cap)
    return mechanism_for(cfg).update_weights([d.n for d in pop.devices]).numpy()


@dataclass(frozen=True)
class Direction:
    """The devices' mean gradient against the pooled one: their cosine, and the mean's components along the
    pooled direction (the signal an update follows) and across it (a bias no noise averages away)."""

    cos: float
    along: float
    across: float


def device_cosines(net: torch.nn.Module, pop: SyntheticPopulation, pooled: np.ndarray,
                   cap: int) -> dict[str, Direction]:
    """The devices' mean gradient against the pooled gradient: as is, each clipped (unit norm: the clip as a
    unit), and each clipped then pair-weighted (the mean over the devices, as the server's)."""
    grads = _device_grads(net, _device_pairs(pop))
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    w = pair_weights(pop, cap)
    return {"as is": _direction(grads.mean(0), pooled), "clipped": _direction(units.mean(0), pooled),
            "clipped, pair-weighted": _direction(w @ units / len(w), pooled)}


def _direction(v: np.ndarray, pooled: np.ndarray) -> Direction:
    unit_pooled = pooled / np.linalg.norm(pooled)
    along = float(v @ unit_pooled)
    return Direction(along / float(np.linalg.norm(v)), along, float(np.linalg.norm(v - along * unit_pooled)))


def fedavg_direction(net: torch.nn.Module, pop: SyntheticPopulation, pooled: np.ndarray, local_lr: float,
                     seed: int) -> Direction:
    """The mean of the devices' DP-FedAvg deltas, each clipped (unit norm: every delta is above the clip), against
    the pooled gradient: what a device-level round follows when each device takes its local epoch (minibatches of
    16) before clipping, beside :func:`device_cosines`' one gradient at the start. As ``local_lr`` goes to 0 the
    delta becomes a multiple of the device's summed minibatch gradients at the start, and this is the clipped
    gradients' direction."""
    rng = np.random.default_rng(seed)
    units = []
    for d in pop.devices:
        delta = fedavg_delta(net, d.enroll, d.runtime, orders=[rng.permutation(d.n)], batch=16, lr=local_lr,
                             clip_norm=float("inf"))[0].numpy().astype(np.float64)
        units.append(delta / np.linalg.norm(delta))
    return _direction(np.mean(units, 0), pooled)


def noisy_fedsgd_curve(net: NessaNet, pop: SyntheticPopulation, steps: int, opt: torch.optim.Optimizer,
                       noise_ratio: float, at: Sequence[int], score: Callable[[], float], y: torch.Tensor,
                       centre_on: torch.Tensor | None, seed: int,
                       loss_centre: torch.Tensor | None = None) -> list[tuple[int, float, Shift]]:
    """Device-level FedSGD rounds with the noise of a fleet: each step applies the mean of the devices' clipped
    gradients (unit norm, all their pairs) plus Gaussian noise whose norm is ``noise_ratio`` times the first
    round's mean (fixed after, as sigma C / N is), through ``opt``; ``centre_on``: re-centred after every step
    (:func:`recentre`); ``loss_centre``: the devices' gradients of :func:`mean_free_loss`. (step, EER, the
    residual's :class:`Shift` on ``y``) at each step in ``at``."""
    gen = torch.Generator().manual_seed(seed)
    params = trainable(net)
    pairs = _device_pairs(pop)
    std = None
    out = [(0, score(), residual_shift(net, y))] if 0 in at else []
    for step in range(1, steps + 1):
        grads = _device_grads(net, pairs, loss_centre)
        mean = torch.from_numpy((grads / np.linalg.norm(grads, axis=1, keepdims=True)).mean(0).astype(np.float32))
        if std is None:
            std = noise_ratio * float(mean.norm()) / mean.numel() ** 0.5
        noisy = mean + std * torch.randn(mean.shape, generator=gen)
        for p, g in zip(params, noisy.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()
        opt.step()
        if centre_on is not None:
            recentre(net, centre_on)
        if step in at:
            out.append((step, score(), residual_shift(net, y)))
    return out


@dataclass(frozen=True)
class MeanPull:
    """Where the plain cosine loss's descent in output space points, over the pairs: the norm of its part common
    to every pair over its mean per-pair norm, that part's cosine with the mean enrollment embedding, and the mapped
    embeddings' mean norm and mean cosine with their enrollment embedding."""

    common: float
    cos_mean: float
    output_norm: float
    pair_cos: float


def mean_pull(net: NessaNet, x: torch.Tensor, y: torch.Tensor) -> MeanPull:
    """The :class:`MeanPull` of ``net``'s outputs on the pairs ``(x, y)``."""
    f = net(y).detach().requires_grad_(True)
    cosine_loss(f, x).mean().backward()
    assert f.grad is not None
    descent, mu = -f.grad, x.mean(0)
    common = descent.mean(0)
    return MeanPull(float(common.norm() / descent.norm(dim=1).mean()),
                    float(common @ mu / (common.norm() * mu.norm())), float(f.detach().norm(dim=1).mean()),
                    float(torch.nn.functional.cosine_similarity(f.detach(), x).mean()))


def clipped_fedavg_adam_curve(net: torch.nn.Module, pop: SyntheticPopulation, rounds: int, server_lr: float,
                              local_lr: float, clip: float, weights: np.ndarray, at: Sequence[int],
                              score: Callable[[], float], seed: int) -> list[tuple[int, float]]:
    """Noise-free DP-FedAvg rounds: one local epoch (minibatches of 16), each delta clipped to ``clip`` and
    multiplied by its device's weight, the mean applied with server Adam as a gradient; the EER at each round in
    ``at``."""
    rng = np.random.default_rng(seed)
    params = trainable(net)
    opt = torch.optim.Adam(params, lr=server_lr)
    out = [(0, score())] if 0 in at else []
    for r in range(1, rounds + 1):
        deltas = np.stack([fedavg_delta(net, d.enroll, d.runtime, orders=[rng.permutation(d.n)], batch=16,
                                        lr=local_lr, clip_norm=clip)[0].numpy() for d in pop.devices])
        mean = torch.from_numpy((weights @ deltas / len(pop.devices)).astype(np.float32))
        for p, g in zip(params, mean.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()
        opt.step()
        if r in at:
            out.append((r, score()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.fedavg_steps_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--adam-rounds", type=int, default=0,
                        help="noise-free clipped FedAvg rounds with server Adam, equal and pair-weighted (0: none)")
    parser.add_argument("--pooled", nargs="*", default=[], metavar="ARM",
                        help="more full-batch arms on the pooled loss, with its loss: adam:LR[:EPS] or sgdm:LR, "
                             "+centred: the residual re-centred after each step on 30 other devices' embeddings")
    parser.add_argument("--shift", nargs="*", type=int, default=[], metavar="STEP",
                        help="full-batch Adam 1e-3 steps at which to print the residual's common shift and the EER "
                             "with it taken out")
    parser.add_argument("--local-lrs", nargs="*", type=float, default=[0.05], metavar="LR",
                        help="local learning rates at which to print the clipped DP-FedAvg deltas' mean direction")
    parser.add_argument("--noisy-fedsgd", nargs="*", default=[], metavar="ARM",
                        help="device-level FedSGD arms (adam:LR[:EPS] or sgdm:LR[+centred]) under noise of "
                             "--noise-ratio times the mean clipped gradient's norm, --steps rounds")
    parser.add_argument("--noise-ratio", type=float, default=2.2,
                        help="the noise's norm over the mean clipped gradient's (2.2: 10^4 devices at epsilon 60)")
    parser.add_argument("--dp-start", type=float, default=None, metavar="SIGMA",
                        help="start from a device-level DP linear start at this statistics noise multiplier (0.224: "
                             "10^4 devices at epsilon 60 on half the budget), not the noise-free ridge fit")
    parser.add_argument("--start-seed", type=int, default=None,
                        help="the seed of --dp-start's statistics noise (default: --seed): another draw of the start")
    parser.add_argument("--fedavg-rounds", type=int, default=5,
                        help="noise-free, unclipped FedAvg rounds at server SGD 1 and 0.1 (0: none)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    pop = generate_population(args.devices, seed=args.seed)
    cfg = replace(FederationConfig(), linear_start=LinearStart.SUFFSTATS, seed=args.seed)
    x = torch.tensor(np.concatenate([d.enroll for d in pop.devices]))
    y = torch.tensor(np.concatenate([d.runtime for d in pop.devices]))
    start_seed = args.seed if args.start_seed is None else args.start_seed
    net = _start(pop, cfg) if args.dp_start is None else dp_start(pop, cfg, args.dp_start, start_seed)
    w0 = flat(trainable(net))
    keep, start = _eer(net, pop, cfg)
    g_pool, cap = _pooled_grad(net, x, y), cfg.device_stats_pairs
    cosines = device_cosines(net, pop, g_pool, cap)
    print(f"{args.devices} devices, {x.shape[0]} pairs, population seed {args.seed}: not updating {100 * keep:.2f} %, "
          f"{'ridge' if args.dp_start is None else f'DP linear (statistics sigma {args.dp_start:g})'} start "
          f"{100 * start:.2f} % EER; cos(device-weighted mean gradient, pooled gradient) = "
          f"{cosines['as is'].cos:.2f}")
    print("cos(devices' mean gradient, pooled gradient): " + ", ".join(f"{k} {v.cos:.2f}" for k, v in cosines.items())
          + f" (weights min(n, {cap}) / {cap})")
    print("their mean, clipped to 1, along / across the pooled direction: " + ", ".join(
        f"{k} {v.along:.4f} / {v.across:.4f} (norm {math.hypot(v.along, v.across):.4f})"
        for k, v in cosines.items() if k != "as is"))
    pull = mean_pull(net, x, y)
    print(f"the cosine loss's descent over the pairs: common part {pull.common:.3f} of a pair's, cos with the mean "
          f"enrollment embedding {pull.cos_mean:.3f}; mapped embeddings' norm {pull.output_norm:.3f}, cos with their "
          f"enrollment embedding {pull.pair_cos:.3f}")
    for local_lr in args.local_lrs:
        fd = fedavg_direction(net, pop, g_pool, local_lr, args.seed)
        print(f"each device's DP-FedAvg delta (local lr {local_lr:g}, 1 epoch in minibatches of 16), clipped to 1: "
              f"cos {fd.cos:.2f}, their mean along / across {fd.along:.4f} / {fd.across:.4f}")
    print()
    print(f"| update (from the {'ridge' if args.dp_start is None else 'DP linear'} start) | steps or rounds → EER % |")
    print("|---|---|")
    score = lambda: 100 * _eer(net, pop, cfg)[1]  # noqa: E731
    at = sorted({0, 1, 3, 10, 30, 100, args.steps // 2, args.steps})
    for lr in (1e-3, 1e-2):
        load_flat(trainable(net), w0)
        curve = adam_curve(net, x, y, args.steps, lr, at, score)
        print(f"| full-batch Adam lr {lr:g} on the pooled loss | "
              + ", ".join(f"{s}: {e:.2f}" for s, e in curve) + " |")
    for server_lr, local_lr in ((1.0, 0.05), (0.1, 0.05)):
        load_flat(trainable(net), w0)
        if args.fedavg_rounds <= 0:
            break
        curve = fedavg_curve(net, pop, args.fedavg_rounds, server_lr, local_lr, score, args.seed)
        print(f"| FedAvg, local lr {local_lr:g} (1 epoch), server SGD lr {server_lr:g} | "
              + ", ".join(f"{s}: {e:.2f}" for s, e in curve) + " |")
    # the server's own runtime embeddings for "+centred" arms: another population's speakers (same world)
    server_y = torch.tensor(np.concatenate([d.runtime for d in generate_population(30, seed=args.seed + 1).devices]))
    for arm in args.pooled:
        load_flat(trainable(net), w0)
        points = pooled_curve(net, x, y, args.steps, pooled_optimizer(arm, trainable(net)), at, score,
                              centre_on=server_y if centred_arm(arm) else None,
                              loss_centre=x.mean(0) if mean_free_arm(arm) else None)
        print(f"| full-batch {arm} on the pooled loss (pooled loss / EER %) | "
              + ", ".join(f"{s}: {loss:.4f} / {e:.2f}" for s, loss, e in points) + " |")
    if args.shift:
        load_flat(trainable(net), w0)
        opt = torch.optim.Adam(trainable(net), lr=1e-3)
        print("\n| full-batch Adam lr 0.001 step | EER % | centred EER % | linear output | residual | its common "
              "shift | its varying part |\n|---:|---:|---:|---:|---:|---:|---:|")

        steps = iter(sorted(set(args.shift)))

        def shift_row() -> float:  # pooled_curve scores at each STEP in order: print that step's row
            sh, eer = residual_shift(net, y), score()
            print(f"| {next(steps)} | {eer:.2f} | {centred_score(net, y, score):.2f} | {sh.linear:.3f} | "
                  f"{sh.residual:.3f} | {sh.common:.3f} | {sh.varying:.3f} |")
            return eer

        pooled_curve(net, x, y, max(args.shift), opt, args.shift, shift_row)
    for arm in args.noisy_fedsgd:
        load_flat(trainable(net), w0)
        rows = noisy_fedsgd_curve(net, pop, args.steps, pooled_optimizer(arm, trainable(net)), args.noise_ratio,
                                  at, score, y, server_y if centred_arm(arm) else None, args.seed,
                                  loss_centre=x.mean(0) if mean_free_arm(arm) else None)
        print(f"| FedSGD {arm}, noise {args.noise_ratio:g} x the signal (EER % / residual's common shift / varying "
              "part) | " + ", ".join(f"{s}: {e:.2f} / {sh.common:.3f} / {sh.varying:.3f}" for s, e, sh in rows) + " |")
    rounds_at = sorted({0, 1, 10, 25, 50, 100} | set(range(0, args.adam_rounds + 1, 50)) | {args.adam_rounds})
    arms = (("equal weights", np.ones(len(pop.devices))), (f"pair-weighted (cap {cap})", pair_weights(pop, cap)))
    for name, weights in arms if args.adam_rounds > 0 else ():
        load_flat(trainable(net), w0)
        curve = clipped_fedavg_adam_curve(net, pop, args.adam_rounds, 1e-3, 0.05, cfg.device_clip_norm, weights,
                                          [r for r in rounds_at if r <= args.adam_rounds], score, args.seed)
        print(f"| FedAvg, local lr 0.05 (1 epoch), deltas clipped to {cfg.device_clip_norm:g}, {name}, server Adam "
              f"lr 0.001 | " + ", ".join(f"{s}: {e:.2f}" for s, e in curve) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

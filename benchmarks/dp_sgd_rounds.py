"""How many distributed-DP rounds would DP-SGD need to beat the private linear start?

A Flower round at 1000 devices costs minutes here, so this script replays the
*maths* of the distributed protocol without the transport, vectorised over
the whole fleet: the private linear start from :mod:`fed_nessa.federated.suffstats`
(noise once on the sum), then one step per round in which every device of a
uniformly sampled cohort contributes its Poisson sample (rate 1/ceil(n/B)) of
per-example clipped gradients, the sum gets ``N(0, (sigma C)^2)`` once, and
the server applies it with its optimiser. Each device's accountant (RDP:
statistics + its own DP-SGD steps) caps the rounds it may join, as a real
device's ledger would (it declines afterwards).

``--no-dp`` runs the same schedule with neither clipping nor noise: the
ceiling any DP variant of that schedule can reach.

    python benchmarks/dp_sgd_rounds.py --devices 1000 --rounds 200 --cohort 100
    python benchmarks/dp_sgd_rounds.py --devices 1000 --rounds 200 --cohort 100 --no-dp

Prints the held-out EER and gap closure every ``--every`` rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fed_nessa.data.synthetic import generate_population
from fed_nessa.evaluation.protocol import evaluate_trials
from fed_nessa.federated import suffstats
from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet
from fed_nessa.model.losses import get_loss
from fed_nessa.model.training import dp_sample_rate
from fed_nessa.privacy.accounting import compute_epsilon
from fed_nessa.privacy.events import DISTRIBUTED, DP_SGD, GAUSSIAN_SUM, DPEvent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="population seed")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--stats-sigma", type=float, default=1.5, help="noise multiplier of the statistics round")
    p.add_argument("--sigma", type=float, default=1.5, help="noise multiplier of each DP-SGD round")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=28, help="per-device expected batch B (q = 1/ceil(n/B))")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--cohort", type=int, default=100, help="devices sampled per round")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--no-dp", action="store_true")
    return p.parse_args()


def steps_allowed(q: float, a: argparse.Namespace) -> int:
    """Most DP-SGD steps a device with rate q can take after the statistics round, within budget."""
    stats = DPEvent(1, GAUSSIAN_SUM, 1, 1.0, a.stats_sigma, suffstats.SENSITIVITY, a.delta, DISTRIBUTED)

    def eps(k: int) -> float:
        sgd = [DPEvent(2, DP_SGD, k, q, a.sigma, a.clip, a.delta, DISTRIBUTED)] if k else []
        return compute_epsilon([stats, *sgd], a.delta)

    if eps(0) > a.epsilon:
        return 0
    lo, hi = 0, a.rounds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if eps(mid) <= a.epsilon else (lo, mid - 1)
    return lo


def main() -> None:
    a = parse()
    torch.set_num_threads(1)
    rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    pop = generate_population(a.devices, a.seed)
    devs, ev = pop.devices, pop.eval
    xe, ye = ev.emb(pop.enroll_model), ev.emb(pop.runtime_model)
    d_x, d_y = devs[0].d_x, devs[0].d_y

    total = sum(suffstats.device_vector(d.enroll, d.runtime) for d in devs)
    std = 0.0 if a.no_dp else a.stats_sigma * suffstats.SENSITIVITY
    W, b = suffstats.noisy_solve(total, std, rng, d_x, d_y)
    net = NessaNet(d_y, d_x, NessaConfig(hidden=a.hidden, depth=a.depth, train_linear=False), seed=0)
    net.set_linear(W, b)

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            pred = net(torch.from_numpy(ye / np.linalg.norm(ye, axis=1, keepdims=True))).numpy()
        net.train()
        return evaluate_trials(xe, pred / np.linalg.norm(pred, axis=1, keepdims=True), ev.speaker, ev.utterance).eer

    x = torch.from_numpy(np.concatenate([d.enroll for d in devs]))
    y = torch.from_numpy(np.concatenate([d.runtime for d in devs]))
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    ns = np.array([d.n for d in devs])
    qs = np.array([dp_sample_rate(int(n), a.batch) for n in ns])
    starts = np.concatenate([[0], np.cumsum(ns)])
    cap = {q: (10 ** 9 if a.no_dp else steps_allowed(q, a)) for q in set(qs.tolist())}
    allowed = np.array([cap[q] for q in qs])

    params = {k: v for k, v in net.named_parameters() if v.requires_grad}
    loss_fn = get_loss("cosine")
    per_example = vmap(grad(lambda p, xi, yi: loss_fn(functional_call(net, p, (yi[None],)), xi[None]).sum()),
                       in_dims=(None, 0, 0))
    opt = (torch.optim.Adam(params.values(), lr=a.lr) if a.optimizer == "adam"
           else torch.optim.SGD(params.values(), lr=a.lr, momentum=0.9))
    ref = {"start": evaluate()}
    n_trainable = sum(v.numel() for v in params.values())
    print(f"linear start EER {100 * ref['start']:.2f} %  trainable {n_trainable}", flush=True)
    used, declined, t0 = np.zeros(len(devs), int), 0, time.time()
    for r in range(1, a.rounds + 1):
        cohort = rng.choice(len(devs), min(a.cohort, len(devs)), replace=False)
        live = [i for i in cohort if used[i] < allowed[i]]
        declined += len(cohort) - len(live)
        if not live:
            print(f"round {r}: every sampled device is out of budget")
            break
        used[live] += 1
        rows = np.concatenate([np.arange(starts[i], starts[i + 1])[rng.random(ns[i]) < qs[i]] for i in live])
        summed = {k: torch.zeros_like(v) for k, v in params.items()}
        for c in range(0, len(rows), 4096):
            j = torch.from_numpy(rows[c:c + 4096])
            g = per_example({k: v.detach() for k, v in params.items()}, x[j], y[j])
            norms = torch.sqrt(sum(t.reshape(len(j), -1).pow(2).sum(1) for t in g.values()))
            f = torch.ones_like(norms) if a.no_dp else (a.clip / (norms + 1e-6)).clamp(max=1.0)
            for k in summed:
                summed[k] += torch.einsum("i,i...->...", f, g[k])
        for k, v in params.items():
            noise = 0.0 if a.no_dp else torch.randn(v.shape, generator=gen) * a.sigma * a.clip
            v.grad = (summed[k] + noise) / (len(live) * a.batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if r % a.every == 0 or r == a.rounds:
            print(f"round {r}: EER {100 * evaluate():.2f} %  sampled pairs {len(rows)}  live {len(live)}  "
                  f"declined so far {declined}  {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""How much the private linear start's EER varies with the noise draw alone.

A federated run is one draw of the DP noise (and which draw depends on every
device's seed, hence on bit-level details such as BLAS threading). This
replays the statistics round's maths without the transport: the exact sum of
the devices' vectors from :mod:`fed_nessa.federated.suffstats`, plus Gaussian noise of
the std the distributed round releases (``sigma * sqrt(N / g)``: N arrivals,
shares calibrated to g = max(min-arrivals, ceil(0.8 N)) guaranteed ones), then
the server's solve, for ``--draws`` independent draws. Same population and
evaluation set as ``fed-nessa simulate`` (100 evaluation speakers).

    python benchmarks/linear_start_spread.py --devices 1000 300 --sigmas 0.64 1.5 4.05 --draws 10
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from fed_nessa.data.synthetic import generate_population
from fed_nessa.evaluation.protocol import evaluate_trials
from fed_nessa.federated import suffstats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1000, 300])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.64, 1.5, 4.05])
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--min-arrivals", type=int, default=50)
    p.add_argument("--min-arrival-fraction", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0, help="population seed")
    a = p.parse_args()
    print("| devices | σ | EER % mean ± std over draws | min | max | gap closure at the mean |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n_dev in a.devices:
        pop = generate_population(n_dev, a.seed, eval_speakers=100)
        ev = pop.eval
        xe, ye = ev.emb(pop.enroll_model), ev.emb(pop.runtime_model)
        ye = ye / np.linalg.norm(ye, axis=1, keepdims=True)
        before = evaluate_trials(xe, ev.emb(pop.enroll_model), ev.speaker, ev.utterance).eer  # sym_before
        after = evaluate_trials(ev.emb(pop.runtime_model), ev.emb(pop.runtime_model), ev.speaker, ev.utterance).eer
        total = sum(suffstats.device_vector(d.enroll, d.runtime) for d in pop.devices)
        guaranteed = max(min(a.min_arrivals, n_dev), math.ceil(a.min_arrival_fraction * n_dev))
        d_x, d_y = pop.devices[0].d_x, pop.devices[0].d_y
        for sigma in a.sigmas:
            std = sigma * math.sqrt(n_dev / guaranteed)
            eers = []
            for draw in range(a.draws):
                W, b = suffstats.noisy_solve(total, std, np.random.default_rng(1000 + draw), d_x, d_y)
                pred = ye @ W.T + b
                pred /= np.linalg.norm(pred, axis=1, keepdims=True)
                eers.append(evaluate_trials(xe, pred.astype(np.float32), ev.speaker, ev.utterance).eer)
            mean = float(np.mean(eers))
            print(f"| {n_dev} | {sigma:g} | {100 * mean:.2f} ± {100 * np.std(eers):.2f} | {100 * min(eers):.2f} "
                  f"| {100 * max(eers):.2f} | {(before - mean) / (before - after):.2f} |", flush=True)


if __name__ == "__main__":
    main()

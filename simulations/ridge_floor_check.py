"""Does the statistics solve's eigenvalue floor limit the private linear start at small epsilon? A paired check.

The server's ridge solve lifts the noisy Gram matrix's eigenvalues by ``FLOOR_FRACTION`` (1/8) of its noise's
spectral norm (``fed_nessa.federated.suffstats.solve``). Here one fleet's exact statistics (every device's pairs
summed, as the secure sum would before noise) get the released noise of the fleet rule's plan, once per draw, and
the SAME noisy sum is solved at several floor fractions: the floors are compared under identical noise. The noise
is drawn as a Gaussian of the released per-entry variance (the Skellam sum's variance is the same; this is a
tuning harness, nothing is released). EER on the population's validation speakers and held-out speakers; run it on
a population seed that is not reported (default 1).

    python -m simulations.ridge_floor_check [--devices 10000] [--epsilon 1] [--seed 1] [--draws 3]
        [--floors 0.03125 0.0625 0.125 0.25 0.5 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence

import numpy as np

from fed_nessa.config import from_run_config
from fed_nessa.data.registry import load_federation_data
from fed_nessa.evaluation.protocol import evaluate_held_out
from fed_nessa.federated import suffstats
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.release import promised_arrivals
from fed_nessa.federated.server_model import ServerModel
from fed_nessa.sim.fleet_settings import derive

DEFAULT_FLOORS = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0)


def check(devices: int, epsilon: float, seed: int, draws: int, floors: Sequence[float],
          budget_split: float | None = None) -> dict[str, object]:
    """Per floor: the validation and held-out EERs of each draw's solve; plus the plan's sigma and noise std.

    Without ``budget_split`` the statistics round takes all of epsilon (the linear start alone); with it, the
    share a run with DP-SGD rounds after the start (``aligner = nessa``) would give the statistics round.
    """
    given: dict[str, object] = {"num-devices": devices, "epsilon-budget": epsilon, "seed": seed, "aligner": "linear"}
    if budget_split is not None:
        given.update({"aligner": "nessa", "budget-split": budget_split})
    cfg = from_run_config({**given, **derive(given, {}).run})
    data = load_federation_data(cfg, None)
    plan = noise_plan(cfg, devices, (data.d_x, data.d_y))
    model = ServerModel(cfg, data.d_x, data.d_y, data.enroll_model, data.runtime_model)
    g = promised_arrivals(cfg, devices)
    std = math.sqrt(model.released_noise_var(devices, [g] * devices, plan.suffstats_sigma))
    x = np.concatenate([s.enroll for s in data.devices])
    y = np.concatenate([s.runtime for s in data.devices])
    total = suffstats.device_vector(x, y)
    held_out, scenario = data.evaluation()
    if data.validation is None:
        raise ValueError("the population has no validation speakers")
    rng = np.random.default_rng([seed, 2026])  # the harness's own noise: nothing here is released
    out: dict[float, dict[str, list[float]]] = {f: {"validation": [], "held_out": []} for f in floors}
    for _ in range(draws):
        gram, cross = suffstats.unpack(total + rng.normal(0.0, std, total.shape), data.d_x, data.d_y)
        for f in floors:
            w, b = suffstats.solve(gram, cross, cfg.ridge_alpha, noise_std=std, floor_fraction=f)
            model.net.set_linear(w, b)
            for name, held in (("validation", data.validation), ("held_out", held_out)):
                report = evaluate_held_out(held, scenario, {"start": model.comparator()})
                out[f][name].append(report.row("asym_start").metrics.eer)
    return {"sigma": plan.suffstats_sigma, "std": std, "eers": out}


def markdown(result: dict[str, object], floors: Sequence[float]) -> str:
    eers = result["eers"]
    assert isinstance(eers, dict)
    lines = ["| floor fraction | validation EER % | held-out EER % |", "|---:|---:|---:|"]
    for f in floors:
        cells = [eers[f][k] for k in ("validation", "held_out")]
        lines.append(f"| {f:g} | " + " | ".join(
            f"{100 * statistics.fmean(c):.2f} ± {100 * statistics.stdev(c):.2f}" if len(c) > 1
            else f"{100 * c[0]:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.ridge_floor_check", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--floors", type=float, nargs="+", default=list(DEFAULT_FLOORS))
    p.add_argument("--budget-split", type=float, default=None,
                   help="the statistics round's share of epsilon (default: all of it, the linear start alone)")
    args = p.parse_args(argv)
    result = check(args.devices, args.epsilon, args.seed, args.draws, args.floors, args.budget_split)
    print(f"{args.devices} devices, epsilon {args.epsilon:g}, population seed {args.seed}: statistics sigma "
          f"{result['sigma']:.3f}, released noise std {result['std']:.4g} per entry, {args.draws} noise draws")
    print(markdown(result, args.floors))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the DP-SGD rate q trades against noise under each distributed mechanism (the fleet rule's q choice).

For a fleet of N devices at example level, each epsilon and each q (fractions of the rule's target rate), the
noise plan's DP-SGD sigma and the auto rule's signal (clipped examples per noise std per round) under the
Gaussian accountant and the integer mechanism's (Skellam: the symmetric Poisson-subsampling expansion). The rule's
budget split, rounds and delta; the synthetic source's payload. Pure accounting, no training.

    python -m simulations.integer_rate_table [--devices 10000] [--epsilons 1 3 8]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fed_nessa.config import from_run_config
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.sim.fleet_settings import INTEGER_RATE_FRACTIONS, derive, source_dims

MECHANISMS = ("gaussian", "skellam")


def cells(devices: int, epsilon: float) -> list[dict[str, float | str | bool]]:
    """One row per (mechanism, q): sigma, signal, and whether the rule picks that q under the mechanism."""
    out: list[dict[str, float | str | bool]] = []
    for mech in MECHANISMS:
        given = {"num-devices": devices, "epsilon-budget": epsilon, "distributed-mechanism": mech}
        run = derive(given, {}).run
        target = derive({**given, "distributed-mechanism": "gaussian"}, {}).run["sample-rate"]
        for f in INTEGER_RATE_FRACTIONS:
            cfg = from_run_config({**given, **run, "sample-rate": target * f, "aligner": "auto"})
            plan = noise_plan(cfg, devices, source_dims(cfg))
            out.append({"mechanism": mech, "q": target * f, "sigma": plan.dpsgd_sigma, "signal": plan.signal,
                        "chosen": abs(run["sample-rate"] - target * f) < 1e-12})
    return out


def markdown(devices: int, epsilons: Sequence[float]) -> str:
    lines = ["| ε | mechanism | q | DP-SGD σ | signal (examples per noise std per round) | rule's q |",
             "|---:|---|---:|---:|---:|---|"]
    for eps in epsilons:
        for c in cells(devices, eps):
            lines.append(f"| {eps:g} | {c['mechanism']} | {c['q']:.3f} | {c['sigma']:.2f} | {c['signal']:,.0f} "
                         f"| {'**chosen**' if c['chosen'] else ''} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.integer_rate_table", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    args = p.parse_args(argv)
    print(f"{args.devices} devices, example level, delta 1e-5, the fleet rule's split and rounds")
    print(markdown(args.devices, args.epsilons))
    return 0


if __name__ == "__main__":
    sys.exit(main())

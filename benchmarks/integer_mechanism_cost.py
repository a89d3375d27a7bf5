"""What the distributed Skellam mechanism costs at our sizes, beside the continuous Gaussian at equal noise.

For a NESSA update (~78k values) and the statistics vector (~68k values), at 10^3..10^6 devices:
the padded dimension, the scale, the bit width (:func:`fed_nessa.federated.integer_mechanism.build_params`
at its defaults), the rounding's L2 inflation, and epsilon at delta for the same noise multiplier
under both accountings (same integer RDP orders, same subsampling expansion, same conversion; and the
Gaussian as the project accounts it, Opacus' subsampled-Gaussian RDP at its own orders), for the statistics round (one
full sum) and a DP-SGD span (Poisson-subsampled steps). Also the seconds one device spends encoding.

    python benchmarks/integer_mechanism_cost.py
    python benchmarks/integer_mechanism_cost.py --dims 78000 --devices 1000 1000000 --out cost.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fed_nessa.federated.integer_mechanism import build_params, encode, padded_dimension
from fed_nessa.privacy.accountants.rdp import RDP_ORDERS, rdp_to_epsilon
from fed_nessa.privacy.skellam import SKELLAM_ORDERS, poisson_subsampled_rdp, skellam_epsilon
from fed_nessa.randomness import SecureNoise

#: (name, noise multiplier, sample rate, steps): the statistics round at about epsilon 8, and a DP-SGD span.
SCHEDULES = (("statistics round", 0.64, 1.0, 1), ("DP-SGD span", 1.5, 0.02, 1000))


def gaussian_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """The continuous Gaussian's epsilon at the same orders and conversion (subsampled by the same bound)."""
    base = np.array([a / (2 * z * z) for a in SKELLAM_ORDERS])
    return rdp_to_epsilon(poisson_subsampled_rdp(base, q) * steps, SKELLAM_ORDERS, delta)


def encode_seconds(dim: int, repeats: int = 3) -> float:
    params = build_params(dim, 1.0, 1.0, rotation_seed=1, min_devices=1000, max_devices=1000, clip_per_sqrt_dim=8.0)
    x = np.full(dim, 1.0 / np.sqrt(dim))
    start = time.perf_counter()
    for _ in range(repeats):
        encode(x, params, SecureNoise())
    return (time.perf_counter() - start) / repeats


def opacus_gaussian_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """The continuous Gaussian as the project accounts it (Opacus' subsampled-Gaussian RDP at its orders)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=list(RDP_ORDERS))
    return rdp_to_epsilon(rdp, RDP_ORDERS, delta)


def rows(dims: list[int], devices: list[int], delta: float) -> list[dict]:
    """One row per padded dimension (dims that pad alike share every figure), device count and schedule."""
    out = []
    by_padded: dict[int, list[int]] = {}
    for dim in dims:
        by_padded.setdefault(padded_dimension(dim), []).append(dim)
    for same in by_padded.values():
        dim = same[0]
        for n in devices:
            for name, z, q, steps in SCHEDULES:
                p = build_params(dim, 1.0, z, rotation_seed=1, min_devices=n, max_devices=n, clip_per_sqrt_dim=8.0)
                sk = skellam_epsilon([p.release(q, steps)], delta)
                gauss = gaussian_epsilon(z, q, steps, delta)
                out.append({"dims": same, "devices": n, "schedule": name, "noise_multiplier": z,
                            "padded_dim": p.padded_dim,
                            "scale": p.scale, "bits": p.bits, "inflation": p.norm_bound / (p.scale * p.l2_clip) - 1,
                            "eps_gaussian": gauss, "eps_gaussian_opacus": opacus_gaussian_epsilon(z, q, steps, delta),
                            "eps_skellam": sk, "ratio": sk / gauss})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[78000, 68000])
    ap.add_argument("--devices", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    table = rows(args.dims, args.devices, args.delta)
    print("| values | devices | schedule | padded | scale (per clip) | bits | L2 inflation "
          "| eps Gaussian (Opacus) | eps Gaussian (same bound) | eps Skellam |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        values = " / ".join(f"{d:,}" for d in r["dims"])
        print(f"| {values} | {r['devices']:,} | {r['schedule']} (z {r['noise_multiplier']}) | {r['padded_dim']:,} "
              f"| {r['scale']:.0f} | {r['bits']} | {100 * r['inflation']:.2f} % | {r['eps_gaussian_opacus']:.3f} "
              f"| {r['eps_gaussian']:.3f} "
              f"| {r['eps_skellam']:.3f} (x{r['ratio']:.4f}) |")
    for dim in args.dims:
        print(f"encode, one device, {dim:,} values: {encode_seconds(dim):.3f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()

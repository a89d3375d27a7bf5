"""Generating the lazy synthetic population block by block: devices per second, peak RSS, and a round's cost.

Streams ``--devices`` devices of :class:`fed_nessa.data.lazy_population.LazyPopulation` in blocks
of ``--block`` devices, holding one block at a time, split over ``--workers`` processes (each a
contiguous range of devices: device j depends on (seed, j) only, so the ranges need nothing from
each other). Reports devices and pairs per second and the peak RSS of each worker
(``ru_maxrss``), then times the device-level statistics vector
(:func:`fed_nessa.federated.suffstats.device_vector`, one per device) on one block and estimates
a 10^6-device x 100-pair statistics round (generation + vectors) against issue 21's target
(<= 10 min, <= 6 GiB peak RSS on 2 cores). Rates are per CPU second (``process_time``), as the
machine is shared; the estimate assumes two workers each get a whole core at those rates: it is
an estimate, not a measured round.

    python benchmarks/lazy_population.py --devices 100000 --workers 1
    python benchmarks/lazy_population.py --devices 100000 --workers 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.federated.suffstats import device_vector

TARGET_DEVICES, TARGET_PAIRS = 1_000_000, 100  # issue 21's statistics round
TARGET_S, TARGET_RSS_GIB = 600.0, 6.0


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def stream(num_devices: int, start: int, stop: int, block: int, seed: int) -> dict[str, Any]:
    """Generate devices ``start .. stop - 1`` block by block; keep only counts."""
    pop = LazyPopulation.create(num_devices, seed=seed)
    base = _rss_gib()
    pairs, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    for lo in range(start, stop, block):
        pairs += pop.block(lo, min(lo + block, stop)).pairs
    return {"devices": stop - start, "pairs": pairs, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0, "rss_start_gib": round(base, 3),
            "peak_rss_gib": round(_rss_gib(), 3)}


def vectors(block_devices: int, seed: int) -> dict[str, Any]:
    """CPU seconds per pair of the per-device statistics vectors on one generated block, and their dense FLOPs."""
    blk = LazyPopulation.create(block_devices, seed=seed).block(0, block_devices)
    d_t = blk.y.shape[1] + 1  # the augmented runtime vector [y, 1]
    cpu0 = time.process_time()
    for j in range(blk.devices):
        rows = slice(int(blk.starts[j]), int(blk.starts[j + 1]))
        device_vector(blk.x[rows], blk.y[rows])
    seconds = time.process_time() - cpu0
    flops_per_pair = 2.0 * d_t * (d_t + blk.x.shape[1])  # t t^T and t x^T
    return {"devices": blk.devices, "pairs": blk.pairs, "seconds": seconds, "flops_per_pair": flops_per_pair,
            "gflops": flops_per_pair * blk.pairs / seconds / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--block", type=int, default=1024, help="devices per block")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--vector-devices", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuts = [int(c) for c in np.linspace(0, args.devices, args.workers + 1)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(pool.map(stream, [args.devices] * args.workers, cuts[:-1], cuts[1:],
                              [args.block] * args.workers, [args.seed] * args.workers))
    wall = time.perf_counter() - t0
    pairs = sum(p["pairs"] for p in parts)
    one = vectors(args.vector_devices, args.seed)
    gen_per_pair = sum(p["cpu_seconds"] for p in parts) / pairs  # CPU seconds per pair: other work on the
    # machine slows the wall clock, not the CPU time
    vec_per_pair = one["seconds"] / one["pairs"]
    target_pairs = TARGET_DEVICES * TARGET_PAIRS
    est_2core = target_pairs * (gen_per_pair + vec_per_pair) / 2
    out = {
        "devices": args.devices, "block": args.block, "workers": args.workers, "pairs": pairs,
        "wall_s": round(wall, 1), "devices_per_s": round(args.devices / wall, 1),
        "pairs_per_s": round(pairs / wall), "worker_peak_rss_gib": max(p["peak_rss_gib"] for p in parts),
        "worker_rss_after_setup_gib": max(p["rss_start_gib"] for p in parts), "parts": parts,
        "vectors": one, "load_average": os.getloadavg(),
        "estimate_1e6x100": {
            "generation_core_s": round(target_pairs * gen_per_pair),
            "vectors_core_s": round(target_pairs * vec_per_pair),
            "vector_flops": one["flops_per_pair"] * target_pairs, "two_core_s": round(est_2core),
            "target_s": TARGET_S, "peak_rss_gib_two_workers": 2 * max(p["peak_rss_gib"] for p in parts),
            "target_rss_gib": TARGET_RSS_GIB,
        },
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

"""Seconds per round and peak memory: in-process Grid vs Flower's Ray engine on the same run.

``python -m simulations.benchmark --set data-source=... --set num-devices=300 --rounds 2 [--ray]``
runs the configuration once over :mod:`fed_nessa.sim.grid` (this process; peak RSS from
``getrusage``) and, with ``--ray``, once more through ``flwr run`` on Flower's simulation
engine (peak RSS = the largest sum of resident memory over our SuperLink's process tree,
sampled every 0.5 s). Prints one JSON object; BENCHMARKS.md quotes it with the command.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _per_round(summary: dict[str, Any]) -> dict[str, float]:
    secs = [r["seconds"] for r in summary["rounds"]]
    later = secs[1:] or secs  # round 1 is the linear start (a different phase) when enabled
    return {"first_round_s": secs[0], "later_rounds_median_s": statistics.median(later),
            "rounds": len(secs), "participants": [r["participants"] for r in summary["rounds"]]}


def bench_inprocess(cfg: Any, policy: Any = None) -> dict[str, Any]:
    from fed_nessa.sim.runner import simulate

    t0 = time.perf_counter()
    summary = simulate(cfg, policy=policy, quiet=True)
    return {"engine": "in-process Grid", "wall_s": time.perf_counter() - t0, **_per_round(summary),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_fractional_shares(cfg: Any, shares: float, threshold: float, policy: Any = None) -> dict[str, Any]:
    """The same in-process run with Flower's fractional SecAgg+ shares (a fraction of the cohort).

    Only the workflow's ``num_shares``/``reconstruction_threshold`` change (fractions, as
    Flower accepts them): everything else, cohort and data included, is identical.
    """
    from fed_nessa.config import FederationConfig
    from server import secagg_round

    original = secagg_round.make_workflow

    def fractional(cfg: FederationConfig, min_release: int,
                   ranges: tuple[float, int, int] | None = None) -> secagg_round.GuardedSecAggPlusWorkflow:
        wf = original(cfg, min_release, ranges)
        return secagg_round.GuardedSecAggPlusWorkflow(
            min_release=min_release, num_shares=shares, reconstruction_threshold=threshold,
            max_weight=wf.max_weight, clipping_range=wf.clipping_range, quantization_range=wf.quantization_range,
            modulus_range=wf.modulus_range, timeout=wf.timeout)

    secagg_round.make_workflow = fractional
    try:
        result = bench_inprocess(cfg.replace(run_dir=cfg.run_dir + "-fractional"), policy)
    finally:
        secagg_round.make_workflow = original
    return {**result, "engine": f"in-process Grid, num_shares={shares} (fraction), threshold={threshold} (fraction)"}


def bench_ray(cfg: Any, home: Path) -> dict[str, Any]:
    from simulations.flwr_run import descendants, flwr_run, our_superlinks

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = sum(_rss_kib(p) for root in our_superlinks(home) for p in [root, *descendants(root)])
            peak[0] = max(peak[0], total)
            stop.wait(0.5)

    def quote(v: Any) -> str:
        return f"'{v}'" if isinstance(v, str) else ("true" if v is True else "false" if v is False else str(v))

    run_dir = Path(cfg.run_dir + "-ray")
    rc_items = {**cfg.to_run_config(), "run-dir": str(run_dir), "resume": False}
    run_config = " ".join(f"{k}={quote(v)}" for k, v in rc_items.items())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        rc = flwr_run(run_config, cfg.num_devices, home, log_path=home / "bench-flwr.log")
    finally:
        stop.set()
        thread.join()
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"engine": "Flower simulation engine (Ray, flwr run)", "rc": rc, "wall_s": time.perf_counter() - t0,
            **_per_round(summary), "peak_rss_mib": peak[0] / 1024}


def main(argv: Sequence[str] | None = None) -> int:
    from fed_nessa.sim.runner import build_config, build_policy

    parser = argparse.ArgumentParser(prog="python -m simulations.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--ray", action="store_true", help="also run through flwr run on Ray")
    parser.add_argument("--flwr-home", type=Path, default=Path(".flwr-home"))
    parser.add_argument("--fractional-shares", type=float, metavar="F",
                        help="also run with Flower's fractional num_shares=F (of the cohort)")
    parser.add_argument("--fractional-threshold", type=float, default=0.5,
                        help="reconstruction threshold as a fraction of the shares (with --fractional-shares)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cfg = build_config(args.config, args.overrides)
    policy = build_policy(args.config)
    out = {"config": {k: v for k, v in cfg.to_run_config().items()
                      if k in ("num-devices", "clients-per-round", "num-server-rounds", "dp-mode",
                               "secagg-num-shares", "secagg-reconstruction-threshold", "hidden", "depth")},
           "in_process": bench_inprocess(cfg, policy)}
    if args.fractional_shares:
        out["fractional_shares"] = bench_fractional_shares(cfg, args.fractional_shares, args.fractional_threshold,
                                                         policy)
        out["ratio_fractional_over_integer_later_rounds"] = (
            out["fractional_shares"]["later_rounds_median_s"] / out["in_process"]["later_rounds_median_s"])
        out["ratio_fractional_over_integer_first_round"] = (
            out["fractional_shares"]["first_round_s"] / out["in_process"]["first_round_s"])
    if args.ray:
        out["ray"] = bench_ray(cfg, args.flwr_home.resolve())
        out["ratio_ray_over_inprocess_later_rounds"] = (
            out["ray"]["later_rounds_median_s"] / out["in_process"]["later_rounds_median_s"])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

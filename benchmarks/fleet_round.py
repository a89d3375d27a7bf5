"""Seconds per full-participation DP-SGD round of the fleet engine, side by side with the Flower engine.

For each fleet size: the synthetic population in memory, the private linear start solved once
without noise (a realistic model state), then ``--rounds`` timed DP-SGD rounds of the fleet
engine's round maths (every device's Poisson sample at q, ghost-clipped sums, the noise and
rounding draws, the release rule, the server's Adam step; per-device ledgers are not part of
a round: a device reserves its whole DP-SGD phase once). Peak RSS is the process's.
``--flower-devices N`` also times one DP-SGD round of the same config through the Flower
engine (real ClientApps and SecAgg+ on the in-process Grid) and prints the ratio.

    python benchmarks/fleet_round.py --devices 10000 30000 --rounds 5 --flower-devices 1000
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fed_nessa.config import DevicePolicy, Phase, from_run_config
from fed_nessa.data.registry import load_federation_data
from fed_nessa.federated import suffstats
from fed_nessa.federated.engine import Pins, RunState
from fed_nessa.federated.protocol_loop import run_round
from fed_nessa.federated.rounds import LEDGER_FILE
from fed_nessa.privacy.ledger import FederationLedger, server_key_folder
from fed_nessa.sim.fleet import OUTPUTS, FleetEngine
from fed_nessa.sim.fleet_ledgers import DeviceBook


def quantization_range(devices: int) -> int:
    """The finest SecAgg+ grid whose sum over every device stays below the 2**32 modulus."""
    return min(2**22, 2 ** int(math.log2((2**32 - 1) / devices)))


def config(devices: int, q: float, numerics: str, run_dir: str, rounds: int) -> Any:
    return from_run_config({
        "num-devices": devices, "num-server-rounds": rounds + 1, "clients-per-round": 0, "sample-rate": q,
        "noise-multiplier": 0.8, "suffstats-noise-multiplier": 2.0, "aligner": "nessa", "eval-every": 10**6,
        "min-arrivals": 50, "secagg-quantization-range": quantization_range(devices), "fleet-numerics": numerics,
        "run-dir": run_dir, "eval-speakers": 20, "validation-speakers": 0})


def time_fleet(devices: int, q: float, rounds: int, numerics: str, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(devices, q, numerics, tmp, rounds)
        t0 = time.perf_counter()
        data = load_federation_data(cfg, None)
        build = time.perf_counter() - t0
        policy = DevicePolicy(guaranteed_arrivals=max(2, int(0.8 * devices)))
        engine = FleetEngine(cfg, policy, data, device=device)
        total = suffstats.device_vector(data.devices[0].enroll, data.devices[0].runtime) * 0
        for shard in data.devices:
            total += suffstats.device_vector(shard.enroll, shard.runtime)
        engine.model.apply(Phase.SUFFSTATS, total, devices, noise_arrivals=[policy.guaranteed_arrivals] * devices,
                           plan=engine.plan)
        rounds_of = {i: list(range(2, rounds + 2)) for i in range(devices)}
        # Every device already holds its schedule and no ledger: the timed rounds are the protocol's
        # rounds on the fleet engine, without the span reservation (before_round) or the ledgers' epsilon.
        engine.book = DeviceBook(ledgers=[], policies=[policy] * devices, span_rounds=rounds_of)
        engine._dp_rounds, engine.state = list(range(2, rounds + 2)), RunState()
        engine.before_round = lambda r, phase: None  # type: ignore[method-assign]
        ledger = FederationLedger.open(Path(tmp) / LEDGER_FILE, server_key_folder(Path(tmp)))
        seconds = []
        for r in range(2, rounds + 2):
            t = time.perf_counter()
            entry = run_round(engine, OUTPUTS, ledger, Pins({}), engine.state, r, Phase.DPSGD, 10**6)
            seconds.append(time.perf_counter() - t)
            assert entry["status"] == "applied", entry
        pairs = int(engine.fleet.starts[-1])
    return {"devices": devices, "pairs": pairs, "q": q, "numerics": numerics, "device": device,
            "expected_sampled_pairs_per_round": round(q * pairs), "population_build_s": round(build, 1),
            "seconds_per_round": [round(s, 3) for s in seconds], "median_s": round(statistics.median(seconds), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def time_flower(devices: int, q: float) -> dict[str, Any]:
    """One statistics round and one DP-SGD round of the same config on the Flower engine."""
    from fed_nessa.sim.runner import simulate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(devices, q, "exact", tmp, 1).replace(eval_speakers=20, validation_speakers=0,
                                                          secagg_num_shares=11, secagg_reconstruction_threshold=6)
        summary = simulate(cfg, policy=DevicePolicy(guaranteed_arrivals=max(2, int(0.8 * devices))), quiet=True)
        dp = [r["seconds"] for r in summary["rounds"] if r["phase"] == "dpsgd"]
    return {"devices": devices, "engine": "flower (in-process Grid, real SecAgg+)", "dpsgd_round_s": round(dp[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10_000, 30_000])
    p.add_argument("--batch", type=float, default=22_800.0,
                   help="expected sampled pairs per round (q = batch / pairs, as the fleet study keeps it)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--numerics", choices=("fast", "exact"), default="fast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--flower-devices", type=int, default=0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    results: dict[str, Any] = {"fleet": []}
    for n in a.devices:
        q = min(1.0, a.batch / (n * 112.0))
        res = time_fleet(n, q, a.rounds, a.numerics, a.device)
        results["fleet"].append(res)
        print(json.dumps(res), flush=True)
    if a.flower_devices:
        q = min(1.0, a.batch / (a.flower_devices * 112.0))
        flower = time_flower(a.flower_devices, q)
        same = time_fleet(a.flower_devices, q, a.rounds, a.numerics, a.device)
        flower["fleet_engine_median_s"] = same["median_s"]
        flower["ratio_flower_over_fleet"] = round(flower["dpsgd_round_s"] / max(same["median_s"], 1e-9), 1)
        results["flower"] = flower
        print(json.dumps(flower), flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

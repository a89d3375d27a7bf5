"""The block engine at 10^4-10^6 devices: one round's reserve, partial sums and completes, timed per step.

Runs the block workers (:mod:`fed_nessa.sim.blocks`) directly, without the round loop's model
updates, so each step of one round is timed on its own: ``reserve`` (each device's ledger opened,
its checks, one signed reserve entry), ``contribute`` (the blocks' partial sums: the round maths,
with the devices' pairs generated lazily or held by the worker with ``--cache``) and
``complete`` (one signed complete entry each). Fast numerics, secure noise, device level.

``--round device``: today's device-level round (each device's mean gradient over ``device-batch``
= 8 pairs clipped as one vector; NESSA with ``linear-start = none``, 78,528 parameters; dense
FLOPs = 6 x parameters x pairs). ``--round stats``: the statistics round (each device's weighted
sufficient statistics; FLOPs = 173 kflop per pair, BENCHMARKS.md "Lazy population").
``--only-blocks K``: run K blocks spread over a ``--fleet`` of devices (a 10^6-device round's
per-block cost and memory, measured on a subset). ``--pairs P``: every device holds exactly P pairs
(one speaker with P utterances) instead of the default population's ~114.

    nice -n 5 python benchmarks/block_engine.py --round device --fleet 100000 --pairs 8 --cache \
        --devices-per-block 50000 --backend ray
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from fed_nessa.config import DevicePolicy, Phase, from_run_config
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.synthetic import population_config
from fed_nessa.federated.codec import make_codec
from fed_nessa.federated.device import RoundRequest
from fed_nessa.federated.layout import build_net, trainable
from fed_nessa.federated.mechanism import mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.release import promised_arrivals
from fed_nessa.privacy.ledger import DEVICE_KEYS, KEY_STORE_ENV, key_store
from fed_nessa.privacy.store import LedgerStore
from fed_nessa.sim.blocks.backends import make_backend
from fed_nessa.sim.blocks.engine import block_specs
from fed_nessa.sim.blocks.worker import CompleteRequest, ReserveRequest, SumRequest

STATS_FLOP_PER_PAIR = 173e3  # suffstats.device_vector, BENCHMARKS.md "Lazy population"


def _load() -> float:
    return os.getloadavg()[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="block-engine-"))
    os.environ[KEY_STORE_ENV] = str(work / "keys")
    cfg = from_run_config({"num-devices": args.fleet, "num-server-rounds": 2, "clients-per-round": 0,
                           "privacy-unit": "device", "device-batch": 8, "delta": 0.1 / args.fleet,
                           "fleet-numerics": "fast", "suffstats-noise-multiplier": 2.0,
                           "linear-start": "suffstats" if args.round == "stats" else "none",
                           "suffstats-rounds": 1, "ledger-layout": "sqlite", "run-dir": str(work / "run"),
                           # the modulus bounds devices x quantization range: the range shrinks with the fleet
                           "secagg-quantization-range": min(4_194_304, (2**32 - 1) // args.fleet - 1)})
    policy = DevicePolicy(privacy_unit="device", delta=cfg.delta)
    pairs = {} if args.pairs <= 0 else {"speakers_per_device": (1, 1), "utts_per_speaker": (args.pairs, args.pairs)}
    pop = population_config(args.fleet, 0, **pairs)  # type: ignore[arg-type]
    specs = block_specs(pop, args.devices_per_block, Path(cfg.run_dir), cache=args.cache)
    if args.only_blocks:
        step = max(1, len(specs) // args.only_blocks)
        specs = specs[::step][:args.only_blocks]
    devices = sum(s.stop - s.first for s in specs)
    LedgerStore.open(cfg.run_dir, key_store(cfg.run_dir) / DEVICE_KEYS).close()
    lazy = LazyPopulation(pop)
    models = lazy.world.models
    net = build_net(cfg, models[lazy.enroll_model].dim, models[lazy.runtime_model].dim)
    params = sum(p.numel() for p in trainable(net))
    phase = Phase.SUFFSTATS if args.round == "stats" else Phase.DPSGD
    plan = noise_plan(cfg, args.fleet)
    codec = make_codec(mechanism_for(cfg).payload_bound(phase, plan), cfg.secagg_clipping_range,
                       cfg.secagg_quantization_range, args.fleet)
    out: dict[str, Any] = {"round": args.round, "fleet": args.fleet, "devices_run": devices, "blocks": len(specs),
                           "devices_per_block": args.devices_per_block, "backend": args.backend,
                           "cache": args.cache, "pairs_per_device": args.pairs or "default population",
                           "torch_threads": torch.get_num_threads(), "load_before": _load()}
    t0 = time.perf_counter()
    backend = make_backend(args.backend, specs, cfg, policy, ray_address=args.ray_address)
    out["start_s"] = time.perf_counter() - t0
    req = RoundRequest(phase, 1, promised_arrivals(cfg, args.fleet), args.fleet)
    steps: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}

    def worker_cpu(step: str, before: list[dict[str, float]]) -> list[dict[str, float]]:
        now = backend.call("usage", None)
        cpu[step] = [round(b["cpu_seconds"] - a["cpu_seconds"], 2) for a, b in zip(before, now, strict=True)]
        return now

    mark = backend.call("usage", None)
    t0 = time.perf_counter()
    replies = backend.call("reserve", ReserveRequest(req, (1,), {}))
    steps["reserve_s"] = time.perf_counter() - t0
    mark = worker_cpu("reserve", mark)
    accepted = sum(len(r.accepted) for r in replies)
    out["decline_reasons"] = dict(Counter(why for r in replies for why in r.reasons.values()))
    for k in range(args.repeats):
        t0 = time.perf_counter()
        partials = backend.call("contribute", SumRequest(phase, 1, codec, plan, net if phase == Phase.DPSGD else None))
        steps[f"contribute_s_{k}"] = time.perf_counter() - t0
        mark = worker_cpu(f"contribute_{k}", mark)
        out[f"load_after_contribute_{k}"] = _load()
    t0 = time.perf_counter()
    backend.call("complete", CompleteRequest())
    steps["complete_s"] = time.perf_counter() - t0
    worker_cpu("complete", mark)
    usage = backend.call("usage", None)
    backend.close()
    n_pairs: int = devices * min(8, args.pairs or 8)  # device level: device-batch = 8 pairs each
    flop = 6.0 * params * n_pairs
    if phase == Phase.SUFFSTATS:
        from fed_nessa.data.synthetic import household_counts

        n_pairs = sum(int(household_counts(0, j, pop.speakers_per_device, pop.utts_per_speaker)[1].sum())
                      for s in specs for j in range(s.first, s.stop))
        flop = STATS_FLOP_PER_PAIR * n_pairs
    out.update(steps)
    out["worker_cpu_seconds"] = cpu
    out.update({"accepted": accepted, "sent": sum(p.sent for p in partials), "trainable_parameters": params,
                "pairs_in_round": n_pairs, "dense_flop": flop,
                "workers": usage, "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "load_after": _load()})
    best = min(v for k, v in steps.items() if k.startswith("contribute"))
    out["contribute_best_s"] = best
    out["achieved_gflop_per_s"] = flop / best / 1e9 if flop else None
    if args.through_loop:
        out["loop"] = through_loop(args, cfg, policy, pop, work)
        direct = out["start_s"] + steps["reserve_s"] + steps["complete_s"] + sum(
            v for k, v in steps.items() if k.startswith("contribute"))
        out["loop"]["ratio_total_to_direct"] = out["loop"]["total_s"] / direct
    return out


def through_loop(args: argparse.Namespace, cfg: Any, policy: DevicePolicy, pop: Any, work: Path) -> dict[str, Any]:
    """The same fleet, backend and blocks as one run of the round loop (``BlockEngine``): ``repeats``
    device-level rounds, the span reserved before the first and completed after the last, each round
    evaluated and recorded, the gate and the run folder at the end (no pooled references)."""
    from dataclasses import replace

    from fed_nessa.sim.blocks.engine import BlockEngine, BlockOptions

    loop_cfg = replace(cfg, num_server_rounds=args.repeats, run_dir=str(work / "loop"), references=False)
    t0 = time.perf_counter()
    summary = BlockEngine(loop_cfg, policy, pop, BlockOptions(args.devices_per_block, args.backend, args.ray_address,
                                                             args.cache)).run()
    total = time.perf_counter() - t0
    seconds = [e["seconds"] for e in summary["rounds"]]
    return {"total_s": total, "round_seconds": seconds, "statuses": [e["status"] for e in summary["rounds"]],
            "final_eer": summary["final"]["eer"], "epsilon_max": summary["privacy"]["epsilon_max"],
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_after": _load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round", choices=("device", "stats"), default="device")
    parser.add_argument("--fleet", type=int, default=100_000)
    parser.add_argument("--devices-per-block", type=int, default=50_000)
    parser.add_argument("--only-blocks", type=int, default=0, help="run only this many blocks, spread over the fleet")
    parser.add_argument("--pairs", type=int, default=0, help="pairs per device (0: the default population)")
    parser.add_argument("--cache", action="store_true", help="workers hold their blocks' pairs")
    parser.add_argument("--backend", default="in-process", choices=("in-process", "ray", "auto"))
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--through-loop", action="store_true",
                        help="then run the same rounds through the round loop (BlockEngine) and compare")
    parser.add_argument("--out", default=None, help="append the result to this JSON list")
    args = parser.parse_args()
    if args.through_loop and (args.round != "device" or args.only_blocks):
        parser.error("--through-loop runs device-level rounds over the whole fleet (--round device, no --only-blocks)")
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.out:
        path = Path(args.out)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(rows + [result], indent=1) + "\n")


if __name__ == "__main__":
    main()

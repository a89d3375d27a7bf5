"""Seconds per device-level round of the round maths alone, at 10^4 to 10^6 devices, on CPU or one GPU.

What one device-level round computes for EVERY device (docs/privacy.md "Example-level and
device-level"), timed without ledgers, data loading or evaluation (the engine's bookkeeping
is timed in ``benchmarks/fleet_round.py``):

``fedsgd``
    today's fleet-engine update: each device's mean gradient over ``--pairs`` of its pairs,
    clipped to C as one vector (:func:`fed_nessa.sim.ghost.device_clipped_sum`, the engine's
    fast numerics), summed over devices, plus one Gaussian of the summed noise.
``fedavg``
    the DP-FedAvg update (:func:`fed_nessa.sim.fedavg.fedavg_block_sum`, the engines' fast numerics):
    each device runs ``--local-epochs`` of plain SGD in minibatches of ``--local-batch`` from the
    global aligner, its model delta is clipped to C as one vector, and the deltas are summed;
    ``--update explicit`` (the NESSA net written out, no per-device weight copies) or ``vmap`` (the
    general path: each device's weight copy through ``torch.func``), same inputs.

Pairs are random unit vectors generated on the device from (seed, chunk) into a pool of
``--pool`` chunks before the timing, which the round's chunks cycle through: the arithmetic and the
memory of a round do not depend on the values, 10^6 devices' pairs are never held at once, and the
figure is the round maths alone (``--fresh-pairs`` draws every chunk's pairs inside the timed round,
as before session 9: ``torch.randn`` of 10^5 x 112 pairs was ~24 % of a CPU round).
The FLOP figure is the dense forward+backward count (6 x trainable
parameters x pairs per pass); the ratio to it says how close a round runs to the arithmetic.

    python benchmarks/device_level_round.py --devices 10000 100000 --device cpu
    python benchmarks/device_level_round.py --devices 100000 1000000 --device cuda --out result.json
    python benchmarks/device_level_round.py --algorithms fedavg --devices 100000 --workers 2

``--workers N`` (CPU) runs the round as the engines do on N cores: N forked processes of one thread each
(``fed-nessa simulate`` sets one torch thread per process: one process per core beats intra-op threads), every
worker drawing its own pool before the timing and summing every N-th chunk; the parent adds the N sums and the
noise. The figure is the wall time from the parent's request to the last worker's sum.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fed_nessa.config import from_run_config
from fed_nessa.federated.layout import build_net, trainable
from fed_nessa.sim.fedavg import BlockSteps, clip_deltas, fedavg_block_sum, vmap_deltas
from fed_nessa.sim.ghost import device_clipped_sum

D_X, D_Y = 256, 192  # the synthetic population's enrollment and runtime dimensions
CLIP = 0.1  # the device clip norm, and the summed noise's std


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pairs(n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, D_X, device=device, generator=gen)
    y = torch.randn(n, D_Y, device=device, generator=gen)
    return x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)


class PairPool:
    """Chunks of pairs drawn once (``size`` chunks of ``rows``) and handed out in turn; ``size = 0`` draws each
    chunk fresh when it is asked for (inside the timed round)."""

    def __init__(self, size: int, rows: int, device: torch.device) -> None:
        self.device = device
        self.chunks = [_pairs(rows, device, c) for c in range(size)]

    def take(self, c: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.chunks:
            return _pairs(rows, self.device, c)
        x, y = self.chunks[c % len(self.chunks)]
        return x[:rows], y[:rows]


def _chunks(devices: int, chunk: int, share: tuple[int, int]) -> list[tuple[int, int]]:
    """``(chunk index, first device)`` of the chunks that worker ``share[0]`` of ``share[1]`` sums."""
    return [(c, start) for c, start in enumerate(range(0, devices, chunk)) if c % share[1] == share[0]]


def fedsgd_round(net: nn.Module, devices: int, pairs: int, chunk: int, clip: float,
                 device: torch.device, pool: PairPool, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Sum over the devices of ``share`` (worker ``share[0]`` of ``share[1]``) of their clipped mean gradients
    (the round's noise is added once, by :func:`with_noise`)."""
    params = trainable(net)
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    for c, start in _chunks(devices, chunk, share):
        k = min(chunk, devices - start)
        x, y = pool.take(c, k * pairs)
        seg = torch.arange(k, device=device).repeat_interleave(pairs)
        total += device_clipped_sum(net, x, y, seg, k, clip).double()
    return total


def _equal_steps(k: int, pairs: int, epochs: int, batch: int, device: torch.device, seed: int) -> BlockSteps:
    """The local steps of ``k`` devices of ``pairs`` each, drawn on the device in one call (no padding):
    what :func:`fed_nessa.sim.fedavg.block_steps` builds, without its per-device Python loop."""
    batch = batch if batch > 0 else pairs
    if pairs % batch:
        raise ValueError(f"--local-pairs {pairs} must be a multiple of --local-batch {batch}")
    gen = torch.Generator(device=device).manual_seed(seed)
    orders = torch.rand(k, epochs, pairs, device=device, generator=gen).argsort(dim=-1)
    rows = orders.reshape(k, epochs * pairs // batch, batch)
    return BlockSteps(rows, torch.ones(rows.shape, device=device))


def fedavg_round(net: nn.Module, devices: int, pairs: int, chunk: int, clip: float, device: torch.device,
                 local_epochs: int, lr: float, local_batch: int, pool: PairPool,
                 update: str = "explicit", share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Sum over the devices of ``share`` of their clipped DP-FedAvg deltas (``local_epochs`` of plain SGD in
    minibatches of ``local_batch``, secret row orders): ``explicit``, the engines' fast-numerics call
    (:func:`fed_nessa.sim.fedavg.fedavg_block_sum`, the NESSA net written out); ``vmap``, the general path
    (:func:`fed_nessa.sim.fedavg.vmap_deltas`, per-device weight copies: the update before issue 22's speed-up)."""
    total = torch.zeros(sum(p.numel() for p in trainable(net)), dtype=torch.float64, device=device)
    for c, start in _chunks(devices, chunk, share):
        k = min(chunk, devices - start)
        x, y = pool.take(c, k * pairs)
        x, y = x.view(k, pairs, D_X), y.view(k, pairs, D_Y)
        steps = _equal_steps(k, pairs, local_epochs, local_batch, device, c)
        if update == "vmap":
            total += clip_deltas(vmap_deltas(net, x, y, steps, lr=lr), clip).clipped.double().sum(0)
        else:
            total += fedavg_block_sum(net, x, y, steps, lr=lr, clip_norm=clip).total
    return total


def with_noise(total: torch.Tensor, clip: float) -> torch.Tensor:
    """The round's release: the devices' sum plus one Gaussian of the summed noise (std ``clip``)."""
    return total + torch.randn_like(total) * clip


RoundFn = Callable[[tuple[int, int]], torch.Tensor]


def _worker(conn: Any, make: Callable[[int], RoundFn], share: tuple[int, int]) -> None:
    """One forked worker: one torch thread, its own pool drawn, then a sum per request until told to stop."""
    torch.set_num_threads(1)
    fn = make(share[0])
    conn.send("ready")
    while conn.recv() == "round":
        conn.send(fn(share).numpy())
    conn.close()


class Workers:
    """``n`` forked one-thread processes, each summing every n-th chunk of a round (as the engines run a round
    on n cores); :meth:`round` adds their sums and the noise."""

    def __init__(self, n: int, make: Callable[[int], RoundFn], clip: float) -> None:
        ctx = mp.get_context("fork")
        self.clip, self.conns, self.procs = clip, [], []
        for w in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, make, (w, n)), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("a benchmark worker did not start")

    def sums(self) -> torch.Tensor:
        """The round's sum over every device, no noise."""
        for conn in self.conns:
            conn.send("round")
        total = sum(torch.from_numpy(conn.recv()) for conn in self.conns)
        assert isinstance(total, torch.Tensor)
        return total

    def round(self) -> torch.Tensor:
        return with_noise(self.sums(), self.clip)

    def close(self) -> None:
        for conn in self.conns:
            conn.send("stop")
        for proc in self.procs:
            proc.join()


def _time(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: bool = True) -> list[float]:
    if warmup:
        fn()  # warm-up (kernels, allocator)
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure(devices: int, algorithm: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = from_run_config({"linear-start": args.linear_start, "hidden": args.hidden, "num-devices": max(devices, 3),
                           "min-arrivals": 2, "secagg-quantization-range": 2**8, "privacy-unit": "device",
                           "delta": 0.1 / max(devices, 3)})
    net = build_net(cfg, D_X, D_Y).to(device)
    n_params = sum(p.numel() for p in trainable(net))
    pairs = args.pairs if algorithm == "fedsgd" else args.local_pairs
    chunk = args.chunk if algorithm == "fedsgd" else args.fedavg_chunk
    pool_size = 0 if args.fresh_pairs else min(args.pool, -(-devices // chunk))
    rows = min(chunk, devices) * pairs
    passes = 1 if algorithm == "fedsgd" else args.local_epochs

    def make(_: int) -> RoundFn:
        pool = PairPool(pool_size, rows, device)
        if algorithm == "fedsgd":
            return lambda share: fedsgd_round(net, devices, pairs, chunk, CLIP, device, pool, share)
        return lambda share: fedavg_round(net, devices, pairs, chunk, CLIP, device, args.local_epochs, args.lr,
                                          args.local_batch, pool, args.update, share)

    workers = Workers(args.workers, make, CLIP) if args.workers > 1 else None
    if workers is not None:
        fn: Callable[[], torch.Tensor] = workers.round
    else:
        one = make(0)

        def fn() -> torch.Tensor:
            return with_noise(one((0, 1)), CLIP)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = _time(fn, device, args.repeats, not args.no_warmup)
    finally:
        if workers is not None:
            workers.close()
    flops = 6.0 * n_params * devices * pairs * passes
    med = statistics.median(seconds)
    return {"algorithm": algorithm, "update": args.update if algorithm == "fedavg" else None,
            "linear_start": args.linear_start, "devices": devices, "pairs_per_device": pairs, "local_epochs": passes,
            "trainable_params": n_params, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": 1 if workers is not None else torch.get_num_threads(), "workers": max(args.workers, 1),
            "fresh_pairs": args.fresh_pairs,
            "seconds": [round(s, 4) for s in seconds],
            "median_s": round(med, 4), "dense_gflop": round(flops / 1e9, 1),
            "achieved_tflops": round(flops / med / 1e12, 3),
            "peak_gpu_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                             if device.type == "cuda" else None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10_000])
    p.add_argument("--algorithms", nargs="+", choices=("fedsgd", "fedavg"), default=["fedsgd", "fedavg"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8, help="pairs per device in a FedSGD round (device-batch)")
    p.add_argument("--local-pairs", type=int, default=112, help="pairs per device in a DP-FedAvg round")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-batch", type=int, default=16, help="pairs per local minibatch (0: full batch)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--chunk", type=int, default=16_384, help="devices per FedSGD chunk")
    p.add_argument("--fedavg-chunk", type=int, default=256, help="devices per DP-FedAvg chunk (the engines' block)")
    p.add_argument("--update", choices=("explicit", "vmap"), default="explicit",
                   help="DP-FedAvg: the written-out NESSA update, or the general vmap path (the old one)")
    p.add_argument("--linear-start", choices=("none", "suffstats"), default="none",
                   help="none: the whole net trains; suffstats: the residual only (the linear part frozen)")
    p.add_argument("--pool", type=int, default=8, help="chunks of pairs drawn before the timing, cycled")
    p.add_argument("--fresh-pairs", action="store_true", help="draw every chunk's pairs inside the timed round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=1,
                   help="CPU: forked one-thread processes sharing the chunks, as the engines run (1: in process)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-warmup", action="store_true", help="time the first round too (a 10^5-device CPU round)")
    p.add_argument("--out")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.workers > 1 and (device.type != "cpu" or a.threads):
        p.error("--workers runs one-thread CPU processes: it takes neither --device cuda nor --threads")
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for algorithm in a.algorithms:
        for n in a.devices:
            res = measure(n, algorithm, a, device)
            results.append(res)
            print(json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()

"""EER per round of device-level FedSGD vs DP-FedAvg (fixed and adaptive clip) on a small lazy fleet.

Evidence for the device-level study, not the study: the vectorised round maths
(:mod:`fed_nessa.sim.fedavg` and :func:`fed_nessa.sim.ghost.device_clipped_sum`) driven directly,
without an engine, ledgers or SecAgg+. Every device joins every round (q = 1); the noise of each
released sum is ONE Gaussian draw with the full std the mechanism gives for the delta (g = 1) and,
with adaptive clipping, one for the bit count (:meth:`DeviceLevel.share_std` at the round's clip,
:meth:`DeviceLevel.count_share_std`); sigma is calibrated so all ``--rounds`` spend
``--epsilon`` at delta = 0.1 / N (:func:`fed_nessa.federated.noise_plan.noise_plan`). Every arm
starts from the same NON-DP ridge fit on the first 1,024 devices' pairs as the frozen linear part (a
stand-in for the DP linear start), so the figures compare the DP NESSA rounds' update rules only.
Arms: ``fedsgd`` (today: the mean gradient over device-batch pairs clipped to C, server Adam);
``fedavg`` (one local epoch, minibatches of local-batch, the delta clipped to C, server SGD lr 0.1 with momentum 0.9);
``fedavg-adaptive`` (the same with C following the noisy median of the update norms).

Resumable and bounded: each evaluated round appends one JSON line to ``OUT/rounds.jsonl``, each arm
checkpoints to ``OUT/<arm>.pt``; a rerun continues where it stopped; ``--budget-s`` stops cleanly.

    python benchmarks/device_fedavg_quality.py --devices 3000 --rounds 20 --out results/fedavg-quality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fed_nessa.config import FederationConfig, Phase, from_run_config
from fed_nessa.data.blocks import DeviceBlock
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.lazy_population import LazyPopulation
from fed_nessa.data.population import Scenario
from fed_nessa.evaluation.protocol import evaluate_held_out
from fed_nessa.federated.adaptive_clip import AdaptiveClip
from fed_nessa.federated.layout import build_net, nessa_config, trainable
from fed_nessa.federated.mechanism import BIT_SENSITIVITY, DeviceLevel, device_subset, mechanism_for
from fed_nessa.federated.noise_plan import noise_plan
from fed_nessa.federated.server_optimizers import server_optimizer
from fed_nessa.model.aligners.base import AlignerInfo
from fed_nessa.model.aligners.nessa import NessaAligner, NessaNet
from fed_nessa.sim.fedavg import block_steps, fedavg_block, pad_block
from fed_nessa.sim.ghost import device_clipped_sum

ARMS = ("fedsgd", "fedavg", "fedavg-adaptive")
SCENARIO = "runtime-upgrade"
BLOCK = 512  # devices per vectorised pass
RIDGE_ALPHA = 1e-3  # the start's ridge penalty per pair
SERVER_LR_FEDAVG = 0.1  # server SGD, momentum 0.9: a steady step of ~1 x the mean delta (FedAvg)


def arm_config(arm: str, devices: int, rounds: int, epsilon: float) -> FederationConfig:
    """The run config of one arm (sigma calibrated over ``rounds`` full-participation rounds)."""
    fedavg = arm.startswith("fedavg")
    return from_run_config({
        "privacy-unit": "device", "num-devices": devices, "delta": 0.1 / devices, "epsilon-budget": epsilon,
        "budget-split": 1.0, "linear-start": "none", "num-server-rounds": rounds, "min-arrivals": 2,
        "secagg-quantization-range": 2**8, "device-update": "fedavg" if fedavg else "fedsgd",
        "clip-target-quantile": 0.5 if arm == "fedavg-adaptive" else 0.0,
        "server-optimizer": "sgd" if fedavg else "adam", "server-lr": SERVER_LR_FEDAVG if fedavg else 1e-3})


def round_sum(arm: str, cfg: FederationConfig, net: torch.nn.Module, blocks: list[DeviceBlock], clip: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """The summed clipped updates of every device (pseudo-gradients) and the summed centred bits."""
    total = torch.zeros(sum(p.numel() for p in trainable(net)), dtype=torch.float64)
    bits = 0.0
    for b in blocks:
        sizes = np.diff(b.starts)
        if arm == "fedsgd":
            rows = [b.starts[j] + device_subset(rng.random(n), cfg.device_batch) for j, n in enumerate(sizes)]
            idx = np.concatenate(rows)
            seg = torch.from_numpy(np.repeat(np.arange(len(sizes)), [len(r) for r in rows]))
            total += device_clipped_sum(net, torch.from_numpy(b.x[idx]), torch.from_numpy(b.y[idx]), seg,
                                        len(sizes), clip).double()
            continue
        by_size = np.argsort(sizes, kind="stable")  # similar sizes share a pass: little padding
        for lo in range(0, len(sizes), BLOCK):
            chunk = by_size[lo:lo + BLOCK]
            xs = [b.x[b.starts[j]:b.starts[j + 1]] for j in chunk]
            ys = [b.y[b.starts[j]:b.starts[j + 1]] for j in chunk]
            orders = [[np.argsort(rng.random(len(x)), kind="stable") for _ in range(cfg.local_epochs)] for x in xs]
            x, y = pad_block(xs, ys)
            out = fedavg_block(net, x, y, block_steps(orders, cfg.local_batch), lr=cfg.local_lr, clip_norm=clip)
            total += out.clipped.double().sum(0)
            bits += float(((out.norms <= clip).double() - BIT_SENSITIVITY).sum())
    return total, bits


def start_linear(net: torch.nn.Module, block: DeviceBlock, alpha: float) -> None:
    """A NON-DP ridge fit on the first block's pairs as the linear part, then frozen (as after a linear start).

    It stands in for the DP linear start so every arm refines the same aligner; the comparison
    is of the DP-SGD rounds only.
    """
    y1 = np.hstack([block.y, np.ones((len(block.y), 1), np.float32)]).astype(np.float64)
    coef = np.linalg.solve(y1.T @ y1 + alpha * len(y1) * np.eye(y1.shape[1]), y1.T @ block.x.astype(np.float64))
    nessa = cast(NessaNet, net)
    nessa.set_linear(coef[:-1].T, coef[-1])
    nessa.set_linear_trainable(False)


HeldOut = tuple[EmbeddingSet, Scenario]  # the held-out set and the scenario it is scored in


def eer(net: torch.nn.Module, ev: HeldOut, info: AlignerInfo, cfg: FederationConfig) -> dict[str, float]:
    aligner = NessaAligner(info, nessa_config(cfg))
    aligner.net = net
    report = evaluate_held_out(*ev, {"federated": aligner})
    return {r.name: round(float(r.metrics.eer), 5) for r in report.rows}


def run_arm(arm: str, a: argparse.Namespace, pop: LazyPopulation, blocks: list[DeviceBlock], ev: HeldOut,
            out: Path, deadline: float) -> None:
    cfg = arm_config(arm, pop.num_devices, a.rounds, a.epsilon)
    mech = mechanism_for(cfg)
    assert isinstance(mech, DeviceLevel)
    plan = noise_plan(cfg, pop.num_devices)
    info = AlignerInfo(d_x=blocks[0].x.shape[1], d_y=blocks[0].y.shape[1], enroll_model=pop.enroll_model,
                       runtime_model=pop.runtime_model)
    net = build_net(cfg, info.d_x, info.d_y)
    start_linear(net, blocks[0], RIDGE_ALPHA)
    opt = server_optimizer(cfg.server_optimizer, trainable(net), cfg.server_lr)
    clip, start = AdaptiveClip.from_config(cfg), 1
    ckpt = out / f"{arm}.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        run = {"devices": pop.num_devices, "rounds": a.rounds, "epsilon": a.epsilon, "seed": a.seed}
        if state["run"] != run:  # sigma was calibrated for the stored run: mixing them would misstate epsilon
            raise SystemExit(f"{ckpt}: checkpoint of run {state['run']}, asked for {run}; use another --out")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        clip, start = AdaptiveClip(*state["clip"]), state["round"] + 1
    elif arm == ARMS[0] or not (out / "rounds.jsonl").exists():
        _log(out, {"arm": "linear-start", "round": 0, "eer": eer(net, ev, info, cfg)})
    noise = np.random.default_rng([a.seed, ARMS.index(arm)])
    for t in range(start, a.rounds + 1):
        if time.monotonic() > deadline:
            print(f"{arm}: budget spent before round {t}; rerun to continue", flush=True)
            return
        t0 = time.perf_counter()
        c = clip.clip if cfg.clip_target_quantile > 0 else cfg.device_clip_norm
        total, bits = round_sum(arm, cfg, net, blocks, c, np.random.default_rng([a.seed, t, ARMS.index(arm)]))
        std = mech.share_std(Phase.DPSGD, plan, 1, c)
        total += torch.from_numpy(noise.normal(0.0, std, total.shape))
        bits += float(noise.normal(0.0, mech.count_share_std(1, pop.num_devices))) if mech.adaptive else 0.0
        mean = (total / pop.num_devices).float()
        offset = 0
        for p in trainable(net):
            p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if mech.adaptive:
            clip = clip.next(bits, pop.num_devices)
        row: dict[str, Any] = {"arm": arm, "round": t, "clip": round(c, 5), "round_s": round(seconds, 2),
                               "sigma": round(plan.dpsgd_sigma, 4), "delta_sigma": round(mech.delta_sigma(
                                   plan, pop.num_devices), 4)}
        if t % a.eval_every == 0 or t == a.rounds:
            row["eer"] = eer(net, ev, info, cfg)
        _log(out, row)
        torch.save({"run": {"devices": pop.num_devices, "rounds": a.rounds, "epsilon": a.epsilon, "seed": a.seed},
                    "net": net.state_dict(), "opt": opt.state_dict(), "round": t,
                    "clip": (clip.clip, clip.quantile, clip.lr)}, ckpt)


def _log(out: Path, row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    with (out / "rounds.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=840.0, help="stop (resumably) after this many seconds")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    deadline = time.monotonic() + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pop = LazyPopulation.create(a.devices, seed=a.seed, scenario=SCENARIO)
    blocks = list(pop.blocks(1024))
    ev = pop.eval_set(), Scenario(pop.enroll_model, pop.runtime_model, SCENARIO)
    for arm in a.arms:
        run_arm(arm, a, pop, blocks, ev, out, deadline)


if __name__ == "__main__":
    main()

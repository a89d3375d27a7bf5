"""What one federated round computes on each side, independent of the transport.

The Flower apps (``client/``, ``server/``) move vectors; this module decides
what the vectors are and what guarantee each carries. Phases:

``suffstats`` (the private linear start, one round)
    Each device sends its weighted sufficient statistics of L2-normalised
    pairs (:mod:`fed_nessa.suffstats`: the augmented Gram matrix and the cross
    products, half of the symmetric block) plus Gaussian noise. Adding or
    removing one pair changes that vector by at most 1 in L2, the sensitivity
    the noise is calibrated to. The server solves ridge from the (noisy) sum.

``dpsgd`` (training the residual branch, every later round)
    ``local`` mode: each device runs Opacus DP-SGD (per-example clipping,
    full Gaussian noise, Poisson sampling) for ``local_epochs`` and sends its
    weight delta. The guarantee holds even if SecAgg+ is broken.
    ``distributed`` mode: each device sends ONE sum of per-example clipped
    gradients of a Poisson sample, plus a noise *share* of std
    ``sigma * C / sqrt(g)``, where ``g = guaranteed_arrivals(cohort)`` =
    max(min-arrivals, ceil(min-arrival-fraction * cohort size)). The server
    releases no sum of fewer than ``g`` devices, so the released noise std is
    at least ``sigma * C``: one Poisson-subsampled Gaussian step per round for
    every device's data. Calibrating to the round's cohort (not to the global
    minimum) keeps the noise of a 1000-device round near what the guarantee needs.
    The server applies the aggregated gradient with SGD + momentum (post-processing).

A device's events are reserved in its ledger before a mechanism runs and
completed after, so a crash can never hide a spend. Nothing derived from the
data leaves a device except the vector and its epsilon spent.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fed_nessa.aligners.base import AlignerInfo
from fed_nessa import suffstats
from fed_nessa.aligners.nessa import NessaAligner, NessaConfig, NessaNet
from fed_nessa.privacy.events import DISTRIBUTED, DP_SGD, GAUSSIAN_SUM, LOCAL, DPEvent
from fed_nessa.shards import Shard
from fed_nessa.training import DPConfig, TrainConfig, dp_sample_rate, dp_steps, train_local

SUFFSTATS = "suffstats"
DPSGD = "dpsgd"
#: L2 sensitivity of the sufficient-statistics vector to one pair.
SUFFSTATS_SENSITIVITY = suffstats.SENSITIVITY
#: Noise shares are bounded at this many standard deviations when sizing SecAgg+'s range.
PAYLOAD_SIGMAS = 12.0


class RoundConfig(Protocol):
    """The fields of :class:`fed_nessa.config.FederationConfig` a round needs."""

    num_server_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    server_lr: float
    dp_mode: str
    noise_multiplier: float
    clip_norm: float
    delta: float
    epsilon_budget: float
    linear_start: str
    suffstats_noise_multiplier: float
    ridge_alpha: float
    update_clip: float
    min_arrivals: int
    seed: int
    hidden: int
    depth: int


@dataclass(frozen=True)
class ClientOutcome:
    """A device's reply: its contribution to the secure sum, or a decline with its reason."""

    status: str  # "ok" | "declined"
    vector: np.ndarray | None
    metrics: dict[str, float | int | str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- model layout
def nessa_config(cfg: RoundConfig) -> NessaConfig:
    """The architecture every party builds.

    After a private linear start the linear part stays frozen (DP noise grows
    with what is trained); without one it must be learned by DP-SGD.
    """
    train_linear = bool(getattr(cfg, "train_linear", False)) or cfg.linear_start == "none"
    return NessaConfig(hidden=cfg.hidden, depth=cfg.depth, train_linear=train_linear,
                       ridge_alpha=cfg.ridge_alpha)


def build_net(cfg: RoundConfig, d_x: int, d_y: int) -> NessaNet:
    return NessaNet(d_y, d_x, nessa_config(cfg), seed=cfg.seed)  # identical on every party


def trainable(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def flat(params: list[torch.Tensor]) -> np.ndarray:
    if not params:
        return np.zeros(0, np.float32)
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float32)


@torch.no_grad()
def load_flat(params: list[torch.Tensor], vector: np.ndarray) -> None:
    total = sum(p.numel() for p in params)
    if vector.shape != (total,):
        raise ValueError(f"global model vector has {vector.size} values, expected {total}")
    offset = 0
    for p in params:
        p.copy_(torch.from_numpy(vector[offset:offset + p.numel()]).view_as(p))
        offset += p.numel()


# ----------------------------------------------------------------------------- planning
def _is_distributed(cfg: RoundConfig) -> bool:
    return cfg.dp_mode == DISTRIBUTED


def planned_event(phase: str, n: int, cfg: RoundConfig, round_num: int) -> DPEvent | None:
    """The DP event a device with ``n`` pairs would spend in this round (None without DP)."""
    if cfg.dp_mode == "none":
        return None
    mode = DISTRIBUTED if _is_distributed(cfg) else LOCAL
    if phase == SUFFSTATS:
        return DPEvent(round=round_num, mechanism=GAUSSIAN_SUM, steps=1, sample_rate=1.0,
                       noise_multiplier=cfg.suffstats_noise_multiplier, clip_norm=SUFFSTATS_SENSITIVITY,
                       delta=cfg.delta, mode=mode, note="sufficient statistics of unit-norm pairs")
    if phase != DPSGD:
        raise ValueError(f"unknown phase {phase!r}")
    q = dp_sample_rate(n, cfg.batch_size)
    steps = 1 if _is_distributed(cfg) else dp_steps(n, cfg.batch_size, cfg.local_epochs)
    note = ("one clipped-gradient sum per round; noise share sigma/sqrt(min_arrivals)"
            if _is_distributed(cfg) else "Opacus DP-SGD, full noise on the device")
    return DPEvent(round=round_num, mechanism=DP_SGD, steps=steps, sample_rate=q,
                   noise_multiplier=cfg.noise_multiplier, clip_norm=cfg.clip_norm, delta=cfg.delta,
                   mode=mode, note=note)


def plan_round(phase: str, shard: Shard, cfg: RoundConfig, round_num: int, ledger: Any) -> ClientOutcome:
    """Budget check only: would this round take the device over epsilon_budget at delta?"""
    event = planned_event(phase, shard.n, cfg, round_num)
    if event is None:
        return ClientOutcome("ok", None, {"epsilon_spent": 0.0})
    decision = ledger.check_budget(event, cfg.epsilon_budget, cfg.delta)
    metrics: dict[str, float | int | str] = {
        "epsilon_spent": float(decision.epsilon_now), "epsilon_if_run": float(decision.epsilon_if_run)}
    if not decision.allowed:
        metrics["reason"] = decision.reason
        return ClientOutcome("declined", None, metrics)
    return ClientOutcome("ok", None, metrics)


# ----------------------------------------------------------------------------- client side
def _device_seed(cfg: RoundConfig, round_num: int, shard: Shard) -> int:
    """A per-device, per-round seed (simulation reproducibility; secure_rng for production)."""
    digest = hashlib.sha256(f"{cfg.seed}:{round_num}:{shard.n}:{shard.enroll[0, :4].tobytes().hex()}".encode())
    return int.from_bytes(digest.digest()[:4], "little")


def guaranteed_arrivals(cfg: RoundConfig, cohort_size: int | None) -> int:
    """Devices a released sum must contain: the server refuses to release fewer (distributed DP)."""
    if not cohort_size:
        return int(cfg.min_arrivals)
    fraction = float(getattr(cfg, "min_arrival_fraction", 0.0))
    return max(int(cfg.min_arrivals), math.ceil(fraction * cohort_size))


def _noise_std(cfg: RoundConfig, sigma: float, sensitivity: float, cohort_size: int | None = None) -> float:
    """This device's share of the noise: all of it locally, 1/sqrt(g) of the variance distributed."""
    share = 1.0 / math.sqrt(guaranteed_arrivals(cfg, cohort_size)) if _is_distributed(cfg) else 1.0
    return sigma * sensitivity * share


def suffstats_vector(shard: Shard) -> np.ndarray:
    """The un-noised statistics of one device (unit-norm rows bound every pair's contribution)."""
    return suffstats.device_vector(shard.enroll, shard.runtime)


def _client_suffstats(shard: Shard, cfg: RoundConfig, rng: np.random.Generator,
                      cohort_size: int | None) -> np.ndarray:
    vec = suffstats_vector(shard)
    if cfg.dp_mode != "none":
        std = _noise_std(cfg, cfg.suffstats_noise_multiplier, SUFFSTATS_SENSITIVITY, cohort_size)
        vec = vec + rng.normal(0.0, std, vec.shape)
    return vec.astype(np.float32)


def _client_local_dpsgd(net: NessaNet, shard: Shard, cfg: RoundConfig, seed: int) -> np.ndarray:
    before = flat(trainable(net))
    dp = None if cfg.dp_mode == "none" else DPConfig(cfg.noise_multiplier, cfg.clip_norm)
    train_cfg = TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
    train_local(net, shard.enroll, shard.runtime, train_cfg, dp)
    delta = flat(trainable(net)) - before
    norm = float(np.linalg.norm(delta))
    if norm > cfg.update_clip:  # bounds SecAgg+'s range; not a privacy mechanism
        delta *= cfg.update_clip / norm
    return delta


def _client_distributed_grad(net: NessaNet, shard: Shard, cfg: RoundConfig, seed: int,
                             cohort_size: int | None) -> np.ndarray:
    """One Poisson-sampled sum of per-example clipped gradients plus this device's noise share.

    Clipping and per-example gradients go through Opacus' DPOptimizer with the
    noise *share* as its noise multiplier; its output gradient times the
    expected batch size is exactly ``sum(clipped grads) + N(0, share^2 C^2)``.
    """
    from fed_nessa.training import noisy_gradient_sum

    share_sigma = cfg.noise_multiplier / math.sqrt(guaranteed_arrivals(cfg, cohort_size))
    return noisy_gradient_sum(net, shard.enroll, shard.runtime, batch_size=cfg.batch_size,
                              noise_multiplier=share_sigma, max_grad_norm=cfg.clip_norm, seed=seed)


def client_round(phase: str, shard: Shard, global_vector: np.ndarray, cfg: RoundConfig, round_num: int,
                 ledger: Any, cohort_size: int | None = None) -> ClientOutcome:
    """Compute this device's contribution, spending (and recording) privacy only if the budget allows."""
    plan = plan_round(phase, shard, cfg, round_num, ledger)
    if plan.status != "ok":
        return plan
    event = planned_event(phase, shard.n, cfg, round_num)
    seq = ledger.reserve(event) if event is not None else None
    seed = _device_seed(cfg, round_num, shard)
    try:
        vector = _compute(phase, shard, global_vector, cfg, seed, cohort_size)
    except BaseException:
        if seq is not None:
            ledger.complete(seq, float(ledger.epsilon(cfg.delta)), status="failed")
        raise
    metrics: dict[str, float | int | str] = {"epsilon_spent": 0.0}
    if seq is not None:
        eps = float(ledger.epsilon(cfg.delta))
        ledger.complete(seq, eps, status="done")
        metrics["epsilon_spent"] = eps
    return ClientOutcome("ok", vector, metrics)


def _compute(phase: str, shard: Shard, global_vector: np.ndarray, cfg: RoundConfig, seed: int,
             cohort_size: int | None = None) -> np.ndarray:
    if phase == SUFFSTATS:
        return _client_suffstats(shard, cfg, np.random.default_rng(seed), cohort_size)
    net = build_net(cfg, shard.d_x, shard.d_y)
    load_flat(list(net.parameters()), np.asarray(global_vector, np.float32))
    if _is_distributed(cfg):
        return _client_distributed_grad(net, shard, cfg, seed, cohort_size)
    return _client_local_dpsgd(net, shard, cfg, seed)


# ----------------------------------------------------------------------------- server side
class ServerModel:
    """The global aligner and the server's optimiser state, advanced one aggregate at a time."""

    def __init__(self, cfg: RoundConfig, d_x: int, d_y: int, enroll_model: str, runtime_model: str) -> None:
        self.cfg, self.d_x, self.d_y = cfg, d_x, d_y
        self.info = AlignerInfo(d_x=d_x, d_y=d_y, enroll_model=enroll_model, runtime_model=runtime_model)
        self.net = build_net(cfg, d_x, d_y)
        # Plain SGD with momentum on the noisy aggregate: Adam's per-coordinate normalisation turns
        # noise-dominated coordinates into full-size steps and wrecks the private linear start.
        self.opt = torch.optim.SGD(trainable(self.net), lr=cfg.server_lr, momentum=0.9)
        self.completed: list[str] = []
        self.stats_sum: np.ndarray | None = None  # accumulated (noisy) sufficient statistics
        self.stats_devices = 0
        self.stats_noise_var = 0.0  # per-entry noise variance in stats_sum (public: from the protocol)

    @classmethod
    def create(cls, cfg: RoundConfig, d_x: int, d_y: int, enroll_model: str, runtime_model: str) -> ServerModel:
        return cls(cfg, d_x, d_y, enroll_model, runtime_model)

    def phases(self) -> list[str]:
        """One phase per server round; the private linear start (if any) is round 1."""
        rounds = self.cfg.num_server_rounds
        if self.cfg.linear_start == SUFFSTATS:
            k = int(getattr(self.cfg, "suffstats_rounds", 1))
            return [SUFFSTATS] * k + [DPSGD] * (rounds - k)
        return [DPSGD] * rounds

    def vector(self) -> np.ndarray:
        return flat(list(self.net.parameters()))

    def guaranteed_arrivals(self, cohort_size: int) -> int:
        """The fewest devices whose sum the server may release for a cohort of this size."""
        return guaranteed_arrivals(self.cfg, cohort_size)

    def payload_bound(self, phase: str) -> float:
        """Largest |coordinate| an honest device's vector can have (sizes SecAgg+'s range)."""
        if phase == SUFFSTATS:
            noise = 0.0 if self.cfg.dp_mode == "none" else PAYLOAD_SIGMAS * _noise_std(
                self.cfg, self.cfg.suffstats_noise_multiplier, SUFFSTATS_SENSITIVITY)
            return float(getattr(self.cfg, "max_pairs_per_device", 1_000)) + noise
        if _is_distributed(self.cfg):
            noise = PAYLOAD_SIGMAS * _noise_std(self.cfg, self.cfg.noise_multiplier, self.cfg.clip_norm)
            return self.cfg.clip_norm * 4 * self.cfg.batch_size + noise
        return float(self.cfg.update_clip)

    def apply(self, phase: str, aggregate_sum: np.ndarray, n_arrived: int, cohort_size: int | None = None,
              quantization_std: float = 0.0) -> None:
        """Advance the model by one released sum.

        ``quantization_std`` (SecAgg+'s per-device rounding error, public from the codec) is
        noise in the sum like the DP noise: the statistics solve floors it the same way, or a
        small non-DP fleet would invert rounding noise in the Gram matrix's weak directions.
        """
        if n_arrived < 1:
            raise ValueError("no device contributed to the aggregate")
        if phase == SUFFSTATS:
            vec = np.asarray(aggregate_sum, np.float64)
            self.stats_sum = vec if self.stats_sum is None else self.stats_sum + vec
            self.stats_devices += n_arrived
            self.stats_noise_var += n_arrived * quantization_std ** 2
            if self.cfg.dp_mode != "none":
                share = _noise_std(self.cfg, self.cfg.suffstats_noise_multiplier, SUFFSTATS_SENSITIVITY, cohort_size)
                self.stats_noise_var += n_arrived * share ** 2
            gram, cross = suffstats.unpack(self.stats_sum, self.d_x, self.d_y)
            W, b = suffstats.solve(gram, cross, nessa_config(self.cfg).ridge_alpha,
                                   noise_std=math.sqrt(self.stats_noise_var))
            self.net.set_linear(W, b)
        elif _is_distributed(self.cfg):
            self._apply_gradient(np.asarray(aggregate_sum, np.float32), n_arrived)
        else:
            params = trainable(self.net)
            mean = np.asarray(aggregate_sum, np.float32) / n_arrived
            load_flat(params, flat(params) + self.cfg.server_lr * mean)
        self.completed.append(phase)

    def _apply_gradient(self, grad_sum: np.ndarray, n_arrived: int) -> None:
        params = trainable(self.net)
        offset = 0
        g = torch.from_numpy(grad_sum / max(n_arrived * self.cfg.batch_size, 1))
        for p in params:
            p.grad = g[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # -- persistence / evaluation ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "completed": list(self.completed),
                "stats_sum": None if self.stats_sum is None else torch.from_numpy(self.stats_sum),
                "stats_devices": self.stats_devices, "stats_noise_var": self.stats_noise_var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.completed = list(state["completed"])
        stats = state.get("stats_sum")
        self.stats_sum = None if stats is None else torch.as_tensor(stats).numpy().astype(np.float64)
        self.stats_devices = int(state.get("stats_devices", 0))
        self.stats_noise_var = float(state.get("stats_noise_var", 0.0))

    def comparator(self) -> NessaAligner:
        aligner = NessaAligner(self.info, nessa_config(self.cfg))
        aligner.net = self.net
        return aligner

    def save_artifact(self, out_dir: Path, card_extra: dict[str, Any]) -> None:
        from fed_nessa.artifacts import ONNX_FILE, check_onnx_matches, export_onnx

        aligner = self.comparator()
        aligner.info.training.update(card_extra)
        out_dir = Path(out_dir)
        aligner.save(out_dir)
        head = aligner.head()
        export_onnx(head, self.d_y, out_dir / ONNX_FILE)
        check_onnx_matches(head, out_dir / ONNX_FILE, self.d_y)

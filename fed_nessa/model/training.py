"""The one local-training function: plain Adam or DP-SGD (Opacus), centrally and on devices.

Centralised reference training and the federated client call the same
:func:`train_local`, so "the cost of privacy" measured centrally is the cost of
exactly the code that runs on devices.

DP-SGD here is Opacus' per-example clipping (``GradSampleModule``), Gaussian
noise (``DPOptimizer``) and Poisson sampling (``DPDataLoader``). A Poisson batch
may be empty; the step is still taken (zero gradient plus noise), because the
accountant assumes every step releases a noised gradient. Every parameter with
``requires_grad`` is trained; freeze what DP should not touch before calling.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fed_nessa.model.losses import get_loss
from fed_nessa.randomness import NoiseSource, SecureNoise

# Opacus' hooks on a frozen-input model trigger this torch warning on every backward; it is expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (independent of privacy)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "cosine"
    optimizer: str = "adam"  # "adam" | "sgd"
    seed: int = 0
    patience: int = 5  # epochs without validation improvement before stopping (non-DP only)
    input_noise: float = 0.0  # std of Gaussian noise added to runtime inputs (per-example augmentation)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive finite number"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.optimizer in ("adam", "sgd"), "optimizer must be 'adam' or 'sgd'"),
            (self.patience >= 1, "patience must be >= 1"),
            (self.input_noise >= 0, "input_noise must be >= 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid training config: " + "; ".join(bad))
        get_loss(self.loss)


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings. ``noise_multiplier`` is the std of the noise this call adds / clip norm."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"  # Opacus: "hooks" | "functorch" | "ew"
    #: where the Gaussian noise and the Poisson sample come from; None: the OS CSPRNG
    noise: NoiseSource | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("noise_multiplier must be a finite number >= 0")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError("max_grad_norm must be a positive finite number")
        if self.grad_sample_mode not in ("hooks", "functorch", "ew"):
            raise ValueError("grad_sample_mode must be one of hooks, functorch, ew")


@dataclass
class TrainResult:
    """What happened: enough to write a DP ledger event (steps, rate, sigma, clip)."""

    steps: int
    epochs_run: int
    sample_rate: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    train_loss: float
    best_val_loss: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PairLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pair_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Per-example loss of a model; models with their own ``pair_loss`` (shared space) use it."""
    custom = getattr(model, "pair_loss", None)
    if custom is not None:
        return custom(x, y, get_loss(loss_name))
    return get_loss(loss_name)(model(y), x)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _tensors(enroll: np.ndarray, runtime: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(enroll, dtype=np.float32))
    y = torch.as_tensor(np.asarray(runtime, dtype=np.float32))
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need the same number (>= 1) of enroll and runtime rows, got {x.shape[0]}, {y.shape[0]}")
    return x, y


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.0)


def _augment(y: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    if std <= 0:
        return y
    return y + std * torch.randn(y.shape, generator=gen)


class Validator(Protocol):
    """Scores a model on held-out *train-side* speakers (lower is better); never on test data.

    A Protocol so callers inject their own metric (e.g.
    ``fed_nessa.evaluation.validators.EERValidator``) and training never imports
    the evaluation package: ``model`` stays below ``evaluation`` in the layering.
    """

    def __call__(self, model: nn.Module) -> float: ...


@dataclass(frozen=True)
class LossValidator:
    """Mean per-example loss on validation pairs."""

    enroll: np.ndarray
    runtime: np.ndarray
    loss: str = "cosine"

    def __call__(self, model: nn.Module) -> float:
        return evaluate_loss(model, self.enroll, self.runtime, self.loss)


@torch.no_grad()
def evaluate_loss(model: nn.Module, enroll: np.ndarray, runtime: np.ndarray, loss: str = "cosine") -> float:
    """Mean per-example loss (used for early stopping on held-out train-side speakers)."""
    model.eval()
    x, y = _tensors(enroll, runtime)
    value = float(pair_loss(model, x, y, loss).mean())
    model.train()
    return value


def train_local(
    model: nn.Module,
    enroll: np.ndarray,
    runtime: np.ndarray,
    cfg: TrainConfig,
    dp: DPConfig | None = None,
    *,
    val: Validator | tuple[np.ndarray, np.ndarray] | None = None,
    max_steps: int | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on pairs; DP-SGD through Opacus when ``dp`` is given.

    Non-DP runs may early-stop on ``val`` (a :class:`Validator`, or pairs of
    held-out *train-side* speakers scored by loss) and restore the best
    weights; the starting point counts as a candidate, so a model started from
    ridge never ends worse than ridge on validation. DP runs train a fixed
    number of steps: stopping on data would be a further data-dependent release.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters")
    x, y = _tensors(enroll, runtime)
    gen = seed_everything(cfg.seed)
    if isinstance(val, tuple):
        val = LossValidator(val[0], val[1], cfg.loss)
    if dp is None:
        return _train_plain(model, x, y, cfg, gen, val, max_steps, on_epoch)
    return _train_dp(model, x, y, cfg, dp, gen, max_steps, on_epoch)


def _train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 gen: torch.Generator, val: Validator | None, max_steps: int | None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    n, bs = x.shape[0], min(cfg.batch_size, x.shape[0])
    steps, best, best_state, bad_epochs, history = 0, math.inf, None, 0, []
    if val is not None:
        best, best_state = val(model), copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "val": best})
    model.train()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            loss = pair_loss(model, x[idx], _augment(y[idx], cfg.input_noise, gen), cfg.loss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        record = {"epoch": epoch, "train_loss": total / n}
        if val is not None:
            vloss = val(model)
            record["val"] = vloss
            if vloss < best - 1e-6:
                best, best_state, bad_epochs = vloss, copy.deepcopy(model.state_dict()), 0
            else:
                bad_epochs += 1
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if (val is not None and bad_epochs >= cfg.patience) or (max_steps is not None and steps >= max_steps):
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(steps=steps, epochs_run=epoch, sample_rate=min(1.0, bs / n), noise_multiplier=None,
                       max_grad_norm=None, train_loss=history[-1]["train_loss"],
                       best_val_loss=None if val is None else best, history=history)


def dp_sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate ``q = 1 / ceil(n / B)`` (Opacus' convention: 1 / batches per epoch).

    The expected batch is at most ``B``. Taking ``q`` from the grid {1, 1/2, 1/3, ...}
    rather than ``B / n`` leaks nothing new (``q`` is chosen before sampling) and
    lets a fleet share accountant curves: devices with similar sizes get the same
    ``q``, so epsilon is computed once per distinct (q, sigma), not once per device.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return 1.0 / math.ceil(n / batch_size)


def dp_steps(n: int, batch_size: int, epochs: int) -> int:
    """Number of DP-SGD steps ``train_local`` takes: ``epochs`` passes of 1/q steps each."""
    return epochs * math.ceil(n / batch_size)


def _train_dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, dp: DPConfig,
              gen: torch.Generator, max_steps: int | None,
              on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    from opacus import GradSampleModule

    n = x.shape[0]
    q = dp_sample_rate(n, cfg.batch_size)
    steps_total = dp_steps(n, cfg.batch_size, cfg.epochs)
    if max_steps is not None:
        steps_total = min(steps_total, max_steps)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True,
                           force_functorch=dp.grad_sample_mode == "functorch")
    inner = _optimizer([p for p in gsm.parameters() if p.requires_grad], cfg)
    expected = max(1, round(q * n))
    noise = dp.noise if dp.noise is not None else SecureNoise()
    opt = _dp_optimizer(inner, dp.noise_multiplier, dp.max_grad_norm, expected, noise)
    gsm.train()
    history, total, count = [], 0.0, 0
    per_epoch = math.ceil(n / cfg.batch_size)
    for step in range(steps_total):
        mask = torch.from_numpy(noise.uniform(n) < q)  # secret Poisson sample: each pair independently
        idx = mask.nonzero(as_tuple=True)[0]
        opt.zero_grad(set_to_none=True)
        if len(idx) > 0:
            per_ex = pair_loss(gsm._module, x[idx], _augment(y[idx], cfg.input_noise, gen), cfg.loss)
            # Sum reduction: the step uses sum(clipped grads) + N(0, (sigma C)^2), never divided by the
            # realised batch size (that would make the noise scale data-dependent).
            per_ex.sum().backward()
            total += float(per_ex.detach().sum())
            count += len(idx)
        else:
            _empty_batch_grads(gsm)
        opt.step()
        for p in gsm.parameters():
            if p.grad is not None:
                p.grad = None
        if (step + 1) % per_epoch == 0 or step + 1 == steps_total:
            history.append({"step": step + 1, "train_loss": total / max(count, 1)})
            if on_epoch is not None:
                on_epoch(history[-1])
    _detach_opacus(gsm)
    return TrainResult(steps=steps_total, epochs_run=math.ceil(steps_total / per_epoch), sample_rate=q,
                       noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                       train_loss=history[-1]["train_loss"] if history else float("nan"), history=history)


def _empty_batch_grads(gsm: nn.Module) -> None:
    """An empty Poisson batch still releases a noised (zero) gradient: give Opacus zero per-sample grads."""
    for p in gsm.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]  # Opacus' field


def _detach_opacus(gsm: Any) -> None:
    """Remove Opacus hooks so the same model object can be trained again (next round)."""
    gsm._close()
    for p in gsm._module.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter"):
            if hasattr(p, attr):
                delattr(p, attr)


def noisy_gradient_sum(model: nn.Module, enroll: np.ndarray, runtime: np.ndarray, *, batch_size: int,
                       noise_multiplier: float, max_grad_norm: float, noise: NoiseSource | None = None,
                       loss: str = "cosine", sample_rate: float | None = None) -> np.ndarray:
    """``sum_i clip(grad_i) + N(0, (noise_multiplier * C)^2 I)`` over a Poisson sample.

    The rate is ``sample_rate`` when given (device-local, decoupled from the batch size),
    else ``1/ceil(n/B)``.

    The distributed-DP contribution of one device: Opacus clips per example and
    the noise share comes from ``noise`` (default: the OS CSPRNG), as does the secret
    Poisson sample; with sum reduction and an expected batch size of 1 the output
    gradient is exactly the noisy clipped sum. An empty sample still returns the noise share.
    """
    from opacus import GradSampleModule

    x, y = _tensors(enroll, runtime)
    stream = noise if noise is not None else SecureNoise()
    n = x.shape[0]
    q = dp_sample_rate(n, batch_size) if sample_rate is None else float(sample_rate)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = _dp_optimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier, max_grad_norm, 1, stream)
    opt.zero_grad(set_to_none=True)
    idx = torch.from_numpy(stream.uniform(n) < q).nonzero(as_tuple=True)[0]
    if len(idx) > 0:
        pair_loss(gsm._module, x[idx], y[idx], loss).sum().backward()
    else:
        _empty_batch_grads(gsm)
    if not opt.pre_step():  # clip + accumulate + noise, without the parameter update
        raise RuntimeError("Opacus skipped the noise step")
    grad = torch.cat([p.grad.reshape(-1) for p in params]).detach().numpy().astype(np.float32)
    _detach_opacus(gsm)
    return grad


#: Opacus' guard in its clip factor ``C / (norm + 1e-6)``; the device-level clip uses the same.
CLIP_GUARD = 1e-6


def device_clip_factor(norm: float | np.ndarray | torch.Tensor, clip_norm: float) -> Any:
    """``min(1, C / (norm + 1e-6))``: how much a device-level update is scaled down."""
    if isinstance(norm, torch.Tensor):
        return (clip_norm / (norm + CLIP_GUARD)).clamp(max=1.0)
    return np.minimum(1.0, clip_norm / (np.asarray(norm, np.float64) + CLIP_GUARD))


def device_update(model: nn.Module, enroll: np.ndarray, runtime: np.ndarray, *, clip_norm: float,
                  noise_std: float, noise: NoiseSource | None = None, loss: str = "cosine") -> np.ndarray:
    """A device's whole round contribution at device level: ``clip(mean_i grad_i) + N(0, std^2 I)``.

    The mean gradient over ALL the device's pairs (no sampling: the device-level guarantee
    claims no amplification) is clipped as one vector to ``clip_norm``, so adding or removing
    the whole device moves the released sum by at most ``clip_norm``. The noise share is one
    Gaussian per trainable parameter tensor in order, drawn from ``noise`` (default: the OS CSPRNG).
    """
    x, y = _tensors(enroll, runtime)
    stream = noise if noise is not None else SecureNoise()
    params = [p for p in model.parameters() if p.requires_grad]
    if x.shape[0] > 0:
        grads = torch.autograd.grad(pair_loss(model, x, y, loss).mean(), params)
        flat = torch.cat([g.reshape(-1) for g in grads]).detach().double()
        flat = flat * device_clip_factor(torch.linalg.vector_norm(flat), clip_norm)
    else:
        flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    return with_noise_share(flat.numpy(), params, noise_std, stream)


def with_noise_share(vector: np.ndarray, params: list[nn.Parameter], std: float, noise: NoiseSource) -> np.ndarray:
    """``vector + N(0, std^2 I)`` as float32, the Gaussian drawn one trainable tensor at a time, in order.

    The one draw order of a device-level share (FedSGD and DP-FedAvg alike), which the fleet
    engine's exact numerics reproduce.
    """
    if std > 0:
        vector = vector + np.concatenate([np.asarray(noise.normal(tuple(p.shape), std)).reshape(-1) for p in params])
    return np.asarray(vector, dtype=np.float32)


def _dp_optimizer(inner: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float,
                  expected_batch_size: int, noise: NoiseSource) -> Any:
    """Opacus' DPOptimizer (clipping, accumulation) with its Gaussian drawn from ``noise``.

    Opacus seeds a torch generator (64 bits at most) or needs an extra package for
    secure mode; the noise stream here is the OS CSPRNG unless a simulation asked for
    reproducible noise (docs/privacy.md), so only ``add_noise`` is replaced.
    """
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class _StreamNoiseDPOptimizer(DPOptimizer):
        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                z = torch.from_numpy(noise.normal(tuple(p.summed_grad.shape), std)).to(p.summed_grad.dtype)
                p.grad = (p.summed_grad + z).view_as(p)
                _mark_as_processed(p.summed_grad)

    return _StreamNoiseDPOptimizer(inner, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                   expected_batch_size=expected_batch_size, loss_reduction="sum")


# ----------------------------------------------------------------------------- DP-FedAvg at device level
def local_minibatches(orders: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """The local SGD steps of one device: each epoch's row order cut into minibatches of ``batch`` (0: all).

    ``orders`` holds one permutation of the device's rows per local epoch (drawn by the caller from
    the device's noise stream, so the vectorised engine can reproduce them); the last minibatch of
    an epoch may be short.
    """
    steps: list[np.ndarray] = []
    for order in orders:
        size = len(order) if batch <= 0 else batch
        steps.extend(order[s:s + size] for s in range(0, len(order), size))
    return steps


def fedavg_delta(model: nn.Module, enroll: np.ndarray, runtime: np.ndarray, *, orders: list[np.ndarray],
                 batch: int, lr: float, clip_norm: float, weight: float = 1.0,
                 loss: str = "cosine") -> tuple[torch.Tensor, float]:
    """DP-FedAvg's device update (McMahan et al. 2018) before noise: ``(w clip(start - end), ||start - end||)``.

    Plain SGD at ``lr`` over :func:`local_minibatches` of the device's own pairs, from ``model``'s
    weights (left unchanged), then the model difference clipped as ONE vector to ``clip_norm``, so
    adding or removing the whole device moves the released sum by at most ``clip_norm`` whatever
    the local steps did. The sign is the pseudo-gradient's (start minus end), so the server's
    optimiser applies the mean as a gradient (FedOpt); the unclipped norm is returned for the
    adaptive clip's bit. ``weight`` w <= 1 (``DeviceLevel.update_weight``) scales the clipped delta, so the
    bound stays ``clip_norm``. float32 steps, float64 result.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"a device's update weight must lie in [0, 1] (else it widens the sum's bound), got {weight}")
    x, y = _tensors(enroll, runtime)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    try:
        for rows in local_minibatches(orders, batch):
            idx = torch.as_tensor(rows, dtype=torch.long)
            grads = torch.autograd.grad(pair_loss(model, x[idx], y[idx], loss).mean(), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
        flat = torch.cat([(s - p.detach()).reshape(-1) for s, p in zip(start, params, strict=True)]).double()
    finally:
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    norm = float(torch.linalg.vector_norm(flat))
    return flat * (float(device_clip_factor(norm, clip_norm)) * weight), norm

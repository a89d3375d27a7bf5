"""NESSA aligners (arXiv 2401.12440): a residual MLP from the runtime to the enrollment space.

``g(y) = normalize(W y + b + h(y))``. ``W, b`` start at the ridge solution and
``h``'s last layer at zero, so training starts exactly at the linear map and
can only move away from it where the data say so. No BatchNorm: it couples the
examples of a batch, which breaks per-example gradients and hence DP-SGD.

For DP the trainable part can be kept small (``train_linear=False`` freezes
``W, b``; a narrow ``hidden``): DP noise grows with the number of trained
parameters while each example's clipped signal does not (field-notes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fed_nessa.model.aligners.base import Aligner, AlignerInfo, check_input, l2_normalize
from fed_nessa.model.aligners.linear import RidgeStats, ridge_from_stats
from fed_nessa.model.aligners.network import Architecture, FederatedNet
from fed_nessa.model.losses import LossFn


@dataclass(frozen=True)
class NessaConfig:
    """Architecture of the residual branch."""

    hidden: int = 512
    depth: int = 2  # hidden layers of h
    activation: str = "gelu"
    layer_norm: bool = True  # LayerNorm on h's hidden layers (per-example, DP-safe)
    dropout: float = 0.0
    train_linear: bool = True
    ridge_alpha: float = 1e-2

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.depth < 1:
            raise ValueError("hidden and depth must be >= 1")
        if self.activation not in ("gelu", "relu"):
            raise ValueError("activation must be 'gelu' or 'relu'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")


def _mlp(d_in: int, d_out: int, cfg: NessaConfig) -> nn.Sequential:
    act = nn.GELU if cfg.activation == "gelu" else nn.ReLU
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(cfg.depth):
        layers.append(nn.Linear(width, cfg.hidden))
        if cfg.layer_norm:
            layers.append(nn.LayerNorm(cfg.hidden))
        layers.append(act())
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = cfg.hidden
    last = nn.Linear(width, d_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class NessaNet(FederatedNet):
    """``y -> W y + b + h(y)`` (unnormalised; scoring and export normalise)."""

    def __init__(self, d_y: int, d_x: int, cfg: NessaConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg or NessaConfig()
        with torch.random.fork_rng():  # the same weights on every party, whatever ran before
            torch.manual_seed(seed)
            self.linear = nn.Linear(d_y, d_x)
            self.residual = _mlp(d_y, d_x, self.cfg)
        self.set_linear_trainable(self.cfg.train_linear)

    @classmethod
    def from_architecture(cls, d_y: int, d_x: int, arch: Architecture, seed: int) -> NessaNet:
        return cls(d_y, d_x, NessaConfig(hidden=arch.hidden, depth=arch.depth, train_linear=arch.train_linear,
                                         ridge_alpha=arch.ridge_alpha), seed=seed)

    def set_linear_trainable(self, flag: bool) -> None:
        for p in self.linear.parameters():
            p.requires_grad_(flag)

    @torch.no_grad()
    def set_linear(self, W: np.ndarray, b: np.ndarray) -> None:
        self.linear.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        self.linear.bias.copy_(torch.as_tensor(b, dtype=torch.float32))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(y) + self.residual(y)


class NormalizedHead(nn.Module):
    """Wraps a map with L2 normalisation: the exact function the ONNX export serves."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return F.normalize(self.net(y), dim=-1, eps=1e-12)


def _predict(net: nn.Module, y: np.ndarray, batch: int = 8192) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out.append(net(torch.from_numpy(np.ascontiguousarray(y[i:i + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class NessaAligner(Aligner):
    """Residual-MLP aligner runtime -> enrollment space, started from ridge."""

    method = "nessa"
    #: A :class:`NessaNet` here, a :class:`SharedSpaceNet` in the shared subclass; typed as the common base.
    net: nn.Module

    def __init__(self, info: AlignerInfo, cfg: NessaConfig | None = None) -> None:
        super().__init__(info)
        self.cfg = cfg or NessaConfig()
        self.net = NessaNet(info.d_y, info.d_x, self.cfg)

    def _new_net(self) -> nn.Module:
        return NessaNet(self.info.d_y, self.info.d_x, self.cfg)

    def set_linear(self, W: np.ndarray, b: np.ndarray) -> None:
        """Set the linear part ``W y + b`` (e.g. a private ridge solution); the residual branch is untouched."""
        cast(NessaNet, self.net).set_linear(W, b)  # the shared subclass overrides this method

    def init_linear(self, enroll: np.ndarray, runtime: np.ndarray) -> None:
        W, b = ridge_from_stats(RidgeStats.from_pairs(l2_normalize(enroll), l2_normalize(runtime)),
                                self.cfg.ridge_alpha)
        self.set_linear(W, b)

    def fit(self, enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray | None = None, *,
            train_cfg: Any = None, dp: Any = None, val: Any = None,
            refit: tuple[np.ndarray, np.ndarray] | None = None, on_epoch: Any = None,
            **kwargs: Any) -> NessaAligner:
        """Ridge start (non-DP only), then training.

        ``val`` (a Validator, or (enroll, runtime) pairs of held-out train-side
        speakers) selects the number of epochs, the ridge start included. With
        ``refit`` = all train pairs (the fit pairs plus the validation ones), the
        model is then retrained from the ridge start on them for the selected
        number of epochs, so the validation voices are not lost to training:
        with few voices, voices are what the map lacks most.
        """
        from fed_nessa.model.training import TrainConfig, train_local

        cfg = train_cfg or TrainConfig()
        x = l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))
        y = l2_normalize(check_input(runtime, self.info.d_y, "runtime embeddings"))
        if dp is None:  # a DP run must not look at the raw data outside the DP mechanism
            self.init_linear(x, y)
        if isinstance(val, tuple):
            val = (l2_normalize(val[0]), l2_normalize(val[1]))
        result = train_local(self.net, x, y, cfg, dp, val=val, on_epoch=on_epoch)
        summary = {k: v for k, v in result.to_dict().items() if k != "history"}
        self.info.training.update({"train_result": summary, "history": result.history})
        if refit is not None and dp is None and val is not None:
            self._refit(refit, cfg, result.history)
        return self

    def _refit(self, pairs: tuple[np.ndarray, np.ndarray], cfg: Any, history: list[dict[str, float]]) -> None:
        import dataclasses

        from fed_nessa.model.training import train_local

        best_epoch = int(min(history, key=lambda r: r.get("val", float("inf")))["epoch"])
        x = l2_normalize(check_input(pairs[0], self.info.d_x, "enrollment embeddings"))
        y = l2_normalize(check_input(pairs[1], self.info.d_y, "runtime embeddings"))
        self.net = self._new_net()
        self.init_linear(x, y)
        if best_epoch > 0:
            train_local(self.net, x, y, dataclasses.replace(cfg, epochs=best_epoch))
        self.info.training["refit"] = {"epochs": best_epoch, "pairs": int(len(x))}

    def _map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        return _predict(self.net, l2_normalize(runtime))

    def head(self) -> NormalizedHead:
        return NormalizedHead(self.net)

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in self.net.state_dict().items()}

    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        self.cfg = NessaConfig(**params.get("architecture", {}))
        self.net = NessaNet(self.info.d_y, self.info.d_x, self.cfg)
        self.net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})

    def params(self) -> dict[str, Any]:
        return {"architecture": asdict(self.cfg)}


class SharedSpaceNet(nn.Module):
    """Both sides into a shared space: ``f_X(x) = x + h_X(x)``, ``f_Y(y) = W y + b + h_Y(y)``.

    The enrollment side starts at the identity and a per-example anchor term
    ``mu * (1 - cos(f_X(x), x))`` keeps it near it, which prevents the collapse a
    two-sided cosine objective otherwise allows without any batch-coupled term.
    """

    def __init__(self, d_y: int, d_x: int, cfg: NessaConfig, anchor: float = 0.5) -> None:
        super().__init__()
        self.f_y = NessaNet(d_y, d_x, cfg)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.h_x = _mlp(d_x, d_x, cfg)
        self.anchor = anchor

    def map_x(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.h_x(x)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.f_y(y)

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        zx = self.map_x(x)
        anchor = 1.0 - F.cosine_similarity(zx, x, dim=-1, eps=1e-8)
        return loss_fn(self.f_y(y), zx) + self.anchor * anchor


class NessaSharedAligner(NessaAligner):
    """NESSA shared-space variant: stored profiles are re-mapped once with f_X (no audio needed)."""

    method = "nessa-shared"

    def __init__(self, info: AlignerInfo, cfg: NessaConfig | None = None, anchor: float = 0.5) -> None:
        Aligner.__init__(self, info)
        self.cfg = cfg or NessaConfig()
        self.anchor = anchor
        self.net = SharedSpaceNet(info.d_y, info.d_x, self.cfg, anchor)

    def _new_net(self) -> nn.Module:
        return SharedSpaceNet(self.info.d_y, self.info.d_x, self.cfg, self.anchor)

    def set_linear(self, W: np.ndarray, b: np.ndarray) -> None:
        """Set the runtime side's linear part; the enrollment side ``f_X`` is untouched."""
        cast(SharedSpaceNet, self.net).f_y.set_linear(W, b)

    def init_linear(self, enroll: np.ndarray, runtime: np.ndarray) -> None:
        W, b = ridge_from_stats(RidgeStats.from_pairs(enroll, runtime), self.cfg.ridge_alpha)
        self.set_linear(W, b)

    def map_enroll(self, enroll: np.ndarray) -> np.ndarray:
        x = l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))
        self.net.eval()
        with torch.no_grad():
            return l2_normalize(cast(SharedSpaceNet, self.net).map_x(torch.from_numpy(x)).numpy())

    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        self.cfg = NessaConfig(**params.get("architecture", {}))
        self.anchor = float(params.get("anchor", 0.5))
        self.net = SharedSpaceNet(self.info.d_y, self.info.d_x, self.cfg, self.anchor)
        self.net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()})

    def params(self) -> dict[str, Any]:
        return {"architecture": asdict(self.cfg), "anchor": self.anchor}

"""The global aligner's layout: the network every party builds and its flat parameter vector.

The server and every device must build bit-identical networks from the run config alone
(the model travels as one flat float32 vector), so the architecture and the flattening
order are defined once, here. Which network is built is looked up by aligner name
(:mod:`fed_nessa.model.aligners.federated`, default NESSA); nothing here names a network class.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from fed_nessa.config import FederationConfig, LinearStart
from fed_nessa.model.aligners.federated import DEFAULT_FEDERATED_ALIGNER, federated_net
from fed_nessa.model.aligners.nessa import NessaConfig
from fed_nessa.model.aligners.network import Architecture, FederatedNet


def architecture(cfg: FederationConfig) -> Architecture:
    """The architecture every party builds.

    After a private linear start the linear part stays frozen (DP noise grows
    with what is trained); without one it must be learned by DP-SGD.
    """
    return Architecture(hidden=cfg.hidden, depth=cfg.depth, train_linear=cfg.linear_start == LinearStart.NONE,
                        ridge_alpha=cfg.ridge_alpha)


def nessa_config(cfg: FederationConfig) -> NessaConfig:
    """NESSA's own config for :func:`architecture` (the server's comparator and artifact are NESSA)."""
    return NessaConfig(**dataclasses.asdict(architecture(cfg)))


def build_net(cfg: FederationConfig, d_x: int, d_y: int, aligner: str = DEFAULT_FEDERATED_ALIGNER) -> FederatedNet:
    """The federated aligner's network, looked up by name; identical on every party."""
    return federated_net(aligner, d_y, d_x, architecture(cfg), seed=cfg.seed)


@functools.lru_cache(maxsize=64)
def parameter_counts(cfg: FederationConfig, d_x: int, d_y: int) -> tuple[int, int]:
    """``(all, trainable)`` values of :func:`build_net`'s network: fixed by the config, so counted once
    (building a net per device and round to count it was ~8 % of a block-engine round)."""
    net = build_net(cfg, d_x, d_y)
    return sum(p.numel() for p in net.parameters()), sum(p.numel() for p in trainable(net))


def trainable(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def flat(params: list[torch.Tensor] | list[torch.nn.Parameter]) -> np.ndarray:
    if not params:
        return np.zeros(0, np.float32)
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float32)


@torch.no_grad()
def load_flat(params: list[torch.Tensor] | list[torch.nn.Parameter], vector: np.ndarray) -> None:
    total = sum(p.numel() for p in params)
    if vector.shape != (total,):
        raise ValueError(f"global model vector has {vector.size} values, expected {total}")
    offset = 0
    for p in params:
        p.copy_(torch.from_numpy(vector[offset:offset + p.numel()]).view_as(p))
        offset += p.numel()

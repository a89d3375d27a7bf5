"""The global aligner's layout: the network every party builds and its flat parameter vector.

The server and every device must build bit-identical networks from the run config alone
(the model travels as one flat float32 vector), so the architecture and the flattening
order are defined once, here.
"""

from __future__ import annotations

import numpy as np
import torch

from fed_nessa.config import FederationConfig, LinearStart
from fed_nessa.model.aligners.nessa import NessaConfig, NessaNet


def nessa_config(cfg: FederationConfig) -> NessaConfig:
    """The architecture every party builds.

    After a private linear start the linear part stays frozen (DP noise grows
    with what is trained); without one it must be learned by DP-SGD.
    """
    return NessaConfig(hidden=cfg.hidden, depth=cfg.depth, train_linear=cfg.linear_start == LinearStart.NONE,
                       ridge_alpha=cfg.ridge_alpha)


def build_net(cfg: FederationConfig, d_x: int, d_y: int) -> NessaNet:
    return NessaNet(d_y, d_x, nessa_config(cfg), seed=cfg.seed)  # identical on every party


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

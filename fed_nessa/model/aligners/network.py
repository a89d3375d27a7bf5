"""What a federation needs of an aligner's network, whatever the aligner.

Every party builds the network from the run config's architecture keys alone (the model
travels as one flat vector), and the private linear start sets and freezes a linear part.
An aligner that can be trained federated subclasses :class:`FederatedNet` and registers in
:mod:`fed_nessa.model.aligners.federated`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import numpy as np
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """The run config's architecture keys, as every party reads them."""

    hidden: int
    depth: int
    #: False after a private linear start: the linear part stays frozen (DP noise grows with what is trained).
    train_linear: bool
    ridge_alpha: float


class FederatedNet(nn.Module, metaclass=ABCMeta):
    """A network a federation trains: built from an :class:`Architecture` and a seed, with a linear part."""

    @classmethod
    @abstractmethod
    def from_architecture(cls, d_y: int, d_x: int, arch: Architecture, seed: int) -> FederatedNet:
        """The network every party builds identically from the same arguments."""

    @abstractmethod
    def set_linear(self, W: np.ndarray, b: np.ndarray) -> None:
        """Set the linear part (the private linear start's ridge solution)."""

    @abstractmethod
    def set_linear_trainable(self, flag: bool) -> None:
        """Train or freeze the linear part."""

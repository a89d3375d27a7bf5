"""Aligners a federation can train, by name: method -> network class. Default: NESSA.

A new federated aligner is a :class:`~fed_nessa.model.aligners.network.FederatedNet` subclass
and one line here; the federated layout (:mod:`fed_nessa.federated.layout`) builds through
:func:`federated_net` and never names a network class.
"""

from __future__ import annotations

from fed_nessa.model.aligners.nessa import NessaAligner, NessaNet
from fed_nessa.model.aligners.network import Architecture, FederatedNet

FEDERATED_ALIGNERS: dict[str, type[FederatedNet]] = {
    NessaAligner.method: NessaNet,
}
DEFAULT_FEDERATED_ALIGNER = NessaAligner.method


def federated_net(name: str, d_y: int, d_x: int, arch: Architecture, seed: int) -> FederatedNet:
    """The network of the federated aligner ``name``; an unknown name is one clear error."""
    cls = FEDERATED_ALIGNERS.get(name)
    if cls is None:
        raise ValueError(f"no federated aligner {name!r}; choose one of {sorted(FEDERATED_ALIGNERS)}")
    return cls.from_architecture(d_y, d_x, arch, seed)

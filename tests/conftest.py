"""Shared test settings: one thread (2-core CI machine) and deterministic seeds."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def applied_sums(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, np.ndarray, int]]:
    """Every ``(phase, released sum, devices in it)`` the server model applies in the test (the engines'
    equivalence tests compare what was released, whatever engine released it)."""
    from fed_nessa.federated.server_model import ServerModel

    seen: list[tuple[str, np.ndarray, int]] = []
    original = ServerModel.apply

    def apply(self: ServerModel, phase: Any, aggregate_sum: np.ndarray, n_arrived: int, **kw: Any) -> None:
        seen.append((str(phase), np.array(aggregate_sum, np.float64), n_arrived))
        original(self, phase, aggregate_sum, n_arrived, **kw)

    monkeypatch.setattr(ServerModel, "apply", apply)
    return seen

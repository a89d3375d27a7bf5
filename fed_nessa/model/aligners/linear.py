"""Linear baselines: ridge regression, orthogonal Procrustes, naive cosine.

Ridge is also NESSA's starting point, and it is computable from sufficient
statistics (sums of y y^T, y x^T, y, x and a count), which is what the
federated linear start aggregates securely; :func:`ridge_from_stats` is the one
solver for both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fed_nessa.model.aligners.base import Aligner, AlignerInfo, check_input, l2_normalize


@dataclass(frozen=True)
class RidgeStats:
    """Sufficient statistics of pairs for a ridge map with intercept (all sums over pairs)."""

    yy: np.ndarray  # (d_y, d_y) sum y y^T
    yx: np.ndarray  # (d_y, d_x) sum y x^T
    y: np.ndarray  # (d_y,) sum y
    x: np.ndarray  # (d_x,) sum x
    n: float

    @classmethod
    def from_pairs(cls, enroll: np.ndarray, runtime: np.ndarray) -> RidgeStats:
        x = np.asarray(enroll, dtype=np.float64)
        y = np.asarray(runtime, dtype=np.float64)
        return cls(yy=y.T @ y, yx=y.T @ x, y=y.sum(0), x=x.sum(0), n=float(len(x)))

    def __add__(self, other: RidgeStats) -> RidgeStats:
        return RidgeStats(self.yy + other.yy, self.yx + other.yx, self.y + other.y, self.x + other.x,
                          self.n + other.n)


def ridge_from_stats(stats: RidgeStats, alpha: float, noise_std: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Solve min ||Y W + b - X||^2 + alpha ||W||^2 (intercept unpenalised) from sums.

    Returns ``(W, b)`` with ``W`` of shape (d_x, d_y) so that ``x_hat = W y + b``.
    ``alpha`` is relative to the mean diagonal of the centred covariance, so one
    value works whatever the number of pairs. Noisy (DP) statistics may be
    indefinite; the solve symmetrises and lifts the spectrum to stay well posed:
    with ``noise_std`` (per-entry std of the noise in the sums) the floor is at
    least the noise's spectral norm, ~``2 noise_std sqrt(d_y) / n``, so noise
    directions are regularised away instead of inverted.
    """
    n = max(stats.n, 1.0)
    my, mx = stats.y / n, stats.x / n
    cyy = stats.yy / n - np.outer(my, my)
    cyx = stats.yx / n - np.outer(my, mx)
    cyy = 0.5 * (cyy + cyy.T)
    scale = max(float(np.trace(cyy)) / cyy.shape[0], 1e-12)
    evals, evecs = np.linalg.eigh(cyy)
    floor = max(alpha * scale, 2.0 * noise_std * math.sqrt(cyy.shape[0]) / n)
    evals = np.maximum(evals, 0.0) + floor
    w = (evecs / evals) @ (evecs.T @ cyx)  # (d_y, d_x)
    b = mx - my @ w
    return w.T.astype(np.float32), b.astype(np.float32)


class RidgeAligner(Aligner):
    """Least-squares linear map runtime -> enrollment space (the classic baseline)."""

    method = "ridge"

    def __init__(self, info: AlignerInfo, alpha: float = 1e-2) -> None:
        super().__init__(info)
        self.alpha = float(alpha)
        self.W = np.zeros((info.d_x, info.d_y), np.float32)
        self.b = np.zeros(info.d_x, np.float32)

    def fit(self, enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray | None = None,
            **kwargs: Any) -> RidgeAligner:
        x = l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))
        y = l2_normalize(check_input(runtime, self.info.d_y, "runtime embeddings"))
        self.W, self.b = ridge_from_stats(RidgeStats.from_pairs(x, y), self.alpha)
        return self

    def _map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        return l2_normalize(runtime) @ self.W.T + self.b

    def tensors(self) -> dict[str, np.ndarray]:
        return {"W": self.W, "b": self.b}

    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        self.W, self.b = tensors["W"], tensors["b"]
        self.alpha = float(params.get("alpha", 0.0))

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


class ProcrustesAligner(Aligner):
    """Orthogonal map (rotation) between equal-dimension spaces: fewest parameters, no scaling."""

    method = "procrustes"

    def __init__(self, info: AlignerInfo) -> None:
        if info.d_x != info.d_y:
            raise ValueError(f"procrustes needs equal dims, got d_x={info.d_x}, d_y={info.d_y}")
        super().__init__(info)
        self.R = np.eye(info.d_x, dtype=np.float32)

    def fit(self, enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray | None = None,
            **kwargs: Any) -> ProcrustesAligner:
        x = l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))
        y = l2_normalize(check_input(runtime, self.info.d_y, "runtime embeddings"))
        u, _, vt = np.linalg.svd(y.astype(np.float64).T @ x.astype(np.float64))
        self.R = (u @ vt).T.astype(np.float32)  # x ~ R y
        return self

    def _map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        return runtime @ self.R.T

    def tensors(self) -> dict[str, np.ndarray]:
        return {"R": self.R}

    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        self.R = tensors["R"]


class NaiveAligner(Aligner):
    """Plain cosine across models (equal dims only): the chance-level reference."""

    method = "naive"

    def __init__(self, info: AlignerInfo) -> None:
        if info.d_x != info.d_y:
            raise ValueError(f"naive cosine needs equal dims, got d_x={info.d_x}, d_y={info.d_y}")
        super().__init__(info)

    def fit(self, enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray | None = None,
            **kwargs: Any) -> NaiveAligner:
        return self

    def _map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        return runtime

    def tensors(self) -> dict[str, np.ndarray]:
        return {}

    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        return None

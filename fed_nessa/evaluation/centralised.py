"""Centralised reference training: what the federated system is measured against.

Every method is fitted on the pooled train-side pairs and evaluated with the
design.md protocol on held-out speakers (whole voices). The DP variant runs the
same :func:`fed_nessa.model.training.train_local` the devices run, after a private
linear start from noisy sufficient statistics, and calibrates both noise
multipliers so that the composed guarantee (Opacus RDP accountant) meets a
target epsilon at delta for one pair (example-level).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fed_nessa.evaluation.protocol import ScenarioReport, evaluate_scenario, evaluate_trials
from fed_nessa.evaluation.protocol import scenario_sides as sides
from fed_nessa.evaluation.validators import EERValidator
from fed_nessa.federated import suffstats
from fed_nessa.model.aligners import (
    Aligner,
    AlignerInfo,
    NessaAligner,
    NessaConfig,
    NessaSharedAligner,
    ProcrustesAligner,
    RidgeAligner,
    SpeakerLogitAligner,
)
from fed_nessa.model.aligners.base import l2_normalize
from fed_nessa.model.training import DPConfig, TrainConfig, dp_sample_rate, dp_steps
from fed_nessa.privacy.accounting import compute_epsilon
from fed_nessa.privacy.events import DP_SGD, GAUSSIAN_SUM, LOCAL, DPEvent

SCENARIOS = ("runtime-upgrade", "enrollment-upgrade")
METHODS = ("ridge", "procrustes", "speaker-logit", "nessa", "nessa-shared")


@dataclass(frozen=True)
class CentralisedConfig:
    """How every method is fitted (one config for a whole table)."""

    methods: tuple[str, ...] = METHODS
    nessa: NessaConfig = field(default_factory=lambda: NessaConfig(hidden=512, depth=2, ridge_alpha=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, batch_size=128, lr=3e-4,
                                                                   patience=6))
    ridge_alpha: float = 0.1
    val_fraction: float = 0.15  # share of train-side voices held out for early stopping
    seed: int = 0


def _val_mask(voice: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    voices = np.unique(voice)
    k = max(2, int(round(fraction * voices.size))) if voices.size >= 6 else 0
    chosen: np.ndarray | list[Any] = np.random.default_rng(seed).choice(voices, size=k, replace=False) if k else []
    return np.isin(voice, chosen)


def _first_of_voice(speaker: np.ndarray, voice: np.ndarray) -> np.ndarray:
    """Rows whose speaker is the first speaker id of its voice (no pseudo-speaker twins in trials)."""
    keep = np.zeros(speaker.size, bool)
    for v in np.unique(voice):
        rows = voice == v
        keep |= rows & (speaker == speaker[rows].min())
    return keep


def fit_method(method: str, train: Any, enroll_model: str, runtime_model: str, cfg: CentralisedConfig) -> Aligner:
    """Fit one aligner on all train-side pairs of an EmbeddingSet-like object."""
    x, y = train.embeddings[enroll_model], train.embeddings[runtime_model]
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1], enroll_model=train.model_ids.get(enroll_model, enroll_model),
                       runtime_model=train.model_ids.get(runtime_model, runtime_model))
    info.training.update({"pairs": int(len(x)), "speakers": int(np.unique(train.speaker).size),
                          "voices": int(np.unique(train.voice).size), "data": getattr(train, "name", "?")})
    if method == "ridge":
        return fit_ridge(info, train, x, y, cfg)
    if method == "procrustes":
        return ProcrustesAligner(info).fit(x, y)
    if method == "speaker-logit":
        return SpeakerLogitAligner(info).fit(x, y, train.speaker)
    if method in ("nessa", "nessa-shared"):
        return fit_nessa(method, info, train, x, y, cfg)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1)


def fit_ridge(info: AlignerInfo, train: Any, x: np.ndarray, y: np.ndarray, cfg: CentralisedConfig) -> Aligner:
    """Ridge with its regularisation chosen by EER on held-out train-side voices, then refit on all."""
    val = _val_mask(train.voice, cfg.val_fraction, cfg.seed)
    alpha = cfg.ridge_alpha
    if val.any():
        vrows = val & _first_of_voice(train.speaker, train.voice)
        scores: dict[float, float] = {}
        for a in RIDGE_ALPHAS:
            r = RidgeAligner(info, alpha=a).fit(x[~val], y[~val])
            scores[a] = evaluate_trials(r.map_enroll(x[vrows]), r.map_runtime(y[vrows]), train.speaker[vrows],
                                        train.utterance[vrows]).eer
        alpha = min(scores, key=lambda a: scores[a])
        info.training["ridge_alpha_selection"] = {str(k): v for k, v in scores.items()}
    return RidgeAligner(info, alpha=alpha).fit(x, y)


def fit_nessa(method: str, info: AlignerInfo, train: Any, x: np.ndarray, y: np.ndarray,
               cfg: CentralisedConfig, on_epoch: Callable[[dict[str, float]], None] | None = None) -> Aligner:
    val = _val_mask(train.voice, cfg.val_fraction, cfg.seed)
    cls = NessaAligner if method == "nessa" else NessaSharedAligner
    aligner = cls(info, cfg.nessa)
    if not val.any():
        return aligner.fit(x, y, train_cfg=dataclasses.replace(cfg.train, epochs=min(cfg.train.epochs, 10)),
                           on_epoch=on_epoch)
    vrows = val & _first_of_voice(train.speaker, train.voice)
    validator = EERValidator(l2_normalize(x[vrows]), l2_normalize(y[vrows]), train.speaker[vrows],
                             train.utterance[vrows])
    return aligner.fit(x[~val], y[~val], train_cfg=cfg.train, val=validator, refit=(x, y), on_epoch=on_epoch)


def applicable(method: str, d_x: int, d_y: int) -> bool:
    return method not in ("procrustes", "naive") or d_x == d_y


def scenario_report(train: Any, test: Any, old_model: str, new_model: str, scenario: str,
                    cfg: CentralisedConfig, extra: Mapping[str, Aligner] | None = None) -> ScenarioReport:
    """Fit every applicable method for one scenario and evaluate all rows on the held-out set."""
    e, r = sides(scenario, old_model, new_model)
    d_x, d_y = train.embeddings[e].shape[1], train.embeddings[r].shape[1]
    aligners = {m: fit_method(m, train, e, r, cfg) for m in cfg.methods if applicable(m, d_x, d_y)}
    aligners.update(extra or {})
    keep = _first_of_voice(test.speaker, test.voice)
    emb = {m: a[keep] for m, a in test.embeddings.items()}
    return evaluate_scenario(emb, test.speaker[keep], test.utterance[keep], old_model, new_model, scenario,
                             aligners)


# ------------------------------------------------------------------------------------------ DP
@dataclass(frozen=True)
class DPPlan:
    """Calibrated noise for a target (epsilon, delta): linear start + DP-SGD on the residual."""

    epsilon: float
    delta: float
    suffstats_sigma: float
    sgd_sigma: float
    sample_rate: float
    steps: int
    clip_norm: float
    events: tuple[DPEvent, ...]
    epsilon_rdp: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["events"] = [e.to_dict() for e in self.events]
        return d


def _bisect(fn: Callable[[float], float], target: float, lo: float = 0.05, hi: float = 200.0) -> float:
    """Smallest sigma in [lo, hi] with fn(sigma) <= target (fn decreasing in sigma)."""
    if fn(hi) > target:
        raise ValueError(f"epsilon {target} is not reachable with noise multiplier <= {hi}")
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fn(mid) > target else (lo, mid)
    return hi


def plan_dp(epsilon: float, delta: float, n: int, train: TrainConfig, clip_norm: float,
            linear_share: float = 0.3) -> DPPlan:
    """Spend ``linear_share`` of epsilon on the sufficient statistics, the rest (composed) on DP-SGD."""
    q, steps = dp_sample_rate(n, train.batch_size), dp_steps(n, train.batch_size, train.epochs)

    def ss(s: float) -> list[DPEvent]:
        return [DPEvent(0, GAUSSIAN_SUM, 1, 1.0, s, suffstats.SENSITIVITY, delta, LOCAL)]

    def sgd(s: float) -> list[DPEvent]:
        return [DPEvent(1, DP_SGD, steps, q, s, clip_norm, delta, LOCAL)]

    s_ss = _bisect(lambda s: compute_epsilon(ss(s), delta), linear_share * epsilon)
    if linear_share >= 1.0:  # a DP linear map only: the whole budget goes to the statistics
        events = tuple(ss(s_ss))
        return DPPlan(epsilon, delta, s_ss, 0.0, q, 0, clip_norm, events, compute_epsilon(list(events), delta))
    s_sgd = _bisect(lambda s: compute_epsilon(ss(s_ss) + sgd(s), delta), epsilon)
    events = tuple(ss(s_ss) + sgd(s_sgd))
    return DPPlan(epsilon, delta, s_ss, s_sgd, q, steps, clip_norm, events, compute_epsilon(list(events), delta))


def fit_dp_nessa(train: Any, enroll_model: str, runtime_model: str, plan: DPPlan, cfg: CentralisedConfig,
                 dp_nessa: NessaConfig, dp_train: TrainConfig, seed: int = 0) -> tuple[Aligner, Aligner]:
    """(DP ridge from noisy statistics, DP NESSA = that start + DP-SGD on the residual)."""
    x = l2_normalize(train.embeddings[enroll_model]).astype(np.float64)
    y = l2_normalize(train.embeddings[runtime_model]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    # The statistics a federation sums, noised once and solved as its server solves them.
    W, b = suffstats.noisy_solve(suffstats.device_vector(x, y), plan.suffstats_sigma * suffstats.SENSITIVITY,
                                 np.random.default_rng(seed), x.shape[1], y.shape[1])
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1], enroll_model=train.model_ids.get(enroll_model, enroll_model),
                       runtime_model=train.model_ids.get(runtime_model, runtime_model),
                       training={"dp": plan.to_dict()})
    ridge = RidgeAligner(info, alpha=suffstats.DEFAULT_ALPHA)
    ridge.W, ridge.b = W, b
    if plan.steps == 0:
        return ridge, ridge
    nessa = NessaAligner(dataclasses.replace(info, training=dict(info.training)),
                         dataclasses.replace(dp_nessa, train_linear=False))
    nessa.set_linear(W, b)
    nessa.fit(x.astype(np.float32), y.astype(np.float32), train_cfg=dp_train,
              dp=DPConfig(noise_multiplier=plan.sgd_sigma, max_grad_norm=plan.clip_norm))
    return ridge, nessa


def mean_reports(reports: Sequence[ScenarioReport]) -> dict[str, Any]:
    """Average every row's metrics over folds (with the across-fold standard deviation)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for rep in reports:
        for row in rep.to_dict()["rows"]:
            bucket = rows.setdefault(row["name"], {})
            for key in ("eer", "min_dcf", "sid_top1"):
                bucket.setdefault(key, []).append(row[key])
            if row.get("gap_closure") is not None:
                bucket.setdefault("gap_closure", []).append(row["gap_closure"])
    return {name: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "folds": len(v)} for k, v in m.items()}
            for name, m in rows.items()}


#: Optimiser steps (batch 256) of the pooled non-DP NESSA reference: 20 epochs of the 1,000-device
#: synthetic fleet (112k pairs); larger fleets get fewer epochs and the same steps, so a 30k-device
#: reference costs what a 1k-device one does.
REFERENCE_STEPS = 8_750


def pooled_references(x: np.ndarray, y: np.ndarray, info: AlignerInfo, *, hidden: int, depth: int,
                      ridge_alpha: float, seed: int) -> dict[str, Aligner]:
    """Non-DP NESSA and ridge fitted on a federation's pooled device data (simulation only).

    The rows every federated report sets its aligner beside: the same data, no privacy.
    """
    ridge = RidgeAligner(dataclasses.replace(info), alpha=ridge_alpha).fit(x, y)
    epochs = max(1, min(20, math.ceil(REFERENCE_STEPS * 256 / max(len(x), 1))))
    nessa = NessaAligner(dataclasses.replace(info), NessaConfig(hidden=hidden, depth=depth)).fit(
        x, y, train_cfg=TrainConfig(epochs=epochs, batch_size=256, lr=1e-3, seed=seed))
    return {"centralised_nessa": nessa, "ridge": ridge}

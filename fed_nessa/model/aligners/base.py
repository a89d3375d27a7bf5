"""One interface for every aligner: fit / map_enroll / map_runtime / save / load.

Scoring always compares ``map_enroll(enrollment-side embedding)`` with
``map_runtime(runtime-side embedding)`` by cosine. For maps into the enrollment
space (NESSA, ridge, Procrustes) ``map_enroll`` is the identity, so stored
profiles are untouched; shared-space methods (speaker-logit, NESSA-shared) map
profiles once, which needs no audio.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# The on-disk format (file names, card schema, (de)serialisation) lives in artifacts, which knows
# nothing about aligners; the dependency is one-way: aligners -> artifacts.
from fed_nessa.model.artifacts import (
    CARD_FILE,
    CARD_SCHEMA_VERSION,
    WEIGHTS_FILE,
    AlignerFileError,
    read_weights_and_card,
    shapes_text,
    write_weights_and_card,
)


def l2_normalize(a: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    a = np.asarray(a, dtype=np.float32)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.maximum(norm, 1e-12)


def check_input(a: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Validate an (n, dim) float array: one clear error for wrong shape or non-finite rows."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what}: expected an (n, {dim}) array, got shape {a.shape}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} non-finite row(s), first at row {int(np.argmax(bad))}")
    return a.astype(np.float32, copy=False)


@dataclass
class AlignerInfo:
    """What the card says about an aligner besides its weights."""

    d_x: int
    d_y: int
    enroll_model: str = "unknown"
    runtime_model: str = "unknown"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Aligner(ABC):
    """Maps runtime-model embeddings (d_Y) and enrollment-model embeddings (d_X) to comparable rows."""

    method: ClassVar[str]
    registry: ClassVar[dict[str, type[Aligner]]] = {}

    def __init__(self, info: AlignerInfo) -> None:
        self.info = info

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            Aligner.registry[cls.method] = cls

    # -- fitting -------------------------------------------------------------------------
    @abstractmethod
    def fit(self, enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray | None = None,
            **kwargs: Any) -> Aligner:
        """Fit on pairs (enroll_i, runtime_i) of the same utterance."""

    # -- mapping -------------------------------------------------------------------------
    def map_enroll(self, enroll: np.ndarray) -> np.ndarray:
        return l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))

    @abstractmethod
    def _map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        """Unnormalised mapping of validated runtime rows."""

    def map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        return l2_normalize(self._map_runtime(check_input(runtime, self.info.d_y, "runtime embeddings")))

    def transform(self, runtime: np.ndarray) -> np.ndarray:
        """Runtime embeddings -> the space profiles are scored in (L2-normalised rows)."""
        return self.map_runtime(runtime)

    # -- persistence ---------------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> dict[str, np.ndarray]:
        """Weights to save (float32 arrays)."""

    @abstractmethod
    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        """Restore weights saved by :meth:`tensors`."""

    def params(self) -> dict[str, Any]:
        """Hyper-parameters needed to rebuild the object (saved in the card)."""
        return {}

    def card(self) -> dict[str, Any]:
        return {
            "schema_version": CARD_SCHEMA_VERSION,
            "method": self.method,
            "d_x": self.info.d_x,
            "d_y": self.info.d_y,
            "enroll_model": self.info.enroll_model,
            "runtime_model": self.info.runtime_model,
            "params": self.params(),
            "training": self.info.training,
            "metrics": self.info.metrics,
            "weights_file": WEIGHTS_FILE,
            "scoring": "cosine(map_enroll(profile-side), map_runtime(test-side)); outputs L2-normalised",
        }

    def save(self, out_dir: str | Path) -> Path:
        return write_weights_and_card(Path(out_dir), self.tensors(), self.card())


def _card_dim(card: dict[str, Any], key: str, card_path: Path) -> int:
    value = card.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AlignerFileError(f"{card_path}: {key} must be a positive integer, got {value!r}")
    return value


def load_aligner(path: str | Path) -> Aligner:
    """Load any aligner saved by :meth:`Aligner.save` (the card names the method).

    The weights are checked against the card: they must load into the method's model for the
    card's ``d_x`` / ``d_y`` and map one row of each side to rows of one common width. Any
    disagreement is an :class:`~fed_nessa.model.artifacts.AlignerFileError` naming both files.
    """
    folder = Path(path)
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    tensors, card = read_weights_and_card(folder)
    method = card.get("method")
    cls = Aligner.registry.get(method) if isinstance(method, str) else None
    if cls is None:
        raise AlignerFileError(f"{card_path}: unknown aligner method {method!r}")
    params = card.get("params", {})
    if not isinstance(params, dict):
        raise AlignerFileError(f"{card_path}: params must be a JSON object, got {type(params).__name__}")
    info = AlignerInfo(
        d_x=_card_dim(card, "d_x", card_path), d_y=_card_dim(card, "d_y", card_path),
        enroll_model=card.get("enroll_model", "unknown"), runtime_model=card.get("runtime_model", "unknown"),
        training=card.get("training", {}), metrics=card.get("metrics", {}),
    )
    mismatch = (f"{weights_path}: weights ({shapes_text(tensors) or 'none'}) do not match {card_path} "
                f"(method {method}, d_x {info.d_x}, d_y {info.d_y})")
    obj = cls.__new__(cls)
    Aligner.__init__(obj, info)
    try:
        obj._load_tensors(tensors, params)
        # One zero row per side: both maps must run and agree on the width of the scoring space.
        enroll = obj.map_enroll(np.zeros((1, info.d_x), np.float32))
        runtime = obj.map_runtime(np.zeros((1, info.d_y), np.float32))
    except KeyError as exc:
        raise AlignerFileError(f"{mismatch}: no tensor {exc.args[0]!r}") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]  # torch: a heading + a line
        detail = " ".join(lines)[:300] or type(exc).__name__
        raise AlignerFileError(f"{mismatch}: {detail}") from None
    if np.shape(enroll) != np.shape(runtime) or np.ndim(runtime) != 2:
        raise AlignerFileError(f"{mismatch}: runtime rows map to width {np.shape(runtime)[-1]}, "
                               f"enrollment rows to {np.shape(enroll)[-1]}")
    return obj

"""Speaker-logit alignment: the pre-NESSA baseline.

Each side is scored against a fixed set of reference speakers (centroids in
that model's own space); the two score vectors live in one "speaker-logit"
space and are compared by cosine. No cross-model map is learned, only the
reference set, so it needs speakers, not pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fed_nessa.model.aligners.base import Aligner, AlignerInfo, check_input, l2_normalize


def _centroids(emb: np.ndarray, speaker: np.ndarray) -> np.ndarray:
    ids = np.unique(speaker)
    return l2_normalize(np.stack([emb[speaker == s].mean(0) for s in ids]))


class SpeakerLogitAligner(Aligner):
    """Cosine scores against reference-speaker centroids, centred by the training-set mean logit."""

    method = "speaker-logit"

    def __init__(self, info: AlignerInfo) -> None:
        super().__init__(info)
        self.cx = np.zeros((0, info.d_x), np.float32)
        self.cy = np.zeros((0, info.d_y), np.float32)
        self.mx = np.zeros(0, np.float32)
        self.my = np.zeros(0, np.float32)

    def fit(self, enroll: np.ndarray, runtime: np.ndarray, speaker: np.ndarray | None = None,
            **kwargs: Any) -> SpeakerLogitAligner:
        if speaker is None:
            raise ValueError("speaker-logit alignment needs speaker labels")
        x = l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))
        y = l2_normalize(check_input(runtime, self.info.d_y, "runtime embeddings"))
        speaker = np.asarray(speaker)
        if np.unique(speaker).size < 2:
            raise ValueError("speaker-logit alignment needs at least 2 reference speakers")
        self.cx, self.cy = _centroids(x, speaker), _centroids(y, speaker)
        self.mx = (x @ self.cx.T).mean(0)
        self.my = (y @ self.cy.T).mean(0)
        return self

    def map_enroll(self, enroll: np.ndarray) -> np.ndarray:
        x = l2_normalize(check_input(enroll, self.info.d_x, "enrollment embeddings"))
        return l2_normalize(x @ self.cx.T - self.mx)

    def _map_runtime(self, runtime: np.ndarray) -> np.ndarray:
        return l2_normalize(runtime) @ self.cy.T - self.my

    def tensors(self) -> dict[str, np.ndarray]:
        return {"cx": self.cx, "cy": self.cy, "mx": self.mx, "my": self.my}

    def _load_tensors(self, tensors: dict[str, np.ndarray], params: dict[str, Any]) -> None:
        self.cx, self.cy, self.mx, self.my = tensors["cx"], tensors["cy"], tensors["mx"], tensors["my"]

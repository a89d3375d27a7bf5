"""How distinct the voices of an embedding corpus are, per speaker model: the corpus README's validation.

Two figures per model on a subset of voices:

- mean cosine of utterance pairs of one voice (within) and of two voices (between),
  and the EER over all those trials;
- the 2-voice EER of each voice against its *nearest* other voice (nearest by
  centroid cosine in that model's own space): the pairs most likely to have
  merged. A median near 0 says even the closest voices are told apart; near
  0.5 says they merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fed_nessa.evaluation.protocol import eer


@dataclass(frozen=True)
class Distinctness:
    """One model's figures on one subset of voices."""

    voices: int
    within: float
    between: float
    eer_all: float
    nn_eer_median: float
    nn_eer_max: float


def _trials(emb: np.ndarray, voice: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-voice labels of all utterance pairs among ``rows``."""
    e = emb[rows]
    iu = np.triu_indices(rows.size, 1)
    return (e @ e.T)[iu], (voice[rows][:, None] == voice[rows][None])[iu]


def distinctness(emb: np.ndarray, voice: np.ndarray, voices: np.ndarray) -> Distinctness:
    """Figures for the voices ``voices`` of unit-row embeddings ``emb`` (rows labelled by ``voice``)."""
    emb = np.asarray(emb, np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rows = np.flatnonzero(np.isin(voice, voices))
    scores, same = _trials(emb, voice, rows)
    cent = np.stack([emb[voice == v].mean(axis=0) for v in voices])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    sim = cent @ cent.T
    np.fill_diagonal(sim, -np.inf)
    nn_eers = []
    for i, v in enumerate(voices):
        pair = np.flatnonzero(np.isin(voice, [v, voices[int(np.argmax(sim[i]))]]))
        nn_eers.append(eer(*_trials(emb, voice, pair)))
    return Distinctness(int(len(voices)), float(scores[same].mean()), float(scores[~same].mean()),
                        float(eer(scores, same)), float(np.median(nn_eers)), float(np.max(nn_eers)))


def two_group_eer(emb: np.ndarray, group: np.ndarray) -> float:
    """EER of telling two groups of utterances apart by cosine (0.5: the groups are one identity)."""
    emb = np.asarray(emb, np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return float(eer(*_trials(emb, np.asarray(group), np.arange(len(group)))))

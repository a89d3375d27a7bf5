"""Corpus voices: convex blends of Kokoro style packs, packed greedily with a minimum style distance.

A blend of packs is a new identity for real speaker models (field notes: 13
random blends gave CAM++ within 0.88 / between 0.50 cosine), but blends that
lie close together in style space merge. So candidates are drawn at random and
kept only if their style summary is at least ``d_min`` from every voice kept
before (greedy packing); ``d_min`` is a fraction of the median nearest-neighbour
distance between the 54 original packs.

Held-out voices: the packs are split once into a training and a held-out
group (stratified by the pack's language-and-gender prefix); a voice blends
packs of one group only, so no held-out voice shares a parent with a training
voice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Style rows summarised for the distance: Kokoro picks row n-1 for n phonemes, and one-sentence
# utterances have ~20-120 phonemes.
STYLE_ROWS = slice(16, 128)
D_MIN_FRACTION = 0.5  # of the median nearest-neighbour distance between the original packs
HELDOUT_FRACTION = 1 / 3
SPLIT_SEED = 24
VOICE_SEED = 20261204
N_CANDIDATES = 20000
PARENTS = (2, 3)  # parents per blend, drawn uniformly
SPEED_RANGE = (0.9, 1.1)
TRAIN, HELDOUT = "train", "heldout"


@dataclass(frozen=True)
class Voice:
    """One corpus voice: parent packs with convex weights, a speaking speed, and its split."""

    voice_id: int
    parents: tuple[str, ...]
    weights: tuple[float, ...]
    speed: float
    split: str

    def style(self, packs: dict[str, np.ndarray]) -> np.ndarray:
        """The blended (510, 256) style table."""
        return sum(w * packs[p] for p, w in zip(self.parents, self.weights))  # type: ignore[return-value]


def style_summaries(packs: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Pack names (sorted) and their (n_packs, 256) style summaries."""
    names = sorted(packs)
    return names, np.stack([packs[n][STYLE_ROWS].mean(axis=0) for n in names]).astype(np.float64)


def min_distance(summaries: np.ndarray) -> float:
    """The packing radius: ``D_MIN_FRACTION`` x the median nearest-neighbour distance between packs."""
    d = np.linalg.norm(summaries[:, None] - summaries[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(D_MIN_FRACTION * np.median(d.min(axis=1)))


def heldout_packs(names: list[str], seed: int = SPLIT_SEED) -> frozenset[str]:
    """``HELDOUT_FRACTION`` of each prefix stratum's packs (e.g. 'af', 'bm'); at least one of a stratum of 3+."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    for prefix in sorted({n.split("_")[0] for n in names}):
        group = sorted(n for n in names if n.split("_")[0] == prefix)
        k = int(round(HELDOUT_FRACTION * len(group))) or (1 if len(group) >= 3 else 0)
        out.update(rng.choice(group, size=k, replace=False).tolist())
    return frozenset(out)


def pack_voices(names: list[str], summaries: np.ndarray, heldout: frozenset[str], d_min: float, *,
                n_candidates: int = N_CANDIDATES, seed: int = VOICE_SEED) -> list[Voice]:
    """Greedy packing: random blends (within one split's packs) kept when >= ``d_min`` from all kept ones."""
    rng = np.random.default_rng(seed)
    sides = {TRAIN: [i for i, n in enumerate(names) if n not in heldout],
             HELDOUT: [i for i, n in enumerate(names) if n in heldout]}
    p_heldout = len(sides[HELDOUT]) / len(names)
    kept: list[Voice] = []
    kept_summaries = np.empty((n_candidates, summaries.shape[1]))
    for _ in range(n_candidates):
        split = HELDOUT if rng.random() < p_heldout else TRAIN
        pool = sides[split]
        k = min(int(rng.choice(PARENTS)), len(pool))
        idx = np.sort(rng.choice(pool, size=k, replace=False))
        w = rng.dirichlet(np.ones(k))
        speed = float(rng.uniform(*SPEED_RANGE))
        s = w @ summaries[idx]
        if kept and np.min(np.linalg.norm(kept_summaries[: len(kept)] - s, axis=1)) < d_min:
            continue
        kept_summaries[len(kept)] = s
        kept.append(Voice(len(kept), tuple(names[i] for i in idx), tuple(round(float(x), 6) for x in w),
                          round(speed, 4), split))
    return kept


def voice_table(packs: dict[str, np.ndarray]) -> list[Voice]:
    """The corpus's voices, deterministic from the packs and the seeds above."""
    names, summaries = style_summaries(packs)
    return pack_voices(names, summaries, heldout_packs(names), min_distance(summaries))

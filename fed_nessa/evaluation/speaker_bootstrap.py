"""A paired speaker bootstrap of EER: how sure the gate may be that one system beats another.

Why speakers and not trials: the trials of one speaker share its voice, so they are not
independent; an EER's uncertainty on a set of 100 speakers is dominated by which 100 speakers
were drawn (docs/results.md "The gate's confidence"). One resample draws the speakers with
replacement (multiplicity ``c_s``) and re-weights the fixed trial list: a test utterance of
speaker a against its own profile counts ``c_a`` times, against the profile of b != a
``c_a * c_b`` times. Every system is scored on the SAME resamples (paired), so what is compared is
the difference, whose spread is far smaller than either EER's.

Server-side data only (the gate's validation speakers), so nothing here touches privacy: the
resampling generator is seeded for reproducible decisions, never used for a mechanism.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fed_nessa.evaluation.protocol import eer_from_rates

#: Resamples per gate decision (its win frequencies move by ~1/sqrt(4 * RESAMPLES) = 1.6 % at 1,000).
DEFAULT_RESAMPLES = 1000
#: The seed of the resampling generator (public: the gate's validation data are the server's own).
DEFAULT_SEED = 0


@dataclass(frozen=True)
class SortedTrials:
    """One system's trial list sorted by score once, so each resample is a gather and a cumsum."""

    row_speaker: np.ndarray  # (T,) the test utterance's speaker (profile column) of each sorted trial
    column: np.ndarray  # (T,) the profile of each sorted trial
    target: np.ndarray  # (T,) bool
    group_end: np.ndarray  # last index of each group of tied scores (thresholds fall between groups)

    @classmethod
    def of(cls, scores: np.ndarray, test_speaker: np.ndarray) -> SortedTrials:
        s = np.asarray(scores)
        n_test, m = s.shape
        order = np.argsort(s.reshape(-1), kind="stable")
        flat = s.reshape(-1)[order]
        rows, cols = np.divmod(order, m)
        spk = np.asarray(test_speaker)[rows]
        ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
        return cls(spk.astype(np.int64), cols.astype(np.int64), spk == cols, ends)

    def eer(self, count: np.ndarray) -> float:
        """The EER with speaker ``s`` drawn ``count[s]`` times (all ones: the plain EER)."""
        c = np.asarray(count, dtype=np.float64)
        w_row = c[self.row_speaker]
        w = np.where(self.target, w_row, w_row * c[self.column])
        tar = np.cumsum(np.where(self.target, w, 0.0))[self.group_end]
        non = np.cumsum(np.where(self.target, 0.0, w))[self.group_end]
        n_tar, n_non = tar[-1], non[-1]
        p_miss = np.concatenate(([0.0], tar / n_tar))
        p_fa = np.concatenate(([1.0], (n_non - non) / n_non))
        return eer_from_rates(p_miss, p_fa)


def speaker_counts(speakers: int, resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(resamples, speakers) multiplicities: each row draws ``speakers`` speakers with replacement.

    A resample that keeps fewer than two distinct speakers has no non-target trials; it is drawn
    again (never happens at the gate's sizes, but a tiny validation set must not crash it).
    """
    if speakers < 2 or resamples < 1:
        raise ValueError(f"a speaker bootstrap needs >= 2 speakers and >= 1 resample, got {speakers}, {resamples}")
    rng = np.random.default_rng(seed)
    out = rng.multinomial(speakers, np.full(speakers, 1.0 / speakers), size=resamples)
    for i in np.flatnonzero(np.count_nonzero(out, axis=1) < 2):
        while np.count_nonzero(out[i]) < 2:
            out[i] = rng.multinomial(speakers, np.full(speakers, 1.0 / speakers))
    return out


def bootstrap_eers(scores: Mapping[str, np.ndarray], test_speaker: np.ndarray,
                   resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Each system's EER on the same ``resamples`` speaker resamples (paired): name -> (resamples,)."""
    if not scores:
        raise ValueError("no systems to resample")
    m = {s.shape[1] for s in scores.values()}
    if len(m) != 1:
        raise ValueError(f"the systems' trial lists differ in profiles: {sorted(m)}")
    counts = speaker_counts(m.pop(), resamples, seed)
    out = {}
    for name, s in scores.items():
        trials = SortedTrials.of(s, test_speaker)
        out[name] = np.array([trials.eer(c) for c in counts])
    return out


def win_rate(challenger: np.ndarray, incumbent: np.ndarray) -> float:
    """Share of paired resamples where ``challenger``'s EER is strictly below ``incumbent``'s."""
    return float(np.mean(np.asarray(challenger) < np.asarray(incumbent)))

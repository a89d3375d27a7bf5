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
    """One system's trial list sorted by score once, so each resample is one gather and one cumsum.

    A trial's resample weight is an integer (``c_a`` for a target trial, ``c_a * c_b`` for a non-target
    one), so it is read from one table of the resample's weights (``c_a c_b`` for every profile pair, then
    ``c_a``) by the trial's ``weight_index``; every cumulative sum of integers below 2^53 is exact in float64,
    so the target counts at a threshold are the small target list's cumsum and the non-target counts the
    total's remainder, bit-identical to summing each class on its own.
    """

    speakers: int  # profiles (columns): the weight table has speakers^2 pair entries, then speakers
    weight_index: np.ndarray  # (T,) each sorted trial's entry in the resample's weight table
    target_speaker: np.ndarray  # (targets,) the speaker of each target trial, in sorted order
    targets_before: np.ndarray  # (groups,) target trials up to each group's end (a threshold's position)
    group_end: np.ndarray  # last index of each group of tied scores (thresholds fall between groups)

    @classmethod
    def of(cls, scores: np.ndarray, test_speaker: np.ndarray) -> SortedTrials:
        s = np.asarray(scores)
        n_test, m = s.shape
        order = np.argsort(s.reshape(-1), kind="stable")
        flat = s.reshape(-1)[order]
        rows, cols = np.divmod(order, m)
        spk = np.asarray(test_speaker).astype(np.int64)[rows]
        target = spk == cols
        index = np.where(target, m * m + spk, spk * m + cols)
        ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
        return cls(m, index, spk[target], np.cumsum(target)[ends], ends)

    def eer(self, count: np.ndarray) -> float:
        """The EER with speaker ``s`` drawn ``count[s]`` times (all ones: the plain EER).

        Only the two ROC points around the crossing are formed (``P_miss - P_fa`` never decreases along the
        sorted trials, so the first point at or past it is found by bisection): the same two points, and so
        the same figure, as :func:`~fed_nessa.evaluation.protocol.eer_from_rates` over the whole curve."""
        c = np.asarray(count, dtype=np.float64)
        total = np.cumsum(np.concatenate((np.outer(c, c).reshape(-1), c))[self.weight_index])
        tar_cum = np.concatenate(([0.0], np.cumsum(c[self.target_speaker])))
        n_tar = tar_cum[-1]
        n_non = total[-1] - n_tar

        def point(k: int) -> tuple[float, float]:
            """(P_miss, P_fa) at threshold ``k`` (0: below every score; k: after group k - 1)."""
            if k == 0:
                return 0.0, 1.0
            tar = tar_cum[self.targets_before[k - 1]]
            non = total[self.group_end[k - 1]] - tar
            return tar / n_tar, (n_non - non) / n_non

        lo, hi = 1, self.group_end.size  # the last point (P_miss 1, P_fa 0) is past the crossing
        while lo < hi:
            mid = (lo + hi) // 2
            miss, fa = point(mid)
            if miss >= fa:
                hi = mid
            else:
                lo = mid + 1
        (m0, f0), (m1, f1) = point(lo - 1), point(lo)
        return eer_from_rates(np.array([m0, m1]), np.array([f0, f1]))


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

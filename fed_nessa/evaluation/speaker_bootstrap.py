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


#: Fewest trials per block of :class:`SortedTrials`' running counts.
MIN_BLOCK = 1024


@dataclass(frozen=True)
class SortedTrials:
    """One system's trial list sorted by score once, with running weight counts every ``block`` trials, so a
    resample's EER costs a few dot products and one block's cumsum instead of passes over every trial.

    A trial's resample weight is an integer (``c_a`` for a target trial, ``c_a * c_b`` for a non-target
    one), read from one table of the resample's weights (``c_a c_b`` for every profile pair, then ``c_a``)
    by the trial's ``weight_index``. The weighted count of the trials before a position is then the table
    dotted with how often each entry occurs there (kept every ``block`` trials: ``counts``) plus the partial
    block's sum. Every such sum is of integers below 2^53, so exact in float64 in any order: the EER is
    bit-identical to summing the whole sorted list. ``P_miss - P_fa`` never decreases along the sorted
    trials, so the crossing is found by bisection, first over the blocks, then over the thresholds (tied
    scores form one group; thresholds fall between groups) of the one block that holds it.
    """

    speakers: int  # profiles (columns): the weight table has speakers^2 pair entries, then speakers
    weight_index: np.ndarray  # (T,) each sorted trial's entry in the resample's weight table
    target_speaker: np.ndarray  # (targets,) the speaker of each target trial, in sorted order
    target_position: np.ndarray  # (targets,) each target trial's place in the sorted list
    group_end: np.ndarray  # last index of each group of tied scores
    block: int  # trials between two rows of ``counts``
    counts: np.ndarray  # (blocks + 1, table) occurrences of each table entry among the first b * block trials

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
        # a block about the table's size balances the dot products of the first bisection against the block's sum
        block = max(MIN_BLOCK, m * m + m)
        blocks = -(-index.size // block)
        counts = np.zeros((blocks + 1, m * m + m))
        for b in range(blocks):
            counts[b + 1] = counts[b] + np.bincount(index[b * block:(b + 1) * block], minlength=m * m + m)
        return cls(m, index, spk[target], np.flatnonzero(target), ends, block, counts)

    def eer(self, count: np.ndarray) -> float:
        """The EER with speaker ``s`` drawn ``count[s]`` times (all ones: the plain EER): the same two ROC
        points around the crossing, so the same figure, as :func:`~fed_nessa.evaluation.protocol.eer_from_rates`
        over the whole curve."""
        r = _Resample.of(self, count)
        b = r.crossing_block()
        start, stop = (b - 1) * self.block, min(b * self.block, r.n_trials)
        running = r.weight_before(start) + np.cumsum(r.table[self.weight_index[start:stop]])

        def weight_at(pos: int) -> float:
            """:meth:`_Resample.weight_before`, read off the crossing block's running sum where ``pos`` is in it."""
            return float(running[pos - start - 1]) if start < pos <= stop else r.weight_before(pos)

        # the first threshold (after group k - 1, at position group_end[k - 1] + 1) at or past the crossing
        k_lo = int(np.searchsorted(self.group_end, start)) + 1
        k_hi = int(np.searchsorted(self.group_end, stop - 1)) + 1
        while k_lo < k_hi:
            mid = (k_lo + k_hi) // 2
            pos = int(self.group_end[mid - 1]) + 1
            if r.past(pos, weight_at(pos)):
                k_hi = mid
            else:
                k_lo = mid + 1
        points = []
        for k in (k_lo - 1, k_lo):
            pos = int(self.group_end[k - 1]) + 1 if k else 0
            points.append(r.rates(pos, weight_at(pos)) if k else (0.0, 1.0))
        return eer_from_rates(np.array([p[0] for p in points]), np.array([p[1] for p in points]))


@dataclass(frozen=True)
class _Resample:
    """One resample's weights over a :class:`SortedTrials`: the weighted counts and ROC points at any position."""

    trials: SortedTrials
    table: np.ndarray  # the resample's weight table: c_a c_b for every profile pair, then c_a
    tar_cum: np.ndarray  # weighted target trials among the first k targets in sorted order
    n_non: float  # weighted non-target trials in all

    @classmethod
    def of(cls, trials: SortedTrials, count: np.ndarray) -> _Resample:
        c = np.asarray(count, dtype=np.float64)
        table = np.concatenate((np.outer(c, c).reshape(-1), c))
        tar_cum = np.concatenate(([0.0], np.cumsum(c[trials.target_speaker])))
        return cls(trials, table, tar_cum, float(trials.counts[-1] @ table) - float(tar_cum[-1]))

    @property
    def n_trials(self) -> int:
        return int(self.trials.weight_index.size)

    def weight_before(self, pos: int) -> float:
        """The weighted count of the first ``pos`` trials: a block row dotted with the table, plus a partial block."""
        t = self.trials
        b = min(pos // t.block, t.counts.shape[0] - 1)
        return float(t.counts[b] @ self.table) + float(self.table[t.weight_index[b * t.block:pos]].sum())

    def rates(self, pos: int, weight: float) -> tuple[float, float]:
        """(P_miss, P_fa) with the threshold after the first ``pos`` trials (of weighted count ``weight``)."""
        tar = float(self.tar_cum[np.searchsorted(self.trials.target_position, pos)])
        return tar / float(self.tar_cum[-1]), (self.n_non - (weight - tar)) / self.n_non

    def past(self, pos: int, weight: float) -> bool:
        """Whether the threshold after ``pos`` trials is at or past the EER crossing (P_miss >= P_fa)."""
        miss, fa = self.rates(pos, weight)
        return bool(miss >= fa)

    def crossing_block(self) -> int:
        """The first block end at or past the crossing (position 0 is before it: P_miss 0, P_fa 1)."""
        t = self.trials
        lo, hi = 1, t.counts.shape[0] - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.past(min(mid * t.block, self.n_trials), float(t.counts[mid] @ self.table)):
                hi = mid
            else:
                lo = mid + 1
        return lo


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

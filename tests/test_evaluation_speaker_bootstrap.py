"""The gate's paired speaker bootstrap: a resample's EER is the plain EER of the explicitly duplicated
trial list, resamples are paired and seeded, and identical systems never beat each other."""

from __future__ import annotations

import numpy as np
import pytest

from fed_nessa.evaluation import speaker_bootstrap
from fed_nessa.evaluation.protocol import eer
from fed_nessa.evaluation.speaker_bootstrap import SortedTrials, bootstrap_eers, speaker_counts, win_rate


def _scores(seed: int, m: int = 6, per: int = 5, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test_speaker = np.repeat(np.arange(m), per)
    scores = rng.normal(size=(m * per, m)).astype(np.float32)
    scores[np.arange(m * per), test_speaker] += signal
    return scores, test_speaker


def _expanded_eer(scores: np.ndarray, test_speaker: np.ndarray, count: np.ndarray) -> float:
    """The resample built by hand: copy a of each speaker is tested against every profile copy."""
    s, y = [], []
    for row, a in enumerate(test_speaker):
        for _ in range(count[a]):  # each copy of speaker a's test utterance ...
            for b in range(scores.shape[1]):
                if b == a:
                    s.append(scores[row, b])  # ... against its own profile once
                    y.append(True)
                else:
                    s.extend([scores[row, b]] * int(count[b]))  # ... against every copy of another speaker
                    y.extend([False] * int(count[b]))
    return eer(np.array(s), np.array(y))


def test_all_ones_is_the_protocols_eer() -> None:
    scores, spk = _scores(0)
    labels = np.zeros(scores.shape, dtype=bool)
    labels[np.arange(spk.size), spk] = True
    trials = SortedTrials.of(scores, spk)
    assert trials.eer(np.ones(6)) == pytest.approx(eer(scores.reshape(-1), labels.reshape(-1)), abs=1e-12)


@pytest.mark.parametrize("count", [[2, 0, 1, 3, 0, 0], [1, 1, 0, 0, 2, 2], [0, 5, 1, 0, 0, 0]])
def test_a_resample_is_the_duplicated_trial_list(count: list[int]) -> None:
    scores, spk = _scores(1)
    c = np.array(count)
    assert SortedTrials.of(scores, spk).eer(c) == pytest.approx(_expanded_eer(scores, spk, c), abs=1e-12)


@pytest.mark.parametrize("min_block", [1024, 1])
@pytest.mark.parametrize(("seed", "decimals"), [(3, None), (4, 0), (5, 1)])
def test_random_resamples_match_the_duplicated_trial_list_with_and_without_ties(
        seed: int, decimals: int | None, min_block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bisection to the crossing finds the full curve's crossing, ties or not, for any multiplicities,
    in one block or in many (``min_block`` 1: blocks of 56 trials, tie groups spanning several)."""
    monkeypatch.setattr(speaker_bootstrap, "MIN_BLOCK", min_block)
    scores, spk = _scores(seed, m=7, per=4, signal=1.0)
    if decimals is not None:
        scores = np.round(scores, decimals)
    trials = SortedTrials.of(scores, spk)
    assert trials.counts.shape[0] - 1 == (1 if min_block > 196 else 4)  # 196 trials: one block, or four of 56
    for c in speaker_counts(7, 12, seed=seed):
        assert trials.eer(c) == pytest.approx(_expanded_eer(scores, spk, c), abs=1e-12)


def test_ties_are_never_split() -> None:
    scores, spk = _scores(2)
    scores = np.round(scores, 0)  # many ties across targets and non-targets
    labels = np.zeros(scores.shape, dtype=bool)
    labels[np.arange(spk.size), spk] = True
    assert SortedTrials.of(scores, spk).eer(np.ones(6)) == pytest.approx(eer(scores.reshape(-1), labels.reshape(-1)))


def test_counts_are_seeded_and_keep_two_speakers() -> None:
    a, b = speaker_counts(3, 500, seed=4), speaker_counts(3, 500, seed=4)
    assert np.array_equal(a, b) and a.shape == (500, 3) and np.all(a.sum(axis=1) == 3)
    assert np.all(np.count_nonzero(a, axis=1) >= 2)  # a one-speaker resample has no non-target trial
    with pytest.raises(ValueError, match=">= 2 speakers"):
        speaker_counts(1, 10)


def test_resamples_are_paired_and_identical_systems_never_win() -> None:
    scores, spk = _scores(3, m=20)
    weaker = scores.copy()
    weaker[np.arange(spk.size), spk] -= 1.0  # the same trials, less target signal: worse on every resample
    boot = bootstrap_eers({"a": scores, "same": scores.copy(), "weaker": weaker}, spk, resamples=200)
    assert np.array_equal(boot["a"], boot["same"]) and win_rate(boot["same"], boot["a"]) == 0.0
    assert win_rate(boot["a"], boot["weaker"]) > 0.95 and np.all(boot["a"] <= boot["weaker"])
    with pytest.raises(ValueError, match="differ in profiles"):
        bootstrap_eers({"a": scores, "b": scores[:, :5]}, spk)

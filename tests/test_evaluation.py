"""Tests for fed_nessa.evaluation.protocol: the protocol every report relies on.

Hand-worked examples list the operating points (P_miss, P_fa) for thresholds
placed between distinct scores, lowest threshold first (accept score > t).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq

from fed_nessa.evaluation.protocol import (
    WORSE_THAN_NOT_UPDATING,
    Comparator,
    Metrics,
    eer,
    enrollment_split,
    error_rates,
    evaluate_scenario,
    evaluate_trials,
    gap_closure,
    min_dcf,
    reports_to_dict,
    reports_to_markdown,
    speaker_profiles,
)

# --------------------------------------------------------------------------- EER / minDCF by hand


def test_perfect_separation_gives_zero():
    # targets {0.8, 0.9} all above non-targets {0.1, 0.2}: the threshold between 0.2 and 0.8
    # has P_miss = P_fa = 0.
    scores = np.array([0.9, 0.1, 0.8, 0.2])
    labels = np.array([True, False, True, False])
    assert eer(scores, labels) == 0.0
    assert min_dcf(scores, labels) == 0.0


def test_fully_inverted_gives_one():
    # Every non-target above every target: sorted 0.1T 0.2T 0.8N 0.9N gives the points
    # (0,1) (1/2,1) (1,1) (1,1/2) (1,0); the crossing is the point (1,1) -> EER 1.
    scores = np.array([0.9, 0.1, 0.8, 0.2])
    labels = np.array([False, True, False, True])
    assert eer(scores, labels) == pytest.approx(1.0)
    # minDCF can never exceed the better trivial system (normalised cost 1).
    assert min_dcf(scores, labels) == pytest.approx(1.0)


# Targets {0.2, 0.6, 0.7, 0.9}, non-targets {0.1, 0.3, 0.5, 0.8}; sorted 0.1N 0.2T 0.3N 0.5N 0.6T 0.7T 0.8N 0.9T.
# Operating points (P_miss, P_fa):
#   below all (0, 1); >0.1 (0, 3/4); >0.2 (1/4, 3/4); >0.3 (1/4, 1/2); >0.5 (1/4, 1/4);
#   >0.6 (1/2, 1/4); >0.7 (3/4, 1/4); >0.8 (3/4, 0); above all (1, 0).
CROSS_TAR = [0.2, 0.6, 0.7, 0.9]
CROSS_NON = [0.1, 0.3, 0.5, 0.8]


def _pair(tar, non):
    scores = np.array(list(tar) + list(non), dtype=np.float64)
    labels = np.array([1] * len(tar) + [0] * len(non))
    return scores, labels


def test_eer_at_known_crossing():
    # The point >0.5 has P_miss = P_fa = 1/4 exactly.
    assert eer(*_pair(CROSS_TAR, CROSS_NON)) == pytest.approx(0.25)


def test_eer_interpolates_inside_a_segment():
    # The crossing lies strictly inside a diagonal segment created by a tie:
    # targets {0.5, 0.9}, non-targets {0.1, 0.5} (a tie at 0.5): 0.1N {0.5T,0.5N} 0.9T.
    # Points: (0,1) (0,1/2) (1/2,0) (1,0). Segment (0,1/2)->(1/2,0) meets P_miss=P_fa at 1/4.
    # Breaking the tie in the targets' favour would give (0,0) -> 0; against them (1/2,1/2) -> 0.5.
    scores, labels = _pair([0.5, 0.9], [0.1, 0.5])
    assert eer(scores, labels) == pytest.approx(0.25)


def test_eer_interpolation_unequal_class_sizes():
    # Targets {0.5, 0.5, 0.9}, non-targets {0.5}: sorted {0.5T,0.5T,0.5N} 0.9T.
    # Points: (0,1) (2/3,0) (1,0). Segment from (0,1) to (2/3,0): P_miss = 2a/3, P_fa = 1-a;
    # equal at a = 3/5 -> EER = 2/5.
    scores, labels = _pair([0.5, 0.5, 0.9], [0.5])
    assert eer(scores, labels) == pytest.approx(0.4)


def test_error_rates_group_ties():
    scores, labels = _pair([0.5, 0.9], [0.1, 0.5])
    p_miss, p_fa = error_rates(scores, labels)
    np.testing.assert_allclose(p_miss, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(p_fa, [1.0, 0.5, 0.0, 0.0])


def test_min_dcf_ties_are_not_split():
    # Tie case above, points (0,1) (0,1/2) (1/2,0) (1,0).
    scores, labels = _pair([0.5, 0.9], [0.1, 0.5])
    # p=0.5, C=1: normaliser 0.5, cost/0.5 = P_miss + P_fa -> 1, 1/2, 1/2, 1 -> 0.5 (a split tie would give 0).
    assert min_dcf(scores, labels, p_target=0.5) == pytest.approx(0.5)
    # p=0.01: normaliser 0.01, cost/0.01 = P_miss + 99 P_fa -> 99, 49.5, 0.5, 1 -> 0.5.
    assert min_dcf(scores, labels, p_target=0.01) == pytest.approx(0.5)


def test_min_dcf_normalisation():
    scores, labels = _pair(CROSS_TAR, CROSS_NON)
    # p=0.5, C=1: P_miss + P_fa over the 9 points: 1, .75, 1, .75, .5, .75, 1, .75, 1 -> 0.5.
    assert min_dcf(scores, labels, p_target=0.5) == pytest.approx(0.5)
    # p=0.9, C=1: c_miss*p = 0.9 > c_fa*(1-p) = 0.1, so the normaliser is 0.1 and
    # cost/0.1 = 9 P_miss + P_fa -> 1, .75, 3, 2.75, 2.5, 4.75, 7, 6.75, 9 -> 0.75.
    assert min_dcf(scores, labels, p_target=0.9) == pytest.approx(0.75)
    # p=0.5, c_miss=1, c_fa=3: normaliser min(0.5, 1.5) = 0.5, cost/0.5 = P_miss + 3 P_fa
    # -> 3, 2.25, 2.5, 1.75, 1, 1.25, 1.5, .75, 1 -> 0.75.
    assert min_dcf(scores, labels, p_target=0.5, c_miss=1, c_fa=3) == pytest.approx(0.75)
    # p=0.01, c_miss=10: normaliser min(0.1, 0.99) = 0.1, cost/0.1 = P_miss + 9.9 P_fa
    # -> 9.9, 7.425, 7.675, 5.2, 2.725, 2.975, 3.225, .75, 1 -> 0.75.
    assert min_dcf(scores, labels, p_target=0.01, c_miss=10) == pytest.approx(0.75)
    # An unnormalised cost would be 0.075 here: check we divide.
    assert min_dcf(scores, labels, p_target=0.01, c_miss=10) != pytest.approx(0.075)


def test_integer_labels_and_float32_accepted():
    scores, labels = _pair(CROSS_TAR, CROSS_NON)
    assert eer(scores.astype(np.float32), labels.astype(bool)) == pytest.approx(0.25)
    assert eer(list(scores), list(labels)) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([], [], "empty"),
        ([0.1, 0.2], [1, 1], "no non-target"),
        ([0.1, 0.2], [0, 0], "no target"),
        ([0.1, np.nan], [1, 0], "non-finite"),
        ([0.1, np.inf], [1, 0], "non-finite"),
        ([0.1, 0.2, 0.3], [1, 0], "differ in length"),
        ([[0.1, 0.2]], [[1, 0]], "1-D"),
        ([0.1, 0.2], [2, 0], "0/1"),
        ([0.1, 0.2], [0.5, 0.0], "0/1"),
    ],
)
def test_invalid_scores_raise(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        eer(np.array(scores), np.array(labels))
    with pytest.raises(ValueError, match=match):
        min_dcf(np.array(scores), np.array(labels))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"p_target": 0.0}, "p_target"),
    ({"p_target": 1.0}, "p_target"),
    ({"c_miss": 0.0}, "c_miss"),
    ({"c_fa": -1.0}, "c_fa"),
])
def test_invalid_costs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        min_dcf(*_pair(CROSS_TAR, CROSS_NON), **kwargs)


# --------------------------------------------------------------------------- brute force comparison


def _brute_force_points(scores, labels):
    """Operating points by direct counting at every threshold (independent of the sort logic)."""
    tar = scores[labels]
    non = scores[~labels]
    thresholds = [-np.inf] + sorted(set(scores.tolist()))  # accept score > t
    p_miss = np.array([np.mean(tar <= t) for t in thresholds])
    p_fa = np.array([np.mean(non > t) for t in thresholds])
    return p_miss, p_fa


def _brute_force_eer(scores, labels):
    """Solve P_miss(a) = P_fa(a) on the piecewise-linear ROC, parameterised by point index."""
    p_miss, p_fa = _brute_force_points(scores, labels)
    idx = np.arange(p_miss.size, dtype=float)

    def diff(a):
        return np.interp(a, idx, p_miss) - np.interp(a, idx, p_fa)

    root = brentq(diff, 0.0, idx[-1], xtol=1e-12)
    return float(np.interp(root, idx, p_miss))


def _brute_force_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0):
    p_miss, p_fa = _brute_force_points(scores, labels)
    best = min(c_miss * p_target * m + c_fa * (1 - p_target) * f for m, f in zip(p_miss, p_fa))
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 400
    labels = rng.random(n) < (0.1 + 0.15 * seed)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + 1.2 * labels
    if seed % 2:
        # Coarse rounding creates many ties, including target/non-target ties.
        scores = np.round(scores, 1)
    assert eer(scores, labels) == pytest.approx(_brute_force_eer(scores, labels), abs=1e-6)
    for p in (0.01, 0.05, 0.5):
        assert min_dcf(scores, labels, p_target=p) == pytest.approx(
            _brute_force_min_dcf(scores, labels, p), abs=1e-9
        )
    assert min_dcf(scores, labels, p_target=0.2, c_miss=3, c_fa=0.5) == pytest.approx(
        _brute_force_min_dcf(scores, labels, 0.2, 3, 0.5), abs=1e-9
    )


def test_eer_is_order_invariant_and_bounded():
    rng = np.random.default_rng(7)
    labels = rng.random(1000) < 0.3
    scores = rng.normal(size=1000) + labels
    perm = rng.permutation(1000)
    assert eer(scores[perm], labels[perm]) == eer(scores, labels)
    assert 0.0 < eer(scores, labels) < 0.5
    assert 0.0 < min_dcf(scores, labels) <= 1.0


# --------------------------------------------------------------------------- profiles and trials


def test_enrollment_split_uses_first_k_by_utterance_index():
    # Speaker 7: 5 utterances stored out of order; speaker 3: 2 utterances; speaker 9: 1 (skipped).
    speaker = np.array([7, 7, 3, 7, 9, 7, 3, 7])
    utterance = np.array([4, 0, 1, 2, 0, 3, 0, 1])
    split = enrollment_split(speaker, utterance, k=2)
    np.testing.assert_array_equal(split.speakers, [3, 7])
    # Speaker 7 enrolls utterances 0, 1 (rows 1, 7); speaker 3 has K_s = min(2, 2-1) = 1: utterance 0 (row 6).
    assert sorted(np.flatnonzero(split.enroll_mask).tolist()) == [1, 6, 7]
    assert sorted(np.flatnonzero(split.test_mask).tolist()) == [0, 2, 3, 5]
    assert not split.enroll_mask[4] and not split.test_mask[4]
    np.testing.assert_array_equal(split.enroll_counts, [1, 2])
    # Each test row points to its own speaker's profile.
    assert dict(zip(split.test_index.tolist(), split.test_speaker.tolist())) == {2: 0, 0: 1, 3: 1, 5: 1}


def test_speaker_profiles_are_normalised_mean_of_normalised_rows():
    speaker = np.array([0, 0, 0, 1, 1, 1])
    utterance = np.array([2, 0, 1, 0, 1, 2])
    emb = np.array([[9.0, 9.0], [2.0, 0.0], [0.0, 5.0], [0.0, -3.0], [-1.0, 0.0], [1.0, 1.0]])
    split = enrollment_split(speaker, utterance, k=2)
    profiles = speaker_profiles(emb, split)
    # Speaker 0: utterances 0,1 = rows 1,2 -> (1,0)+(0,1) -> (1,1)/sqrt2 (the raw mean (1, 2.5) would differ).
    # Speaker 1: utterances 0,1 = rows 3,4 -> (0,-1)+(-1,0) -> (-1,-1)/sqrt2.
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(profiles, [[s, s], [-s, -s]], atol=1e-12)


def _clusters(n_spk, n_utt, dim, noise, rng, centers=None):
    if centers is None:
        centers = rng.normal(size=(n_spk, dim))
    speaker = np.repeat(np.arange(n_spk), n_utt)
    utterance = np.tile(np.arange(n_utt), n_spk)
    emb = centers[speaker] + noise * rng.normal(size=(speaker.size, dim))
    return emb, speaker, utterance, centers


def test_profiles_use_exactly_k_first_utterances_end_to_end():
    # Two speakers on orthogonal axes. Each speaker's utterances with index >= 2 sit, on the
    # profile side, on the OTHER speaker's axis. With k=2 the profiles are clean and every trial
    # separates (EER 0); with k=4 the profiles are the diagonal and cannot tell the speakers apart.
    e1, e2 = np.eye(2)
    speaker = np.array([0] * 5 + [1] * 5)
    utterance = np.array([0, 1, 2, 3, 4] * 2)
    profile_side = np.array([e1, e1, e2, e2, e2, e2, e2, e1, e1, e1])
    test_side = np.array([e1] * 5 + [e2] * 5) + 0.01 * np.arange(10)[:, None]
    perm = np.random.default_rng(0).permutation(10)  # row order must not matter
    m2 = evaluate_trials(profile_side[perm], test_side[perm], speaker[perm], utterance[perm], k=2)
    assert m2.eer == 0.0 and m2.sid_top1 == 1.0
    assert (m2.n_target, m2.n_nontarget, m2.n_speakers) == (6, 6, 2)
    m4 = evaluate_trials(profile_side[perm], test_side[perm], speaker[perm], utterance[perm], k=4)
    assert (m4.n_target, m4.n_nontarget) == (2, 2)
    assert m4.eer >= 0.25


def test_k_capped_at_n_minus_one():
    rng = np.random.default_rng(1)
    emb, speaker, utterance, _ = _clusters(4, 3, 8, 0.1, rng)
    m = evaluate_trials(emb, emb, speaker, utterance, k=10)
    # Each speaker: K_s = min(10, 3 - 1) = 2 enroll, 1 test.
    assert (m.n_target, m.n_nontarget, m.n_speakers) == (4, 12, 4)


def test_sid_top1_constructed():
    # Profiles on e1, e2, e3 (utterances 0, 1). Tests (utterances 2, 3, 4): speaker 0 has one test
    # utterance on e2 -> misidentified; all others correct: top-1 = 8/9.
    eye = np.eye(3)
    speaker = np.repeat([0, 1, 2], 5)
    utterance = np.tile(np.arange(5), 3)
    profile_side = eye[speaker]
    test_side = eye[speaker].copy()
    test_side[4] = eye[1] + 0.1 * eye[0]
    m = evaluate_trials(profile_side, test_side, speaker, utterance, k=2)
    assert m.sid_top1 == pytest.approx(8 / 9)
    assert (m.n_target, m.n_nontarget, m.n_speakers) == (9, 18, 3)
    assert isinstance(m, Metrics)


def test_string_speaker_labels():
    rng = np.random.default_rng(2)
    emb, speaker, utterance, _ = _clusters(3, 6, 5, 0.2, rng)
    names = np.array(["ann", "bob", "cy"])[speaker]
    assert evaluate_trials(emb, emb, names, utterance, k=3) == evaluate_trials(emb, emb, speaker, utterance, k=3)


def test_evaluate_trials_is_deterministic_and_row_order_invariant():
    rng = np.random.default_rng(3)
    emb, speaker, utterance, _ = _clusters(20, 12, 16, 0.8, rng)
    a = evaluate_trials(emb, emb, speaker, utterance)
    b = evaluate_trials(emb, emb, speaker, utterance)
    assert a == b
    perm = rng.permutation(speaker.size)
    c = evaluate_trials(emb[perm], emb[perm], speaker[perm], utterance[perm])
    assert c.eer == pytest.approx(a.eer, abs=1e-3)
    assert (c.n_target, c.n_nontarget, c.sid_top1) == (a.n_target, a.n_nontarget, a.sid_top1)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p, t, s, u: (p, t, s, np.where(np.arange(u.size) == 1, 0, u)), "duplicate utterance index"),
        (lambda p, t, s, u: (p, t, s, u.astype(float)), "integer"),
        (lambda p, t, s, u: (p, t, s[:-1], u), "equal length"),
        (lambda p, t, s, u: (p[:-1], t, s, u), "profile embeddings"),
        (lambda p, t, s, u: (p, t[:, :3], s, u), "different spaces"),
        (lambda p, t, s, u: (np.where(np.arange(p.shape[0])[:, None] == 0, np.nan, p), t, s, u), "non-finite"),
        (lambda p, t, s, u: (p, np.where(np.arange(t.shape[0])[:, None] == 3, 0.0, t), s, u), "zero norm"),
        (lambda p, t, s, u: (p, t, np.zeros_like(s), np.arange(u.size)), "at least 2 speakers"),
    ],
)
def test_evaluate_trials_invalid_input(mutate, match):
    rng = np.random.default_rng(4)
    emb, speaker, utterance, _ = _clusters(3, 4, 5, 0.2, rng)
    args = mutate(emb, emb.copy(), speaker, utterance)
    with pytest.raises(ValueError, match=match):
        evaluate_trials(*args, k=2)


def test_invalid_k():
    with pytest.raises(ValueError, match="k"):
        enrollment_split(np.array([0, 0]), np.array([0, 1]), k=0)


# --------------------------------------------------------------------------- gap closure


def test_gap_closure_arithmetic():
    # before 10%, after 4%: gain 6 points.
    assert gap_closure(0.10, 0.04, 0.04) == pytest.approx(1.0)
    assert gap_closure(0.10, 0.04, 0.10) == pytest.approx(0.0)
    assert gap_closure(0.10, 0.04, 0.064) == pytest.approx(0.6)  # (0.10-0.064)/0.06
    assert gap_closure(0.10, 0.04, 0.13) == pytest.approx(-0.5)  # worse than not updating
    assert gap_closure(0.10, 0.04, 0.01) == pytest.approx(1.5)  # better than the full update


def test_gap_closure_undefined_cases():
    assert gap_closure(0.05, 0.05, 0.02) is None
    assert gap_closure(0.05, 0.05 + 1e-7, 0.02) is None  # below GAP_DENOMINATOR_EPS
    assert gap_closure(float("nan"), 0.04, 0.02) is None
    assert gap_closure(0.10, float("inf"), 0.02) is None


# --------------------------------------------------------------------------- scenarios


class Rotate:
    """map_runtime undoes a known orthogonal map; map_enroll is the identity."""

    def __init__(self, q: np.ndarray) -> None:
        self.q = q  # applied as rows @ q
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def map_enroll(self, X):
        self.calls.append(("enroll", X.shape))
        return X

    def map_runtime(self, Y):
        self.calls.append(("runtime", Y.shape))
        return Y @ self.q


class Garbage:
    """Maps each side through an unrelated random projection: a broken aligner."""

    def __init__(self, d_x: int, d_y: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(d_x, 4))
        self.b = rng.normal(size=(d_y, 4))

    def map_enroll(self, X):
        return X @ self.a

    def map_runtime(self, Y):
        return Y @ self.b


def _orthonormal(d_in, d_out, seed):
    """(d_in, d_out) with orthonormal columns (d_out <= d_in) or rows."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(max(d_in, d_out), max(d_in, d_out))))
    return q[:d_in, :d_out]


def test_rotated_copy_is_perfectly_undone():
    rng = np.random.default_rng(10)
    old, speaker, utterance, _ = _clusters(25, 8, 6, 1.0, rng)
    r = _orthonormal(6, 6, 11)
    new = old @ r  # a rotated copy: same geometry, other coordinates
    rep = evaluate_scenario(
        {"old": old, "new": new}, speaker, utterance, "old", "new", "runtime-upgrade",
        aligners={"undo": Rotate(r.T)}, k=3,
    )
    assert [row.name for row in rep.rows] == ["sym_before", "sym_after", "asym_naive", "asym_undo"]
    before, after = rep.row("sym_before").metrics, rep.row("sym_after").metrics
    undo, naive = rep.row("asym_undo").metrics, rep.row("asym_naive").metrics
    assert after.eer == pytest.approx(before.eer, abs=1e-3)
    assert undo.eer == pytest.approx(before.eer, abs=1e-3)
    assert undo.sid_top1 == pytest.approx(before.sid_top1)
    assert naive.eer > before.eer + 0.1  # raw cross-space cosine is far worse
    assert rep.row("asym_undo").profile_model == "old" and rep.row("asym_undo").test_model == "new"


def _upgrade_data(seed=20):
    """old: 4-d, noisy; new: a 6-d orthonormal embedding of the same speakers, less noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(30, 4))
    old, speaker, utterance, _ = _clusters(30, 8, 4, 1.1, rng, centers)
    q = _orthonormal(6, 4, seed + 1).T  # (4, 6), orthonormal rows: x @ q embeds R^4 in R^6
    clean, _, _, _ = _clusters(30, 8, 4, 0.35, rng, centers)
    return {"old": old, "new": clean @ q}, speaker, utterance, q


def test_scenario_rows_and_sides_runtime_upgrade():
    emb, speaker, utterance, q = _upgrade_data()
    aligner = Rotate(q.T)  # runtime side is new (6-d) -> back to 4-d
    rep = evaluate_scenario(emb, speaker, utterance, "old", "new", "runtime-upgrade", {"rot": aligner}, k=4)
    assert [row.name for row in rep.rows] == ["sym_before", "sym_after", "asym_rot"]  # dims differ: no naive
    assert any("asym_naive omitted" in n for n in rep.notes)
    assert aligner.calls == [("enroll", (240, 4)), ("runtime", (240, 6))]
    rot = rep.row("asym_rot")
    assert (rot.profile_model, rot.test_model, rot.method) == ("old", "new", "rot")
    before, after = rep.row("sym_before").metrics.eer, rep.row("sym_after").metrics.eer
    assert after < before
    assert rep.row("sym_before").gap_closure == pytest.approx(0.0)
    assert rep.row("sym_after").gap_closure == pytest.approx(1.0)
    assert rot.gap_closure == pytest.approx((before - rot.metrics.eer) / (before - after))
    # Old profiles + clean tests sit between the two symmetric systems.
    assert 0.0 < rot.gap_closure < 1.0
    assert rot.note is None


def test_scenario_sides_enrollment_upgrade():
    emb, speaker, utterance, q = _upgrade_data()

    class NewEnrollToOld(Rotate):
        def map_enroll(self, X):
            self.calls.append(("enroll", X.shape))
            return X @ self.q  # new (6-d) profiles -> 4-d

        def map_runtime(self, Y):
            self.calls.append(("runtime", Y.shape))
            return Y

    aligner = NewEnrollToOld(q.T)
    rep = evaluate_scenario(
        emb, speaker, utterance, "old", "new", "enrollment-upgrade", {"rot": aligner}, k=4
    )
    assert aligner.calls == [("enroll", (240, 6)), ("runtime", (240, 4))]
    assert (rep.enroll_model, rep.runtime_model) == ("new", "old")
    rot = rep.row("asym_rot")
    assert (rot.profile_model, rot.test_model) == ("new", "old")
    assert rep.row("sym_before").profile_model == rep.row("sym_before").test_model == "old"
    assert rep.row("sym_after").profile_model == rep.row("sym_after").test_model == "new"


def test_negative_gap_closure_is_flagged():
    emb, speaker, utterance, _ = _upgrade_data()
    rep = evaluate_scenario(
        emb, speaker, utterance, "old", "new", "runtime-upgrade", {"bad": Garbage(4, 6, 5)}, k=4
    )
    bad = rep.row("asym_bad")
    assert bad.gap_closure < 0
    assert WORSE_THAN_NOT_UPDATING in bad.note
    md = rep.to_markdown()
    assert f"({WORSE_THAN_NOT_UPDATING})" in md


def test_naive_row_when_dims_match():
    rng = np.random.default_rng(30)
    old, speaker, utterance, centers = _clusters(10, 6, 5, 0.9, rng)
    new, _, _, _ = _clusters(10, 6, 5, 0.3, rng, centers)
    rep = evaluate_scenario({"old": old, "new": new, "other": old[:, :2]}, speaker, utterance,
                            "old", "new", "enrollment-upgrade")
    naive = rep.row("asym_naive")
    assert (naive.profile_model, naive.test_model, naive.method) == ("new", "old", "naive")
    # Same underlying space here, so the naive row is a valid system between before and after.
    assert naive.metrics.eer <= rep.row("sym_before").metrics.eer + 0.05


def test_scenario_report_rendering_and_determinism():
    emb, speaker, utterance, q = _upgrade_data()
    aligners: dict[str, Comparator] = {"rot": Rotate(q.T)}
    reps = [
        evaluate_scenario(emb, speaker, utterance, "old", "new", "runtime-upgrade", aligners, k=4),
        evaluate_scenario(emb, speaker, utterance, "old", "new", "runtime-upgrade", aligners, k=4),
    ]
    assert reps[0].to_dict() == reps[1].to_dict()
    doc = reports_to_dict(reps)
    text = json.dumps(doc, allow_nan=False)  # JSON-ready: no NaN, only plain types
    assert json.loads(text)["scenarios"][0]["rows"][2]["name"] == "asym_rot"
    md = reps[0].to_markdown()
    assert "| row | profile model | test model | EER % | minDCF | SID top-1 % | gap closure |" in md
    assert "| asym_rot | old | new |" in md
    assert "runtime-upgrade" in md
    full = reports_to_markdown(reps, title="Demo")
    assert full.startswith("# Demo") and full.count("| row |") == 2
    with pytest.raises(ValueError, match="no scenario reports"):
        reports_to_markdown([])


def test_zero_denominator_reported_as_na():
    rng = np.random.default_rng(40)
    old, speaker, utterance, _ = _clusters(12, 6, 5, 1.0, rng)
    rep = evaluate_scenario({"a": old, "b": old.copy()}, speaker, utterance, "a", "b", "runtime-upgrade")
    assert all(row.gap_closure is None for row in rep.rows)
    assert any("gap closure undefined" in n for n in rep.notes)
    assert "| n/a |" in rep.to_markdown()
    assert rep.to_dict()["rows"][0]["gap_closure"] is None


class Short:
    """An aligner that loses a row: evaluation must refuse it, not misalign trials."""

    def map_enroll(self, X):
        return X

    def map_runtime(self, Y):
        return Y[:-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scenario": "sideways"}, "unknown scenario"),
        ({"new_model": "missing"}, "no embeddings for model 'missing'"),
        ({"new_model": "old"}, "same"),
        ({"aligners": {"x": object()}}, "map_enroll"),
        ({"aligners": {"short": Short()}}, "'short': map_runtime returned shape"),
    ],
)
def test_scenario_invalid_input(kwargs, match):
    emb, speaker, utterance, _ = _upgrade_data()
    args = {"old_model": "old", "new_model": "new", "scenario": "runtime-upgrade", **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluate_scenario(emb, speaker, utterance, **args)


def test_scenario_rejects_wrong_row_count():
    emb, speaker, utterance, _ = _upgrade_data()
    emb = {"old": emb["old"], "new": emb["new"][:-1]}
    with pytest.raises(ValueError, match="model 'new' must be"):
        evaluate_scenario(emb, speaker, utterance, "old", "new", "runtime-upgrade")

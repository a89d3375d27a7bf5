"""The evaluation protocol (design.md section 2): trials, EER, minDCF, SID top-1, gap closure.

Every report in the project goes through this module so that numbers from the
central baselines, the federated runs and the real-model experiments are
comparable: one profile rule (mean of the first K enrollment utterances), one
trial list (every test utterance against every profile), one EER definition and
one minDCF normalisation.

Numpy only (no torch): the evaluation must run wherever the embeddings are, and
an aligner is reached only through the two methods of :class:`Comparator`.
Trial lists can hold ~1e7 scores, so scores are kept as one float32 matrix and
the error-rate sweep is a single sort.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from fed_nessa.data.datasets import EmbeddingSet
    from fed_nessa.data.population import Scenario

SCENARIOS = ("runtime-upgrade", "enrollment-upgrade")
DEFAULT_K = 10
DEFAULT_P_TARGET = 0.01
# |EER_sym_before - EER_sym_after| at or below this is treated as "no gain to close".
GAP_DENOMINATOR_EPS = 1e-6
WORSE_THAN_NOT_UPDATING = "worse than not updating"


# --------------------------------------------------------------------------- metrics on scores


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (scores, labels) pair and return flat views; one clear error per fault."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.size == 0:
        raise ValueError("no trials: scores and labels are empty")
    if not np.issubdtype(s.dtype, np.floating) and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.count_nonzero(~np.isfinite(s)))} non-finite value(s)")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.integer) or np.any((y != 0) & (y != 1)):
            raise ValueError("labels must be boolean or 0/1 (1 = target trial)")
        y = y.astype(bool)
    n_tar = int(np.count_nonzero(y))
    if n_tar == 0:
        raise ValueError("no target trials: EER/minDCF need at least one target and one non-target")
    if n_tar == y.size:
        raise ValueError("no non-target trials: EER/minDCF need at least one target and one non-target")
    return s, y


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct operating point of the detector.

    A trial is accepted when its score is above the threshold. Thresholds are
    placed *between* distinct score values (plus one below all and one above
    all), never inside a group of tied scores: a detector cannot split tied
    trials, so a tie between a target and a non-target becomes one diagonal step
    of the ROC instead of an optimistic or pessimistic corner.

    Returns ``(p_miss, p_fa)``, each of length (#distinct scores + 1), with
    ``p_miss`` rising from 0 to 1 and ``p_fa`` falling from 1 to 0.
    """
    s, y = _check_scores(scores, labels)
    # Plain sorts and a binary search instead of one argsort: ~5x faster on 1e7 trials.
    s_sorted = np.sort(s)
    last = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])  # last index of each group of ties
    last = np.append(last, s_sorted.size - 1)
    distinct = s_sorted[last]
    del s_sorted
    n_le = last + 1  # trials with score <= u_j
    n_tar = int(np.count_nonzero(y))
    n_non = int(y.size) - n_tar
    # Count in the smaller class, derive the other.
    if n_tar <= n_non:
        tar_le = np.searchsorted(np.sort(s[y]), distinct, side="right")
        non_le = n_le - tar_le
    else:
        non_le = np.searchsorted(np.sort(s[~y]), distinct, side="right")
        tar_le = n_le - non_le
    p_miss = np.concatenate(([0.0], tar_le / n_tar))
    p_fa = np.concatenate(([1.0], (n_non - non_le) / n_non))
    return p_miss, p_fa


def eer_from_rates(p_miss: np.ndarray, p_fa: np.ndarray) -> float:
    """Where the piecewise-linear ROC crosses P_miss = P_fa (linear interpolation on the segment)."""
    i = int(np.argmax(p_miss >= p_fa))  # first point at or past the crossing; i >= 1 as p_fa[0]=1
    d0 = p_fa[i - 1] - p_miss[i - 1]  # > 0
    d1 = p_fa[i] - p_miss[i]  # <= 0
    alpha = d0 / (d0 - d1)
    return float(p_miss[i - 1] + alpha * (p_miss[i] - p_miss[i - 1]))


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if not (c_miss > 0.0 and c_fa > 0.0 and math.isfinite(c_miss) and math.isfinite(c_fa)):
        raise ValueError(f"c_miss and c_fa must be finite and > 0, got {c_miss} and {c_fa}")


def _min_dcf_from_rates(
    p_miss: np.ndarray, p_fa: np.ndarray, p_target: float, c_miss: float, c_fa: float
) -> float:
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate as a fraction in [0, 1] (the standard speaker-verification definition).

    The ROC through all distinct operating points (see :func:`error_rates`) is
    joined by straight segments, and the EER is the rate where that curve meets
    P_miss = P_fa: exact, not the nearest threshold's average.
    """
    return eer_from_rates(*error_rates(scores, labels))


def min_dcf(
    scores: np.ndarray,
    labels: np.ndarray,
    p_target: float = DEFAULT_P_TARGET,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> float:
    """Normalised minimum detection cost over all thresholds.

    ``min_t (c_miss*p_target*P_miss(t) + c_fa*(1-p_target)*P_fa(t)) / min(c_miss*p_target,
    c_fa*(1-p_target))``: 1.0 is the cost of the better trivial system (accept all or
    reject all), so values above it never occur and 0 means perfect at that prior.
    """
    _check_costs(p_target, c_miss, c_fa)
    return _min_dcf_from_rates(*error_rates(scores, labels), p_target, c_miss, c_fa)


# --------------------------------------------------------------------------- profiles and trials


@dataclass(frozen=True)
class EnrollmentSplit:
    """Which utterances enroll which profile and which are tested (row masks over the n inputs)."""

    speakers: np.ndarray  # (m,) speaker labels that get a profile, sorted
    enroll_mask: np.ndarray  # (n,) bool
    test_mask: np.ndarray  # (n,) bool
    enroll_index: np.ndarray  # (n_enroll,) row indices, grouped by profile, by utterance index
    enroll_counts: np.ndarray  # (m,) K_s per profile
    test_index: np.ndarray  # (n_test,) row indices of test utterances
    test_speaker: np.ndarray  # (n_test,) profile index (into ``speakers``) of each test row


def enrollment_split(speaker: np.ndarray, utterance: np.ndarray, k: int = DEFAULT_K) -> EnrollmentSplit:
    """Apply the profile rule: the first K_s = min(k, n_s - 1) utterances (by utterance index) enroll.

    Ordering by the utterance index rather than by row keeps the split identical
    however the rows were shuffled or sharded. A speaker with fewer than two
    utterances cannot give both a profile and a test, so it is skipped entirely.
    """
    spk = np.asarray(speaker)
    utt = np.asarray(utterance)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (enrollment utterances per profile) must be an integer >= 1, got {k!r}")
    if spk.ndim != 1 or utt.ndim != 1 or spk.shape != utt.shape:
        raise ValueError(f"speaker and utterance must be 1-D of equal length, got {spk.shape} and {utt.shape}")
    if not np.issubdtype(utt.dtype, np.integer):
        raise ValueError(f"utterance must hold integer indices within each speaker, got dtype {utt.dtype}")
    labels, spk_idx = np.unique(spk, return_inverse=True)
    spk_idx = spk_idx.reshape(-1)
    order = np.lexsort((utt, spk_idx))
    s_sorted, u_sorted = spk_idx[order], utt[order]
    dup = np.flatnonzero((s_sorted[1:] == s_sorted[:-1]) & (u_sorted[1:] == u_sorted[:-1]))
    if dup.size:
        row = order[dup[0] + 1]
        raise ValueError(
            f"duplicate utterance index {int(utt[row])} for speaker {spk[row].item()!r} ({dup.size} duplicate(s))"
        )
    counts = np.bincount(spk_idx, minlength=labels.size)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(order.size) - starts[s_sorted]  # position within the speaker, by utterance index
    k_s = np.minimum(k, counts - 1)  # 0 for single-utterance speakers -> skipped below
    kept = counts >= 2
    enroll_sorted = kept[s_sorted] & (rank < k_s[s_sorted])
    test_sorted = kept[s_sorted] & (rank >= k_s[s_sorted])
    profile_of = np.cumsum(kept) - 1  # speaker index -> profile index
    n = spk.size
    enroll_mask = np.zeros(n, dtype=bool)
    test_mask = np.zeros(n, dtype=bool)
    enroll_mask[order[enroll_sorted]] = True
    test_mask[order[test_sorted]] = True
    return EnrollmentSplit(
        speakers=labels[kept],
        enroll_mask=enroll_mask,
        test_mask=test_mask,
        enroll_index=order[enroll_sorted],
        enroll_counts=k_s[kept],
        test_index=order[test_sorted],
        test_speaker=profile_of[s_sorted[test_sorted]],
    )


def _normalize_rows(x: np.ndarray, what: str) -> np.ndarray:
    """L2-normalise rows in float64, refusing rows that have no direction."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: embeddings must be 2-D (n, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: embeddings contain non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(norms[:, 0] == 0.0)
    if bad.size:
        raise ValueError(f"{what}: {bad.size} embedding row(s) have zero norm (first: row {int(bad[0])})")
    return x / norms


def speaker_profiles(profile_emb: np.ndarray, split: EnrollmentSplit) -> np.ndarray:
    """Profiles (m, d): L2-normalised mean of each speaker's L2-normalised enrollment rows."""
    x = np.asarray(profile_emb)
    if x.ndim != 2 or x.shape[0] != split.enroll_mask.size:
        raise ValueError(
            f"profile embeddings must be (n={split.enroll_mask.size}, d), got shape {x.shape}"
        )
    rows = _normalize_rows(x[split.enroll_index], "profile-side")
    starts = np.concatenate(([0], np.cumsum(split.enroll_counts)[:-1]))
    sums = np.add.reduceat(rows, starts, axis=0)
    return _normalize_rows(sums, "profile-side (mean of enrollment rows)")


def trial_scores(profiles: np.ndarray, test_rows: np.ndarray) -> np.ndarray:
    """Cosine score of every test row against every profile: (n_test, m) float32."""
    p = _normalize_rows(profiles, "profiles").astype(np.float32)
    t = _normalize_rows(test_rows, "test-side").astype(np.float32)
    if p.shape[1] != t.shape[1]:
        raise ValueError(
            f"profile and test embeddings live in different spaces: dims {p.shape[1]} vs {t.shape[1]}"
        )
    return t @ p.T


@dataclass(frozen=True)
class Metrics:
    """The protocol's numbers for one system (rates are fractions in [0, 1])."""

    eer: float
    min_dcf: float
    sid_top1: float
    n_target: int
    n_nontarget: int
    n_speakers: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "eer": self.eer,
            "min_dcf": self.min_dcf,
            "sid_top1": self.sid_top1,
            "n_target": self.n_target,
            "n_nontarget": self.n_nontarget,
            "n_speakers": self.n_speakers,
        }


def trial_matrix(profile_emb: np.ndarray, test_emb: np.ndarray, split: EnrollmentSplit) -> np.ndarray:
    """Every test utterance (rows, ``split.test_speaker`` names each row's own profile) scored against
    every profile (columns): the one trial list every figure and the gate's bootstrap share."""
    return trial_scores(speaker_profiles(profile_emb, split), np.asarray(test_emb)[split.test_index])


def _metrics_from_split(
    profile_emb: np.ndarray,
    test_emb: np.ndarray,
    split: EnrollmentSplit,
    p_target: float,
) -> Metrics:
    _check_costs(p_target, 1.0, 1.0)
    t = np.asarray(test_emb)
    if t.ndim != 2 or t.shape[0] != split.test_mask.size:
        raise ValueError(f"test embeddings must be (n={split.test_mask.size}, d), got shape {t.shape}")
    m = split.speakers.size
    if m < 2:
        raise ValueError(
            f"need at least 2 speakers with >= 2 utterances for non-target trials, got {m}"
        )
    scores = trial_matrix(profile_emb, t, split)
    n_test = scores.shape[0]
    target = np.zeros(scores.shape, dtype=bool)
    target[np.arange(n_test), split.test_speaker] = True
    top1 = float(np.mean(np.argmax(scores, axis=1) == split.test_speaker))
    p_miss, p_fa = error_rates(scores.reshape(-1), target.reshape(-1))
    return Metrics(
        eer=eer_from_rates(p_miss, p_fa),
        min_dcf=_min_dcf_from_rates(p_miss, p_fa, p_target, 1.0, 1.0),
        sid_top1=top1,
        n_target=n_test,
        n_nontarget=n_test * (m - 1),
        n_speakers=m,
    )


def evaluate_trials(
    profile_emb: np.ndarray,
    test_emb: np.ndarray,
    speaker: np.ndarray,
    utterance: np.ndarray,
    k: int = DEFAULT_K,
    p_target: float = DEFAULT_P_TARGET,
) -> Metrics:
    """EER, minDCF and closed-set SID top-1 for one system.

    ``profile_emb`` and ``test_emb`` are two views (n, d) of the SAME n
    utterances in one comparison space: the profile side enrolls (first K_s
    utterances of each speaker), the test side provides the remaining
    utterances, and every test utterance is scored against every profile.
    """
    split = enrollment_split(speaker, utterance, k)
    return _metrics_from_split(profile_emb, test_emb, split, p_target)


# --------------------------------------------------------------------------- gap closure


def gap_closure(eer_before: float, eer_after: float, eer_asym: float) -> float | None:
    """Share of the full update's EER gain that a one-sided update keeps.

    ``(eer_before - eer_asym) / (eer_before - eer_after)``; 1 = as good as
    updating both models and re-enrolling, 0 = no better than not updating,
    negative = worse than not updating. ``None`` when the full update gains
    nothing measurable (|denominator| <= GAP_DENOMINATOR_EPS) or an input is not
    finite, because the ratio then carries no information.
    """
    values = (eer_before, eer_after, eer_asym)
    if not all(isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) for v in values):
        return None
    denominator = float(eer_before) - float(eer_after)
    if abs(denominator) <= GAP_DENOMINATOR_EPS:
        return None
    return (float(eer_before) - float(eer_asym)) / denominator


# --------------------------------------------------------------------------- scenarios


@runtime_checkable
class Comparator(Protocol):
    """What evaluation needs from an aligner: map each side into one comparison space."""

    def map_enroll(self, X: np.ndarray) -> np.ndarray:
        """Enrollment-model rows (n, d_X) -> comparison space (n, d_S)."""
        ...

    def map_runtime(self, Y: np.ndarray) -> np.ndarray:
        """Runtime-model rows (n, d_Y) -> comparison space (n, d_S)."""
        ...


@dataclass(frozen=True)
class ScenarioRow:
    """One system of a scenario table."""

    name: str
    scenario: str
    profile_model: str
    test_model: str
    metrics: Metrics
    gap_closure: float | None
    method: str | None = None  # aligner name for asym_<method> rows, "naive" for asym_naive
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scenario": self.scenario,
            "profile_model": self.profile_model,
            "test_model": self.test_model,
            "method": self.method,
            **self.metrics.to_dict(),
            "gap_closure": self.gap_closure,
            "note": self.note,
        }


def _fmt_gap(value: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}"
    return f"{text} ({WORSE_THAN_NOT_UPDATING})" if value < 0 else text


@dataclass(frozen=True)
class ScenarioReport:
    """All rows of one update scenario, plus what is needed to read them."""

    scenario: str
    old_model: str
    new_model: str
    enroll_model: str
    runtime_model: str
    k: int
    p_target: float
    rows: tuple[ScenarioRow, ...]
    notes: tuple[str, ...] = ()

    def row(self, name: str) -> ScenarioRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r} in scenario {self.scenario} (rows: {[r.name for r in self.rows]})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no NaN: an undefined gap closure is ``None``)."""
        return {
            "scenario": self.scenario,
            "old_model": self.old_model,
            "new_model": self.new_model,
            "enroll_model": self.enroll_model,
            "runtime_model": self.runtime_model,
            "k": self.k,
            "p_target": self.p_target,
            "rows": [r.to_dict() for r in self.rows],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        first = self.rows[0].metrics
        lines = [
            f"### {self.scenario}: {self.old_model} -> {self.new_model}",
            "",
            f"Profiles from `{self.enroll_model}`, tests from `{self.runtime_model}` in the asymmetric rows; "
            f"K={self.k} enrollment utterances, {first.n_speakers} speakers, "
            f"{first.n_target} target / {first.n_nontarget} non-target trials, minDCF at p_target={self.p_target:g}.",
            "",
            "| row | profile model | test model | EER % | minDCF | SID top-1 % | gap closure |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            m = r.metrics
            lines.append(
                f"| {r.name} | {r.profile_model} | {r.test_model} | {100 * m.eer:.2f} | {m.min_dcf:.3f} "
                f"| {100 * m.sid_top1:.1f} | {_fmt_gap(r.gap_closure)} |"
            )
        notes = list(self.notes) + [f"{r.name}: {r.note}" for r in self.rows if r.note]
        if notes:
            lines.append("")
            lines.extend(f"- {n}" for n in notes)
        return "\n".join(lines) + "\n"


def scenario_sides(scenario: str, old_model: str, new_model: str) -> tuple[str, str]:
    """(enrollment-side model, runtime-side model) of the asymmetric system."""
    if scenario == "runtime-upgrade":
        return old_model, new_model
    if scenario == "enrollment-upgrade":
        return new_model, old_model
    raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")


def _mapped(aligner: Comparator, method: str, side: str, emb: np.ndarray, n: int) -> np.ndarray:
    """Call one side of an aligner and check it returned one row per utterance."""
    fn = aligner.map_enroll if side == "enroll" else aligner.map_runtime
    out = np.asarray(fn(emb))
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"aligner {method!r}: map_{side} returned shape {out.shape}, expected ({n}, d)")
    return out


def _row_note(gap: float | None) -> str | None:
    if gap is not None and gap < 0:
        return f"{WORSE_THAN_NOT_UPDATING}: EER above sym_before"
    return None


System = tuple[str, str, str, str | None, np.ndarray, np.ndarray]  # name, profile model, test model, method, p, t


def _scenario_systems(embeddings: Mapping[str, np.ndarray], split: EnrollmentSplit, old_model: str, new_model: str,
                      scenario: str, aligners: Mapping[str, Comparator] | None, notes: list[str]) -> list[System]:
    """Every system of one scenario as (profile-side, test-side) embeddings of the same utterances:
    sym_before, sym_after, asym_naive (same dimension only) and ``asym_<name>`` per aligner."""
    enroll_model, runtime_model = scenario_sides(scenario, old_model, new_model)
    if old_model == new_model:
        raise ValueError(f"old and new model are the same ({old_model!r}): nothing is updated")
    for name in (old_model, new_model):
        if name not in embeddings:
            raise ValueError(f"no embeddings for model {name!r} (have: {sorted(embeddings)})")
    n = split.enroll_mask.size
    for name in (old_model, new_model):
        shape = np.shape(embeddings[name])
        if len(shape) != 2 or shape[0] != n:
            raise ValueError(f"embeddings of model {name!r} must be (n={n}, d), got shape {shape}")
    aligners = dict(aligners or {})
    for method, aligner in aligners.items():
        if not isinstance(aligner, Comparator):
            raise ValueError(f"aligner {method!r} must have map_enroll(X) and map_runtime(Y)")

    x_side, y_side = embeddings[enroll_model], embeddings[runtime_model]
    systems: list[System] = [
        ("sym_before", old_model, old_model, None, embeddings[old_model], embeddings[old_model]),
        ("sym_after", new_model, new_model, None, embeddings[new_model], embeddings[new_model]),
    ]
    if np.shape(x_side)[1] == np.shape(y_side)[1]:
        systems.append(("asym_naive", enroll_model, runtime_model, "naive", x_side, y_side))
    else:
        notes.append(
            f"asym_naive omitted: {enroll_model} ({np.shape(x_side)[1]}-d) and "
            f"{runtime_model} ({np.shape(y_side)[1]}-d) differ in dimension"
        )
    for method, aligner in aligners.items():
        p = _mapped(aligner, method, "enroll", x_side, n)
        t = _mapped(aligner, method, "runtime", y_side, n)
        systems.append((f"asym_{method}", enroll_model, runtime_model, method, p, t))

    return systems


def evaluate_scenario(
    embeddings: Mapping[str, np.ndarray],
    speaker: np.ndarray,
    utterance: np.ndarray,
    old_model: str,
    new_model: str,
    scenario: str,
    aligners: Mapping[str, Comparator] | None = None,
    k: int = DEFAULT_K,
    p_target: float = DEFAULT_P_TARGET,
) -> ScenarioReport:
    """All rows of one update scenario on one evaluation set (held-out speakers only).

    ``runtime-upgrade``: profiles stay in the old model, tests come from the new
    one; ``enrollment-upgrade``: profiles are recomputed with the new model,
    tests come from the old one. Every row uses the same split into enrollment
    and test utterances, so rows differ only by the system.
    """
    split = enrollment_split(speaker, utterance, k)
    enroll_model, runtime_model = scenario_sides(scenario, old_model, new_model)
    notes: list[str] = []
    systems = _scenario_systems(embeddings, split, old_model, new_model, scenario, aligners, notes)
    metrics = [_metrics_from_split(p, t, split, p_target) for (*_, p, t) in systems]
    before, after = metrics[0].eer, metrics[1].eer
    if abs(before - after) <= GAP_DENOMINATOR_EPS:
        notes.append("gap closure undefined: the new model has the same EER as the old one")
    elif after > before:
        notes.append(
            "the new model is worse than the old one (sym_after EER > sym_before EER): "
            "gap closure measures a loss, read it with care"
        )
    rows = tuple(
        ScenarioRow(
            name=name,
            scenario=scenario,
            profile_model=prof,
            test_model=test,
            metrics=m,
            gap_closure=(g := gap_closure(before, after, m.eer)),
            method=method,
            note=_row_note(g),
        )
        for (name, prof, test, method, _, _), m in zip(systems, metrics)
    )
    return ScenarioReport(
        scenario=scenario,
        old_model=old_model,
        new_model=new_model,
        enroll_model=enroll_model,
        runtime_model=runtime_model,
        k=int(k),
        p_target=float(p_target),
        rows=rows,
        notes=tuple(notes),
    )


def reports_to_markdown(reports: Sequence[ScenarioReport], title: str = "Evaluation") -> str:
    """One markdown document with a section per scenario and the protocol stated once."""
    if not reports:
        raise ValueError("no scenario reports to render")
    head = [
        f"# {title}",
        "",
        "Protocol: profile = L2-normalised mean of the first K enrollment utterances (fewer where a speaker "
        "has fewer); every test utterance is scored (cosine) against every profile; EER and minDCF "
        "(C_miss = C_fa = 1) over all trials, SID top-1 = nearest profile. Gap closure = "
        "(EER_sym_before - EER_row) / (EER_sym_before - EER_sym_after); the paper's bar is >= 0.60, "
        f"negative means {WORSE_THAN_NOT_UPDATING}.",
        "",
        "",
    ]
    return "\n".join(head) + "\n".join(r.to_markdown() for r in reports)


def reports_to_dict(reports: Sequence[ScenarioReport]) -> dict[str, Any]:
    """One JSON-ready dict holding every scenario report."""
    if not reports:
        raise ValueError("no scenario reports to render")
    return {
        "protocol": {
            "profile": "l2-normalised mean of the first K l2-normalised enrollment utterances",
            "scoring": "cosine, every test utterance vs every profile",
            "c_miss": 1.0,
            "c_fa": 1.0,
            "gap_closure": "(eer_sym_before - eer_row) / (eer_sym_before - eer_sym_after)",
        },
        "scenarios": [r.to_dict() for r in reports],
    }


def evaluate_held_out(held_out: EmbeddingSet, scenario: Scenario, aligners: Mapping[str, Any]) -> ScenarioReport:
    """The protocol on a held-out set in a scenario (its old and new model); both engines and the gate
    score their aligners with it."""
    embeddings = {m: held_out.emb(m) for m in (scenario.old_model, scenario.new_model)}
    return evaluate_scenario(embeddings, held_out.speaker, held_out.utterance, scenario.old_model,
                             scenario.new_model, scenario.name, aligners=dict(aligners))


@dataclass(frozen=True)
class HeldOutTrials:
    """The score matrices of a held-out set's systems (the gate's speaker bootstrap resamples them)."""

    scores: dict[str, np.ndarray]  # row name (sym_before, asym_<name>) -> (n_test, m) scores
    test_speaker: np.ndarray  # (n_test,) each test row's own profile column


def matrix_eer(scores: np.ndarray, test_speaker: np.ndarray) -> float:
    """The protocol's EER of one score matrix (rows' own profile in ``test_speaker``)."""
    target = np.zeros(scores.shape, dtype=bool)
    target[np.arange(scores.shape[0]), test_speaker] = True
    return eer(scores.reshape(-1), target.reshape(-1))


def held_out_trials(held_out: EmbeddingSet, scenario: Scenario, aligners: Mapping[str, Any],
                    rows: Sequence[str] = ("sym_before",)) -> HeldOutTrials:
    """The trials behind :func:`evaluate_held_out`'s rows ``rows`` plus ``asym_<name>`` per aligner."""
    embeddings = {m: held_out.emb(m) for m in (scenario.old_model, scenario.new_model)}
    split = enrollment_split(held_out.speaker, held_out.utterance, DEFAULT_K)
    systems = _scenario_systems(embeddings, split, scenario.old_model, scenario.new_model, scenario.name,
                                dict(aligners), [])
    keep = set(rows) | {f"asym_{name}" for name in aligners}
    return HeldOutTrials({name: trial_matrix(p, t, split) for name, *_, p, t in systems if name in keep},
                         split.test_speaker)


def summary_row(report: ScenarioReport, name: str) -> dict[str, Any]:
    """One row of a report as a run summary stores it."""
    row = report.row(name)
    return {"eer": row.metrics.eer, "min_dcf": row.metrics.min_dcf, "sid_top1": row.metrics.sid_top1,
            "gap_closure": row.gap_closure}


def federated_row(held_out: EmbeddingSet, scenario: Scenario, comparator: Any) -> dict[str, Any]:
    """A round entry's evaluation: the federated aligner's row on a federation's held-out set
    (injected into the round protocol, which may not import this package)."""
    return summary_row(evaluate_held_out(held_out, scenario, {"federated": comparator}), "asym_federated")


def reference_rows(report: ScenarioReport) -> dict[str, Any]:
    """The final rows beside the federated one, as every engine states them: the pooled non-DP NESSA and
    ridge references and the two symmetric baselines."""
    return {"centralised_nessa": summary_row(report, "asym_centralised_nessa"),
            "ridge": summary_row(report, "asym_ridge"),
            "sym_before": summary_row(report, "sym_before"), "sym_after": summary_row(report, "sym_after")}

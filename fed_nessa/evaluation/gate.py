"""The promotion gate: ship an aligner only where it beats not updating, else ship nothing.

The candidates are **not updating** (keep the current runtime model: the old model scored
against the old enrollment profiles, the scenario's ``sym_before``), the run's DP linear start
(when it has one) and DP NESSA (when DP-SGD rounds ran). DP training can make an aligner worse
than not updating (field-notes: real-dev voices, 8 households, 38.3 % against 12.8 %), so the
server scores every candidate on its OWN validation speakers (server-side data, never device
data, never the speakers the run is reported on) and ships the best; ties go to the simpler,
safer candidate (not updating, then the linear start). Without a validation set nothing can be
shown to help, so nothing ships unless the operator says so (``ship-without-validation``).
Everything here is post-processing of released aggregates: it costs no privacy.

A lower validation EER is not enough: on 100 validation speakers the EER difference of two
aligners moves by about a point from one draw of speakers to the next (docs/results.md "The gate's
confidence"; at 3k devices and epsilon 8 a DP NESSA 1.1 points better on the validation speakers
was 0.5 points worse on the test speakers). So the candidates climb from the simplest: a more
complex one replaces the current choice only when it is better on the validation speakers AND
better in at least ``gate-confidence`` (default 0.95) of paired speaker resamples
(:mod:`fed_nessa.evaluation.speaker_bootstrap`).
The bootstrap resamples within the one validation sample and cannot see that sample's own luck;
only more speakers narrow it, hence 400 by default (``validation-speakers``; docs/results.md "How many
validation speakers").

``aligner = auto`` ships the gate's choice among the aligners; ``linear`` / ``nessa`` pin
which aligner the run may ship, but the pinned one still ships only where it beats not
updating (an explicit choice never hands an operator harm; the reason names the pin).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fed_nessa.config import GATE_CONFIDENCE, AlignerChoice, FederationConfig, Phase
from fed_nessa.evaluation.protocol import (
    ScenarioReport,
    evaluate_held_out,
    held_out_trials,
    matrix_eer,
    summary_row,
)
from fed_nessa.evaluation.speaker_bootstrap import DEFAULT_RESAMPLES, bootstrap_eers, win_rate

if TYPE_CHECKING:
    from fed_nessa.data.datasets import EmbeddingSet
    from fed_nessa.data.population import Scenario

KEEP = "none"  # ship nothing: keep the current runtime model
LINEAR_START = "linear-start"
DP_NESSA = "dp-nessa"
#: Simplest and safest first: a tie goes to the earlier one.
CANDIDATES = (KEEP, LINEAR_START, DP_NESSA)
#: The summary key (and evaluation row suffix) of each aligner candidate.
ROW = {LINEAR_START: "linear_start", DP_NESSA: "dp_nessa"}
#: What ``aligner = linear|nessa`` pins (``auto`` pins nothing).
PINNED = {AlignerChoice.LINEAR: LINEAR_START, AlignerChoice.NESSA: DP_NESSA}
#: The aligner card's flag: false when the run's gate shipped nothing (the artifact is not for deployment).
SHIPPED = "shipped"
LABEL = {KEEP: "nothing (keep the current runtime model)", LINEAR_START: "the DP linear start",
         DP_NESSA: "DP NESSA"}
#: Each candidate as the gate's weighing names it.
WEIGHED = {**LABEL, KEEP: "not updating"}


@dataclass(frozen=True)
class GateDecision:
    shipped: str  # one of CANDIDATES (KEEP: nothing is shipped)
    aligner: str | None  # the aligner the run's artifact holds (shipped or not); None without any
    validation_eer: dict[str, float | None]  # every candidate's EER on the server's validation speakers
    reason: str
    # challenger -> share of paired speaker resamples where it beat the choice it was weighed against
    win_rate: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None  # the share a challenger needs (None: no validation, nothing weighed)
    resamples: int = 0

    @property
    def ships(self) -> bool:
        return self.shipped != KEEP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _candidate_trials(candidates: Mapping[str, Any], validation: EmbeddingSet,
                      scenario: Scenario) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Score matrices of not updating and of every candidate on the validation speakers (scored once:
    the point EERs and the bootstrap both read them)."""
    trials = held_out_trials(validation, scenario, {ROW[c]: a for c, a in candidates.items()})
    scores = {KEEP: trials.scores["sym_before"], **{c: trials.scores[f"asym_{ROW[c]}"] for c in candidates}}
    return scores, trials.test_speaker


def validation_eers(candidates: Mapping[str, Any], validation: EmbeddingSet, scenario: Scenario) -> dict[str, float]:
    """EER of not updating and of every aligner candidate on the server's ``validation`` speakers."""
    scores, test_speaker = _candidate_trials(candidates, validation, scenario)
    return {c: matrix_eer(m, test_speaker) for c, m in scores.items()}


def _best(eers: Mapping[str, float], among: list[str]) -> str:
    """The lowest EER among ``among`` (in CANDIDATES order: a tie keeps the simpler one)."""
    best = among[0]
    for c in among[1:]:
        if eers[c] < eers[best]:
            best = c
    return best


@dataclass(frozen=True)
class _Climb:
    chosen: str
    wins: dict[str, float]  # challenger -> its win share against the choice it was weighed against
    against: dict[str, str]  # challenger -> that choice


def _climb(eers: Mapping[str, float], boot: Mapping[str, Any], among: list[str], confidence: float) -> _Climb:
    """The simplest-first climb: each challenger replaces the current choice only where it is
    better on the validation speakers and in at least ``confidence`` of the paired resamples."""
    chosen, wins, against = KEEP, {}, {}
    for c in among:
        wins[c], against[c] = win_rate(boot[c], boot[chosen]), chosen
        if eers[c] < eers[chosen] and wins[c] >= confidence:
            chosen = c
    return _Climb(chosen, wins, against)


def _weighing(climb: _Climb, resamples: int, confidence: float) -> str:
    said = [f"{WEIGHED[c]} beat {WEIGHED[climb.against[c]]} in {100 * w:.0f} %" for c, w in climb.wins.items()]
    return f"; of {resamples} speaker resamples {', '.join(said)} (the gate asks {100 * confidence:.0f} %)"


def promotion_gate(candidates: Mapping[str, Any], validation: EmbeddingSet | None, scenario: Scenario,
                   choice: str = AlignerChoice.AUTO, ship_without_validation: bool = False,
                   confidence: float = GATE_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES) -> GateDecision:
    """Decide what ships among not updating and ``candidates`` ({LINEAR_START/DP_NESSA: aligner}).

    ``choice`` is the run's ``aligner`` key: a pinned aligner (``linear``/``nessa``) is the only
    one that may ship; ``auto`` takes the best the climb reaches. The shipped aligner must beat not
    updating on the validation speakers with ``confidence``; without them it ships only with
    ``ship_without_validation``.
    """
    ran = [c for c in CANDIDATES if c in candidates]
    if not ran:
        return GateDecision(KEEP, None, {}, "the run produced no aligner")
    pinned = PINNED.get(AlignerChoice(choice))
    pin = pinned if pinned in ran else None
    pin_note = f"aligner = {choice} pins {LABEL[pin]}; " if pin else ""
    if validation is None:
        aligner = pin or ran[0]
        eers: dict[str, float | None] = {c: None for c in [KEEP, *ran]}
        if ship_without_validation:
            return GateDecision(aligner, aligner, eers, f"{pin_note}no server-side validation set, shipped untested "
                                                        "because ship-without-validation = true")
        return GateDecision(KEEP, aligner, eers, f"{pin_note}no server-side validation set: the gate cannot show that "
                                                 "any aligner beats not updating (set ship-without-validation = true "
                                                 "to ship untested)")
    matrices, test_speaker = _candidate_trials({c: candidates[c] for c in ran}, validation, scenario)
    scores = {c: matrix_eer(m, test_speaker) for c, m in matrices.items()}
    boot = bootstrap_eers(matrices, test_speaker, resamples)
    climb = _climb(scores, boot, [pin] if pin else ran, confidence)
    shipped = climb.chosen
    aligner = pin or (shipped if shipped != KEEP else _best(scores, ran))
    others = ", ".join(f"{LABEL[c]} {_pct(scores[c])}" for c in ran if c != aligner)
    versus = f"{LABEL[aligner]} {_pct(scores[aligner])} vs not updating {_pct(scores[KEEP])}" + (
        f" ({others})" if others else "")
    where = " EER on the server's validation speakers" + _weighing(climb, resamples, confidence)
    decided: dict[str, Any] = {"win_rate": climb.wins, "confidence": confidence, "resamples": resamples}
    if shipped != KEEP:
        return GateDecision(shipped, shipped, dict(scores), f"{pin_note}{versus}{where}", **decided)
    loses = f"{LABEL[pin]} does not beat" if pin else "no aligner beats"
    return GateDecision(KEEP, aligner, dict(scores), f"{pin_note}{loses} not updating with the gate's confidence: "
                                                     f"{versus}{where}; keep the current runtime model", **decided)


def final_figures(report: ScenarioReport, decision: GateDecision) -> dict[str, Any]:
    """The summary's ``final`` figures on the test speakers: what the operator actually gets.

    ``report`` scores every aligner candidate (rows ``asym_<ROW>``) on the reported speakers.
    When nothing ships the operator keeps the runtime model: the figures are ``sym_before``'s.
    """
    row = "sym_before" if not decision.ships else f"asym_{ROW[decision.shipped]}"
    final = summary_row(report, row)
    for c, key in ROW.items():
        if c in decision.validation_eer:
            final[key] = summary_row(report, f"asym_{key}")
    final["gate"] = decision.to_dict()
    return final


class GatedModel(Protocol):
    """What the gate needs of the server's model (``ServerModel``, which this layer may not import)."""

    completed: list[Phase]

    def linear_start_aligner(self) -> Any | None: ...

    def comparator(self) -> Any: ...

    def restore_linear_start(self) -> None: ...


def gate_run(model: GatedModel, validation: EmbeddingSet | None, test: EmbeddingSet, scenario: Scenario,
             cfg: FederationConfig) -> dict[str, Any]:
    """Both engines' end of run: decide, leave ``model`` holding the aligner its artifact keeps, and
    return the ``final`` figures on the test speakers ``test`` (with ``final["gate"]``).

    DP NESSA is a candidate only when DP-SGD rounds ran; every aligner is scored before the
    linear start is restored (the DP NESSA aligner shares the model's network).
    """
    dp_nessa = model.comparator() if Phase.DPSGD in model.completed else None
    candidates = {c: a for c, a in ((LINEAR_START, model.linear_start_aligner()), (DP_NESSA, dp_nessa))
                  if a is not None}
    decision = promotion_gate(candidates, validation, scenario, cfg.aligner, cfg.ship_without_validation,
                              cfg.gate_confidence)
    final = final_figures(evaluate_held_out(test, scenario, {ROW[c]: a for c, a in candidates.items()}), decision)
    if decision.aligner == LINEAR_START:
        model.restore_linear_start()
    return final


def card_fields(gate: Mapping[str, Any]) -> dict[str, Any]:
    """What the aligner card records about the gate (a summary's ``final.gate``); ``fed-nessa apply``
    reads :data:`SHIPPED`."""
    return {SHIPPED: gate["shipped"] != KEEP, "gate": dict(gate)}


def decision_sentence(gate: Mapping[str, Any]) -> str:
    """A summary's ``final.gate`` in one sentence (the top of the run report)."""
    reason = str(gate["reason"])
    return f"**Shipped: {LABEL[gate['shipped']]}.** {reason[:1].upper()}{reason[1:]}."


def unshipped_reason(training: Mapping[str, Any]) -> str | None:
    """Why an aligner card's run did not ship it (None: shipped, or an aligner made outside a run)."""
    if training.get(SHIPPED, True) is not False:
        return None
    return str((training.get("gate") or {}).get("reason", "the run's promotion gate shipped nothing"))

"""The promotion gate ships nothing rather than harm: not updating, the DP linear start and DP NESSA,
scored on the server's own validation speakers; a more complex candidate replaces a simpler one only
where it is better in at least gate-confidence of the paired speaker resamples; ties go to the simpler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_nessa.data.population import Scenario
from fed_nessa.data.synthetic import generate_population
from fed_nessa.evaluation.gate import (
    DP_NESSA,
    KEEP,
    LINEAR_START,
    ROW,
    final_figures,
    promotion_gate,
    validation_eers,
)
from fed_nessa.evaluation.protocol import evaluate_held_out
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig, RidgeAligner
from fed_nessa.model.training import TrainConfig

#: The synthetic population's models: enrolled by the old, tested with the new (runtime upgrade).
SCENARIO = Scenario("synth-old", "synth-new")


@pytest.fixture(scope="module")
def world() -> dict[str, object]:
    # 200 devices: the ridge start (6.1 % against not updating's 12.0 % on the 20 validation speakers) wins
    # 99.8 % of the speaker resamples; at 60 devices (11.1 %) it wins only 65 %.
    pop = generate_population(200, seed=3, eval_speakers=20, validation_speakers=20)
    x = np.concatenate([d.enroll for d in pop.devices])
    y = np.concatenate([d.runtime for d in pop.devices])

    assert pop.validation is not None and (pop.enroll_model, pop.runtime_model) == (SCENARIO.old_model,
                                                                                     SCENARIO.new_model)
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1], enroll_model=pop.enroll_model, runtime_model=pop.runtime_model)
    return {"x": x, "y": y, "val": pop.validation, "info": info}


def _aligner(world: dict[str, object], epochs: int, damage: float = 0.0) -> NessaAligner:
    """epochs 0: the linear start (ridge in the linear part, the residual at zero)."""
    a = NessaAligner(world["info"], NessaConfig(hidden=16, depth=1))  # type: ignore[arg-type]
    if epochs:
        a.fit(world["x"], world["y"], train_cfg=TrainConfig(epochs=epochs, batch_size=128, seed=0))  # type: ignore[arg-type]
    else:
        ridge = RidgeAligner(world["info"], alpha=1e-3).fit(world["x"], world["y"])  # type: ignore[arg-type]
        a.set_linear(ridge.W, ridge.b)
    if damage:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in a.net.residual.parameters():  # type: ignore[union-attr]
                p.add_(damage * torch.randn(p.shape, generator=gen))
    return a


def test_validation_speakers_are_not_the_reported_ones() -> None:
    pop = generate_population(5, seed=3, eval_speakers=10, validation_speakers=10)
    assert pop.validation is not None
    assert not set(np.unique(pop.eval.speaker)) & set(np.unique(pop.validation.speaker))


def test_aligners_all_worse_than_not_updating_ship_nothing(world: dict[str, object]) -> None:
    cands = {LINEAR_START: _aligner(world, 0, damage=0.5), DP_NESSA: _aligner(world, 0, damage=5.0)}
    for choice in ("auto", "linear", "nessa"):
        decision = promotion_gate(cands, world["val"], SCENARIO, choice)
        eer = decision.validation_eer
        assert decision.shipped == KEEP and not decision.ships, choice
        assert eer[KEEP] is not None and min(eer[LINEAR_START], eer[DP_NESSA]) > eer[KEEP]  # type: ignore[type-var]
        assert "keep the current runtime model" in decision.reason
    # auto keeps the better of the two aligners in its (unshipped) artifact
    assert promotion_gate(cands, world["val"], SCENARIO).aligner == LINEAR_START


def test_a_good_run_ships_the_best_candidate(world: dict[str, object]) -> None:
    start, broken = _aligner(world, 0), _aligner(world, 0, damage=0.5)
    val = world["val"]
    decision = promotion_gate({LINEAR_START: broken, DP_NESSA: start}, val, SCENARIO)
    eer = validation_eers({LINEAR_START: broken, DP_NESSA: start}, val, SCENARIO)
    assert eer[DP_NESSA] < eer[KEEP] < eer[LINEAR_START]
    assert decision.shipped == decision.aligner == DP_NESSA and decision.validation_eer == eer
    linear_only = promotion_gate({LINEAR_START: start}, val, SCENARIO, "linear")
    assert linear_only.shipped == LINEAR_START and DP_NESSA not in linear_only.validation_eer


def test_a_candidate_better_by_chance_does_not_ship() -> None:
    """Better on the validation speakers but not in 95 % of their resamples: nothing ships; the same
    aligner ships where the operator asks only a bare majority (gate-confidence = 0.5)."""
    pop = generate_population(60, seed=3, eval_speakers=20, validation_speakers=20)
    assert pop.validation is not None
    x = np.concatenate([d.enroll for d in pop.devices])
    y = np.concatenate([d.runtime for d in pop.devices])
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1], enroll_model=pop.enroll_model, runtime_model=pop.runtime_model)
    start = _aligner({"x": x, "y": y, "info": info}, 0)
    decision = promotion_gate({LINEAR_START: start}, pop.validation, SCENARIO)
    eer = decision.validation_eer
    assert eer[LINEAR_START] < eer[KEEP]  # type: ignore[operator]
    assert decision.shipped == KEEP and decision.aligner == LINEAR_START
    assert 0.5 < decision.win_rate[LINEAR_START] < 0.95 and decision.confidence == 0.95
    assert "with the gate's confidence" in decision.reason and "the gate asks 95 %" in decision.reason
    assert promotion_gate({LINEAR_START: start}, pop.validation, SCENARIO, confidence=0.5).shipped == LINEAR_START


def test_the_weighing_is_reproducible_and_recorded(world: dict[str, object]) -> None:
    cands = {LINEAR_START: _aligner(world, 0), DP_NESSA: _aligner(world, 0, damage=0.05)}
    first, again = (promotion_gate(cands, world["val"], SCENARIO) for _ in range(2))
    assert first == again and first.resamples == 1000
    assert set(first.win_rate) == {LINEAR_START, DP_NESSA} and first.to_dict()["win_rate"] == first.win_rate
    assert "DP NESSA beat the DP linear start in" in first.reason  # weighed against the choice it would replace


def test_ties_go_to_the_simpler_candidate(world: dict[str, object]) -> None:
    start = _aligner(world, 0)
    assert promotion_gate({LINEAR_START: start, DP_NESSA: start}, world["val"], SCENARIO).shipped == LINEAR_START


def test_a_pinned_aligner_ships_only_where_it_beats_not_updating(world: dict[str, object]) -> None:
    start, broken = _aligner(world, 0), _aligner(world, 0, damage=0.5)
    # aligner = nessa pins DP NESSA: a worse DP NESSA is not swapped for the linear start, and not shipped
    pinned = promotion_gate({LINEAR_START: start, DP_NESSA: broken}, world["val"], SCENARIO, "nessa")
    assert pinned.shipped == KEEP and pinned.aligner == DP_NESSA and "pins DP NESSA" in pinned.reason
    better = promotion_gate({LINEAR_START: broken, DP_NESSA: start}, world["val"], SCENARIO, "linear")
    assert better.shipped == KEEP and better.aligner == LINEAR_START  # the pin holds although DP NESSA is better
    assert "the DP linear start does not beat not updating" in better.reason


def test_without_validation_nothing_ships_unless_the_operator_says_so(world: dict[str, object]) -> None:
    start, other = _aligner(world, 0), _aligner(world, 0, damage=0.1)
    cands = {LINEAR_START: start, DP_NESSA: other}
    decision = promotion_gate(cands, None, SCENARIO)
    assert decision.shipped == KEEP and "ship-without-validation" in decision.reason
    assert decision.validation_eer == {KEEP: None, LINEAR_START: None, DP_NESSA: None}
    assert promotion_gate(cands, None, SCENARIO, ship_without_validation=True).shipped == LINEAR_START
    assert promotion_gate(cands, None, SCENARIO, "nessa", ship_without_validation=True).shipped == DP_NESSA
    assert promotion_gate({}, world["val"], SCENARIO).shipped == KEEP


def test_final_figures_are_what_the_operator_gets(world: dict[str, object]) -> None:
    """Nothing shipped: the summary's final EER is not updating's (sym_before), on the test speakers."""
    cands = {LINEAR_START: _aligner(world, 0, damage=0.5)}
    decision = promotion_gate(cands, world["val"], SCENARIO)
    test = world["val"]  # any held-out set serves as the test set here
    report = evaluate_held_out(test, SCENARIO, {ROW[c]: a for c, a in cands.items()})
    final = final_figures(report, decision)
    assert final["eer"] == report.row("sym_before").metrics.eer
    assert final["linear_start"]["eer"] == report.row("asym_linear_start").metrics.eer > final["eer"]
    assert final["gate"]["shipped"] == KEEP and "dp_nessa" not in final
    shipped = final_figures(report, promotion_gate({LINEAR_START: _aligner(world, 0)}, world["val"], SCENARIO))
    assert shipped["gate"]["shipped"] == LINEAR_START and shipped["eer"] == shipped["linear_start"]["eer"]

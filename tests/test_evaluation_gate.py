"""The promotion gate never ships an aligner worse than the linear start on the server's validation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_nessa.data.population import EvalSet
from fed_nessa.data.synthetic import generate_population
from fed_nessa.evaluation.gate import DP_NESSA, LINEAR_START, promotion_gate, validation_eer
from fed_nessa.model.aligners import AlignerInfo, NessaAligner, NessaConfig, RidgeAligner
from fed_nessa.model.training import TrainConfig

SCENARIO = "runtime-upgrade"


@pytest.fixture(scope="module")
def world() -> dict[str, object]:
    pop = generate_population(60, seed=3, eval_speakers=20, validation_speakers=20)
    x = np.concatenate([d.enroll for d in pop.devices])
    y = np.concatenate([d.runtime for d in pop.devices])

    def as_eval(es: object) -> EvalSet:
        emb = {m: np.asarray(es.emb(m), np.float32) for m in (pop.enroll_model, pop.runtime_model)}  # type: ignore[attr-defined]
        return EvalSet(emb, np.asarray(es.speaker), np.asarray(es.utterance), pop.enroll_model,  # type: ignore[attr-defined]
                       pop.runtime_model)

    assert pop.validation is not None
    info = AlignerInfo(d_x=x.shape[1], d_y=y.shape[1], enroll_model=pop.enroll_model, runtime_model=pop.runtime_model)
    return {"x": x, "y": y, "val": as_eval(pop.validation), "info": info}


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


def test_gate_ships_the_linear_start_over_a_worse_dp_nessa(world: dict[str, object]) -> None:
    start = _aligner(world, epochs=0)
    broken = _aligner(world, epochs=0, damage=0.5)
    decision = promotion_gate(start, broken, world["val"], SCENARIO)
    assert decision.shipped == LINEAR_START
    assert decision.dp_nessa_eer is not None and decision.linear_start_eer is not None
    assert decision.dp_nessa_eer > decision.linear_start_eer


def test_gate_ships_dp_nessa_only_when_it_is_better(world: dict[str, object]) -> None:
    start = _aligner(world, epochs=0)
    trained = _aligner(world, epochs=8)
    val = world["val"]
    decision = promotion_gate(start, trained, val, SCENARIO)
    args = (val.embeddings, val.speaker, val.utterance, val.old_model, val.new_model, SCENARIO)  # type: ignore[attr-defined]
    lin, nes = validation_eer(start, *args), validation_eer(trained, *args)
    assert decision.shipped == (DP_NESSA if nes < lin else LINEAR_START)
    shipped_eer = nes if decision.shipped == DP_NESSA else lin
    assert shipped_eer <= lin  # never worse than the start, whichever it picked


def test_gate_without_evidence_ships_the_start_and_without_a_start_ships_nessa(world: dict[str, object]) -> None:
    start, other = _aligner(world, epochs=0), _aligner(world, epochs=0, damage=0.1)
    assert promotion_gate(start, other, None, SCENARIO).shipped == LINEAR_START
    assert promotion_gate(None, other, world["val"], SCENARIO).shipped == DP_NESSA

"""The round protocol's shared steps (fed_nessa.federated.rounds): the evaluation cadence and the end of a run,
driven with injected stand-ins for the gate and the run folder (no engine, no evaluation import)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fed_nessa.config import Phase, from_run_config
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.rounds import (
    ALIGNER_DIR,
    CARD_PRIVACY_KEYS,
    RunOutputs,
    evaluates,
    finish_run,
    not_evaluated,
    round_entry,
    share_of_centralised,
)


def test_the_evaluation_cadence() -> None:
    cfg = from_run_config({"eval-every": 3})
    assert [r for r in range(1, 8) if evaluates(cfg, r, 7, Phase.DPSGD)] == [3, 6, 7]
    assert not evaluates(cfg, 1, 7, Phase.SUFFSTATS)
    assert evaluates(cfg, 1, 7, Phase.SUFFSTATS, statistics_rounds=True)  # the fleet engine's cadence
    assert not_evaluated() == {"eer": None, "min_dcf": None, "sid_top1": None, "gap_closure": None}


def test_the_round_entry_every_engine_states() -> None:
    fed = {"eer": 0.1, "min_dcf": 0.2, "sid_top1": 0.9, "gap_closure": 0.5, "not_a_column": 1}
    entry = round_entry(3, Phase.DPSGD, "applied", "sum of 5", fed, participants=5, declined=2, failed=1)
    assert list(entry) == ["round", "phase", "status", "note", "eer", "min_dcf", "sid_top1", "gap_closure",
                           "participants", "declined", "failed", "sampled", "saturated"]  # the summary's order
    assert (entry["phase"], entry["sampled"], entry["saturated"]) == ("dpsgd", 8, 0)
    assert round_entry(1, Phase.SUFFSTATS, "skipped", "", not_evaluated(), participants=0, declined=0,
                       failed=0)["eer"] is None


def test_share_of_centralised_only_when_both_are_known() -> None:
    final: dict[str, Any] = {"gap_closure": 0.3, "centralised_nessa": {"gap_closure": 0.6}}
    share_of_centralised(final)
    assert final["share_of_centralised_gap_closure"] == 0.5
    for central, fed in ((0.0, 0.3), (None, 0.3), (-0.2, 0.3), (0.6, None)):
        other: dict[str, Any] = {"gap_closure": fed, "centralised_nessa": {"gap_closure": central}}
        share_of_centralised(other)
        assert "share_of_centralised_gap_closure" not in other
    share_of_centralised(none := {"gap_closure": 0.3})  # no references at all
    assert "share_of_centralised_gap_closure" not in none


class _Model:
    def __init__(self) -> None:
        self.saved: list[tuple[Path, dict[str, Any], bool]] = []

    def save_artifact(self, out_dir: Path, card: dict[str, Any], deployable: bool = True) -> None:
        self.saved.append((out_dir, card, deployable))


def _finish(tmp_path: Path, shipped: bool, **kw: Any) -> tuple[dict[str, Any], _Model, list[Any]]:
    written: list[Any] = []

    def gate(model: Any, validation: Any, test: Any, scenario: Any, cfg: Any) -> dict[str, Any]:
        assert (validation, test, scenario) == ("val", "test", "scenario")  # the population's sets, as it hands them
        return {"gap_closure": 0.2, "gate": {"shipped": shipped}}

    def card_fields(gate_block: Mapping[str, Any]) -> dict[str, Any]:
        return {"shipped": gate_block["shipped"], "gate": dict(gate_block)}

    outputs = RunOutputs(gate, card_fields, "shipped", lambda run_dir, summary: written.append((run_dir, summary)),
                         lambda ev, scenario, comparator: {})
    model, events = _Model(), []
    privacy = dict.fromkeys(CARD_PRIVACY_KEYS, 1) | {"extra": 2}
    cfg = from_run_config({"run-dir": str(tmp_path / "run")})
    data = SimpleNamespace(validation="val", evaluation=lambda: ("test", "scenario"))
    summary = finish_run(model, data, cfg, NoisePlan(1.0, 1.0, 0, reason="the plan"), outputs,  # type: ignore[arg-type]
                         rounds=4, summary_of=lambda final: {"final": final, "privacy": privacy},
                         progress=events.append, **kw)
    assert written == [(tmp_path / "run", summary)]
    return summary, model, events


def test_finish_run_gates_states_and_ships_only_what_the_gate_ships(tmp_path: Path) -> None:
    summary, model, events = _finish(tmp_path, True, references=lambda: {"centralised_nessa": {"gap_closure": 0.4}},
                                     evaluation=lambda: {"report": 1},
                                     card_extra=lambda s: {"engine": "x"})
    final = summary["final"]
    assert final["aligner_plan"] == "the plan" and final["evaluation"] == {"report": 1}
    assert final["share_of_centralised_gap_closure"] == 0.5
    [(out, card, deployable)] = model.saved
    assert out == tmp_path / "run" / ALIGNER_DIR and deployable
    assert card["federated"] and card["rounds"] == 4 and card["engine"] == "x"
    assert set(card["privacy"]) == set(CARD_PRIVACY_KEYS)  # the summary's extra privacy fields stay out
    assert events == [{"event": "done", "run_dir": str(tmp_path / "run")}]
    summary, model, _ = _finish(tmp_path, False)
    assert "evaluation" not in summary["final"] and "share_of_centralised_gap_closure" not in summary["final"]
    assert model.saved[0][2] is False  # the gate kept the old state: nothing fit to deploy

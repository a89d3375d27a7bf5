"""The round protocol written once (fed_nessa.federated.protocol_loop), driven through a scripted engine:
the release rule, key pinning, the federation-ledger record and the hooks are the loop's, whatever the
engine (the two real engines are held to it by tests/test_sim_fleet.py and tests/test_server_federation.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fed_nessa.config import FederationConfig, Phase, from_run_config
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.population import Population, Scenario
from fed_nessa.federated.codec import SecAggCodec
from fed_nessa.federated.engine import Answers, Ending, Engine, Pins, Released
from fed_nessa.federated.noise_plan import NoisePlan, noise_plan
from fed_nessa.federated.protocol_loop import run_protocol
from fed_nessa.federated.release import promised_arrivals
from fed_nessa.federated.rounds import CARD_PRIVACY_KEYS, LEDGER_FILE, RunOutputs

DEVICES = 6


class _Model:
    """The server model's surface the loop uses, recording what it was asked to apply."""

    def __init__(self) -> None:
        self.applied: list[tuple[Phase, int]] = []
        self.d_x = self.d_y = 2  # the codec sizes an integer field by them (unused by the Gaussian codec)
        self.average = None  # no server-ema: each evaluated round states one EER

    def phases(self, aligner: Any = None) -> list[Phase]:
        return [Phase.DPSGD] * 4

    def payload_bound(self, phase: Phase, plan: NoisePlan) -> float:
        return 1.0

    def round_clip(self, phase: Phase) -> float | None:
        return None  # a fixed clip: the round config states none

    def loss_centre(self, phase: Phase) -> np.ndarray | None:
        return None  # the plain cosine loss: the round config states no centre

    def apply(self, phase: Phase, total: np.ndarray, n: int, **kw: Any) -> None:
        self.applied.append((phase, n))

    def comparator(self) -> None:
        return None

    def save_artifact(self, out_dir: Path, card: dict[str, Any], deployable: bool = True) -> None:
        return None


class _Scripted(Engine):
    """Round r: ``accept[r]`` devices accept, the engine's sum holds ``arrive[r]`` of them; in round
    ``rekey`` device d0 answers with a new key."""

    name = "scripted"

    def __init__(self, cfg: FederationConfig, accept: dict[int, int], arrive: dict[int, int], rekey: int) -> None:
        self.cfg, self.model = cfg, _Model()  # type: ignore[assignment]
        held_out = EmbeddingSet({m: np.eye(2, dtype=np.float32) for m in "er"}, [0, 1], [0, 1], [0, 0],
                                {m: m for m in "er"}, "scripted")
        self.data = Population("scripted", held_out, scenario=Scenario("e", "r"), enroll_model="e", runtime_model="r")
        self.plan = noise_plan(cfg, DEVICES)
        self.accept, self.arrive, self.rekey = accept, arrive, rekey
        self.summed: list[int] = []
        self.hooks: list[str] = []

    def noise_plan(self) -> NoisePlan:
        return self.plan

    def cohort(self, r: int, phase: Phase) -> list[int]:
        return list(range(DEVICES))

    def ask(self, r: int, phase: Phase, cohort: list[int], request: dict[str, Any]) -> Answers:
        k = self.accept[r]
        return Answers(cohort[:k], cohort[k:], [], {i: f"d{i}" for i in cohort}, {i: "budget" for i in cohort[k:]},
                       {i: f"key{i}" + ("-new" if r == self.rekey and i == 0 else "") for i in cohort})

    def secure_sum(self, r: int, phase: Phase, answers: Answers, request: dict[str, Any], codec: SecAggCodec,
                   promised: int) -> Released:
        self.summed.append(r)
        arrived = answers.accepted[:self.arrive[r]]
        return Released(np.zeros(3), arrived, len(arrived))

    def device_epsilons(self, r: int, phase: Phase, answers: Answers, released: Released | None) -> dict[str, Any]:
        return {"epsilon_max": 0.0, "epsilon_median": 0.0}

    def round_done(self, r: int, rounds: int, entry: dict[str, Any]) -> None:
        self.hooks.append(f"done {r}")

    def close(self, ledger: Any, pins: Pins) -> None:
        self.hooks.append("close")

    def release(self) -> None:
        self.hooks.append("release")

    def ending(self) -> Ending:
        return Ending(summary_of=lambda final: {"final": final, "privacy": dict.fromkeys(CARD_PRIVACY_KEYS, 1),
                                                "rounds": self.state.history})


def _outputs() -> RunOutputs:
    return RunOutputs(lambda *a: {"gap_closure": 0.0, "gate": {"shipped": False}},
                      lambda gate: {"shipped": False}, "shipped", lambda run_dir, summary: None,
                      lambda ev, scenario, comparator: {"eer": 0.1, "min_dcf": 0.2, "sid_top1": 0.3,
                                                        "gap_closure": 0.4})


def test_the_loop_applies_the_release_rule_pins_keys_and_records_every_round(tmp_path: Path) -> None:
    """Round 1: fewer accept than g, nothing summed. Round 2: the engine releases a sum of fewer than g
    (a faulty engine), refused and never applied. Round 3: applied. Round 4: d0's key changed, it is
    refused (failed) and the rest applied. Each fails without the loop's may_start, may_unmask or pins."""
    cfg = from_run_config({"run-dir": str(tmp_path / "run"), "num-devices": DEVICES, "min-arrivals": 3,
                           "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3, "dp-mode": "none"})
    g = promised_arrivals(cfg, DEVICES)
    engine = _Scripted(cfg, accept={1: g - 1, 2: DEVICES, 3: DEVICES, 4: DEVICES},
                       arrive={2: g - 1, 3: DEVICES, 4: DEVICES}, rekey=4)
    events: list[dict[str, Any]] = []
    summary = run_protocol(engine, _outputs(), events.append)
    statuses = [e["status"] for e in summary["rounds"]]
    assert statuses == ["skipped", "refused", "applied", "applied"]
    assert engine.summed == [2, 3, 4]  # round 1 never reached the secure sum
    assert engine.model.applied == [(Phase.DPSGD, DEVICES), (Phase.DPSGD, DEVICES - 1)]  # type: ignore[attr-defined]
    assert summary["rounds"][3]["failed"] == 1 and summary["rounds"][3]["participants"] == DEVICES - 1
    assert engine.hooks == ["done 1", "done 2", "done 3", "done 4", "close", "release"]
    assert [e["event"] for e in events] == ["start"] + ["round"] * 4 + ["done"]

    ledger = [json.loads(line) for line in (tmp_path / "run" / LEDGER_FILE).read_text().splitlines()]
    rounds = [e["payload"] for e in ledger if e["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4] and ledger[-1]["kind"] == "end"
    extra = [r["extra"] for r in rounds]
    assert all(x["engine"] == "scripted" and x["guaranteed_arrivals"] == g for x in extra)
    assert extra[0]["decline_reasons"] == {"budget": DEVICES - g + 1}
    assert extra[0]["device_key_fingerprints"] == {f"d{i}": f"key{i}" for i in range(DEVICES)}  # pinned once
    assert all(x["device_key_fingerprints"] == {} for x in extra[1:])
    assert extra[3]["key_mismatch"] == {"d0": "key0-new"} and "d0" in rounds[3]["failed"]


def test_pins_first_sight_wins_and_each_pin_is_flushed_once() -> None:
    pins = Pins({"a": "k1"})
    assert pins.offer("a", "k1") and not pins.offer("a", "k2") and pins.offer("b", "k3")
    assert pins.flush() == {"b": "k3"} and pins.flush() == {}
    answers = Answers([1, 2], [3], [], {1: "a", 2: "b", 3: "c"}, fingerprints={1: "k9", 3: "k4"})
    assert pins.check(answers) == {"a": "k9"}
    assert (answers.accepted, answers.declined, answers.failed) == ([2], [3], [1])
    assert pins.flush() == {"c": "k4"}

"""The round protocol's shared steps, written once for every engine.

Two engines run the protocol today: Flower + SecAgg+ (``server/federation.py``) and the fleet
engine (``fed_nessa/sim/fleet.py``). What both must do identically lives here and both call it:
the run folder's names, the evaluation cadence of a round entry, and the end of a run (the gate,
the final rows beside the centralised references, the aligner artifact and its card, summary,
report and plots). Evaluation, the gate and the run folder are *injected* (:class:`RunOutputs`):
``federated/`` never imports ``evaluation/`` (pyproject's layer rules), and no engine
re-implements them.

The per-round steps (cohort, asking the devices, key pinning, the release rule, apply, the ledger
record) are :mod:`fed_nessa.federated.protocol_loop`; an engine implements
:class:`fed_nessa.federated.engine.Engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fed_nessa.config import FederationConfig, Phase
from fed_nessa.data.datasets import EmbeddingSet
from fed_nessa.data.population import Population, Scenario
from fed_nessa.federated.noise_plan import NoisePlan
from fed_nessa.federated.server_model import ServerModel

#: The run folder's federation ledger and aligner artifact (one name for every engine).
LEDGER_FILE = "federation-ledger.jsonl"
ALIGNER_DIR = "aligner"
#: The evaluation columns of a round entry (None on a round the cadence skips).
EVAL_COLUMNS = ("eer", "min_dcf", "sid_top1", "gap_closure")
#: The summary's privacy fields the aligner's card repeats.
CARD_PRIVACY_KEYS = ("unit", "mode", "mechanism", "trust", "delta", "accountant", "epsilon_budget", "epsilon_max")

Progress = Callable[[dict[str, Any]], None]


def evaluates(cfg: FederationConfig, r: int, rounds: int, phase: Phase, *, statistics_rounds: bool = False) -> bool:
    """Whether round ``r`` of ``rounds`` evaluates the global aligner: every ``eval-every`` rounds and
    the last; ``statistics_rounds``: the statistics round too (the fleet engine's cadence)."""
    return r % cfg.eval_every == 0 or r == rounds or (statistics_rounds and phase == Phase.SUFFSTATS)


def not_evaluated() -> dict[str, Any]:
    """A round entry's evaluation columns on a round the cadence skips."""
    return dict.fromkeys(EVAL_COLUMNS)


#: A round entry's (and its federation-ledger record's) adaptive clip: the public C_t the round's config stated.
CLIP_COLUMN = "clip_norm"
#: A round entry's SecAgg+ field width under the integer mechanism (bits of Z_{2^bits}); absent otherwise.
FIELD_BITS_COLUMN = "field_bits"
#: Under ``server-ema``, an evaluated round's EER of the optimiser's last iterate (``eer`` is the average's).
LAST_ITERATE_COLUMN = "eer_last_iterate"


def round_entry(r: int, phase: Phase, status: str, note: str, evaluation: Mapping[str, Any], *,
                participants: int, declined: int, failed: int, saturated: int = 0) -> dict[str, Any]:
    """A round's entry in the summary, the columns every engine states, in order (the engine adds its epsilon
    and timing columns). ``failed`` counts the accepted devices whose vector did not make it into the sum,
    so ``sampled`` is everyone the round asked."""
    return {"round": r, "phase": str(phase), "status": str(status), "note": note,
            **{k: evaluation[k] for k in EVAL_COLUMNS}, "participants": participants, "declined": declined,
            "failed": failed, "sampled": participants + declined + failed, "saturated": saturated}


@dataclass(frozen=True)
class RunOutputs:
    """What the end of a run needs from evaluation and the run folder, injected by the engine."""

    #: The promotion gate (``evaluation.gate.gate_run``): model, validation set, test set, scenario, config.
    gate: Callable[[ServerModel, EmbeddingSet | None, EmbeddingSet, Scenario, FederationConfig], dict[str, Any]]
    #: The card's gate fields (``evaluation.gate.card_fields``) and the one naming whether it ships.
    card_fields: Callable[[Mapping[str, Any]], dict[str, Any]]
    shipped_key: str
    #: summary.json, report.md and the plots (``evaluation.run_folder``).
    write: Callable[[Path, dict[str, Any]], None]
    #: A round entry's evaluation: evaluation set, scenario, the global aligner's comparator
    #: (``evaluation.protocol.federated_row``).
    round_row: Callable[[EmbeddingSet, Scenario, Any], dict[str, Any]]


def share_of_centralised(final: dict[str, Any]) -> None:
    """The federated gap closure as a share of centralised NESSA's (only when both are known and > 0)."""
    central = final.get("centralised_nessa", {}).get("gap_closure")
    if central and final["gap_closure"] is not None and central > 0:
        final["share_of_centralised_gap_closure"] = final["gap_closure"] / central


def finish_run(model: ServerModel, data: Population, cfg: FederationConfig, plan: NoisePlan | None,
               outputs: RunOutputs, *, rounds: int, summary_of: Callable[[dict[str, Any]], dict[str, Any]],
               references: Callable[[], dict[str, Any]] | None = None,
               evaluation: Callable[[], dict[str, Any]] | None = None,
               card_extra: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """The end of every run: gate, final rows, artifact (shipped only if the gate says so), outputs.

    ``references`` (the pooled non-DP rows) and ``evaluation`` (the final report as a dict) are the
    engine's: the Flower engine computes the report before the references and states it, the fleet
    engine does not. ``summary_of`` builds the engine's summary around ``final``; ``card_extra``
    picks what the engine adds to the card from that summary.
    """
    run_dir = Path(cfg.run_dir)
    held_out, scenario = data.evaluation()
    final = outputs.gate(model, data.validation, held_out, scenario, cfg)  # every run
    final["aligner_plan"] = plan.reason if plan else ""
    report = evaluation() if evaluation is not None else None
    if references is not None:
        final.update(references())
    share_of_centralised(final)
    if report is not None:
        final["evaluation"] = report
    summary = summary_of(final)
    card = {"federated": True, "rounds": rounds,
            "privacy": {k: summary["privacy"][k] for k in CARD_PRIVACY_KEYS},
            **(card_extra(summary) if card_extra else {}), **outputs.card_fields(final["gate"])}
    model.save_artifact(run_dir / ALIGNER_DIR, card, deployable=card[outputs.shipped_key])
    outputs.write(run_dir, summary)
    if progress is not None:
        progress({"event": "done", "run_dir": str(run_dir)})
    return summary

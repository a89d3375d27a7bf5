"""The promotion gate: ship DP NESSA only where it beats the DP linear start.

DP-SGD rounds can make the aligner worse than the private linear start they began from
(field-notes: at 1,000 devices every DP-SGD setup did). The server therefore scores both on
its OWN validation speakers (server-side data, never device data, never the speakers the
run is reported on) and ships the better one. Everything here is post-processing of
released aggregates: it costs no privacy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fed_nessa.evaluation.protocol import evaluate_scenario

LINEAR_START = "linear-start"
DP_NESSA = "dp-nessa"


@dataclass(frozen=True)
class GateDecision:
    shipped: str  # LINEAR_START or DP_NESSA
    linear_start_eer: float | None
    dp_nessa_eer: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validation_eer(aligner: Any, embeddings: dict[str, np.ndarray], speaker: np.ndarray, utterance: np.ndarray,
                   old_model: str, new_model: str, scenario: str) -> float:
    report = evaluate_scenario(embeddings, speaker, utterance, old_model, new_model, scenario,
                               aligners={"candidate": aligner})
    return float(report.row("asym_candidate").metrics.eer)


def promotion_gate(linear_start: Any | None, dp_nessa: Any, validation: Any | None, scenario: str) -> GateDecision:
    """Ship the better of the two on ``validation`` (an EvalSet); ties and no evidence ship the linear start.

    Without a linear start (``linear-start = none``) DP NESSA is all there is. Without a
    validation set the gate cannot show DP NESSA is better, so it ships the linear start
    and says so.
    """
    if linear_start is None:
        return GateDecision(DP_NESSA, None, None, "no linear start in this run: DP NESSA is shipped")
    if validation is None:
        return GateDecision(LINEAR_START, None, None, "no server-side validation set: the gate cannot show that "
                                                      "DP NESSA beats the linear start, so the linear start is shipped")
    args = (validation.embeddings, validation.speaker, validation.utterance, validation.old_model,
            validation.new_model, scenario)
    lin, nessa = validation_eer(linear_start, *args), validation_eer(dp_nessa, *args)
    if nessa < lin:
        return GateDecision(DP_NESSA, lin, nessa, f"DP NESSA {100 * nessa:.2f} % < linear start "
                                                   f"{100 * lin:.2f} % "
                                                   "EER on the server's validation speakers")
    return GateDecision(LINEAR_START, lin, nessa,
                        f"DP NESSA {100 * nessa:.2f} % >= linear start {100 * lin:.2f} % EER on the server's "
                        "validation speakers: the linear start is shipped")

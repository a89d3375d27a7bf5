"""The audit's vocabulary: severities, tolerances and the result types.

Shared by :mod:`.verify` (which produces them) and :mod:`.report` (which
renders them). Keeping them here makes the dependency one-way:
``verify -> report -> findings`` and ``verify -> findings``, with no cycle, so
the report can change shape without touching what is verified and vice versa.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fed_nessa.privacy.events import DPEvent
from fed_nessa.privacy.statement import SECAGG_DOES_NOT_HIDE, SECAGG_HIDES

FAIL = "fail"
WARN = "warn"
#: (relative, absolute) tolerance of a reported epsilon against the recomputed one.
REPORT_TOLERANCE: dict[str, tuple[float, float]] = {"rdp": (1e-4, 1e-6), "prv": (0.01, 0.02),
                                                    "pld": (0.01, 0.02)}
#: Tight accountant may exceed the RDP upper bound only by its discretisation error.
TIGHT_OVER_RDP = (0.001, 0.01)
#: RDP's slack over a tight accountant beyond which the gap is flagged for explanation.
RDP_SLACK = (1.5, 1.0)
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class Finding:
    """One audit result that is not clean: ``fail`` fails the verdict, ``warn`` is for the record."""

    severity: str
    check: str
    message: str
    device: str | None = None
    seq: int | None = None


@dataclass
class DeviceAudit:
    """What the audit established about one device ledger."""

    device_id: str
    path: str
    key_fingerprint: str | None
    chain_ok: bool
    n_entries: int
    events: list[DPEvent] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    delta: float | None = None
    epsilon: dict[str, float] = field(default_factory=dict)
    reported_final: float | None = None
    reported_accountant: str | None = None
    curve_by_round: list[tuple[int, float]] = field(default_factory=list)
    reserve_rounds: dict[int, list[int]] = field(default_factory=dict)  # round -> reserve seqs

    def summary(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "path": self.path, "key_fingerprint": self.key_fingerprint,
            "chain_ok": self.chain_ok, "entries": self.n_entries, "events": len(self.events),
            "steps": sum(e.steps for e in self.events), "rounds": sorted(self.reserve_rounds),
            "pending_reservations": self.pending, "budget": self.budget, "delta": self.delta,
            "epsilon": self.epsilon, "reported_epsilon": self.reported_final,
            "reported_accountant": self.reported_accountant,
            "epsilon_per_round": [{"round": r, "epsilon": e} for r, e in self.curve_by_round],
            "events_detail": [e.to_dict() for e in self.events],
        }


@dataclass
class AuditResult:
    """The audit's full result; ``passed`` is the verdict."""

    path: str
    devices: list[DeviceAudit]
    findings: list[Finding]
    federation: dict[str, Any] | None
    statement: dict[str, Any]
    accountants: tuple[str, str]
    out_dir: str | None = None

    @property
    def passed(self) -> bool:
        return not any(f.severity == FAIL for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == FAIL]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": "pass" if self.passed else "fail",
            "path": self.path,
            "accountants": list(self.accountants),
            "tolerances": {"reported_vs_recomputed": REPORT_TOLERANCE,
                           "tight_over_rdp": {"rel": TIGHT_OVER_RDP[0], "abs": TIGHT_OVER_RDP[1]},
                           "rdp_slack_flagged_above": {"factor": RDP_SLACK[0], "abs": RDP_SLACK[1]}},
            "statement": self.statement,
            "threat_model": {"secure_aggregation_hides": SECAGG_HIDES,
                             "secure_aggregation_does_not_hide": SECAGG_DOES_NOT_HIDE},
            "devices": [d.summary() for d in self.devices],
            "federation": self.federation,
            "findings": [asdict(f) for f in self.findings],
            "counts": {"devices": len(self.devices), "fail": len(self.failures),
                       "warn": sum(f.severity == WARN for f in self.findings)},
        }

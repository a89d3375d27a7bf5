"""The audit's vocabulary: severities, tolerances and the result types.

Shared by :mod:`.verify` (which produces them) and :mod:`.report` (which
renders them). Keeping them here makes the dependency one-way:
``verify -> report -> findings`` and ``verify -> findings``, with no cycle, so
the report can change shape without touching what is verified and vice versa.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from fed_nessa.privacy.events import DPEvent
from fed_nessa.privacy.statement import SECAGG_DOES_NOT_HIDE, SECAGG_HIDES

FAIL = "fail"
WARN = "warn"
#: (relative, absolute) tolerance of a reported epsilon against the recomputed one.
REPORT_TOLERANCE: dict[str, tuple[float, float]] = {"rdp": (1e-4, 1e-6), "prv": (0.01, 0.02),
                                                    "pld": (0.01, 0.02), "skellam": (1e-4, 1e-6)}
#: Tight accountant may exceed the RDP upper bound only by its discretisation error.
TIGHT_OVER_RDP = (0.001, 0.01)
#: RDP's slack over a tight accountant beyond which the gap is flagged for explanation.
RDP_SLACK = (1.5, 1.0)
BUDGET_SLACK = 1e-9

#: Rounds as closed intervals (first, last): a device's 1,000-round span is one pair,
#: not 1,000 set members, which keeps the audit's memory and time flat in the rounds.
Interval = tuple[int, int]


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of closed round intervals as sorted, disjoint, non-adjacent intervals."""
    out: list[Interval] = []
    for first, last in sorted(intervals):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def subtract_intervals(base: Iterable[Interval], minus: list[Interval]) -> list[Interval]:
    """Rounds of ``base`` not in ``minus`` (``minus`` merged: sorted and disjoint)."""
    out: list[Interval] = []
    for first, last in merge_intervals(base):
        cur = first
        for m_first, m_last in minus:
            if m_last < cur:
                continue
            if m_first > last:
                break
            if m_first > cur:
                out.append((cur, m_first - 1))
            cur = max(cur, m_last + 1)
            if cur > last:
                break
        if cur <= last:
            out.append((cur, last))
    return out


def count_rounds(intervals: Iterable[Interval]) -> int:
    return sum(last - first + 1 for first, last in intervals)


def format_rounds(intervals: list[Interval], limit: int = 8) -> str:
    """``round 3`` / ``rounds 3..9, 12`` (the first ``limit`` runs), for finding messages."""
    parts = [f"{a}" if a == b else f"{a}..{b}" for a, b in intervals[:limit]]
    more = f" (+{len(intervals) - limit} more runs)" if len(intervals) > limit else ""
    single = len(intervals) == 1 and intervals[0][0] == intervals[0][1]
    return ("round " if single else "rounds ") + ", ".join(parts) + more


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
    #: Recomputed epsilon per accountant, in :attr:`unit` (the unit the device's budget is stated in).
    epsilon: dict[str, float] = field(default_factory=dict)
    #: The unit of the device's budget: ``example`` or ``device``.
    unit: str = "example"
    #: Every guarantee the ledger supports: unit -> accountant (and ``gaussian``, analytic) -> epsilon.
    epsilon_by_unit: dict[str, dict[str, float]] = field(default_factory=dict)
    reported_final: float | None = None
    reported_accountant: str | None = None
    curve_by_round: list[tuple[int, float]] = field(default_factory=list)
    #: (first round, last round, reserve seq) per valid reserve entry, in ledger order.
    reserve_spans: list[tuple[int, int, int]] = field(default_factory=list)
    #: The union of ``reserve_spans``' rounds (set by the audit once parsing is done).
    covered: list[Interval] = field(default_factory=list)
    #: round -> (model_sha256, config_sha256, reserve seq): what a single-round reserve says it received.
    received: dict[int, tuple[str | None, str | None, int]] = field(default_factory=dict)
    #: (reserve seq, rounds as intervals, chain, complete seq): a span's received-model chain.
    chains: list[tuple[int, tuple[Interval, ...], str, int]] = field(default_factory=list)
    #: server key fingerprint -> first seq recording it (the device's pin of the server).
    server_pins: dict[str, int] = field(default_factory=dict)
    #: SHA-256 of every entry by seq ("" for an unparsable line): the heads the server signed are checked on it.
    entry_hashes: list[str] = field(default_factory=list)

    def cover(self) -> None:
        """Compute :attr:`covered` from :attr:`reserve_spans` (once, after parsing)."""
        self.covered = merge_intervals((a, b) for a, b, _ in self.reserve_spans)

    def rounds_covered(self) -> int:
        """How many rounds the device's reservations cover (a span counts all of its rounds)."""
        return count_rounds(self.covered)

    def first_seq_covering(self, first: int, last: int) -> int | None:
        """The seq of the first reserve entry covering any round in ``first..last``."""
        return next((seq for a, b, seq in self.reserve_spans if a <= last and b >= first), None)

    def summary(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "path": self.path, "key_fingerprint": self.key_fingerprint,
            "chain_ok": self.chain_ok, "entries": self.n_entries, "events": len(self.events),
            "steps": sum(e.steps for e in self.events), "rounds_covered": self.rounds_covered(),
            "round_spans": [list(iv) for iv in self.covered],
            "pending_reservations": self.pending, "budget": self.budget, "delta": self.delta,
            "epsilon": self.epsilon, "unit": self.unit, "epsilon_by_unit": self.epsilon_by_unit,
            "reported_epsilon": self.reported_final,
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
    #: What this audit could not check (e.g. a single ledger: no federation ledger, no pins).
    not_checked: list[str] = field(default_factory=list)
    #: Accounting shared across devices (:meth:`EpsilonMemo.stats`) and the audit's wall time.
    performance: dict[str, Any] = field(default_factory=dict)

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
            "not_checked": self.not_checked,
            "findings": [asdict(f) for f in self.findings],
            "counts": {"devices": len(self.devices), "fail": len(self.failures),
                       "warn": sum(f.severity == WARN for f in self.findings)},
            "performance": self.performance,
        }

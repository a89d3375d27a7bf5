"""The audit of the integer (Skellam) mechanism's events: the accountants, and a second computation.

PLD and PRV have no Skellam mechanism, so a ledger holding :data:`~fed_nessa.privacy.events.SKELLAM`
events is replayed through ``rdp`` and ``skellam`` (RDP at more orders); what makes the audit's
figure independent of the closed-form bound both use is :func:`fed_nessa.privacy.skellam.audit_release`:
the Rényi divergence of the recorded mechanism summed numerically over the Skellam pmf, at the
recorded parameters, which the closed form must bound at every order. A record whose parameters
were edited is refused when it is read (:func:`fed_nessa.privacy.events.check_skellam_parameters`).
"""

from __future__ import annotations

import functools
from typing import Any

from fed_nessa.privacy.accounting import RDP, SKELLAM_ACCOUNTANT
from fed_nessa.privacy.audit.findings import FAIL, DeviceAudit, Finding
from fed_nessa.privacy.events import SKELLAM
from fed_nessa.privacy.skellam import SkellamRelease, audit_release, event_release
from fed_nessa.privacy.statement import GAUSSIAN_NOISE, SKELLAM_NOISE

#: The accountants a ledger with the integer mechanism is replayed through.
INTEGER_ACCOUNTANTS = (RDP, SKELLAM_ACCOUNTANT)


def accountants_for(dev: DeviceAudit, accountants: tuple[str, str], findings: list[Finding]) -> tuple[str, str]:
    """The two accountants for ``dev``'s history; with skellam events, also their numerical check."""
    events = [ev for ev in dev.events if ev.mechanism == SKELLAM and ev.steps]
    if not events:
        return accountants
    for ev in events:
        assert ev.skellam is not None  # a parsed skellam event carries its parameters
        try:
            _numerical_check(event_release(ev), int(ev.skellam["dim"]))
        except ArithmeticError as exc:
            findings.append(Finding(FAIL, "skellam.numerical", str(exc), dev.device_id))
    return INTEGER_ACCOUNTANTS


def holds_integer(devices: list[DeviceAudit]) -> bool:
    """Whether any audited ledger holds a skellam event (the report then shows :data:`INTEGER_ACCOUNTANTS`)."""
    return any(ev.mechanism == SKELLAM for d in devices for ev in d.events)


def check_claimed_mechanism(claim: dict[str, Any], devices: list[DeviceAudit], findings: list[Finding]) -> None:
    """The summary's ``mechanism`` must be what the ledgers record: skellam iff any event is skellam."""
    stated = claim.get("mechanism")
    spent = [ev for d in devices for ev in d.events if ev.steps]
    if stated is None or not spent:
        return
    recorded = SKELLAM_NOISE if any(ev.mechanism == SKELLAM for ev in spent) else GAUSSIAN_NOISE
    if stated != recorded:
        findings.append(Finding(FAIL, "summary.mechanism", f"summary states noise mechanism {stated!r}, the ledgers "
                                                           f"record {recorded!r} events"))


@functools.lru_cache(maxsize=256)
def _numerical_check(release: SkellamRelease, dim: int) -> float:
    # a fleet's ledgers repeat one release per round: each distinct one is summed once per audit process
    return audit_release(SkellamRelease(release.l2_sensitivity, release.l1_sensitivity, release.variance), dim)

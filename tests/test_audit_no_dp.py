"""A run that adds no DP noise audits as what it is: intact ledgers, no guarantee, and no false truncation.

Devices reserve nothing for a dp-mode-none round (there is no epsilon to spend), so the audit must not
read their missing reservations as deleted entries, yet must keep doing so when the server's own
records claim a DP run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_nessa.config import DevicePolicy, from_run_config
from fed_nessa.privacy.audit import audit
from fed_nessa.sim.fleet import run_fleet


@pytest.fixture(scope="module")
def non_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("nodp") / "run"
    cfg = from_run_config({"num-devices": 24, "num-server-rounds": 3, "clients-per-round": 0, "min-arrivals": 8,
                           "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3, "sample-rate": 0.2,
                           "aligner": "nessa", "dp-mode": "none", "references": False, "eval-speakers": 20,
                           "validation-speakers": 20, "hidden": 8, "run-dir": str(run_dir)})
    run_fleet(cfg, DevicePolicy(guaranteed_arrivals=8, allow_non_dp=True))
    return run_dir


def test_a_non_dp_run_passes_its_audit_and_says_no_guarantee_covers_it(non_dp_run: Path) -> None:
    result = audit(non_dp_run, write=False)
    assert result.passed, result.failures[:3]
    warned = [f for f in result.findings if f.check == "federation.no_dp"]
    assert len(warned) == 1 and "no DP guarantee covers what they sent" in warned[0].message


def test_a_summary_that_claims_dp_makes_the_missing_reservations_fail(non_dp_run: Path) -> None:
    """The excuse needs both parties: with the summary claiming distributed DP, every joined device
    without a reservation fails federation.joined as before."""
    summary_path = non_dp_run / "summary.json"
    original = summary_path.read_text()
    summary = json.loads(original)
    summary["privacy"]["mode"] = "distributed"
    summary_path.write_text(json.dumps(summary))
    try:
        result = audit(non_dp_run, write=False)
    finally:
        summary_path.write_text(original)
    assert not result.passed
    assert any(f.check == "federation.joined" for f in result.failures)


def test_a_non_dp_report_states_no_epsilon_rather_than_epsilon_zero(non_dp_run: Path) -> None:
    """An epsilon of 0 would claim perfect privacy; a run without noise has no epsilon at all."""
    from fed_nessa.evaluation.run_folder import epsilon_phrase

    report = (non_dp_run / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("- epsilon per "))
    assert "no DP" in line and "0.000" not in line
    assert epsilon_phrase(json.loads((non_dp_run / "summary.json").read_text())["privacy"]).startswith("none")
    assert epsilon_phrase({"mode": "distributed", "epsilon_max": 7.9651}) == "max 7.965"

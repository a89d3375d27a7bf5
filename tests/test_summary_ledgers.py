"""summary.json names the device ledgers by one path pattern and their number (not one path per
device), and the audit still finds a missing ledger from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fed_nessa.config import DevicePolicy, from_run_config
from fed_nessa.federated.protocol import DEVICE_LEDGER_PATTERN
from fed_nessa.privacy.audit import audit
from fed_nessa.privacy.audit.findings import FAIL, Finding
from fed_nessa.privacy.audit.verify import _check_referenced_files

DEVICES = 6


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from fed_nessa.sim.fleet import run_fleet

    tmp = tmp_path_factory.mktemp("fleet")
    cfg = from_run_config({
        "num-devices": DEVICES, "num-server-rounds": 3, "clients-per-round": 0, "min-arrivals": 4,
        "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3, "sample-rate": 0.2,
        "suffstats-noise-multiplier": 1.0, "noise-multiplier": 1.5, "aligner": "nessa", "eval-speakers": 20,
        "validation-speakers": 20, "hidden": 8, "server-optimizer": "sgd", "server-lr": 0.05,
        "references": False, "run-dir": str(tmp / "run")})
    return tmp / "run", run_fleet(cfg, DevicePolicy(guaranteed_arrivals=4))


def test_the_summary_records_the_ledger_pattern_and_count(fleet_run: tuple[Path, dict[str, Any]]) -> None:
    run, summary = fleet_run
    privacy = summary["privacy"]
    assert privacy["device_ledger_pattern"] == DEVICE_LEDGER_PATTERN == "devices/{device_id}/privacy-ledger.jsonl"
    assert privacy["num_device_ledgers"] == DEVICES and "device_ledgers" not in privacy
    assert json.loads((run / "summary.json").read_text())["privacy"] == privacy
    assert len(list(run.glob(DEVICE_LEDGER_PATTERN.replace("{device_id}", "*")))) == DEVICES
    assert f"per-device ledgers: {DEVICES} at `{DEVICE_LEDGER_PATTERN}`" in (run / "report.md").read_text()


def test_the_audit_finds_a_missing_ledger_from_the_pattern(fleet_run: tuple[Path, dict[str, Any]],
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fleet_run[0], run)
    assert audit(run, write=False).passed
    shutil.rmtree(run / "devices" / "device-00002")
    messages = [f.message for f in audit(run, write=False).findings
                if f.severity == FAIL and f.check == "evidence.missing_file"]
    assert messages == [f"summary.json states {DEVICES} device ledgers at {DEVICE_LEDGER_PATTERN!r}; "
                        f"{DEVICES - 1} are in the run folder"]


@pytest.mark.parametrize("pattern", ["/etc/{device_id}", "../{device_id}/privacy-ledger.jsonl", ""])
def test_a_pattern_outside_the_run_folder_counts_no_ledger(tmp_path: Path, pattern: str) -> None:
    (tmp_path / "x").mkdir()
    findings: list[Finding] = []
    _check_referenced_files(tmp_path / "x", {"privacy": {"device_ledger_pattern": pattern,
                                                         "num_device_ledgers": 1}}, findings)
    assert [f.check for f in findings] == ["evidence.missing_file"]


def test_older_summaries_with_one_path_per_device_are_still_checked(tmp_path: Path) -> None:
    (tmp_path / "devices" / "a").mkdir(parents=True)
    (tmp_path / "devices" / "a" / "privacy-ledger.jsonl").write_text("")
    findings: list[Finding] = []
    refs = {"a": "devices/a/privacy-ledger.jsonl", "b": "devices/b/privacy-ledger.jsonl"}
    _check_referenced_files(tmp_path, {"privacy": {"device_ledgers": refs}}, findings)
    assert [(f.check, f.device) for f in findings] == [("evidence.missing_file", "b")]

"""The federated table reads the study's CSV only and names a CSV it cannot use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulations.results_csv import row, write
from simulations.results_table import main, table


def _summary(devices: int, rounds: int, eer: float) -> dict[str, Any]:
    cfg = {"num-devices": devices, "num-server-rounds": rounds, "suffstats-rounds": 1, "linear-start": "suffstats",
           "dp-mode": "distributed", "epsilon-budget": 8.0, "suffstats-noise-multiplier": 0.64,
           "noise-multiplier": 1.5, "data-source": "synthetic"}
    ref = {"eer": 0.04, "gap_closure": 0.9}
    return {"config": cfg, "rounds": [{"eer": eer, "seconds": 10.0, "declined": 0}] * rounds,
            "final": {"eer": eer, "gap_closure": 0.5, "share_of_centralised_gap_closure": 0.55,
                      "centralised_nessa": ref, "ridge": ref},
            "privacy": {"epsilon_max": 7.97, "epsilon_median": 7.9}}


def test_rows_come_from_the_csv(tmp_path: Path) -> None:
    csv = tmp_path / "federated.csv"
    write(csv, [row(_summary(300, 1, 0.0695), "a"), row(_summary(1000, 3, 0.0695), "b")])
    assert main([str(csv)]) == 0
    out = table([row(_summary(300, 1, 0.0695), "a"), row(_summary(1000, 3, 0.0695), "b")]).splitlines()
    assert len(out) == 4
    assert "| 1000 | linear start + DP-SGD |" in out[2] and "| 300 | linear start only |" in out[3]
    assert "0.64 / –" in out[3] and "6.95" in out[3] and "55 %" in out[3]
    assert out[2].endswith("| 10 / 10.0 |") and out[3].endswith("| 10 / – |")


def test_a_missing_csv_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.csv")]) == 2
    assert f"{tmp_path / 'nope.csv'}: no such results CSV" in capsys.readouterr().err


def test_a_run_without_a_final_evaluation_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = _summary(300, 1, 0.07)
    summary["final"] = {}
    csv = tmp_path / "federated.csv"
    write(csv, [row(summary, "fed-unfinished")])
    assert main([str(csv)]) == 2
    assert f"{csv}: run fed-unfinished has no final evaluation yet" in capsys.readouterr().err

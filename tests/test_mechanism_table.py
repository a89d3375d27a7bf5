"""Issue 19's side-by-side table reads the study's CSV only: cells by run name, mechanism by the recorded key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fed_nessa.federated.rounds import FIELD_BITS_COLUMN
from simulations.mechanism_table import main, table
from simulations.results_csv import read, row, write


def _summary(mechanism: str | None, eer: float, bits: int | None, devices: int = 1000) -> dict[str, Any]:
    cfg: dict[str, Any] = {"num-devices": devices, "dp-mode": "distributed", "epsilon-budget": 8.0}
    if mechanism is not None:
        cfg["distributed-mechanism"] = mechanism
    first: dict[str, Any] = {"round": 1, "phase": "suffstats", "eer": eer, "seconds": 60.0}
    if bits is not None:
        first[FIELD_BITS_COLUMN] = bits
    return {"config": cfg, "rounds": [first], "final": {"eer": eer, "gate": {"shipped": "linear-start"}},
            "privacy": {"epsilon_max": 7.965}}


def test_draws_are_grouped_by_cell_and_mechanism(tmp_path: Path) -> None:
    rows = [row(_summary("gaussian", 0.0745, None), "mech-main-gaussian-draw1"),
            row(_summary("gaussian", 0.0735, None), "mech-main-gaussian-draw2"),
            row(_summary("skellam", 0.0760, 31), "mech-main-skellam-draw1"),
            row(_summary(None, 0.0395, None, 10_000), "selfset-10000dev-eps8-draw1"),  # before the column
            row(_summary("skellam", 0.0400, 27, 10_000), "selfset-10000dev-eps8-skellam-draw1"),
            row(_summary("gaussian", 0.05, None, 10_000), "selfset-10000dev-eps3-draw1")]  # another cell: not shown
    csv = tmp_path / "mechanism.csv"
    write(csv, rows)
    lines = table(read(csv)).splitlines()
    assert len(lines) == 2 + 4
    gauss_main = next(x for x in lines if x.startswith("| main job") and "| gaussian |" in x)
    assert "| 2 |" in gauss_main and "7.40 ± 0.07" in gauss_main and "7.965" in gauss_main
    assert gauss_main.endswith("| n/a |")
    skellam_main = next(x for x in lines if x.startswith("| main job") and "| skellam |" in x)
    assert "| 1 |" in skellam_main and "| 7.60 |" in skellam_main and skellam_main.endswith("| 31 |")
    fleet = [x for x in lines if x.startswith("| 10k devices")]
    assert len(fleet) == 2 and "| gaussian | 1 |" in fleet[0] and fleet[1].endswith("| 27 |")
    assert main([str(csv)]) == 0


def test_a_missing_csv_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.csv")]) == 2
    assert f"{tmp_path / 'nope.csv'}: no such results CSV" in capsys.readouterr().err

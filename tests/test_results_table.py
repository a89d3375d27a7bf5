"""The run-folder table reads summaries only and names a folder that is not a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.results_table import main, table


def _summary(devices: int, rounds: int, eer: float) -> dict:
    cfg = {"num-devices": devices, "num-server-rounds": rounds, "suffstats-rounds": 1, "linear-start": "suffstats",
           "dp-mode": "distributed", "epsilon-budget": 8.0, "suffstats-noise-multiplier": 0.64,
           "noise-multiplier": 1.5, "data-source": "synthetic"}
    row = {"eer": 0.04, "gap_closure": 0.9}
    return {"config": cfg, "rounds": [{"eer": eer, "seconds": 10.0, "declined": 0}] * rounds,
            "final": {"eer": eer, "gap_closure": 0.5, "share_of_centralised_gap_closure": 0.55,
                      "centralised_nessa": row, "ridge": row},
            "privacy": {"epsilon_max": 7.97, "epsilon_median": 7.9}}


def test_rows_come_from_the_summaries(tmp_path: Path) -> None:
    for name, devices, rounds in (("a", 300, 1), ("b", 1000, 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(_summary(devices, rounds, 0.0695)))
    out = table([tmp_path / "a", tmp_path / "b"]).splitlines()
    assert len(out) == 4
    assert "| 1000 | linear start + DP-SGD |" in out[2] and "| 300 | linear start only |" in out[3]
    assert "0.64 / –" in out[3] and "6.95" in out[3] and "55 %" in out[3]


def test_a_folder_without_a_summary_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path}/summary.json: no summary.json" in capsys.readouterr().err

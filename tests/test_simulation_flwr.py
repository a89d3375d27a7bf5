"""``flwr run .`` on Flower's Ray simulation engine: the same apps, offline, no SuperLink left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_simulation import make_folder

from simulations.flwr_run import flwr_run, our_superlinks


@pytest.mark.slow
def test_flwr_run_simulation_writes_a_run_folder_and_stops_its_superlink(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    run_dir, home = tmp_path / "run", tmp_path / "flwr-home"
    run_config = (f"data-source='{data}' run-dir='{run_dir}' num-devices=8 clients-per-round=6 "
                  "secagg-num-shares=5 secagg-reconstruction-threshold=3 min-arrivals=3 num-server-rounds=2 "
                  "hidden=16 depth=1 epsilon-budget=30 aligner='nessa'")  # DP-SGD rounds (auto: none at 8)
    rc = flwr_run(run_config, 8, home, timeout_s=600, log_path=tmp_path / "flwr.log")
    assert rc == 0, (tmp_path / "flwr.log").read_text()[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # Flower's simulation engine gives a virtual node only its partition id, so every device has
    # the default policy (g = 50): it declines rounds that promise g = 7 (all 8) and 5 (6 sampled).
    # The run still completes through the real apps and writes its folder.
    assert [(r["status"], r["declined"]) for r in summary["rounds"]] == [("skipped", 8), ("skipped", 6)]
    # no round trained an aligner: the gate ships nothing, so the artifact has no deployable ONNX
    assert summary["final"]["gate"]["shipped"] == "none" and (run_dir / "aligner" / "card.json").is_file()
    assert not (run_dir / "aligner" / "aligner.onnx").exists()
    assert our_superlinks(home) == []

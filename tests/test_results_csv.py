"""The results CSVs: one row per run from its summary.json, typed cells that round-trip, and the
committed studies' tables reproduced from the committed CSVs (the docs cite them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations import (
    device_fedavg_table,
    device_level_table,
    ema_tuning_table,
    fedavg_tuning_table,
    fleet_selfset_table,
    fleet_table,
    mechanism_table,
    results_table,
)
from simulations.results_csv import (
    COLUMNS,
    ROUND_COLUMNS,
    main,
    metrics,
    read,
    round_rows,
    rounds_path,
    row,
    upsert,
    write,
)

ROOT = Path(__file__).resolve().parents[1]


def _summary() -> dict[str, Any]:
    return {
        "config": {"num-devices": 1000, "epsilon-budget": 8.0, "aligner": "nessa", "references": False,
                   "not-a-column": "ignored"},
        "rounds": [{"round": 1, "phase": "suffstats", "eer": 0.07, "seconds": 20.0, "declined": 2},
                   {"round": 2, "phase": "dpsgd", "eer": None, "seconds": 0.5, "declined": 1},
                   {"round": 3, "phase": "dpsgd", "eer": 0.06, "seconds": 0.25, "declined": 0}],
        "final": {"eer": 0.06, "gap_closure": 0.6, "linear_start": {"eer": 0.07, "gap_closure": 0.5},
                  "gate": {"shipped": "dp-nessa", "reason": "DP NESSA 5.00 % < linear start 7.00 %"}},
        "privacy": {"epsilon_max": 7.99, "epsilon_median": 7.5, "delta": 1e-5, "devices_within_budget": True},
        "engine": {"name": "fleet", "numerics": "fast", "pairs": 111684, "peak_rss_mib": 5300.5,
                   "noise_plan": {"signal": 7079.1, "dpsgd_sigma": 0.7}},
    }


def test_a_summary_is_one_row_and_a_missing_key_an_empty_cell() -> None:
    r = row(_summary(), "fleet-1000dev-nessa-eps8")
    assert list(r) == [c.name for c in COLUMNS]
    assert r["run"] == "fleet-1000dev-nessa-eps8" and r["num-devices"] == 1000 and r["references"] is False
    assert r["final_eer"] == 0.06 and r["linear_start_gap_closure"] == 0.5 and r["dp_nessa_eer"] is None
    assert r["gate_shipped"] == "dp-nessa" and r["gate_reason"].startswith("DP NESSA")  # type: ignore[union-attr]
    assert r["auto_signal"] == 7079.1 and r["dpsgd_sigma"] == 0.7  # the first studies' noise plan under engine
    assert (r["engine"], r["numerics"], r["pairs"], r["devices"]) == ("fleet", "fast", 111684, 1000)
    assert (r["rounds"], r["dpsgd_rounds"], r["declined"]) == (3, 2, 3)
    assert (r["first_round_eer"], r["first_round_seconds"], r["later_rounds_seconds_mean"]) == (0.07, 20.0, 0.375)
    assert r["epsilon_example_max"] is None and r["privacy-unit"] is None and r["delta"] == 1e-5
    assert metrics(r, "linear_start") == {"eer": 0.07, "min_dcf": None, "sid_top1": None, "gap_closure": 0.5}
    assert metrics(r, "ridge") is None


def test_a_summary_without_an_engine_block_is_the_flower_engine() -> None:
    summary = _summary()
    del summary["engine"]
    summary["noise_plan"] = {"signal": 10.0}
    r = row(summary, "fed-a")
    assert (r["engine"], r["numerics"], r["auto_signal"], r["pairs"]) == ("flower", None, 10.0, None)


def test_only_evaluated_rounds_are_kept() -> None:
    rounds = round_rows(_summary(), "run-a")
    assert [(r["run"], r["round"], r["eer"]) for r in rounds] == [("run-a", 1, 0.07), ("run-a", 3, 0.06)]
    assert list(rounds[0]) == [c.name for c in ROUND_COLUMNS]


@pytest.mark.parametrize(("summary", "message"), [
    ([1, 2], "x/summary.json: not a run summary (no 'config' object)"),
    ({"rounds": []}, "x/summary.json: not a run summary (no 'config' object)"),
    ({"config": {"num-devices": 7.5}}, "x/summary.json: num-devices is 7.5, expected int"),
    ({"config": {"epsilon-budget": "eight"}}, "x/summary.json: epsilon-budget is 'eight', expected float"),
])
def test_a_bad_summary_is_one_error_naming_the_file(summary: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        row(summary, "x", where="x/summary.json")
    assert str(err.value) == message


def test_cells_round_trip_exactly(tmp_path: Path) -> None:
    path = tmp_path / "study.csv"
    r = row(_summary(), "a")
    r["final_eer"] = 0.1 + 0.2  # 0.30000000000000004: every digit survives the CSV
    write(path, [r])
    assert read(path) == [r]


def test_upsert_replaces_a_runs_rows(tmp_path: Path) -> None:
    path = tmp_path / "study.csv"
    upsert(path, [row(_summary(), "a"), row(_summary(), "b")])
    again = row(_summary(), "a")
    again["final_eer"] = 0.05
    assert upsert(path, [again]) == 2
    assert [(r["run"], r["final_eer"]) for r in read(path)] == [("a", 0.05), ("b", 0.06)]


def test_a_csv_with_an_unknown_column_or_a_bad_cell_is_named(tmp_path: Path) -> None:
    path = tmp_path / "study.csv"
    path.write_text("run,final_eer,colour\na,0.1,red\n")
    with pytest.raises(ValueError, match=f"{path}: unknown column\\(s\\) colour"):
        read(path)
    path.write_text("run,final_eer\na,low\n")
    with pytest.raises(ValueError, match=f"{path}: column 'final_eer' holds 'low', expected float"):
        read(path)


def test_a_csv_from_before_a_column_existed_reads_it_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "study.csv"
    path.write_text("run,final_eer\na,0.1\n")
    (r,) = read(path)
    assert r["final_eer"] == 0.1 and r["peak_rss_mib"] is None and len(r) == len(COLUMNS)


def test_the_command_writes_both_csvs_and_names_a_folder_without_a_summary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "fleet-1000dev-nessa-eps8"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(_summary()))
    csv = tmp_path / "results" / "fleet.csv"
    assert main([str(csv), str(run)]) == 0
    assert [r["run"] for r in read(csv)] == [run.name]
    assert len(read(rounds_path(csv), ROUND_COLUMNS)) == 2 and rounds_path(csv).name == "fleet_rounds.csv"
    assert main([str(csv), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"results_csv: error: {tmp_path}/summary.json: no summary.json (not a run folder, or the run " \
                  "has not finished a round)"


def _doc_lines() -> set[str]:
    return {line for name in ("docs/results.md", "README.md", "BENCHMARKS.md")
            for line in (ROOT / name).read_text().splitlines()}


def test_the_committed_tables_reproduce_from_the_committed_csvs() -> None:
    """Every row of the four study tables the docs show, regenerated from results/*.csv."""
    results = ROOT / "results"
    tables = [
        fleet_table.markdown(fleet_table.rows(fleet_table.cells(read(results / "fleet.csv")))),
        device_level_table.markdown(device_level_table.rows(
            device_level_table.cells(read(results / "device_level.csv")), read(results / "fleet.csv"))),
        results_table.table(read(results / "federated.csv")),
        fleet_selfset_table.markdown(fleet_selfset_table.rows(
            fleet_selfset_table.draws(read(results / "fleet_selfset.csv")),
            fleet_selfset_table.references(read(results / "fleet.csv")))),
        device_fedavg_table.markdown(device_fedavg_table.rows(read(results / "device_fedavg.csv"))),
        mechanism_table.table(read(results / "mechanism.csv") + read(results / "fleet_selfset.csv")),
        device_level_table.fedavg_markdown(read(results / "device_level.csv"), read(results / "fleet.csv")),
        fedavg_tuning_table.markdown(read(results / "device_fedavg_tuning.csv"),
                                     read(results / "device_fedavg_tuning_rounds.csv", ROUND_COLUMNS)),
        ema_tuning_table.markdown(read(results / "tuning.csv"), read(results / "tuning_rounds.csv", ROUND_COLUMNS)),
    ]
    docs = _doc_lines()
    for text in tables:
        lines = text.splitlines()
        assert len(lines) > 2
        assert [line for line in lines if line not in docs] == []


@pytest.mark.parametrize("module", [fleet_table, device_level_table])
def test_a_table_without_its_csv_or_without_a_complete_cell_is_one_clear_error(
        module: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    assert module.main([str(missing), *(["--example", str(missing)] if module is device_level_table else [])]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{missing}: no such results CSV")
    lonely = tmp_path / "study.csv"
    write(lonely, [row(_summary(), "fleet-1000dev-linear-eps8"), row(_summary(), "device-1000dev-linear-eps8")])
    assert module.main([str(lonely), *(["--example", str(lonely)] if module is device_level_table else [])]) == 2
    assert "no complete (linear, nessa) pair" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "csv", "table"), [
    ("fleet_study.sh", "results/fleet.csv", "simulations.fleet_table"),
    ("device_level_study.sh", "results/device_level.csv", "simulations.device_level_table"),
    ("quality_table.sh", "results/federated.csv", "simulations.results_table"),
    ("fleet_selfset_study.sh", "results/fleet_selfset.csv", "simulations.fleet_selfset_table"),
    ("device_fedavg_study.sh", "results/device_fedavg.csv", "simulations.device_fedavg_table"),
    ("mechanism_study.sh", "results/mechanism.csv", "simulations.mechanism_table"),
])
def test_each_study_script_writes_ignored_run_folders_and_its_committed_csv(script: str, csv: str, table: str) -> None:
    text = (ROOT / "simulations" / script).read_text()
    assert f"RUNS=runs/studies CSV={csv}" in text and "-m simulations.results_csv" in text
    assert f'-m {table} "$CSV"' in text and (ROOT / csv).is_file() and rounds_path(ROOT / csv).is_file()
    assert "runs/" in (ROOT / ".gitignore").read_text().splitlines()
    assert f"{table} {csv}" in (ROOT / "docs" / "results.md").read_text()


def test_the_update_rule_table_states_each_runs_clip_and_arm(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An adaptive-clip run's row carries the clip its last round stated; the table shows first -> last, a
    fixed-clip run its one clip; a CSV without a run of the study's names is one clear error."""
    adaptive = _summary()
    adaptive["config"].update({"device-update": "fedavg", "clip-target-quantile": 0.5, "device-clip-norm": 0.1,
                               "server-optimizer": "adam-bc", "server-lr": 0.01})
    adaptive["rounds"][1]["clip_norm"], adaptive["rounds"][2]["clip_norm"] = 0.1, 0.0734
    adaptive["final"]["dp_nessa"] = {"eer": 0.3, "gap_closure": -1.5}
    fixed = _summary()
    fixed["config"].update({"device-update": "fedsgd", "device-clip-norm": 0.1, "server-optimizer": "adam",
                            "server-lr": 0.01})
    runs = [row(adaptive, "fedavg-1000dev-fedavg-adaptive-adambc-eps8"), row(fixed, "fedavg-1000dev-fedsgd-eps8")]
    assert runs[0]["last_round_clip"] == 0.0734 and runs[1]["last_round_clip"] is None
    rounds = round_rows(adaptive, "x")
    assert [r["clip_norm"] for r in rounds] == [None, 0.0734]  # the evaluated rounds (1 and 3)
    lines = device_fedavg_table.markdown(device_fedavg_table.rows(runs)).splitlines()
    assert lines[2].startswith("| 1000 | 8 (1e-05) | fedsgd | fedsgd | adam (0.01) | 0.1 (fixed) | 6.00 (0.60) |")
    assert lines[3].startswith("| 1000 | 8 (1e-05) | fedavg-adaptive-adambc | fedavg | adam-bc (0.01) | 0.1 → 0.0734 "
                               "| 30.00 (-1.50) |")
    other = tmp_path / "other.csv"
    write(other, [row(fixed, "device-1000dev-nessa-eps8")])
    assert device_fedavg_table.main([str(other)]) == 2
    assert "no run named fedavg-<n>dev-<arm>-eps<e>" in capsys.readouterr().err


def test_the_large_fleet_fedavg_table_reads_one_run_per_cell_and_the_nearest_reference() -> None:
    """Issue 22's rows: the start and DP-FedAvg of one run, the share against the largest smaller fleet's non-DP
    NESSA (no pooled reference is fitted at 10^5 devices)."""
    run = _summary()
    run["config"].update({"num-devices": 100_000, "budget-split": 0.5, "server-optimizer": "sgd", "server-lr": 0.5})
    run["final"].update({"dp_nessa": {"eer": 0.06, "gap_closure": 0.6}})
    run["noise_plan"] = {"suffstats_sigma": 2.0, "dpsgd_sigma": 3.0}
    refs = []
    for n, gap in ((30_000, 0.94), (10_000, 0.95), (300_000, 0.99)):
        ref = _summary()
        ref["config"]["num-devices"] = n
        ref["final"]["centralised_nessa"] = {"eer": 0.04, "gap_closure": gap}
        refs.append(row(ref, f"fleet-{n}dev-nessa-eps8"))
    text = device_level_table.fedavg_markdown([row(run, "device-100000dev-startfedavg-eps8")], refs)
    [line] = text.splitlines()[2:]
    assert line.startswith("| 100000 | 8 (1e-05) | 0.5 | sgd (0.5) | 7.00 (0.50) | 2 | 2 / 3 |")
    assert "| 6.00 (0.60) | dp-nessa | 0.64 (0.94, 30000 devices) |" in line


def test_a_budget_split_arm_is_its_own_line_of_the_large_fleet_table() -> None:
    """``device-<n>dev-startfedavg-split<s>-eps<e>`` sits beside the 0.5 split's run of the same cell."""
    runs = []
    arms = (("device-100000dev-startfedavg-eps8", 0.5), ("device-100000dev-startfedavg-split0.9-eps8", 0.9))
    for name, split in arms:
        run = _summary()
        run["config"].update({"num-devices": 100_000, "budget-split": split, "server-optimizer": "sgd",
                              "server-lr": 0.1})
        run["noise_plan"] = {"suffstats_sigma": 2.0, "dpsgd_sigma": 3.0}
        runs.append(row(run, name))
    lines = device_level_table.fedavg_markdown(runs, []).splitlines()[2:]
    assert [line.split(" | ")[2] for line in lines] == ["0.5", "0.9"]


def test_a_fedsgd_arm_about_the_mean_says_so_in_the_large_fleet_table() -> None:
    """``DEVICE_UPDATE=fedsgd LOSS_CENTRE=enrollment-mean``: the arm's rounds are named beside its optimiser."""
    run = _summary()
    run["config"].update({"num-devices": 100_000, "budget-split": 0.5, "server-optimizer": "adam",
                          "server-lr": 0.001, "device-update": "fedsgd", "loss-centre": "enrollment-mean"})
    run["noise_plan"] = {"suffstats_sigma": 2.0, "dpsgd_sigma": 3.0}
    [line] = device_level_table.fedavg_markdown([row(run, "device-100000dev-startfedsgd-meanfree-eps8")],
                                                []).splitlines()[2:]
    assert "| adam (0.001); device-update fedsgd; loss-centre enrollment-mean |" in line


def test_a_start_only_run_is_a_line_of_the_large_fleet_table_without_dp_fedavg_figures() -> None:
    """``device-<n>dev-startonly-eps<e>`` (the DP linear start on all of epsilon): no DP-FedAvg round, so its
    step, rounds' sigma and clip are n/a, never a figure the run did not have."""
    run = _summary()
    run["config"].update({"num-devices": 100_000, "budget-split": 1.0, "aligner": "linear",
                          "server-optimizer": "adam", "server-lr": 0.001})
    run["rounds"] = run["rounds"][:1]
    run["final"].update({"gap_closure": 0.5})
    run["final"]["gate"]["shipped"] = "linear-start"
    run["noise_plan"] = {"suffstats_sigma": 0.7, "dpsgd_sigma": 148.0}
    ref = _summary()
    ref["final"]["centralised_nessa"] = {"eer": 0.04, "gap_closure": 0.94}
    text = device_level_table.fedavg_markdown([row(run, "device-100000dev-startonly-eps8")],
                                              [row(ref, "fleet-30000dev-nessa-eps8")])
    [line] = text.splitlines()[2:]
    assert line.startswith("| 100000 | 8 (1e-05) | 1.0 | n/a | 7.00 (0.50) | 0 | 0.7 / n/a | n/a | n/a "
                           "| linear-start | 0.53 (0.94, 1000 devices) |")


def test_another_noise_draw_of_an_arm_is_its_own_line_of_the_large_fleet_table() -> None:
    """``...-eps<e>-draw<k>`` (DRAW=k of the scale study) is a line of its own, numbered in the last column; the
    first draw (no suffix) is draw 1, and neither overwrites the other."""
    runs = []
    for name, eer in (("device-100000dev-startonly-eps8", 0.063), ("device-100000dev-startonly-eps8-draw2", 0.067)):
        run = _summary()
        run["config"].update({"num-devices": 100_000, "budget-split": 1.0, "aligner": "linear"})
        run["rounds"] = run["rounds"][:1]
        run["final"]["linear_start"] = {"eer": eer, "gap_closure": 0.6}
        runs.append(row(run, name))
    lines = device_level_table.fedavg_markdown(runs, []).splitlines()[2:]
    assert [(line.split(" | ")[4], line.split(" | ")[-1]) for line in lines] == [("6.30 (0.60)", "1 |"),
                                                                                 ("6.70 (0.60)", "2 |")]


def test_the_tuning_table_reads_each_arms_curve_and_refuses_a_csv_without_arms(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The start is round 1's EER, the best and last DP-FedAvg rounds come from the rounds CSV; the gate's
    validation EERs and choice from the run's row."""
    summary = _summary()
    summary["final"]["gate"].update({"shipped": "linear-start", "validation_eer": {
        "none": 0.11, "linear-start": 0.08, "dp-nessa": 0.2}})
    summary["rounds"].append({"round": 5, "phase": "dpsgd", "eer": 0.09, "seconds": 0.2, "declined": 0})
    name = "tune-10000dev-seed1-eps60-sgd-0.1-0.05-e1"
    csv = tmp_path / "device_fedavg_tuning.csv"
    write(csv, [row(summary, name)])
    write(rounds_path(csv), round_rows(summary, name), ROUND_COLUMNS)
    assert fedavg_tuning_table.main([str(csv)]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line.startswith("| 10000 | 1 | 60 | sgd (0.1) | fedavg: 0.05, 1, equal |")
    assert "| 7.00 | 6.00 (round 3) | 6.00 (round 3) | 9.00 (round 5) | 11.00 / 8.00 / 20.00 | linear-start |" in line
    long = "tune-10000dev-seed1-eps60-adam-0.001-0.05-e1-r300"  # a long arm's name keeps its rounds
    write(csv, [row(summary, long)])
    write(rounds_path(csv), round_rows(summary, long), ROUND_COLUMNS)
    assert fedavg_tuning_table.main([str(csv)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith(
        "| 10000 | 1 | 60 | adam (0.001) | fedavg: 0.05, 1, equal |")
    summary["config"]["device-weight"] = "pairs"  # a pair-weighted arm (DEVICE_WEIGHT=pairs) says so
    weighed = f"{long}-wpairs"
    write(csv, [row(summary, weighed)])
    write(rounds_path(csv), round_rows(summary, weighed), ROUND_COLUMNS)
    assert fedavg_tuning_table.main([str(csv)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith(
        "| 10000 | 1 | 60 | adam (0.001) | fedavg: 0.05, 1, pairs |")
    summary["config"].update({"device-update": "fedsgd", "device-weight": "equal"})  # DEVICE_UPDATE=fedsgd, no DP
    plain = "tune-10000dev-seed1-epsnone-adam-0.0001-0.05-e1-r100-fedsgd"
    write(csv, [row(summary, plain)])
    write(rounds_path(csv), round_rows(summary, plain), ROUND_COLUMNS)
    assert fedavg_tuning_table.main([str(csv)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith(
        "| 10000 | 1 | none (no DP) | adam (0.0001) | fedsgd: mean gradient over all its pairs | n/a |")
    summary["config"]["loss-centre"] = "enrollment-mean"  # LOSS_CENTRE=enrollment-mean, a second draw by hand
    centred = "tune-10000dev-seed1-eps60-adam-0.001-0.05-e1-r60-fedsgd-meanfree-draw2"
    write(csv, [row(summary, centred)])
    write(rounds_path(csv), round_rows(summary, centred), ROUND_COLUMNS)
    assert fedavg_tuning_table.main([str(csv)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith(
        "| 10000 | 1 | 60 | adam (0.001) | fedsgd: mean gradient over all its pairs; loss-centre enrollment-mean |")
    write(csv, [row(summary, "device-1000dev-nessa-eps8")])
    assert fedavg_tuning_table.main([str(csv)]) == 2
    assert "no run named tune-" in capsys.readouterr().err

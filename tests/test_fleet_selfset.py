"""The self-set fleet study: its table (mean +- sd over noise draws, the gate's choices, the targets, the
"never worse than not updating nor than its own start" check) and its resumable study script."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from simulations import fleet_selfset_table as table
from simulations.results_csv import row, write

ROOT = Path(__file__).resolve().parents[1]


def _summary(eer: float, gap: float, start_eer: float, shipped: str = "dp-nessa", seed: int = 0) -> dict[str, Any]:
    return {
        "config": {"num-devices": 10_000, "epsilon-budget": 3.0, "aligner": "auto", "seed": seed, "sample-rate": 0.04},
        "rounds": [],
        "final": {"eer": eer, "gap_closure": gap, "linear_start": {"eer": start_eer, "gap_closure": 0.6},
                  "dp_nessa": {"eer": eer, "gap_closure": gap}, "sym_before": {"eer": 0.1175, "gap_closure": 0.0},
                  "gate": {"shipped": shipped, "reason": f"{shipped} is best on the validation speakers"}},
        "noise_plan": {"signal": 17_912.4, "aligner": "nessa"},
        "engine": {"name": "fleet", "devices": 10_000},
    }


def _reference() -> dict[str, Any]:
    ref = copy.deepcopy(_summary(0.0375, 0.95, 0.068))
    ref["final"]["centralised_nessa"] = {"eer": 0.0375, "gap_closure": 0.95}
    return ref


def _csvs(tmp_path: Path, summaries: list[dict[str, Any]]) -> tuple[Path, Path]:
    study, ref = tmp_path / "fleet_selfset.csv", tmp_path / "fleet.csv"
    write(study, [row(s, f"selfset-10000dev-eps3-draw{k + 1}") for k, s in enumerate(summaries)])
    write(ref, [row(_reference(), "fleet-10000dev-nessa-eps3")])
    return study, ref


def test_a_cell_is_mean_and_sd_over_its_draws_against_its_target(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    study, ref = _csvs(tmp_path, [_summary(0.045, 0.85, 0.068), _summary(0.047, 0.83, 0.069),
                                  _summary(0.049, 0.81, 0.070)])
    assert table.main([str(study), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("| 10000 | 3 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "gaussian (0.04)" and cells[3] == "3" and cells[4] == "nessa (17912)"
    assert cells[5] == "dp-nessa x3"
    assert cells[8] == "4.70 ± 0.20" and cells[9] == "0.83 ± 0.02" and cells[10] == "0.95"
    assert cells[11] == "0.87 ± 0.02 (≥ 0.90: missed)" and cells[12] == "yes"
    assert "dp-nessa is best on the validation speakers" in out


def test_runs_under_the_integer_mechanism_are_their_own_cell(tmp_path: Path) -> None:
    """selfset-<n>dev-eps<e>-skellam-draw<k> (the default mechanism) never pools with the untagged Gaussian rows."""
    study, ref = _csvs(tmp_path, [_summary(0.045, 0.85, 0.068)])
    skellam = _summary(0.05, 0.80, 0.07)
    skellam["config"]["sample-rate"] = 0.02
    write(study, table.read(study) + [row(skellam, "selfset-10000dev-eps3-skellam-draw1")])
    cells = table.rows(table.draws(table.read(study)), table.references(table.read(ref)))
    assert [(c["mechanism"], c["rates"], c["draws"]) for c in cells] == [("gaussian", [0.04], 1),
                                                                          ("skellam", [0.02], 1)]
    assert "| 10000 | 3 | skellam (0.02) | 1 |" in table.markdown(cells)


def test_rows_accounted_by_the_symmetric_expansion_are_their_own_cell(tmp_path: Path) -> None:
    """selfset-<n>dev-eps<e>-skellam-sym-draw<k> (session 14's accounting) never pools with the -skellam rows
    calibrated under Zhu & Wang's bound."""
    study, ref = _csvs(tmp_path, [_summary(0.045, 0.85, 0.068)])
    old, new = _summary(0.05, 0.80, 0.07), _summary(0.046, 0.84, 0.069)
    old["config"]["sample-rate"] = 0.02
    write(study, table.read(study) + [row(old, "selfset-10000dev-eps3-skellam-draw1"),
                                      row(new, "selfset-10000dev-eps3-skellam-sym-draw1")])
    cells = table.rows(table.draws(table.read(study)), table.references(table.read(ref)))
    assert sorted((c["mechanism"], c["rates"]) for c in cells) == [("gaussian", [0.04]), ("skellam", [0.02]),
                                                                   ("skellam-sym", [0.04])]


def test_rows_with_the_loss_about_the_mean_are_their_own_cell(tmp_path: Path) -> None:
    """selfset-<n>dev-eps<e>-skellam-sym-val400-meanfree-draw<k> (LOSS_CENTRE=enrollment-mean) never pools with the
    plain-loss rows of the same mechanism and validation speakers."""
    study, ref = _csvs(tmp_path, [_summary(0.045, 0.85, 0.068)])
    write(study, table.read(study) + [row(_summary(0.05, 0.80, 0.07), "selfset-10000dev-eps3-skellam-sym-val400-draw1"),
                                      row(_summary(0.04, 0.88, 0.07),
                                          "selfset-10000dev-eps3-skellam-sym-val400-meanfree-draw1")])
    cells = table.rows(table.draws(table.read(study)), table.references(table.read(ref)))
    assert sorted(c["mechanism"] for c in cells) == ["gaussian", "skellam-sym val400", "skellam-sym val400 meanfree"]


@pytest.mark.parametrize(("eer", "gap", "start"), [(0.07, 0.55, 0.068), (0.13, -0.1, 0.14)])
def test_a_draw_worse_than_its_start_or_than_not_updating_is_flagged(tmp_path: Path, eer: float, gap: float,
                                                                     start: float) -> None:
    study, ref = _csvs(tmp_path, [_summary(0.045, 0.85, 0.068), _summary(eer, gap, start)])
    cell = table.rows(table.draws(table.read(study)), table.references(table.read(ref)))[0]
    assert cell["safe"] is False and "| NO |" in table.markdown([cell])


def test_a_study_run_on_another_population_seed_is_one_clear_error(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    study, ref = _csvs(tmp_path, [_summary(0.045, 0.85, 0.068, seed=1)])
    assert table.main([str(study), "--reference", str(ref)]) == 2
    assert "population seed(s) [1]" in capsys.readouterr().err


def test_a_reference_from_another_population_is_one_clear_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    other = _summary(0.045, 0.85, 0.068)
    other["final"]["sym_before"]["eer"] = 0.2
    study, ref = _csvs(tmp_path, [other])
    assert table.main([str(study), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleet_selfset_table: error: 10000 devices: the reference's held-out sym_before EER")
    assert "\n" not in err


def test_the_study_script_is_resumable_and_gives_only_the_fleet_size_and_epsilon() -> None:
    text = (ROOT / "simulations" / "fleet_selfset_study.sh").read_text()
    assert "RUNS=runs/studies CSV=results/fleet_selfset.csv" in text and 'recorded "$name"' in text
    assert 'name="selfset-${n}dev-eps${eps}${tag}-draw$d"' in text and "tag=-skellam-sym" in text
    run_line = next(x for x in text.splitlines() if "fed-nessa\" simulate" in x)
    assert "num-devices" in run_line and "epsilon-budget" in run_line and "aligner" not in run_line
    assert "sample-rate" not in text and "num-server-rounds" not in text and "server-lr" not in text

"""The Kokoro study's tables: the run names the study script writes, the rows they make, the docs' blocks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simulations import kokoro_table as kt
from simulations.results_csv import COLUMNS, Value

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "kokoro_study.sh"


def _row(run: str, **cells: Value) -> dict[str, Value]:
    row: dict[str, Value] = {c.name: None for c in COLUMNS}
    row.update({"run": run, "devices": 140, "linear-start": "suffstats", "gate_shipped": "none",
                "sym_before_eer": 0.2139, "sym_before_gap_closure": 0.0, "sym_after_eer": 0.1083,
                "sym_after_gap_closure": 1.0, "final_eer": 0.2139, "final_gap_closure": 0.0,
                "centralised_nessa_eer": 0.2361, "centralised_nessa_gap_closure": -0.21,
                "ridge_eer": 0.2343, "ridge_gap_closure": -0.19, "dpsgd_rounds": 0})
    row.update(cells)
    return row


def test_every_run_of_the_study_script_has_a_name_the_table_reads() -> None:
    names = re.findall(r'simulate "\$tag-([a-z0-9-]+)"', SCRIPT.read_text())
    assert len(names) == 8
    for name in names:
        m = kt.NAME.search(f"kokoro230v-vfl_dvec-resemblyzer-{name}")
        assert m, name
        kind, eps = m.group(6), m.group(7)
        assert (kind, "nodp" if eps == "nodp" else "eps") in kt.ARMS


def test_the_table_shows_the_largest_corpus_with_each_arm() -> None:
    runs = [
        _row("kokoro230v-vfl_dvec-resemblyzer-fleet-example-nessa-eps8", dp_nessa_eer=0.3028,
             dp_nessa_gap_closure=-0.84, linear_start_eer=0.3361, linear_start_gap_closure=-1.16, dpsgd_rounds=100),
        _row("kokoro230v-vfl_dvec-resemblyzer-flower-example-linear-nodp", linear_start_eer=0.2300,
             linear_start_gap_closure=-0.15),
        _row("kokoro230v-vfl_dvec-resemblyzer-fleet-example-linear-eps8", linear_start_eer=0.2583,
             linear_start_gap_closure=-0.42),
        _row("kokoro100v-vfl_dvec-resemblyzer-fleet-example-linear-eps8", linear_start_eer=0.4,
             linear_start_gap_closure=-2.0),
    ]
    table = kt.federated_table(runs)
    lines = table.splitlines()
    assert lines[0].startswith("Corpus of 230 voices: 140 devices") and "sym_before 21.39 (0.00)" in lines[0]
    body = lines[4:]
    assert len(body) == 3 and "40.00" not in table  # the smaller corpus is left out
    assert "| fleet | example | 8 | DP linear start (all of ε) | 25.83 (-0.42) | – | none: 21.39 (0.00) |" in body[0]
    assert "| DP NESSA | 30.28 (-0.84) | 33.61 (-1.16) |" in body[1] and body[1].endswith("| 100 |")
    assert "| flower | example | ∞ | non-DP linear start | 23.00 (-0.15) |" in body[2]
    assert "40.00 (-2.00)" in kt.federated_table(runs, voices=100)
    with pytest.raises(ValueError, match=r"no run on a 500-voice corpus \(corpora in the CSV: 100, 230\)"):
        kt.federated_table(runs, voices=500)


def _evaluation(sym_before: float, sym_after: float, asym: dict[str, float]) -> dict[str, object]:
    def rows() -> list[dict[str, object]]:
        def gap(e: float) -> float:
            return (sym_before - e) / (sym_before - sym_after)

        return [{"name": n, "eer": e, "gap_closure": gap(e)} for n, e in
                [("sym_before", sym_before), ("sym_after", sym_after), *((f"asym_{m}", e) for m, e in asym.items())]]

    return {"scenarios": {s: {"splits": [{"rows": rows()}]} for s in ("runtime-upgrade", "enrollment-upgrade")}}


def test_the_centralised_table_reads_the_evaluate_json(tmp_path: Path) -> None:
    for folder in kt.CENTRALISED.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "evaluation.json").write_text(json.dumps(_evaluation(0.2, 0.1, {"ridge": 0.15})))
    lines = kt.centralised_table(tmp_path).splitlines()
    assert len(lines) == 2 + 2 * len(kt.CENTRALISED)
    assert lines[2] == ("| resemblyzer → CAM++ | runtime upgrade | 20.00 | 10.00 | 15.00 (0.50) "
                        "| n/a | n/a | n/a | n/a |")
    (tmp_path / "kokoro-campp-vfl" / "evaluation.json").unlink()
    with pytest.raises(FileNotFoundError, match="kokoro-campp-vfl/evaluation.json: no centralised table"):
        kt.centralised_table(tmp_path)


def test_the_docs_blocks_are_rewritten_between_their_markers() -> None:
    start, end = kt.MARKERS["federated"]
    text = f"before\n{start}: python -m simulations.kokoro_table -->\nold table\n{end}\nafter\n"
    out = kt.replace_block(text, "federated", "| new |", "results.md")
    assert out == f"before\n{start}: python -m simulations.kokoro_table -->\n| new |\n{end}\nafter\n"
    with pytest.raises(ValueError, match="results.md: no '<!-- kokoro centralised table ...'"):
        kt.replace_block(text, "centralised", "x", "results.md")
    tables = {"federated": "| f |", "centralised": "| c |"}
    assert "| f |" in kt.rewrite(text, tables, "results.md") and "| c |" not in kt.rewrite(text, tables, "x")
    with pytest.raises(ValueError, match="README.md: no kokoro table markers"):
        kt.rewrite("no markers here\n", tables, "README.md")

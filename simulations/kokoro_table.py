"""The Kokoro-voices study's tables (docs/results.md "Real-model population (Kokoro voices)").

Reads the federated study's CSV (``results/kokoro_federated.csv``: runs
``kokoro<V>v-<old>-<new>-<engine>-<unit>-<linear|nessa>-<eps<e>|nodp>`` of ``simulations/kokoro_study.sh``)
and the centralised evaluate tables beside it (``results/kokoro-*/evaluation.json``). By default the
largest corpus in the CSV (most voices) is shown; every figure is on the corpus's held-out voices.

    python -m simulations.kokoro_table results/kokoro_federated.csv [--voices V] [--docs FILE ...]

``--docs`` rewrites each table whose markers the file holds (docs/results.md: the federated one;
data/kokoro-voices/README.md: the centralised one); the prose around them is not touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.results_csv import Value, eer_gap, metrics, number, read

NAME = re.compile(r"kokoro(\d+)v-([a-z_]+)-([a-z_]+)-(fleet|flower)-(example|device)-(linear|nessa)-(eps[\d.]+|nodp)$")
#: Each federated table row's arm: the aligner that run trains (its own figures, whatever the gate shipped).
ARMS = {("linear", "eps"): ("DP linear start (all of ε)", "linear_start"),
        ("linear", "nodp"): ("non-DP linear start", "linear_start"),
        ("nessa", "eps"): ("DP NESSA", "dp_nessa")}
FED_HEADER = ("| old → new | engine | unit | ε | arm | arm EER % (gap) | start under it (30 % ε) "
              "| gate: shipped, EER % (gap) | pooled non-DP NESSA | pooled non-DP ridge | DP-SGD rounds |")
FED_ALIGN = "|---|---|---|---:|---|---|---|---|---|---|---:|"
#: The centralised evaluate tables, (old, new) -> folder (data/kokoro-voices/README.md's commands).
CENTRALISED = {("resemblyzer", "campp"): "kokoro-campp-resemblyzer", ("vfl_dvec", "campp"): "kokoro-campp-vfl",
               ("vfl_dvec", "resemblyzer"): "kokoro-resemblyzer-vfl"}
CEN_METHODS = ("ridge", "nessa", "nessa-shared", "speaker-logit", "procrustes")
CEN_HEADER = ("| old → new | scenario | sym_before | sym_after | ridge | NESSA | NESSA-shared | speaker-logit "
              "| Procrustes |")
CEN_ALIGN = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
MARKERS = {"federated": ("<!-- kokoro federated table", "<!-- end kokoro federated table -->"),
           "centralised": ("<!-- kokoro centralised table", "<!-- end kokoro centralised table -->")}
LABEL = {"campp": "CAM++", "resemblyzer": "resemblyzer", "vfl_dvec": "vfl_dvec"}


def runs_by_voices(runs: Sequence[dict[str, Value]]) -> dict[int, list[tuple[re.Match[str], dict[str, Value]]]]:
    """The study's rows grouped by the corpus's voice count (in the run name)."""
    out: dict[int, list[tuple[re.Match[str], dict[str, Value]]]] = {}
    for r in runs:
        m = NAME.search(str(r["run"]))
        if m:
            out.setdefault(int(m.group(1)), []).append((m, r))
    return out


def _pair(old: str, new: str) -> str:
    return f"{LABEL[old]} → {LABEL[new]}"


def federated_rows(found: list[tuple[re.Match[str], dict[str, Value]]]) -> list[str]:
    """One line per run, by model pair, then engine (fleet first), unit and arm."""
    lines = []
    order = {"fleet": 0, "flower": 1, "example": 0, "device": 1, "linear": 0, "nessa": 1}
    for m, r in sorted(found, key=lambda mr: (mr[0].group(2), mr[0].group(3), order[mr[0].group(4)],
                                             order[mr[0].group(5)], mr[0].group(7) == "nodp",
                                             order[mr[0].group(6)])):
        _, old, new, engine, unit, kind, eps = m.groups()
        label, row = ARMS[(kind, "nodp" if eps == "nodp" else "eps")]
        start = metrics(r, "linear_start") if kind == "nessa" and r["linear-start"] == "suffstats" else None
        shipped = str(r["gate_shipped"] or "n/a")
        rounds = number(r["dpsgd_rounds"])
        lines.append(
            f"| {_pair(old, new)} | {engine} | {unit} | {'∞' if eps == 'nodp' else eps[3:]} | {label} "
            f"| {eer_gap(metrics(r, row))} | {eer_gap(start) if start else '–'} "
            f"| {shipped}: {eer_gap(metrics(r, 'final'))} | {eer_gap(metrics(r, 'centralised_nessa'))} "
            f"| {eer_gap(metrics(r, 'ridge'))} | {0 if rounds is None else int(rounds)} |")
    return lines


def federated_table(runs: Sequence[dict[str, Value]], voices: int | None = None) -> str:
    """The federated table of one corpus size (the largest in the CSV unless ``voices``)."""
    groups = runs_by_voices(runs)
    if not groups:
        raise ValueError("no kokoro study run in the CSV (run names kokoro<V>v-...)")
    v = max(groups) if voices is None else voices
    if v not in groups:
        raise ValueError(f"no run on a {v}-voice corpus (corpora in the CSV: {', '.join(map(str, sorted(groups)))})")
    first = groups[v][0][1]
    sym = {(m.group(2), m.group(3)): r for m, r in groups[v]}
    head = [f"Corpus of {v} voices: {first['devices']} devices (one per training voice), "
            + "; ".join(f"{_pair(o, n)}: sym_before {eer_gap(metrics(r, 'sym_before'))}, "
                        f"sym_after {eer_gap(metrics(r, 'sym_after'))}" for (o, n), r in sorted(sym.items())) + "."]
    return "\n".join([*head, "", FED_HEADER, FED_ALIGN, *federated_rows(groups[v])])


def _held_out_rows(evaluation: dict[str, Any], scenario: str) -> dict[str, dict[str, Any]]:
    splits = evaluation["scenarios"][scenario]["splits"]
    if len(splits) != 1:
        raise ValueError(f"{scenario}: expected one held-out split, got {len(splits)}")
    return {row["name"]: row for row in splits[0]["rows"]}


def centralised_table(results: Path) -> str:
    """Held-out EER % (gap closure) of each one-sided update, from the evaluate tables' JSON."""
    lines = [CEN_HEADER, CEN_ALIGN]
    for (old, new), folder in CENTRALISED.items():
        path = results / folder / "evaluation.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no centralised table (run simulations/kokoro_study.sh)")
        evaluation = json.loads(path.read_text())
        for scenario, title in (("runtime-upgrade", "runtime upgrade"), ("enrollment-upgrade", "enrollment upgrade")):
            rows = _held_out_rows(evaluation, scenario)

            def cell(name: str, rows: dict[str, dict[str, Any]] = rows) -> str:
                row = rows.get(name)
                return "n/a" if row is None or row["eer"] is None else eer_gap(row)

            lines.append(f"| {_pair(old, new)} | {title} | {100 * rows['sym_before']['eer']:.2f} "
                         f"| {100 * rows['sym_after']['eer']:.2f} | "
                         + " | ".join(cell(f"asym_{m}") for m in CEN_METHODS) + " |")
    return "\n".join(lines)


def replace_block(text: str, key: str, table: str, where: str) -> str:
    """``text`` with the lines between ``key``'s two markers replaced by ``table``."""
    start, end = MARKERS[key]
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{where}: no '{start} ...' / '{end}' markers")
    i = text.index("\n", i) + 1
    return text[:i] + table + "\n" + text[j:]


def rewrite(text: str, tables: dict[str, str], where: str) -> str:
    """``text`` with every table whose markers it holds rewritten; a file with none is an error."""
    present = [key for key, (start, _) in MARKERS.items() if start in text]
    if not present:
        raise ValueError(f"{where}: no kokoro table markers ({', '.join(s for s, _ in MARKERS.values())})")
    for key in present:
        text = replace_block(text, key, tables[key], where)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--voices", type=int, default=None, help="the corpus size to show (default: the largest)")
    p.add_argument("--results", type=Path, default=Path("results"), help="folder of the centralised tables")
    p.add_argument("--docs", type=Path, action="append", default=[],
                   help="rewrite the tables whose markers this file holds (repeatable)")
    args = p.parse_args(argv)
    try:
        tables = {"federated": federated_table(read(args.csv), args.voices),
                  "centralised": centralised_table(args.results)}
        for doc in args.docs:
            doc.write_text(rewrite(doc.read_text(encoding="utf-8"), tables, str(doc)), encoding="utf-8")
    except (OSError, ValueError, KeyError) as exc:
        print(f"kokoro_table: error: {exc}", file=sys.stderr)
        return 2
    print(tables["federated"] + "\n\n" + tables["centralised"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
